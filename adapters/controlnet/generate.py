"""Sampling with one or several ControlNets through ``StableDiffusionControlNetPipeline``.

Several ControlNets at once become diffusers' ``MultiControlNetModel``: each keeps its
own condition map, scale and start/end window, and their residuals add up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image

from condkit.errors import UserError

if TYPE_CHECKING:
    from condkit.adapters.controlnet.adapter import ControlNetAdapter
    from condkit.base import BaseModel

DEFAULT_VALIDATION_COUNT = 8
# Per-ControlNet pipeline arguments that become lists with several ControlNets.
PER_CONTROLNET_ARGS = ("image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")


def controlnet_pipeline_arguments(
    adapters: Sequence[ControlNetAdapter], inputs: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pipeline components and call arguments for one or several ControlNets.

    Args:
        adapters: the ControlNet adapters, in order.
        inputs: one dict per adapter (``condition`` and optional overrides, see
            :meth:`ControlNetAdapter.pipeline_call_kwargs`).

    Returns:
        ``(components, call_kwargs)``: ``{"controlnet": model or MultiControlNetModel}``
        and ``image`` / ``controlnet_conditioning_scale`` / ``control_guidance_start`` /
        ``control_guidance_end`` (lists with several ControlNets) plus ``guess_mode``.
    """
    if len(adapters) != len(inputs):
        raise UserError(f"{len(adapters)} ControlNets but {len(inputs)} condition inputs; give one per ControlNet")
    if not adapters:
        raise ValueError("controlnet_pipeline_arguments needs at least one ControlNet")
    parts = [adapter.pipeline_call_kwargs(given) for adapter, given in zip(adapters, inputs)]
    if len(adapters) == 1:
        return adapters[0].pipeline_components(), parts[0]
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    components = {"controlnet": MultiControlNetModel([adapter.pipeline_components()["controlnet"] for adapter in adapters])}
    call = {key: [part[key] for part in parts] for key in PER_CONTROLNET_ARGS}
    # The pipeline takes one guess_mode for all branches.
    call["guess_mode"] = any(part["guess_mode"] for part in parts)
    return components, call


def generate_controlled(
    base: BaseModel,
    adapters: Sequence[ControlNetAdapter],
    prompts: Sequence[str],
    inputs: Sequence[Sequence[dict[str, Any]]],
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    negative_prompt: str | None = None,
    extra_call_kwargs: dict[str, Any] | None = None,
) -> list[Image.Image]:
    """Generate one image per prompt with the given ControlNets on ``base``.

    Image ``i`` uses ``torch.Generator().manual_seed(seed + i)``, so a stock pipeline
    called the same way reproduces it exactly.

    Args:
        base: the base (with any LoRA/IP-Adapter already attached).
        adapters: the ControlNets to apply.
        prompts: one prompt per image.
        inputs: per prompt, one input dict per ControlNet (``condition``, overrides).
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        seed: base seed.
        negative_prompt: optional negative prompt.
        extra_call_kwargs: more pipeline arguments (e.g. another adapter's).
    """
    if len(prompts) != len(inputs):
        raise ValueError(f"{len(prompts)} prompts but {len(inputs)} input sets")
    images = []
    pipe = None
    for index, (prompt, per_adapter) in enumerate(zip(prompts, inputs)):
        components, call = controlnet_pipeline_arguments(adapters, per_adapter)
        if pipe is None:
            pipe = base.pipeline(**components)
        result = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=base.resolution,
            width=base.resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed + index),
            **call,
            **(extra_call_kwargs or {}),
        )
        images.append(result.images[0])
    return images


def validation_pairs(validation_config: Any, resolution: int) -> tuple[list[str], list[np.ndarray]]:
    """The fixed (prompt, condition map) pairs validation samples on.

    With ``validation.images`` (condition-map files) the prompts are cycled over them;
    without, :data:`DEFAULT_VALIDATION_COUNT` held-out shapes-world samples (prompts no
    training file contains) give both.

    Args:
        validation_config: the recipe's ``validation`` block (``images``, ``prompts``).
        resolution: the base's image size; maps are resized to it.

    Returns:
        Prompts and (resolution, resolution, 3) uint8 maps.
    """
    from condkit.adapters.controlnet.data import read_condition_map

    files = list(getattr(validation_config, "images", None) or [])
    prompts = list(getattr(validation_config, "prompts", None) or [])
    if files:
        maps = [read_condition_map(path, (resolution, resolution)) for path in files]
        return [prompts[i % len(prompts)] if prompts else "" for i in range(len(files))], maps
    return held_out_shapes_pairs(resolution, DEFAULT_VALIDATION_COUNT)


def held_out_shapes_pairs(resolution: int, count: int, seed: int = 20_261_122) -> tuple[list[str], list[np.ndarray]]:
    """Captions and Canny maps of shapes-world samples drawn from the held-out combos.

    Args:
        resolution: image side in pixels.
        count: number of pairs (combos are cycled).
        seed: placement seed.
    """
    from condkit.train.shapes_world import HELD_OUT_COMBOS, ShapesWorld

    world = ShapesWorld(seed, resolution, include_held_out=True)
    samples = [
        world.draw(*HELD_OUT_COMBOS[i % len(HELD_OUT_COMBOS)], np.random.default_rng([seed, i])) for i in range(count)
    ]
    return [s.caption for s in samples], [s.condition for s in samples]
