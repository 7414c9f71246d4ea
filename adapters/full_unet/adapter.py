"""Full U-Net fine-tuning: the adapter *is* the U-Net's weights.

attach = unfreeze the base U-Net (remembering its weights, so ``detach`` and
``set_scale(0)`` give the base back); save = ``unet.save_pretrained(out/unet)`` plus
``condkit_adapter.json``; load = put saved weights into the base U-Net (same
architecture required). ``set_scale(s)`` blends ``original + s * (trained - original)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from condkit.adapters.base import ADAPTER_CONFIG_FILE, Adapter
from condkit.adapters.full_unet.config import FullUnetConfig
from condkit.errors import UserError

if TYPE_CHECKING:
    from condkit.base import BaseModel

UNET_FOLDER = "unet"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class FullUnetAdapter(Adapter):
    """Trains (or carries) every weight of the base U-Net."""

    kind = "full_unet"
    config_class = FullUnetConfig

    def __init__(self, config: FullUnetConfig | None = None, name: str = "default") -> None:
        super().__init__(config or FullUnetConfig(), name)
        self._original: dict[str, torch.Tensor] | None = None  # base weights before attach
        self._tuned: dict[str, torch.Tensor] | None = None  # weights at scale 1, once set_scale is used

    # ---- attach and detach -------------------------------------------------------
    def attach(self, base: BaseModel) -> None:
        """Unfreeze ``base.unet`` for training, remembering its current weights."""
        self.check_unattached()
        self.base = base
        self._original = {k: v.detach().clone() for k, v in base.unet.state_dict().items()}
        base.unet.requires_grad_(True)

    def detach(self) -> None:
        """Put the remembered base weights back and freeze the U-Net again."""
        unet = self._unet()
        unet.load_state_dict(self._original)
        unet.requires_grad_(False)
        self.base, self._original, self._tuned = None, None, None

    def set_scale(self, scale: float) -> None:
        """Blend the weights: ``original + scale * (tuned - original)`` (0 = base, 1 = tuned)."""
        unet = self._unet()
        if self._tuned is None:
            self._tuned = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        blended = {k: self._original[k] + scale * (self._tuned[k] - self._original[k]) if v.is_floating_point() else v for k, v in self._tuned.items()}
        with torch.no_grad():
            unet.load_state_dict(blended)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every U-Net parameter, in ``named_parameters`` order (stable for checkpoints)."""
        return [p for _, p in self._unet().named_parameters()]

    # ---- validation --------------------------------------------------------------
    def validate(self, base: BaseModel, validation: Any, step: int) -> tuple[list[list[Any]], dict[str, float]]:
        """Sample the validation prompts; score them when they are all shapes-world captions."""
        rows, metrics = super().validate(base, validation, step)
        if not (rows and self.config.shapes_metrics):
            return rows, metrics
        import numpy as np

        from condkit.train.shapes_metrics import read_image, score_readings
        from condkit.train.shapes_world import parse_caption

        labels = [parse_caption(prompt) for prompt in validation.prompts]
        if all(labels):
            readings = [read_image(np.asarray(image)) for image in rows[0]]
            metrics = {**metrics, **score_readings(readings, labels)}
        return rows, metrics

    # ---- persistence -------------------------------------------------------------
    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``out_dir/unet/`` (diffusers ``save_pretrained``) and ``condkit_adapter.json``."""
        from condkit.io import atomic_folder

        out_dir = Path(out_dir)
        final = out_dir / UNET_FOLDER
        with atomic_folder(final) as tmp:  # save_pretrained writes several files
            self._unet().save_pretrained(tmp, safe_serialization=True)
        described = self.save_description(out_dir, format="diffusers_unet", weights=f"{UNET_FOLDER}/{WEIGHTS_NAME}")
        return [final / "config.json", final / WEIGHTS_NAME, described]

    @classmethod
    def load(cls, path: str | Path, base: BaseModel, name: str = "default") -> FullUnetAdapter:
        """Put the U-Net weights saved at ``path`` into ``base.unet`` (frozen).

        Args:
            path: a folder holding ``unet/`` (as :meth:`save` writes) or a U-Net folder itself.
            base: the base whose U-Net has the same architecture.
            name: instance name.

        Raises:
            UserError: no weights there, or a key or shape does not match the base U-Net.
        """
        from condkit.io import load_state_dict

        weights = _weights_file(Path(path))
        if weights is None:
            raise UserError(f"{path}: no U-Net weights ({UNET_FOLDER}/{WEIGHTS_NAME} or {WEIGHTS_NAME})")
        state = load_state_dict(weights)
        expected = base.unet.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            key = (missing or unexpected)[0]
            what = "missing" if missing else "unexpected"
            raise UserError(f"{weights}: {len(missing)} missing and {len(unexpected)} unexpected U-Net keys for this base (first {what}: {key})")
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise UserError(f"{weights}: {key} has shape {tuple(tensor.shape)}, the base U-Net has {tuple(expected[key].shape)}")
        adapter = cls(_saved_config(Path(path)), name=name)
        adapter.attach(base)
        with torch.no_grad():
            base.unet.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
        base.unet.requires_grad_(False)
        return adapter

    @classmethod
    def can_load(cls, path: str | Path) -> bool:
        """A folder with ``unet/`` U-Net weights, or a U-Net folder itself (not another
        diffusers model's folder, e.g. a T2I-Adapter's: its ``config.json`` names the class)."""
        weights = _weights_file(Path(path))
        if weights is None:
            return False
        import json

        try:
            class_name = json.loads((weights.parent / "config.json").read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return True  # no readable config: the weights decide, as before
        return class_name in (None, "UNet2DConditionModel")

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        """Format, parameter count and the U-Net's architecture keys."""
        import json

        from condkit.io import load_state_dict

        weights = _weights_file(Path(path))
        if weights is None:
            raise UserError(f"{path}: no U-Net weights ({UNET_FOLDER}/{WEIGHTS_NAME} or {WEIGHTS_NAME})")
        config = json.loads((weights.parent / "config.json").read_text()) if (weights.parent / "config.json").is_file() else {}
        return {
            "kind": cls.kind,
            "format": "diffusers_unet",
            "weights": str(weights),
            "parameters": sum(t.numel() for t in load_state_dict(weights).values()),
            "block_out_channels": config.get("block_out_channels"),
            "cross_attention_dim": config.get("cross_attention_dim"),
            "sample_size": config.get("sample_size"),
        }

    def _unet(self):
        self.check_attached()
        return self.base.unet


def _weights_file(path: Path) -> Path | None:
    for candidate in (path / UNET_FOLDER / WEIGHTS_NAME, path / WEIGHTS_NAME):
        if candidate.is_file():
            return candidate
    return None


def _saved_config(path: Path) -> FullUnetConfig:
    return FullUnetAdapter.saved_config(path / ADAPTER_CONFIG_FILE) or FullUnetConfig()
