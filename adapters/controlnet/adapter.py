"""The ControlNet adapter: a trainable copy of the base U-Net's encoder driven by a map.

The branch is diffusers' :class:`~diffusers.ControlNetModel`, built with
``ControlNetModel.from_unet`` from the base U-Net (encoder + middle block copied, zero
1x1 convolutions on every output, a hint encoder downsampling the condition map to the
latent size). It never touches the U-Net: its outputs enter through the U-Net's
``down_block_additional_residuals`` / ``mid_block_additional_residual`` arguments, so
LoRA (peft layers inside the U-Net) and IP-Adapter (attention processors) compose with
it in any order. At step 0 the zero convolutions make every residual exactly zero, so
the controlled model equals the base bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from condkit.adapters.base import Adapter, GenerateInput
from condkit.adapters.base import AdapterStateError
from condkit.adapters.controlnet import formats
from condkit.adapters.controlnet.branch import check_fits, controlnet_from_unet
from condkit.adapters.controlnet.config import ControlNetConfig
from condkit.adapters.controlnet.data import CONDITION_INPUT
from condkit.errors import UserError

if TYPE_CHECKING:
    from diffusers import ControlNetModel

    from condkit.base import BaseModel
    from condkit.families import Conditioning

# Pipeline arguments that take one value per ControlNet when several are attached; a
# single ControlNet passes its value unwrapped, as diffusers expects.
PER_CONTROLNET_KEYS = ("image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")


def to_condition_image(condition: Any) -> Image.Image:
    """A condition map given as a path, PIL image or (H, W, 3) uint8 array, as RGB PIL.

    Args:
        condition: the map (files are read like training images: any mode, EXIF applied).
    """
    from condkit.train.data import load_rgb

    return Image.fromarray(np.ascontiguousarray(load_rgb(condition)))


class ControlNetAdapter(Adapter):
    """A ControlNet branch on a base (see the module docstring).

    Args:
        config: the ControlNet config.
        name: instance name (several ControlNets on one base need distinct names).
        controlnet: an existing branch (from :meth:`load`); None builds one on :meth:`attach`.
    """

    kind = "controlnet"
    config_class = ControlNetConfig
    sample_inputs = (CONDITION_INPUT,)
    generate_inputs = (
        GenerateInput(
            option="--control-image",
            key="control_images",
            help="condition map for each ControlNet, in --adapter order",
            label="ControlNet",
            one_per_adapter=True,
        ),
    )
    pipeline_component = "controlnet"
    pipeline_variant = "ControlNet"  # StableDiffusionControlNetPipeline, StableDiffusionXLControlNetImg2ImgPipeline, ...

    def __init__(self, config: ControlNetConfig, name: str = "default", controlnet: ControlNetModel | None = None) -> None:
        super().__init__(config, name)
        self.controlnet = controlnet
        self.scale = float(config.conditioning_scale)

    # ---- attach and detach -------------------------------------------------------
    def attach(self, base: BaseModel) -> None:
        """Build the branch from ``base`` (or ``config.init_from``) if there is none yet, and check it fits."""
        self.check_unattached()
        if self.controlnet is None:
            if self.config.init_from:
                self.controlnet = formats.read_controlnet(self.config.init_from, base, self.config).requires_grad_(True)
            else:
                hint_channels = self.config.hint_channels(base.vae_scale_factor)
                self.controlnet = controlnet_from_unet(base.unet, hint_channels, self.config)
        check_fits(self.controlnet, base, self.config.init_from or f"controlnet {self.name}")
        self.base = base

    def detach(self) -> None:
        """Forget the base; the U-Net was never modified, so nothing else to undo."""
        self.base = None

    def set_scale(self, scale: float) -> None:
        """Set the residual scale (``controlnet_conditioning_scale``; 0 = the base alone)."""
        self.scale = float(scale)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter of the branch (the base stays locked)."""
        return list(self._branch().parameters())

    def trainable_modules(self) -> list[torch.nn.Module]:
        """The branch, which the loop prepares with accelerate and keeps in float32."""
        return [self._branch()]

    def _branch(self) -> ControlNetModel:
        if self.controlnet is None:
            raise AdapterStateError(f"controlnet adapter {self.name!r} has no branch yet; attach it to a base first")
        return self.controlnet

    # ---- training hooks ----------------------------------------------------------
    def encode_extras(self, batch: dict[str, Any], base: BaseModel) -> dict[str, torch.Tensor]:
        """Pass the batch's condition maps through (the hint encoder trains, so nothing to precompute).

        Args:
            batch: needs ``condition``, (b, C, H, W) float in [0, 1] at image resolution.
            base: unused.
        """
        from condkit.adapters.controlnet.data import batch_condition_maps

        return batch_condition_maps(batch, f"controlnet {self.name}")

    def unet_kwargs(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeds: torch.Tensor,
        extras: dict[str, torch.Tensor],
        conditioning: Conditioning | None = None,
    ) -> dict[str, Any]:
        """Run the branch and return its residuals for the U-Net call.

        The branch is conditioned as the U-Net is: the text states, plus the model
        family's own U-Net arguments (SDXL: ``added_cond_kwargs`` with the pooled
        ``text_embeds`` and ``time_ids``, which ``ControlNetModel.from_unet`` kept the
        ``text_time`` embedding for), as diffusers' ``train_controlnet_sdxl.py`` and
        ``StableDiffusionXLControlNetPipeline`` call it.

        Args:
            noisy_latents: (b, 4, h, w) noisy latents.
            timesteps: (b,) timesteps.
            text_embeds: (b, 77, d) text embeddings (after caption dropout).
            extras: ``condition``, (b, C, h * f, w * f) float in [0, 1], f the VAE factor.
            conditioning: the family's conditioning of the batch; None = text only (SD 1.x/2.x).
        """
        controlnet = self._branch()
        condition = extras["condition"]
        factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
        if tuple(condition.shape[-2:]) != tuple(s * factor for s in noisy_latents.shape[-2:]):
            raise ValueError(
                f"condition maps {tuple(condition.shape[-2:])} do not match latents {tuple(noisy_latents.shape[-2:])} x {factor}"
            )
        dtype = controlnet.dtype
        family_kwargs = dict(conditioning.to(dtype=dtype).unet_kwargs) if conditioning is not None else {}
        down, mid = controlnet(
            noisy_latents.to(dtype),
            timesteps,
            encoder_hidden_states=text_embeds.to(dtype),
            controlnet_cond=condition.to(device=noisy_latents.device, dtype=dtype),
            conditioning_scale=self.scale,
            return_dict=False,
            **family_kwargs,
        )
        # down: one (b, c_i, h_i, w_i) residual per U-Net skip connection; mid: (b, c, h/2^k, w/2^k)
        return {
            "down_block_additional_residuals": [r.to(noisy_latents.dtype) for r in down],
            "mid_block_additional_residual": mid.to(noisy_latents.dtype),
        }

    # ---- inference hooks ---------------------------------------------------------
    def pipeline_components(self) -> dict[str, Any]:
        """``{"controlnet": branch}`` for ``StableDiffusionControlNetPipeline``."""
        return {"controlnet": self._branch()}

    @classmethod
    def combine_pipeline_components(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One ``controlnet`` component: the branch, or a ``MultiControlNetModel`` of several."""
        branches = [part["controlnet"] for part in parts]
        if len(branches) == 1:
            return {"controlnet": branches[0]}
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        return {"controlnet": MultiControlNetModel(branches)}

    @classmethod
    def combine_pipeline_kwargs(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Several ControlNets' arguments as diffusers takes them: a list per
        :data:`PER_CONTROLNET_KEYS` key, and ``guess_mode`` on if any branch asks for it."""
        if len(parts) == 1:
            return dict(parts[0])
        combined: dict[str, Any] = {}
        for part in parts:
            for key, value in part.items():
                if key in PER_CONTROLNET_KEYS:
                    combined.setdefault(key, []).append(value)
                elif key == "guess_mode":  # one flag for the pipeline
                    combined[key] = bool(combined.get(key)) or bool(value)
                else:
                    combined[key] = value
        return combined

    @classmethod
    def combine_unet_kwarg(cls, key: str, first: Any, second: Any) -> Any:
        """Several ControlNets' residuals add up, as diffusers' ``MultiControlNetModel`` sums them.

        Args:
            key: ``down_block_additional_residuals`` (a list of (b, c_i, h_i, w_i), one per
                skip connection) or ``mid_block_additional_residual`` ((b, c, h', w')).
            first: the residuals so far.
            second: this branch's residuals.
        """
        if key == "down_block_additional_residuals":
            return [a + b for a, b in zip(first, second, strict=True)]
        if key == "mid_block_additional_residual":
            return first + second
        return super().combine_unet_kwarg(key, first, second)

    def pipeline_call_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The pipeline arguments for this branch.

        Args:
            inputs: the generate inputs: ``control_images`` (one map per ControlNet, in
                adapter order; path, PIL image or array) and ``index`` (this adapter's
                position among the ControlNets), or ``condition`` (this branch's map);
                optional ``preprocessor`` (the map is then computed from the given image)
                and overrides ``conditioning_scale``, ``guess_mode``,
                ``control_guidance_start``, ``control_guidance_end``.
        """
        condition = inputs.get("condition")
        if condition is None:
            maps, index = inputs.get("control_images") or [], int(inputs.get("index", 0))
            if index >= len(maps):
                raise UserError(
                    f"controlnet {self.name}: no condition map for ControlNet number {index + 1} "
                    f"({len(maps)} given; pass one --control-image per ControlNet, in --adapter order)"
                )
            condition = maps[index]
        image = to_condition_image(condition)
        if inputs.get("preprocessor"):
            from condkit.preprocessors import get_preprocessor

            image = Image.fromarray(get_preprocessor(inputs["preprocessor"])(image))
        return {
            "image": image,
            "controlnet_conditioning_scale": float(inputs.get("conditioning_scale", self.scale)),
            "guess_mode": bool(inputs.get("guess_mode", self.config.guess_mode)),
            "control_guidance_start": float(inputs.get("control_guidance_start", self.config.control_guidance_start)),
            "control_guidance_end": float(inputs.get("control_guidance_end", self.config.control_guidance_end)),
        }

    # ---- validation --------------------------------------------------------------
    def validate(self, base: BaseModel, validation_config: Any, step: int) -> tuple[list[list[Image.Image]], dict[str, float]]:
        """Sample on fixed condition maps; rows are (condition | output), metrics the edge fidelity.

        Args:
            base: the base the branch is attached to.
            validation_config: the recipe's ``validation`` block: ``prompts``, ``images``
                (condition-map files; held-out shapes-world maps when empty),
                ``num_inference_steps``, ``guidance_scale``.
            step: the training step (unused: the maps and seed are fixed so steps compare).
        """
        from condkit.adapters.controlnet.generate import validate_on_condition_maps

        return validate_on_condition_maps(self, base, validation_config, self.generate_inputs[0].key)

    @classmethod
    def find_records(cls, data: Any) -> list:
        """Training records for ``data.path`` in any ControlNet layout (see :mod:`.data`)."""
        from condkit.adapters.controlnet.data import find_pair_records

        return find_pair_records(data)

    # ---- persistence -------------------------------------------------------------
    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``out_dir/controlnet/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``).

        ``ControlNetModel.from_pretrained(out_dir / "controlnet")`` loads it in a plain
        diffusers install; ``condkit_adapter.json`` beside the weights records the
        condkit config and the base fingerprint.
        """
        base_fingerprint = self.base.fingerprint() if self.base is not None else None
        return formats.write_diffusers_folder(
            self._branch(), Path(out_dir) / formats.EXPORT_SUBFOLDER, self.config, base_fingerprint
        )

    @classmethod
    def load(cls, path: str | Path, base: BaseModel, name: str = "default") -> ControlNetAdapter:
        """Load a ControlNet (condkit output folder, diffusers folder, or original
        ``control_*`` single file) and attach it to ``base``.

        Args:
            path: the folder or file.
            base: the base to attach to; also gives the local config for single files.
            name: instance name.
        """
        config = formats.read_condkit_config(path) or ControlNetConfig()
        controlnet = formats.read_controlnet(path, base, config)
        controlnet.requires_grad_(False).eval()  # loaded = frozen (e.g. a frozen_adapters entry)
        adapter = cls(config, name=name, controlnet=controlnet)
        check_fits(controlnet, base, str(path))
        adapter.base = base
        return adapter

    @classmethod
    def can_load(cls, path: str | Path) -> bool:
        """Whether ``path`` is a ControlNet folder or an original ControlNet file."""
        return formats.detect_format(path) is not None

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        """Format, conditioning and architecture of a ControlNet file or folder."""
        return {"kind": cls.kind, **formats.describe(path)}
