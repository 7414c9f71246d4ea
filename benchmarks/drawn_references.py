"""Reference images drawn the way a user would, independently of the shapes-world generator.

The shapes world draws its references with OpenCV at 64 px, sizes 30-75% of the side,
without anti-aliasing, by the same code as the training targets. A user draws theirs
with whatever tool they have. These references share no rendering code with it: PIL's
``ImageDraw``, image sides of 64, 96 or 128 px (the pipeline's image processor resizes
them), shapes from 20% to 85% of the side anywhere in the image (possibly touching the
border), and half of them anti-aliased (drawn at 4x and downsampled with Lanczos).
Only the six colour values are shared: they are what the labels name.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from condkit.train.shapes_world import COLOURS

SHAPES = ("circle", "square", "triangle")
SIDES = (64, 96, 128)
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class DrawnReference:
    """One drawn reference and what it shows.

    Attributes:
        image: the reference (PIL RGB, side 64, 96 or 128).
        colour, shape, background: the shapes-world names of what it shows.
        antialiased: drawn at 4x and downsampled (soft edges) rather than pixel-hard.
    """

    image: Image.Image
    colour: str
    shape: str
    background: str
    antialiased: bool


def draw_reference(colour: str, shape: str, background: str, rng: np.random.Generator, antialiased: bool) -> DrawnReference:
    """Draw one reference with PIL at a random side, size and position.

    Args:
        colour, shape, background: what to draw (names of :data:`COLOURS`, :data:`SHAPES`).
        rng: draws the side, the shape's size (20-85% of the side) and its centre.
        antialiased: draw at 4x and downsample with Lanczos.
    """
    side = int(rng.choice(SIDES))
    scale = SUPERSAMPLE if antialiased else 1
    extent = rng.uniform(0.2, 0.85) * side
    cx, cy = rng.uniform(extent / 3, side - extent / 3, size=2)  # may overlap the border a little
    canvas = Image.new("RGB", (side * scale, side * scale), COLOURS[background])
    draw = ImageDraw.Draw(canvas)
    half = extent / 2 * scale
    x, y = cx * scale, cy * scale
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([x - half, y - half, x + half, y + half], fill=fill)
    elif shape == "square":
        draw.rectangle([x - half, y - half, x + half, y + half], fill=fill)
    else:  # an upright triangle
        draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=fill)
    if antialiased:
        canvas = canvas.resize((side, side), Image.Resampling.LANCZOS)
    return DrawnReference(canvas, colour, shape, background, antialiased)


def drawn_references(count: int, seed: int = 11) -> list[DrawnReference]:
    """``count`` references over all (colour, shape, background) pairs, half anti-aliased.

    Colour pairs cycle through all 30 ordered pairs of different colours before repeating
    (so every colour appears as shape and as background), shapes cycle too.

    Args:
        count: how many.
        seed: seed of sides, sizes and positions.
    """
    rng = np.random.default_rng(seed)
    pairs = [(c, b) for c in COLOURS for b in COLOURS if c != b]
    order = rng.permutation(len(pairs))
    references = []
    for index in range(count):
        colour, background = pairs[order[index % len(pairs)]]
        shape = SHAPES[index % len(SHAPES)]
        references.append(draw_reference(colour, shape, background, rng, antialiased=index % 2 == 1))
    return references
