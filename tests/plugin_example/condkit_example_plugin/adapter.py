"""``attn_bias``: a learned bias added to the output of the U-Net's attention layers.

Each chosen attention layer gets a processor (diffusers' hook point
``unet.set_attn_processor``) that runs the layer's own processor and adds
``scale * bias``, one value per output channel. The biases start at zero, so a fresh
adapter leaves the base exactly as it was; ``detach`` puts the original processors back.
Small on purpose: it shows the whole contract (config, attach/detach, scale, training,
save/load with ``condkit_adapter.json``, describe) in one file outside condkit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from condkit.adapters.base import ADAPTER_CONFIG_FILE, Adapter, AdapterConfig, config_field
from condkit.errors import UserError

WEIGHTS_NAME = "attn_bias.safetensors"
FORMAT = "condkit_example_attn_bias"
LAYER_CHOICES = ("cross", "all")
PROCESSOR_SUFFIX = ".processor"


@dataclasses.dataclass(frozen=True)
class AttnBiasConfig(AdapterConfig):
    """Settings of the ``attn_bias`` kind."""

    scale: float = config_field(1.0, "strength of the learned bias; 0 = the base's own output", range=(0.0, 10.0))
    layers: str = config_field("cross", "which attention layers get a bias: cross (attn2 only) or all", choices=LAYER_CHOICES)


class BiasedProcessor(torch.nn.Module):
    """An attention processor: the layer's own processor, then ``+ scale * bias``.

    Args:
        inner: the processor it wraps (kept, so detach can put it back).
        channels: the attention output's channels.
    """

    def __init__(self, inner: Any, channels: int) -> None:
        super().__init__()
        self.inner = inner
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        self.scale = 1.0

    def forward(self, attn, hidden_states, *args, **kwargs):
        """Run the wrapped processor and add the bias over the channel (last) dimension."""
        out = self.inner(attn, hidden_states, *args, **kwargs)  # (b, seq, channels)
        return out + self.scale * self.bias.to(out.dtype)


class AttnBiasAdapter(Adapter):
    """Learned per-channel biases on the U-Net's attention outputs."""

    kind = "attn_bias"
    config_class = AttnBiasConfig

    def __init__(self, config: AttnBiasConfig | None = None, name: str = "default") -> None:
        super().__init__(config or AttnBiasConfig(), name)
        self.processors: dict[str, BiasedProcessor] = {}
        self._original: dict[str, Any] = {}

    def attach(self, base) -> None:
        """Wrap the chosen attention layers' processors (biases zero: the base is unchanged)."""
        self.check_unattached()
        unet = base.unet
        self._original = dict(unet.attn_processors)
        chosen = [n for n in self._original if self.config.layers == "all" or ".attn2." in n]
        if not self.processors:
            parameter = next(unet.parameters())
            for name in chosen:
                layer = unet.get_submodule(name.removesuffix(PROCESSOR_SUFFIX))
                channels = layer.to_out[0].out_features
                self.processors[name] = BiasedProcessor(self._original[name], channels).to(parameter.device)
        unet.set_attn_processor({**self._original, **self.processors})
        self.base = base
        self.set_scale(self.config.scale)

    def detach(self) -> None:
        """Put the original processors back."""
        self.check_attached()
        self.base.unet.set_attn_processor(self._original)
        self.base = None

    def set_scale(self, scale: float) -> None:
        """Multiply every bias by ``scale`` (0 = the base's own output)."""
        for processor in self.processors.values():
            processor.scale = float(scale)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """One bias per wrapped layer, in layer order."""
        return [processor.bias for processor in self.processors.values()]

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``attn_bias.safetensors`` (layer name -> bias) and ``condkit_adapter.json``."""
        from condkit.io import save_safetensors_atomic

        out_dir = Path(out_dir)
        tensors = {name: processor.bias.detach().float().cpu().contiguous() for name, processor in self.processors.items()}
        save_safetensors_atomic(tensors, out_dir / WEIGHTS_NAME)
        described = self.save_description(out_dir, format=FORMAT, weights=WEIGHTS_NAME)
        return [out_dir / WEIGHTS_NAME, described]

    @classmethod
    def load(cls, path: str | Path, base, name: str = "default") -> AttnBiasAdapter:
        """Load a folder :meth:`save` wrote and attach it to ``base`` (frozen).

        Raises:
            UserError: no weights, or a layer the base does not have.
        """
        from condkit.io import load_state_dict

        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        if not (folder / WEIGHTS_NAME).is_file():
            raise UserError(f"{folder}: no {WEIGHTS_NAME}")
        state = load_state_dict(folder / WEIGHTS_NAME)
        adapter = cls(cls.saved_config(folder / ADAPTER_CONFIG_FILE), name)
        adapter.attach(base)
        missing = sorted(set(adapter.processors) ^ set(state))
        if missing:
            adapter.detach()
            raise UserError(f"{folder / WEIGHTS_NAME}: layer {missing[0]!r} does not match this base's attention layers")
        with torch.no_grad():
            for layer, tensor in state.items():
                adapter.processors[layer].bias.copy_(tensor)
        for parameter in adapter.trainable_parameters():
            parameter.requires_grad_(False)
        return adapter

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        """Format, number of layers and the mean absolute bias."""
        from condkit.io import load_state_dict

        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        state = load_state_dict(folder / WEIGHTS_NAME)
        values = torch.cat([t.flatten() for t in state.values()])
        return {"kind": cls.kind, "format": FORMAT, "layers": len(state), "mean_abs_bias": float(values.abs().mean())}
