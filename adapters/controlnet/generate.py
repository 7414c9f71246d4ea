"""Sampling with ControlNets (validation, benchmarks) and the fixed validation maps.

Sampling goes through :func:`condkit.generate.build_pipeline`, the path ``condkit
generate`` uses: several ControlNets become diffusers' ``MultiControlNetModel``, each
with its own condition map, scale and start/end window.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image

from condkit.errors import UserError

if TYPE_CHECKING:
    from condkit.base import BaseModel

DEFAULT_VALIDATION_COUNT = 8
VALIDATION_PLACEMENT_SEED = 20_261_122


def generate_controlled(
    base: BaseModel,
    adapters: Sequence[Any],
    prompts: Sequence[str],
    control_images: Sequence[Sequence[Any]],
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    negative_prompt: str | None = None,
) -> list[Image.Image]:
    """Generate one image per prompt with ControlNets, through condkit's generate path.

    A stock ``StableDiffusionControlNetPipeline`` called the same way reproduces it.
    Args as :func:`generate_with_condition_maps` (``control_images``: its ``maps``).
    """
    return generate_with_condition_maps(
        base, adapters, prompts, control_images, "control_images", num_inference_steps, guidance_scale, seed, negative_prompt
    )


def generate_with_condition_maps(
    base: BaseModel,
    adapters: Sequence[Any],
    prompts: Sequence[str],
    maps: Sequence[Sequence[Any]],
    input_key: str,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    negative_prompt: str | None = None,
) -> list[Image.Image]:
    """One image per prompt through :func:`condkit.generate.build_pipeline` (``condkit generate``'s path).

    Image ``i`` uses ``torch.Generator().manual_seed(seed + i)``, so the stock pipeline
    called the same way reproduces it. Shared by the kinds that take condition maps
    (ControlNet, T2I-Adapter).

    Args:
        base: the base, with the adapters attached.
        adapters: the attached adapters (the map-taking ones in the order of their maps).
        prompts: one prompt per image.
        maps: per prompt, one condition map per map-taking adapter (path, PIL image or array).
        input_key: the generate input the kind reads its maps from (its ``GenerateInput.key``,
            e.g. ``control_images``).
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        seed: base seed.
        negative_prompt: optional negative prompt.
    """
    from condkit.generate import build_pipeline

    if len(prompts) != len(maps):
        raise ValueError(f"{len(prompts)} prompts but {len(maps)} sets of condition maps")
    images = []
    for index, (prompt, per_adapter) in enumerate(zip(prompts, maps)):
        pipe, call = build_pipeline(base, list(adapters), {input_key: list(per_adapter)})
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


def validate_on_condition_maps(adapter: Any, base: BaseModel, validation_config: Any, input_key: str) -> tuple[list[list[Image.Image]], dict[str, float]]:
    """Validation of a map-taking kind: sample on fixed condition maps, rows (condition | output), edge F1.

    Args:
        adapter: the attached adapter; its config has ``fidelity_metric`` and ``edge_tolerance``.
        base: the base it is attached to.
        validation_config: the recipe's ``validation`` block: ``prompts``, ``images``
            (condition-map files; held-out shapes-world maps when empty),
            ``num_inference_steps``, ``guidance_scale``, ``seed``.
        input_key: the kind's generate input key (see :func:`generate_with_condition_maps`).
    """
    from condkit.adapters.controlnet.adapter import to_condition_image
    from condkit.adapters.controlnet.metrics import condition_edge_f1, mean_edge_scores

    prompts, conditions = validation_pairs(validation_config, base.resolution)
    outputs = generate_with_condition_maps(
        base,
        [adapter],
        prompts,
        [[c] for c in conditions],
        input_key,
        num_inference_steps=validation_config.num_inference_steps,
        guidance_scale=validation_config.guidance_scale,
        seed=validation_config.seed,
    )
    rows = [[to_condition_image(c), out] for c, out in zip(conditions, outputs)]
    metrics: dict[str, float] = {}
    if adapter.config.fidelity_metric == "edge_f1":
        scores = [condition_edge_f1(np.asarray(c), np.asarray(o), adapter.config.edge_tolerance) for c, o in zip(conditions, outputs)]
        metrics = mean_edge_scores(scores)
    return rows, metrics


def half_precision_base(base: BaseModel) -> contextlib.AbstractContextManager:
    """Autocast to the base's dtype when it runs in half precision (bf16 training).

    The branch stays float32 while the pipeline feeds it the base's bf16 latents and
    text embeddings; autocast makes the two meet (casting weights on the fly, never
    touching the float32 master weights).

    Args:
        base: the base (its U-Net's dtype decides).
    """
    dtype = base.unet.dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=base.unet.device.type, dtype=dtype)


def validation_pairs(validation_config: Any, resolution: int) -> tuple[list[str], list[np.ndarray]]:
    """The fixed (prompt, condition map) pairs validation samples on.

    * ``validation.images`` given: those maps, with the prompts cycled over them;
    * only shapes-world prompts given (``a red circle on a blue background``): each
      prompt's own shape drawn at a fixed placement, its Canny map as condition;
    * neither: :data:`DEFAULT_VALIDATION_COUNT` samples of the held-out shapes combos.

    Args:
        validation_config: the recipe's ``validation`` block (``images``, ``prompts``).
        resolution: the base's image size; maps are resized to it.

    Returns:
        Prompts and (resolution, resolution, 3) uint8 maps.
    """
    from condkit.adapters.controlnet.data import read_condition_map
    from condkit.train.shapes_world import HELD_OUT_COMBOS, caption_for

    files = list(validation_config.images or [])
    prompts = list(validation_config.prompts or [])
    if files:
        maps = [read_condition_map(path, (resolution, resolution)) for path in files]
        return [prompts[i % len(prompts)] if prompts else "" for i in range(len(files))], maps
    if prompts:
        combos = [shapes_combo(prompt) for prompt in prompts]
        return prompts, shapes_conditions(combos, resolution)
    combos = [HELD_OUT_COMBOS[i % len(HELD_OUT_COMBOS)] for i in range(DEFAULT_VALIDATION_COUNT)]
    return [caption_for(*combo) for combo in combos], shapes_conditions(combos, resolution)


def shapes_combo(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a shapes-world prompt.

    Raises:
        UserError: the prompt is not a shapes-world caption (then maps must be given).
    """
    from condkit.train.shapes_world import COLOURS, SHAPES

    words = prompt.strip().split()
    # "a {colour} {shape} on a {background} background"
    if len(words) == 7 and words[2] in SHAPES and words[1] in COLOURS and words[5] in COLOURS:
        return words[1], words[2], words[5]
    raise UserError(
        f"validation.prompts: {prompt!r} needs a condition map; list one per prompt in validation.images "
        "(only shapes-world prompts get a map drawn automatically)"
    )


def shapes_conditions(combos: Sequence[tuple[str, str, str]], resolution: int) -> list[np.ndarray]:
    """Canny maps of shapes-world samples of the given combos at fixed placements.

    Args:
        combos: (colour, shape, background) per map; placement ``i`` is seeded by ``i``.
        resolution: image side in pixels.
    """
    from condkit.train.shapes_world import ShapesWorld

    world = ShapesWorld(VALIDATION_PLACEMENT_SEED, resolution, include_held_out=True)
    return [world.draw(*combo, np.random.default_rng([VALIDATION_PLACEMENT_SEED, i])).condition for i, combo in enumerate(combos)]
