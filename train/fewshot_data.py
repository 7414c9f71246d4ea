"""Few-image concept sets for the LoRA recipe: shapes-world images in a colour the base never saw.

The embedded base knows six colours (:data:`condkit.train.shapes_world.COLOURS`). A
concept here is a seventh colour named by a trigger word: the shipped set
(``fewshot/sks_purple/``) draws purple shapes captioned ``a sks {shape} on a
{background} background``. Shapes, placement and backgrounds come from the shapes
world's own drawing, so only the colour (and its word) is new.

Regenerate the shipped set (deterministic, byte-identical PNGs)::

    python -m condkit.train.fewshot_data train/fewshot/sks_purple

make another concept of the same kind (used by the generalisation test)::

    python -m condkit.train.fewshot_data /tmp/zwx_orange --trigger zwx --rgb 250,140,20 --no-captions
    condkit train lora-few-images --set data.path=/tmp/zwx_orange --set data.caption="a zwx shape" ...

and measure a trained LoRA (trigger prompts show the colour, plain prompts keep theirs)::

    python -m condkit.train.fewshot_data runs/lora-few-images --measure
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from condkit.errors import UserError
from condkit.train.shapes_world import COLOURS, SHAPES, draw_shape

SHIPPED_TRIGGER = "sks"
SHIPPED_RGB = (150, 40, 200)  # purple: far from every base colour (nearest: blue, ~160 apart)
# (shape, background) of each image: every shape on several backgrounds, and every
# background at least once, so the LoRA ties the word to the colour, not to a layout.
DEFAULT_LAYOUT: tuple[tuple[str, str], ...] = (
    ("circle", "white"),
    ("square", "yellow"),
    ("triangle", "green"),
    ("circle", "black"),
    ("square", "white"),
    ("triangle", "yellow"),
    ("circle", "green"),
    ("square", "black"),
    ("triangle", "white"),
    ("circle", "red"),
)


def concept_caption(trigger: str, shape: str, background: str) -> str:
    """The caption of one concept image, in the shapes-world prompt form."""
    return f"a {trigger} {shape} on a {background} background"


def draw_concept(size: int, rgb: tuple[int, int, int], shape: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image: a ``shape`` filled with ``rgb`` on a named background.

    The mask is the shapes world's own drawing (same sizes and placement rules), so
    the only thing new to the base is the colour.
    """
    extent = float(rng.uniform(0.4, 0.7) * size)
    margin = extent / 2 + 1
    centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
    mask_image, _ = draw_shape(size, "white", shape, "black", centre, extent)
    mask = mask_image[..., 0] > 127  # (H, W)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = COLOURS[background]
    image[mask] = rgb
    return image


def write_concept(
    out_dir: str | Path,
    trigger: str = SHIPPED_TRIGGER,
    rgb: tuple[int, int, int] = SHIPPED_RGB,
    layout: tuple[tuple[str, str], ...] = DEFAULT_LAYOUT,
    size: int = 64,
    seed: int = 0,
    captions: bool = True,
) -> Path:
    """Write a concept set: ``NNN.png`` + ``NNN.txt`` (caption) per image.

    Args:
        out_dir: destination folder (created; existing files of the same names replaced atomically).
        trigger: the word that names the new colour in captions.
        rgb: the new colour.
        layout: (shape, background) per image.
        size: image side in pixels (64 = the embedded base).
        seed: placement seed.
        captions: write the ``.txt`` captions (False: images only, captioned by ``data.caption``).

    Returns:
        ``out_dir``.
    """
    from PIL import Image

    from condkit.io import atomic_path, write_text_atomic

    for shape, background in layout:
        if shape not in SHAPES or background not in COLOURS:
            raise UserError(f"layout entry ({shape!r}, {background!r}): shape must be one of {SHAPES}, background one of {tuple(COLOURS)}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    for index, (shape, background) in enumerate(layout):
        image = draw_concept(size, rgb, shape, background, rng)
        with atomic_path(out_dir / f"{index:03d}.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        if captions:
            write_text_atomic(out_dir / f"{index:03d}.txt", concept_caption(trigger, shape, background) + "\n")
    return out_dir


def concept_fraction(image: np.ndarray, rgb: tuple[int, int, int], max_distance: float = 60.0) -> float:
    """Share of non-background pixels whose colour is within ``max_distance`` of ``rgb``.

    Args:
        image: (H, W, 3) uint8 RGB sample.
        rgb: the concept colour.
        max_distance: RGB Euclidean distance counted as "that colour" (base colours are >150 from purple).

    Returns:
        In [0, 1]; 0 when the image has no foreground.
    """
    from condkit.train.shapes_metrics import FOREGROUND_DISTANCE, border_pixels

    image = np.asarray(image)[..., :3].astype(np.float32)
    background = np.median(border_pixels(image), axis=0)
    foreground = np.linalg.norm(image - background, axis=-1) > FOREGROUND_DISTANCE  # (H, W)
    if not foreground.any():
        return 0.0
    close = np.linalg.norm(image[foreground] - np.asarray(rgb, np.float32), axis=-1) < max_distance
    return float(close.mean())


# Measurement prompts: the trigger on shape/background pairs the set has and has not
# shown, and plain prompts in the base's own colours (they must keep those colours).
TRIGGER_PAIRS = (("circle", "white"), ("square", "black"), ("triangle", "green"), ("square", "red"), ("circle", "blue"), ("triangle", "black"))
PLAIN_COMBOS = (("red", "circle", "white"), ("blue", "square", "yellow"), ("green", "triangle", "black"), ("yellow", "circle", "blue"), ("white", "square", "red"), ("black", "triangle", "white"))


def measure_concept(
    base,
    lora_path: str | Path,
    trigger: str = SHIPPED_TRIGGER,
    rgb: tuple[int, int, int] = SHIPPED_RGB,
    seeds: int = 2,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
) -> dict[str, float]:
    """Measure what a concept LoRA learned, on its base.

    Samples the trigger prompts (:data:`TRIGGER_PAIRS`) and the plain base-colour
    prompts (:data:`PLAIN_COMBOS`) with the LoRA, and the plain prompts without it.

    Args:
        base: the base model (the LoRA is attached and detached again).
        lora_path: the trained LoRA (file or output folder).
        trigger, rgb: the concept's word and colour.
        seeds: samples per prompt.
        num_inference_steps, guidance_scale: sampling settings.

    Returns:
        ``trigger_concept_fraction``: mean share of foreground pixels in the concept
        colour on trigger prompts; ``trigger_hit_rate``: share of trigger samples where
        it is above one half; ``plain_colour_accuracy_lora`` / ``..._base``: colour
        accuracy (shapes_metrics) on the plain prompts with and without the LoRA;
        ``plain_concept_fraction``: concept-colour share on the plain prompts with the LoRA.
    """
    import torch

    from condkit.adapters.lora import LoraAdapter
    from condkit.train.shapes_metrics import read_image

    def draw(prompts: list[str]) -> list[np.ndarray]:
        pipe = base.pipeline()
        images = []
        for prompt in prompts:
            for seed in range(seeds):
                generator = torch.Generator().manual_seed(seed)
                out = pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator, output_type="np")
                images.append((out.images[0] * 255).round().astype(np.uint8))
        return images

    trigger_prompts = [concept_caption(trigger, shape, background) for shape, background in TRIGGER_PAIRS]
    plain_prompts = [f"a {colour} {shape} on a {background} background" for colour, shape, background in PLAIN_COMBOS]
    plain_colours = [colour for colour, _, _ in PLAIN_COMBOS for _ in range(seeds)]
    plain_base = draw(plain_prompts)
    adapter = LoraAdapter.load(lora_path, base, name="measured")
    try:
        with_trigger, plain_lora = draw(trigger_prompts), draw(plain_prompts)
    finally:
        adapter.detach()
    fractions = [concept_fraction(image, rgb) for image in with_trigger]
    return {
        "trigger_concept_fraction": float(np.mean(fractions)),
        "trigger_hit_rate": float(np.mean([f > 0.5 for f in fractions])),
        "plain_concept_fraction": float(np.mean([concept_fraction(image, rgb) for image in plain_lora])),
        "plain_colour_accuracy_lora": float(np.mean([read_image(im).colour == c for im, c in zip(plain_lora, plain_colours)])),
        "plain_colour_accuracy_base": float(np.mean([read_image(im).colour == c for im, c in zip(plain_base, plain_colours)])),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: write a concept set, or measure a trained LoRA (see the module docstring)."""
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="folder to write the set to, or with --measure the trained LoRA")
    parser.add_argument("--trigger", default=SHIPPED_TRIGGER)
    parser.add_argument("--rgb", default=",".join(map(str, SHIPPED_RGB)), help="R,G,B of the new colour")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-captions", action="store_true", help="images only (caption them with data.caption)")
    parser.add_argument("--measure", action="store_true", help="measure the LoRA at PATH on --base instead")
    parser.add_argument("--base", default="embedded")
    args = parser.parse_args(argv)
    rgb = tuple(int(v) for v in args.rgb.split(","))
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise SystemExit(f"--rgb {args.rgb!r}: expected three values 0..255")
    if args.measure:
        from condkit.base import load_base

        print(json.dumps(measure_concept(load_base(args.base), args.path, args.trigger, rgb), indent=2))
    else:
        print(write_concept(args.path, args.trigger, rgb, seed=args.seed, captions=not args.no_captions))


if __name__ == "__main__":
    main()
