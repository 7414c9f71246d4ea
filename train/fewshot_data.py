"""Few-image concept sets for the LoRA recipe: shapes-world images in a colour the base never saw.

The embedded base knows six colours (:data:`condkit.train.shapes_world.COLOURS`). A
concept here is a seventh colour named by a trigger word: the shipped set
(``fewshot/sks_purple/``) draws purple shapes captioned ``a sks {shape} on a
{background} background``. Shapes, placement and backgrounds come from the shapes
world's own drawing, so only the colour (and its word) is new.

Regenerate the shipped set (deterministic, byte-identical PNGs)::

    python -m condkit.train.fewshot_data train/fewshot/sks_purple

and make another concept of the same kind (used by the generalisation test)::

    python -m condkit.train.fewshot_data /tmp/zwx_orange --trigger zwx --rgb 250,140,20
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
) -> Path:
    """Write a concept set: ``NNN.png`` + ``NNN.txt`` (caption) per image.

    Args:
        out_dir: destination folder (created; existing files of the same names replaced atomically).
        trigger: the word that names the new colour in captions.
        rgb: the new colour.
        layout: (shape, background) per image.
        size: image side in pixels (64 = the embedded base).
        seed: placement seed.

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


def main(argv: list[str] | None = None) -> None:
    """Command line: write a concept set (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--trigger", default=SHIPPED_TRIGGER)
    parser.add_argument("--rgb", default=",".join(map(str, SHIPPED_RGB)), help="R,G,B of the new colour")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rgb = tuple(int(v) for v in args.rgb.split(","))
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise SystemExit(f"--rgb {args.rgb!r}: expected three values 0..255")
    print(write_concept(args.out_dir, args.trigger, rgb, seed=args.seed))


if __name__ == "__main__":
    main()
