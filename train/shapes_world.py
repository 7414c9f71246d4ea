"""The shapes world: a tiny, fully synthetic text-to-image domain drawn with OpenCV.

Each image is one filled ``circle``, ``square`` or ``triangle`` in one of six named
colours on a flat background of another colour, at a random position and size (the
shape always fully inside the image). The caption is
``a {colour} {shape} on a {background} background``. The embedded base is trained on
it, and the adapter recipes and tests use the same generator for their data:

* ``condition``: the Canny edge map of the image (``cv2.Canny`` 100/200 on the RGB
  image, 3 channels, white edges on black: the fill50k / ``canny`` preprocessor look),
  for ControlNet.
* ``reference``: for IP-Adapter, an image of the *same shape, colour and background at
  a new position and size* (drawn from the sample's own seed), so an adapter trained to
  reproduce the target from the reference must carry content, not layout.

Everything is deterministic: sample ``i`` of ``ShapesWorld(seed)`` only depends on
``(seed, i)``. A handful of (colour, shape, background) combinations,
:data:`HELD_OUT_COMBOS`, never appear in training data (``ShapesWorld`` skips them by
default), so quality can be measured on prompts no training file contains.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from condkit.errors import UserError

# RGB values of the named colours; measurement (shapes_metrics) names colours by them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 30),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CAPTION_TEMPLATE = "a {colour} {shape} on a {background} background"

# (colour, shape, background) triples every colour/shape appears in training in both
# roles, but these exact prompts do not: quality is measured on them. Chosen so that
# each shape, each foreground colour and each background colour occurs at least once.
HELD_OUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "blue"),
    ("green", "square", "white"),
    ("blue", "triangle", "yellow"),
    ("yellow", "circle", "black"),
    ("white", "square", "red"),
    ("black", "triangle", "green"),
    ("red", "triangle", "white"),
    ("blue", "square", "black"),
    ("yellow", "triangle", "red"),
    ("white", "circle", "green"),
    ("green", "circle", "yellow"),
    ("black", "square", "blue"),
)

# Shape size bounds as fractions of the image side: the shape's bounding box side.
MIN_SIZE_FRACTION = 0.3
MAX_SIZE_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class ShapeSample:
    """One shapes-world sample.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        caption: ``a {colour} {shape} on a {background} background``, or a
            :func:`partial_caption` (``ShapesWorld(partial_captions=...)``).
        colour, shape, background: the labels.
        condition: (H, W, 3) uint8 Canny edge map of ``image`` (white edges on black).
        reference: (H, W, 3) uint8, same shape/colour/background at another position and size.
        box: (x0, y0, x1, y1) bounding box of the shape in pixels.
    """

    image: np.ndarray
    caption: str
    colour: str
    shape: str
    background: str
    condition: np.ndarray
    reference: np.ndarray
    box: tuple[int, int, int, int]


def all_combos() -> list[tuple[str, str, str]]:
    """Every valid (colour, shape, background) triple (foreground != background)."""
    return [(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if c != b]


def training_combos() -> list[tuple[str, str, str]]:
    """The combos training data is drawn from: all of them minus :data:`HELD_OUT_COMBOS`."""
    held = set(HELD_OUT_COMBOS)
    return [combo for combo in all_combos() if combo not in held]


def caption_for(colour: str, shape: str, background: str) -> str:
    """The shapes-world prompt for a combo."""
    return CAPTION_TEMPLATE.format(colour=colour, shape=shape, background=background)


def partial_caption(colour: str, shape: str, background: str, rng: np.random.Generator) -> str:
    """A caption that leaves out a random non-empty subset of colour, shape and background.

    ``a red shape``, ``a circle on a blue background``, ..., ``a shape`` (all left out);
    each of the 7 subsets is equally likely. An image condition (IP-Adapter) must then
    supply what the text does not say, as real captions never say everything.

    Args:
        colour, shape, background: the sample's labels.
        rng: where the subset is drawn from.
    """
    left_out = int(rng.integers(1, 8))  # a bit mask over (colour, shape, background), never 0
    keep_colour, keep_shape, keep_background = (not (left_out >> bit) & 1 for bit in range(3))
    words = ["a"] + ([colour] if keep_colour else []) + [shape if keep_shape else "shape"]
    return " ".join(words) + (f" on a {background} background" if keep_background else "")


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """The (colour, shape, background) a shapes-world caption asks for, or None if it is not one."""
    words = caption.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    colour, shape, background = words[1], words[2], words[5]
    if colour in COLOURS and background in COLOURS and shape in SHAPES and colour != background:
        return colour, shape, background
    return None


def draw_shape(
    size: int, colour: str, shape: str, background: str, centre: tuple[float, float], extent: float
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Draw one filled, anti-aliasing-free shape on a flat background.

    Args:
        size: image side in pixels.
        colour, shape, background: names from :data:`COLOURS` / :data:`SHAPES`.
        centre: (x, y) centre of the shape's bounding box in pixels.
        extent: bounding-box side of the shape in pixels.

    Returns:
        The (size, size, 3) uint8 RGB image and the shape's (x0, y0, x1, y1) box.
    """
    image = np.empty((size, size, 3), np.uint8)
    image[:] = COLOURS[background]
    fill = tuple(int(v) for v in COLOURS[colour])
    cx, cy = centre
    half = extent / 2
    x0, y0, x1, y1 = (int(round(v)) for v in (cx - half, cy - half, cx + half - 1, cy + half - 1))
    if shape == "circle":
        cv2.circle(image, (int(round(cx - 0.5)), int(round(cy - 0.5))), int(round(half)), fill, thickness=-1)
    elif shape == "square":
        cv2.rectangle(image, (x0, y0), (x1, y1), fill, thickness=-1)
    elif shape == "triangle":
        # Upright isosceles triangle filling the box: apex at top centre.
        points = np.array([[(x0 + x1) // 2, y0], [x0, y1], [x1, y1]], np.int32)
        cv2.fillPoly(image, [points], fill)
    else:
        raise UserError(f"shape {shape!r}: must be one of {', '.join(SHAPES)}")
    return image, (x0, y0, x1, y1)


def draw_varied_reference(colour: str, shape: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """A reference image as users draw theirs, not like the training targets.

    The side is 64, 96 or 128 px (the data layer and the image processor resize it), the
    shape 20-85% of the side and possibly cut by the border, and half of them are
    anti-aliased (drawn at 4x and downsampled with area averaging).

    Args:
        colour, shape, background: names from :data:`COLOURS` / :data:`SHAPES`.
        rng: draws side, size, position and anti-aliasing.

    Returns:
        (side, side, 3) uint8 RGB.
    """
    side = int(rng.choice((64, 96, 128)))
    scale = 4 if rng.random() < 0.5 else 1
    extent = float(rng.uniform(0.2, 0.85) * side)
    cx, cy = (float(v) for v in rng.uniform(extent / 3, side - extent / 3, size=2))
    image, _ = draw_shape(side * scale, colour, shape, background, (cx * scale, cy * scale), extent * scale)
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA) if scale > 1 else image


def canny_condition(image: np.ndarray) -> np.ndarray:
    """The ControlNet condition map: ``cv2.Canny(rgb, 100, 200)`` as 3-channel uint8."""
    edges = cv2.Canny(image, 100, 200)  # (H, W) 0/255
    return np.repeat(edges[:, :, None], 3, axis=2)


def _random_placement(rng: np.random.Generator, size: int) -> tuple[tuple[float, float], float]:
    extent = float(rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION) * size)
    margin = extent / 2 + 1  # one pixel of background around the shape, so edges exist
    cx = float(rng.uniform(margin, size - margin))
    cy = float(rng.uniform(margin, size - margin))
    return (cx, cy), extent


class ShapesWorld:
    """A deterministic stream of shapes-world samples.

    Args:
        seed: sample ``i`` depends only on ``(seed, i)``.
        size: image side in pixels (the embedded base's native 64).
        include_held_out: also draw :data:`HELD_OUT_COMBOS` (False for training data).
        partial_captions: share of samples captioned by :func:`partial_caption` instead
            of the full caption (drawn per sample, so it depends only on ``(seed, i)``).
        reference_variety: share of samples whose reference is drawn by
            :func:`draw_varied_reference` (as users draw theirs) instead of like the target.
    """

    def __init__(
        self, seed: int = 0, size: int = 64, include_held_out: bool = False, partial_captions: float = 0.0, reference_variety: float = 0.0
    ) -> None:
        if size < 32:
            raise UserError(f"shapes world size {size}: must be at least 32 pixels")
        self.seed = int(seed)
        self.size = int(size)
        self.combos = all_combos() if include_held_out else training_combos()
        self.partial_captions = float(partial_captions)
        self.reference_variety = float(reference_variety)

    @classmethod
    def for_recipe(cls, data, seed: int) -> "ShapesWorld":
        """The training world a recipe's ``data`` section asks for (``data.path: shapes``).

        Args:
            data: the recipe's data section (``shapes_partial_captions``, ``shapes_reference_variety``).
            seed: the recipe's seed.
        """
        return cls(seed=seed, partial_captions=data.shapes_partial_captions, reference_variety=data.shapes_reference_variety)

    def sample(self, index: int) -> ShapeSample:
        """Sample number ``index`` (any non-negative int)."""
        rng = np.random.default_rng([self.seed, int(index)])
        colour, shape, background = self.combos[int(rng.integers(len(self.combos)))]
        sample = self.draw(colour, shape, background, rng)
        caption_rng = np.random.default_rng([self.seed, int(index), 1])  # its own stream: images stay as they were
        if caption_rng.random() < self.partial_captions:
            sample = dataclasses.replace(sample, caption=partial_caption(colour, shape, background, caption_rng))
        reference_rng = np.random.default_rng([self.seed, int(index), 2])  # likewise its own stream
        if reference_rng.random() < self.reference_variety:
            sample = dataclasses.replace(sample, reference=draw_varied_reference(colour, shape, background, reference_rng))
        return sample

    def draw(self, colour: str, shape: str, background: str, rng: np.random.Generator) -> ShapeSample:
        """Draw a given combo at a random placement from ``rng`` (plus its reference image)."""
        centre, extent = _random_placement(rng, self.size)
        image, box = draw_shape(self.size, colour, shape, background, centre, extent)
        ref_centre, ref_extent = _random_placement(rng, self.size)
        reference, _ = draw_shape(self.size, colour, shape, background, ref_centre, ref_extent)
        return ShapeSample(
            image=image,
            caption=caption_for(colour, shape, background),
            colour=colour,
            shape=shape,
            background=background,
            condition=canny_condition(image),
            reference=reference,
            box=box,
        )

    def __iter__(self) -> Iterator[ShapeSample]:
        return (self.sample(i) for i in itertools.count())

    def batch(self, start: int, count: int) -> list[ShapeSample]:
        """Samples ``start .. start + count - 1``."""
        return [self.sample(i) for i in range(start, start + count)]


def write_dataset(out_dir: str | Path, n: int, seed: int = 0, size: int = 64) -> Path:
    """Write ``n`` training samples in condkit's dataset folder format.

    Layout: ``images/NAME.png`` + ``images/NAME.txt`` (caption), ``conditions/NAME.png``
    (Canny map), ``references/NAME.png`` (IP-Adapter reference) and ``metadata.jsonl``
    with ``file_name``, ``text``, ``condition_file_name``, ``reference_file_name`` (paths
    relative to ``out_dir``) plus the ``colour``/``shape``/``background`` labels.
    Every file is written atomically; held-out combos are never written.

    Args:
        out_dir: destination folder (created).
        n: number of samples.
        seed: world seed.
        size: image side in pixels.

    Returns:
        ``out_dir``.
    """
    from PIL import Image

    from condkit.io import atomic_path, write_text_atomic

    if n < 1:
        raise UserError(f"write_dataset: n={n} must be at least 1")
    out_dir = Path(out_dir)
    world = ShapesWorld(seed, size)
    rows = []
    for index in range(n):
        sample = world.sample(index)
        name = f"{index:06d}"
        files = {
            "file_name": f"images/{name}.png",
            "condition_file_name": f"conditions/{name}.png",
            "reference_file_name": f"references/{name}.png",
        }
        for key, array in (("file_name", sample.image), ("condition_file_name", sample.condition), ("reference_file_name", sample.reference)):
            with atomic_path(out_dir / files[key]) as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
        write_text_atomic(out_dir / "images" / f"{name}.txt", sample.caption + "\n")
        rows.append(
            {
                "file_name": files["file_name"],
                "text": sample.caption,
                "condition_file_name": files["condition_file_name"],
                "reference_file_name": files["reference_file_name"],
                "colour": sample.colour,
                "shape": sample.shape,
                "background": sample.background,
            }
        )
    write_text_atomic(out_dir / "metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return out_dir
