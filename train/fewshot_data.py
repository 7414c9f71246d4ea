"""Few-image concept sets for the LoRA recipe: shapes-world images of a shape the base never saw.

The embedded base draws circles, squares and triangles in six colours. A concept here
is a fourth shape named by a trigger word: the shipped set (``fewshot/sks_ring/``) shows
rings in the base's own colours captioned ``a {colour} sks on a {background}
background``. A concept can also bring a colour the base never drew (``--colours orange
black``: :data:`NEW_COLOURS`), such as an orange cross: the embedded base's VAE round-trips
any colour (condkit/embedded/base/TRAINING.md), so a LoRA can learn one.

Regenerate the shipped set (deterministic PNGs)::

    python -m condkit.train.fewshot_data train/fewshot/sks_ring

make another concept of the same kind, given as a user gives theirs: images and one
caption (what the generalisation test does)::

    python -m condkit.train.fewshot_data /tmp/zwx_cross --trigger zwx --concept cross --no-captions --colours orange black --seed 5
    condkit train lora-few-images --set data.path=/tmp/zwx_cross --set data.caption="a orange zwx on a black background" --output runs/zwx
    python -m condkit.train.fewshot_data runs/zwx --measure --trigger zwx --concept cross --colours orange black --seeds 4

and measure a trained LoRA (trigger prompts show the ring, plain prompts keep the base's shapes)::

    python -m condkit.train.fewshot_data runs/lora-few-images --measure
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from condkit.errors import UserError
from condkit.train.shapes_world import COLOURS, SHAPES, draw_shape

SHIPPED_TRIGGER = "sks"
SHIPPED_CONCEPT = "ring"
CONCEPTS = ("ring", "cross", "star")
# Colours outside the shapes world's six, for concepts the base has never drawn.
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"orange": (250, 140, 20), "teal": (0, 128, 128), "purple": (110, 40, 170)}
# (colour, background) of each image: several colours and backgrounds, so the LoRA ties
# the word to the shape, not to one colour or layout.
DEFAULT_LAYOUT: tuple[tuple[str, str], ...] = (
    ("red", "white"),
    ("blue", "yellow"),
    ("green", "black"),
    ("yellow", "blue"),
    ("white", "red"),
    ("black", "green"),
    ("red", "yellow"),
    ("blue", "white"),
    ("green", "red"),
    ("yellow", "black"),
)
TEMPLATE_SIZE = 32  # side of the masks shapes are compared at


def concept_caption(trigger: str, colour: str, background: str) -> str:
    """The caption of one concept image, in the shapes-world prompt form (trigger = the shape word)."""
    return f"a {colour} {trigger} on a {background} background"


def concept_mask(concept: str, size: int, centre: tuple[float, float], extent: float) -> np.ndarray:
    """(size, size) bool mask of a ring or cross with bounding-box side ``extent`` at ``centre``."""
    import cv2

    mask = np.zeros((size, size), np.uint8)
    cx, cy = (int(round(v - 0.5)) for v in centre)
    half = int(round(extent / 2))
    if concept == "ring":
        cv2.circle(mask, (cx, cy), half, 1, thickness=-1)
        cv2.circle(mask, (cx, cy), max(1, int(round(half * 0.5))), 0, thickness=-1)
    elif concept == "cross":
        arm = max(1, int(round(extent / 6)))  # arms one third of the extent wide
        cv2.rectangle(mask, (cx - half, cy - arm), (cx + half, cy + arm), 1, thickness=-1)
        cv2.rectangle(mask, (cx - arm, cy - half), (cx + arm, cy + half), 1, thickness=-1)
    elif concept == "star":  # five points, point up, inner radius 0.45 of the outer
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, half, 0.45 * half)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1).round().astype(np.int32)
        cv2.fillPoly(mask, [points], 1)
    else:
        raise UserError(f"concept {concept!r}: must be one of {', '.join(CONCEPTS)}")
    return mask.astype(bool)


def draw_concept(size: int, concept: str, colour: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image: the concept shape in a named colour on a named background."""
    extent = float(rng.uniform(0.45, 0.75) * size)
    margin = extent / 2 + 1
    centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
    image = np.empty((size, size, 3), np.uint8)
    image[:] = concept_colours()[background]
    image[concept_mask(concept, size, centre, extent)] = concept_colours()[colour]
    return image


def concept_colours() -> dict[str, tuple[int, int, int]]:
    """Every colour a concept may use: the shapes world's six and :data:`NEW_COLOURS`."""
    return {**COLOURS, **NEW_COLOURS}


def write_concept(
    out_dir: str | Path,
    trigger: str = SHIPPED_TRIGGER,
    concept: str = SHIPPED_CONCEPT,
    layout: tuple[tuple[str, str], ...] = DEFAULT_LAYOUT,
    size: int = 64,
    seed: int = 0,
    captions: bool = True,
) -> Path:
    """Write a concept set: ``NNN.png`` + ``NNN.txt`` (caption) per image.

    Args:
        out_dir: destination folder (created; files written atomically).
        trigger: the word that names the new shape in captions.
        concept: ``ring`` or ``cross``.
        layout: (colour, background) per image.
        size: image side in pixels (64 = the embedded base).
        seed: placement seed.
        captions: write the ``.txt`` captions (False: images only, captioned by ``data.caption``).

    Returns:
        ``out_dir``.
    """
    from PIL import Image

    from condkit.io import atomic_path, write_text_atomic

    for colour, background in layout:
        if colour not in concept_colours() or background not in concept_colours() or colour == background:
            raise UserError(f"layout entry ({colour!r}, {background!r}): two different colours of {tuple(concept_colours())}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    for index, (colour, background) in enumerate(layout):
        image = draw_concept(size, concept, colour, background, rng)
        with atomic_path(out_dir / f"{index:03d}.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        if captions:
            write_text_atomic(out_dir / f"{index:03d}.txt", concept_caption(trigger, colour, background) + "\n")
    return out_dir


def _normalised_mask(mask: np.ndarray) -> np.ndarray | None:
    """The mask cropped to its bounding box and resized to TEMPLATE_SIZE square, or None if empty."""
    import cv2

    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8)
    return cv2.resize(crop, (TEMPLATE_SIZE, TEMPLATE_SIZE), interpolation=cv2.INTER_NEAREST).astype(bool)


def shape_templates(concept: str) -> dict[str, np.ndarray]:
    """Normalised masks of the base's three shapes and the concept, drawn large and centred."""
    size = 4 * TEMPLATE_SIZE
    centre, extent = (size / 2, size / 2), size * 0.8
    masks = {name: draw_shape(size, "white", name, "black", centre, extent)[0][..., 0] > 127 for name in SHAPES}
    masks[concept] = concept_mask(concept, size, centre, extent)
    return {name: _normalised_mask(mask) for name, mask in masks.items()}


def closest_shape(image: np.ndarray, templates: dict[str, np.ndarray]) -> str | None:
    """Which template the image's largest foreground blob matches best (IoU), or None without foreground."""
    import cv2

    from condkit.train.shapes_metrics import FOREGROUND_DISTANCE, border_pixels

    image = np.asarray(image)[..., :3].astype(np.float32)
    background = np.median(border_pixels(image), axis=0)
    foreground = (np.linalg.norm(image - background, axis=-1) > FOREGROUND_DISTANCE).astype(np.uint8)  # (H, W)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    # keep holes: the blob is everything inside the largest component's bounding box that is foreground
    x, y, w, h = (int(v) for v in stats[largest, :4])
    blob = np.zeros_like(foreground, bool)
    blob[y : y + h, x : x + w] = foreground[y : y + h, x : x + w] > 0
    mask = _normalised_mask(blob)
    ious = {name: (mask & t).sum() / max((mask | t).sum(), 1) for name, t in templates.items()}
    return max(ious, key=ious.get)


COLOUR_DISTANCE = 60.0  # RGB distance (0-255 units) within which a pixel counts as a named colour


def colour_pixel_share(image: np.ndarray, colour: str) -> float:
    """Share of an image's pixels within :data:`COLOUR_DISTANCE` of a named colour's RGB value.

    Args:
        image: (H, W, 3) uint8 RGB.
        colour: a name from :func:`concept_colours`.
    """
    value = np.array(concept_colours()[colour], np.float32)
    return float((np.linalg.norm(np.asarray(image)[..., :3].astype(np.float32) - value, axis=-1) <= COLOUR_DISTANCE).mean())


# Measurement prompts: the trigger in colour/background pairs the set has and has not
# shown, and plain prompts in the base's own shapes (they must keep their shapes).
TRIGGER_PAIRS = (("red", "white"), ("blue", "yellow"), ("green", "black"), ("white", "blue"), ("black", "red"), ("yellow", "green"))
PLAIN_COMBOS = (("red", "circle", "white"), ("blue", "square", "yellow"), ("green", "triangle", "black"), ("yellow", "circle", "blue"), ("white", "square", "red"), ("black", "triangle", "white"))


def measure_concept(
    base,
    lora_path: str | Path,
    trigger: str = SHIPPED_TRIGGER,
    concept: str = SHIPPED_CONCEPT,
    seeds: int = 2,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    pairs: tuple[tuple[str, str], ...] = TRIGGER_PAIRS,
) -> dict[str, float]:
    """Measure what a concept LoRA learned, on its base.

    Samples the trigger prompts (``pairs``, default :data:`TRIGGER_PAIRS`) and the plain prompts
    (:data:`PLAIN_COMBOS`) with the LoRA, and the plain prompts without it. Shapes are
    named by the best-matching template mask (circle, square, triangle or the concept).

    Args:
        base: the base model (the LoRA is attached and detached again).
        lora_path: the trained LoRA (file or output folder).
        trigger, concept: the concept's word and shape.
        seeds: samples per prompt.
        num_inference_steps, guidance_scale: sampling settings.
        pairs: (colour, background) of the trigger prompts.

    Returns:
        ``trigger_hit_rate``: share of trigger samples whose shape is the concept;
        ``trigger_colour_accuracy``: share in the prompt's colour (as the shapes-world reader names
        it: the six colours only); ``trigger_colour_pixels``: mean share of pixels within
        :data:`COLOUR_DISTANCE` of the prompt colour's RGB value (any colour, e.g. orange) and
        ``trigger_colour_5pct_rate``: share of samples where that is at least 5%; ``plain_concept_rate``:
        share of plain samples drawn as the concept (leakage); ``plain_shape_accuracy_lora``
        / ``_base`` and ``plain_colour_accuracy_lora`` / ``_base``: plain prompts with and
        without the LoRA.
    """
    import torch

    from condkit.adapters.registry import load_adapter
    from condkit.train.shapes_metrics import read_image

    templates = shape_templates(concept)

    def draw(prompts: list[str]) -> list[np.ndarray]:
        pipe = base.pipeline()
        images = []
        for prompt in prompts:
            for seed in range(seeds):
                generator = torch.Generator().manual_seed(seed)
                out = pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator, output_type="np")
                images.append((out.images[0] * 255).round().astype(np.uint8))
        return images

    trigger_prompts = [concept_caption(trigger, colour, background) for colour, background in pairs]
    plain_prompts = [f"a {colour} {shape} on a {background} background" for colour, shape, background in PLAIN_COMBOS]
    trigger_colours = [colour for colour, _ in pairs for _ in range(seeds)]
    plain_labels = [(colour, shape) for colour, shape, _ in PLAIN_COMBOS for _ in range(seeds)]
    plain_base = draw(plain_prompts)
    adapter = load_adapter(lora_path, base, name="measured")  # LoRA, LoHa, LoKr: any kind the file is
    try:
        with_trigger, plain_lora = draw(trigger_prompts), draw(plain_prompts)
    finally:
        adapter.detach()

    def shape_accuracy(images):
        return float(np.mean([closest_shape(im, templates) == s for im, (_, s) in zip(images, plain_labels)]))

    def colour_accuracy(images, colours):
        return float(np.mean([read_image(im).colour == c for im, c in zip(images, colours)]))

    pixel_shares = [colour_pixel_share(im, colour) for im, colour in zip(with_trigger, trigger_colours)]
    return {
        "trigger_hit_rate": float(np.mean([closest_shape(im, templates) == concept for im in with_trigger])),
        "trigger_colour_accuracy": colour_accuracy(with_trigger, trigger_colours),
        "trigger_colour_pixels": float(np.mean(pixel_shares)),
        "trigger_colour_5pct_rate": float(np.mean([share >= 0.05 for share in pixel_shares])),
        "plain_concept_rate": float(np.mean([closest_shape(im, templates) == concept for im in plain_lora])),
        "plain_shape_accuracy_lora": shape_accuracy(plain_lora),
        "plain_shape_accuracy_base": shape_accuracy(plain_base),
        "plain_colour_accuracy_lora": colour_accuracy(plain_lora, [c for c, _ in plain_labels]),
        "plain_colour_accuracy_base": colour_accuracy(plain_base, [c for c, _ in plain_labels]),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: write a concept set, or measure a trained LoRA (see the module docstring)."""
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="folder to write the set to, or with --measure the trained LoRA")
    parser.add_argument("--trigger", default=SHIPPED_TRIGGER)
    parser.add_argument("--concept", default=SHIPPED_CONCEPT, choices=CONCEPTS, help="the new shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-captions", action="store_true", help="images only (caption them with data.caption)")
    parser.add_argument("--colours", nargs=2, metavar=("COLOUR", "BACKGROUND"), help="draw every image in these two colours")
    parser.add_argument("--seeds", type=int, default=2, help="with --measure: samples per prompt")
    parser.add_argument("--measure", action="store_true", help="measure the LoRA at PATH on --base instead")
    parser.add_argument("--base", default="embedded")
    args = parser.parse_args(argv)
    if args.measure:
        from condkit.base import load_base

        pairs = (tuple(args.colours),) if args.colours else TRIGGER_PAIRS
        figures = measure_concept(load_base(args.base), args.path, args.trigger, args.concept, seeds=args.seeds, pairs=pairs)
        print(json.dumps(figures, indent=2))
    else:
        layout = (tuple(args.colours),) * len(DEFAULT_LAYOUT) if args.colours else DEFAULT_LAYOUT
        print(write_concept(args.path, args.trigger, args.concept, layout=layout, seed=args.seed, captions=not args.no_captions))


if __name__ == "__main__":
    main()
