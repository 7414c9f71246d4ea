"""Sampling with T2I-Adapters (validation, benchmarks, tests) through condkit's generate path.

:func:`condkit.generate.build_pipeline` makes diffusers' stock
``StableDiffusionAdapterPipeline`` (several adapters become one ``MultiAdapter``),
which runs the adapters once per generation and adds the same features at every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
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
    from condkit.adapters.controlnet.generate import half_precision_base
    from condkit.generate import build_pipeline

    if len(prompts) != len(maps):
        raise ValueError(f"{len(prompts)} prompts but {len(maps)} sets of condition maps")
    images = []
    for index, (prompt, per_adapter) in enumerate(zip(prompts, maps)):
        pipe, call = build_pipeline(base, list(adapters), {"t2i_images": list(per_adapter)})
        with half_precision_base(base):
            result = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                height=base.resolution,
                width=base.resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed + index),
                **call,
            )
        images.append(result.images[0])
    return images
