"""The T2I-Adapter kind: diffusers' :class:`~diffusers.T2IAdapter` steering the base's down blocks.

The adapter encodes the condition map alone (no latents, no timestep, no prompt) into
one feature map per U-Net down block; they enter through the U-Net's
``down_intrablock_additional_residuals`` argument (added after each down block's last
layer), so LoRA (peft layers) and ControlNet (``down_block_additional_residuals``)
compose with it. On SDXL it is diffusers' ``full_adapter_xl`` layout (see :mod:`.config`),
and the family's ``added_cond_kwargs`` reach the U-Net beside the features, merged by the
loop (the adapter itself reads no prompt). Because the features do not depend on the step, a generation computes
them once (see :mod:`.generate`); training recomputes them per batch, with T2I-Adapter's
cubic timestep sampling (mostly early, noisy steps, where the layout forms).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from condkit.adapters.base import Adapter, AdapterStateError, GenerateInput
from condkit.adapters.controlnet.data import CONDITION_INPUT
from condkit.adapters.t2i_adapter import formats
from condkit.adapters.t2i_adapter.config import T2IAdapterConfig
from condkit.errors import UserError

if TYPE_CHECKING:
    from diffusers import T2IAdapter

    from condkit.base import BaseModel

RESIDUALS_KEY = "down_intrablock_additional_residuals"
# Pipeline arguments that take one value per T2I-Adapter when several are attached
# (diffusers' MultiAdapter); a single adapter passes its value unwrapped.
PER_ADAPTER_KEYS = ("image", "adapter_conditioning_scale")


def residual_shapes(unet_config: Any, latent_size: int) -> list[tuple[int, int, int]]:
    """The (c, h, w) each ``down_intrablock_additional_residuals`` entry must have for a U-Net.

    diffusers adds entry i after down block i's last attention layer (cross-attention
    blocks: before the downsampler) or after the whole block (plain blocks: after it),
    and one more after the middle block when its shape matches (T2I-Adapter-XL).

    Args:
        unet_config: the U-Net's config (``block_out_channels``, ``down_block_types``).
        latent_size: the latents' side (image side / VAE factor).

    Returns:
        One shape per down block, then the middle block's.
    """
    shapes, size = [], latent_size
    channels, types = list(unet_config.block_out_channels), list(unet_config.down_block_types)
    for index, (width, block_type) in enumerate(zip(channels, types)):
        final = index == len(types) - 1
        if "CrossAttn" in block_type or final:
            shapes.append((width, size, size))
        else:
            shapes.append((width, size // 2, size // 2))
        size = size if final else size // 2
    return [*shapes, (channels[-1], size, size)]


def check_fits(model: T2IAdapter, base: BaseModel, source: str) -> None:
    """Check that the adapter's features match the base U-Net's down blocks, on a blank map.

    Args:
        model: the T2I-Adapter.
        base: the base.
        source: what the adapter came from, for the message.

    Raises:
        UserError: a feature's shape differs from its block's (naming both), or the
            adapter gives more or fewer features than the U-Net takes.
    """
    latent = base.resolution // base.vae_scale_factor
    wanted = residual_shapes(base.unet.config, latent)
    first = wanted[0][1]  # side of the first feature: the latents', or half of it on SDXL
    factor = model.config.downscale_factor
    layout = T2IAdapterConfig().resolved_type(tuple(base.unet.config.down_block_types))  # what a fresh one would be
    if factor * first != base.resolution:
        raise UserError(
            f"{source}: downscale_factor {factor} makes {base.resolution // factor} px features but the base U-Net's "
            f"first down block takes {first} px ones (downscale_factor {base.resolution // first}; its VAE factor is {base.vae_scale_factor}; this U-Net takes adapter_type {layout})"
        )
    with torch.no_grad():
        blank = torch.zeros(1, model.config.in_channels, base.resolution, base.resolution, dtype=model.dtype)
        got = [tuple(f.shape[1:]) for f in model(blank)]  # one (c, h, w) per stage
    blocks = len(wanted) - 1
    if len(got) not in (blocks, blocks + 1) or any(g != w for g, w in zip(got, wanted)):
        mismatch = next((i for i, (g, w) in enumerate(zip(got, wanted)) if g != w), min(len(got), len(wanted)) - 1)
        raise UserError(
            f"{source}: T2I-Adapter features {got} do not fit the base U-Net's down blocks {wanted[:blocks]} "
            f"(first difference at feature {mismatch}; channels must follow block_out_channels "
            f"{list(base.unet.config.block_out_channels)}; this U-Net takes adapter_type {layout})"
        )


class T2IAdapterKind(Adapter):
    """A T2I-Adapter on a base (see the module docstring).

    Args:
        config: the T2I-Adapter config.
        name: instance name (several T2I-Adapters on one base need distinct names).
        model: an existing ``T2IAdapter`` (from :meth:`load`); None builds one on :meth:`attach`.
    """

    kind = "t2i_adapter"
    config_class = T2IAdapterConfig
    sample_inputs = (CONDITION_INPUT,)  # ControlNet's condition map: same layouts, same preprocessor key
    generate_inputs = (
        GenerateInput(
            option="--t2i-image",
            key="t2i_images",
            help="condition map for each T2I-Adapter, in --adapter order",
            label="T2I-Adapter",
            one_per_adapter=True,
        ),
    )
    pipeline_component = "adapter"
    pipeline_variant = "Adapter"  # StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline

    def __init__(self, config: T2IAdapterConfig, name: str = "default", model: T2IAdapter | None = None) -> None:
        super().__init__(config, name)
        self.model = model
        self.scale = float(config.conditioning_scale)

    # ---- attach and detach -------------------------------------------------------
    def attach(self, base: BaseModel) -> None:
        """Build the adapter for ``base`` (or read ``config.init_from``) if there is none yet, and check it fits."""
        from diffusers import T2IAdapter

        self.check_unattached()
        if self.model is None:
            if self.config.init_from:
                self.model = formats.read_t2i_adapter(self.config.init_from).requires_grad_(True)
            else:
                unet = base.unet.config
                arguments = self.config.model_config(tuple(unet.block_out_channels), base.vae_scale_factor, tuple(unet.down_block_types))
                self.model = T2IAdapter(**arguments)  # float32, like every module diffusers builds
        check_fits(self.model, base, self.config.init_from or f"t2i_adapter {self.name}")
        self.base = base

    def detach(self) -> None:
        """Forget the base; the U-Net was never modified, so nothing else to undo."""
        self.base = None

    def set_scale(self, scale: float) -> None:
        """Set the feature scale (``adapter_conditioning_scale``; 0 = the base alone)."""
        self.scale = float(scale)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter of the adapter (the base stays locked)."""
        return list(self._model().parameters())

    def trainable_modules(self) -> list[torch.nn.Module]:
        """The adapter, which the loop prepares with accelerate and keeps in float32."""
        return [self._model()]

    def _model(self) -> T2IAdapter:
        if self.model is None:
            raise AdapterStateError(f"t2i_adapter adapter {self.name!r} has no model yet; attach it to a base first")
        return self.model

    # ---- training hooks ----------------------------------------------------------
    def encode_extras(self, batch: dict[str, Any], base: BaseModel) -> dict[str, torch.Tensor]:
        """Pass the batch's condition maps through (the adapter trains, so nothing to precompute).

        Args:
            batch: needs ``condition``, (b, C, H, W) float in [0, 1] at image resolution.
            base: unused.
        """
        from condkit.adapters.controlnet.data import batch_condition_maps

        return batch_condition_maps(batch, f"t2i_adapter {self.name}")

    def sample_timesteps(self, batch_size: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        """T2I-Adapter's cubic sampling ``t = (1 - u^3) T`` (or uniform, per ``timestep_sampling``).

        Args:
            batch_size: b.
            num_train_timesteps: T of the base's noise schedule.
            generator: the loop's CPU generator.

        Returns:
            (b,) int64 timesteps in ``[0, T)``.
        """
        from condkit.train.diffusion import cubic_timesteps

        if self.config.timestep_sampling == "cubic":
            return cubic_timesteps(batch_size, num_train_timesteps, generator)
        return super().sample_timesteps(batch_size, num_train_timesteps, generator)

    def features(self, condition: torch.Tensor) -> list[torch.Tensor]:
        """The scaled features of condition maps, as the stock pipeline computes them.

        Args:
            condition: (b, C, H, W) float in [0, 1], H = W = the base's resolution.

        Returns:
            One (b, c_i, h_i, w_i) tensor per U-Net down block (and the middle block
            when the adapter has one more), times the adapter's scale.
        """
        model = self._model()
        return [f * self.scale for f in model(condition.to(dtype=model.dtype))]

    def unet_kwargs(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeds: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        """The adapter's features for the U-Net call (they depend on the map only).

        Args:
            noisy_latents: (b, 4, h, w) noisy latents (for the size check and dtype).
            timesteps: (b,) timesteps (unused: the features do not depend on them).
            text_embeds: (b, 77, d) text embeddings (unused).
            extras: ``condition``, (b, C, h * f, w * f) float in [0, 1], f the VAE factor.
        """
        condition = extras[CONDITION_INPUT.name].to(noisy_latents.device)
        # The map has the image's size: the VAE factor times the latents' (the adapter's own
        # downscale_factor is twice that on SDXL, whose first features are half the latents').
        factor = self.base.vae_scale_factor if self.base is not None else self._model().config.downscale_factor
        if tuple(condition.shape[-2:]) != tuple(s * factor for s in noisy_latents.shape[-2:]):
            raise ValueError(f"condition maps {tuple(condition.shape[-2:])} do not match latents {tuple(noisy_latents.shape[-2:])} x {factor}")
        # A new list each call: the U-Net pops its entries as it goes.
        return {RESIDUALS_KEY: [f.to(noisy_latents.dtype) for f in self.features(condition)]}

    @classmethod
    def combine_unet_kwarg(cls, key: str, first: Any, second: Any) -> Any:
        """Several T2I-Adapters' features add up, as diffusers' ``MultiAdapter`` sums them.

        Args:
            key: ``down_intrablock_additional_residuals``: lists of (b, c_i, h_i, w_i).
            first: the features so far.
            second: this adapter's features.
        """
        if key == RESIDUALS_KEY:
            if len(first) != len(second):
                raise UserError(f"two T2I-Adapters give {len(first)} and {len(second)} feature maps; they need the same U-Net")
            return [a + b for a, b in zip(first, second)]
        return super().combine_unet_kwarg(key, first, second)

    # ---- inference hooks ---------------------------------------------------------
    def pipeline_components(self) -> dict[str, Any]:
        """``{"adapter": model}`` for ``StableDiffusionAdapterPipeline`` (SDXL: ``StableDiffusionXLAdapterPipeline``)."""
        return {"adapter": self._model()}

    @classmethod
    def combine_pipeline_components(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One ``adapter`` component: the adapter, or diffusers' ``MultiAdapter`` of several."""
        models = [part["adapter"] for part in parts]
        if len(models) == 1:
            return {"adapter": models[0]}
        from diffusers import MultiAdapter

        return {"adapter": MultiAdapter(models)}

    @classmethod
    def combine_pipeline_kwargs(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Several T2I-Adapters' arguments as diffusers takes them: a list per :data:`PER_ADAPTER_KEYS` key."""
        if len(parts) == 1:
            return dict(parts[0])
        combined: dict[str, Any] = {}
        for part in parts:
            for key, value in part.items():
                if key in PER_ADAPTER_KEYS:
                    combined.setdefault(key, []).append(value)
                else:
                    combined[key] = value
        return combined

    def pipeline_call_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The pipeline arguments for this adapter.

        Args:
            inputs: the generate inputs: ``t2i_images`` (one map per T2I-Adapter, in
                adapter order; path, PIL image or array) and ``index`` (this adapter's
                position among the T2I-Adapters), or ``condition`` (this adapter's map);
                optional ``preprocessor`` (the map is then computed from the given image)
                and ``conditioning_scale``.
        """
        from condkit.adapters.controlnet.adapter import to_condition_image

        condition = inputs.get(CONDITION_INPUT.name)
        if condition is None:
            maps, index = inputs.get("t2i_images") or [], int(inputs.get("index", 0))
            if index >= len(maps):
                raise UserError(
                    f"t2i_adapter {self.name}: no condition map for T2I-Adapter number {index + 1} "
                    f"({len(maps)} given; pass one --t2i-image per T2I-Adapter, in --adapter order)"
                )
            condition = maps[index]
        image = to_condition_image(condition)
        if inputs.get("preprocessor"):
            from condkit.preprocessors import get_preprocessor

            image = Image.fromarray(get_preprocessor(inputs["preprocessor"])(image))
        return {"image": image, "adapter_conditioning_scale": float(inputs.get("conditioning_scale", self.scale))}

    # ---- validation --------------------------------------------------------------
    def validate(self, base: BaseModel, validation_config: Any, step: int) -> tuple[list[list[Image.Image]], dict[str, float]]:
        """Sample on fixed condition maps (ControlNet's); rows are (condition | output), metrics the edge F1.

        Args:
            base: the base the adapter is attached to.
            validation_config: the recipe's ``validation`` block (``prompts``, ``images``,
                ``num_inference_steps``, ``guidance_scale``, ``seed``).
            step: the training step (unused: the maps and seed are fixed so steps compare).
        """
        from condkit.adapters.controlnet.generate import validate_on_condition_maps

        return validate_on_condition_maps(self, base, validation_config, self.generate_inputs[0].key)

    @classmethod
    def find_records(cls, data: Any) -> list:
        """Training records for ``data.path`` in any ControlNet layout (the same pairs)."""
        from condkit.adapters.controlnet.data import find_pair_records

        return find_pair_records(data)

    # ---- persistence -------------------------------------------------------------
    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``out_dir/t2i_adapter/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``).

        ``T2IAdapter.from_pretrained(out_dir / "t2i_adapter")`` loads it in a plain
        diffusers install; ``condkit_adapter.json`` beside the weights records the
        condkit config and the base fingerprint.
        """
        fingerprint = self.base.fingerprint() if self.base is not None else None
        return formats.write_diffusers_folder(self._model(), Path(out_dir) / formats.EXPORT_SUBFOLDER, self.config, fingerprint)

    @classmethod
    def load(cls, path: str | Path, base: BaseModel, name: str = "default") -> T2IAdapterKind:
        """Load a T2I-Adapter (condkit output folder or any diffusers T2I-Adapter folder) and attach it.

        Args:
            path: the folder.
            base: the base to attach to.
            name: instance name.
        """
        config = formats.read_condkit_config(path) or T2IAdapterConfig()
        model = formats.read_t2i_adapter(path).requires_grad_(False).eval()  # loaded = frozen
        check_fits(model, base, str(path))
        adapter = cls(config, name=name, model=model)
        adapter.base = base
        return adapter

    @classmethod
    def can_load(cls, path: str | Path) -> bool:
        """Whether ``path`` is a diffusers T2I-Adapter folder (or holds one under ``t2i_adapter/``)."""
        return formats.diffusers_folder(path) is not None

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        """Variant, channels and downscale factor of a T2I-Adapter folder."""
        return {"kind": cls.kind, **formats.describe(path)}
