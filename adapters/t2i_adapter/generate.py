"""Sampling with T2I-Adapters (validation, benchmarks, tests) through condkit's generate path.

:func:`condkit.generate.build_pipeline` makes diffusers' stock
``StableDiffusionAdapterPipeline`` (``StableDiffusionXLAdapterPipeline`` on SDXL; several
adapters become one ``MultiAdapter``),
which runs the adapters once per generation and adds the same features at every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image

if TYPE_CHECKING:
    from condkit.base import BaseModel


def generate_with_maps(
    base: BaseModel,
    adapters: Sequence[Any],
    prompts: Sequence[str],
    maps: Sequence[Sequence[Any]],
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    negative_prompt: str | None = None,
) -> list[Image.Image]:
    """One image per prompt; image ``i`` uses ``torch.Generator().manual_seed(seed + i)``.

    A stock ``StableDiffusionAdapterPipeline`` called the same way reproduces it.

    Args:
        base: the base, with the adapters attached (T2I-Adapters, and e.g. LoRAs).
        adapters: the attached adapters (T2I-Adapters in the order of their maps).
        prompts: one prompt per image.
        maps: per prompt, one condition map per T2I-Adapter (path, PIL image or array).
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        seed: base seed.
        negative_prompt: optional negative prompt.
    """
    from condkit.adapters.controlnet.generate import generate_with_condition_maps
    from condkit.adapters.t2i_adapter.adapter import T2IAdapterKind

    key = T2IAdapterKind.generate_inputs[0].key
    return generate_with_condition_maps(base, adapters, prompts, maps, key, num_inference_steps, guidance_scale, seed, negative_prompt)
