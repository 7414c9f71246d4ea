"""Measure shapes-world images: which colour, which background, which shape.

Used to score samples of the embedded base (and adapters on it) without any learned
classifier:

* background = the named colour nearest to the median of the image's border pixels;
* foreground = the most common nearest named colour among the pixels that differ
  clearly from the measured background colour;
* shape = of the largest foreground contour, which enclosing figure it fills best:
  its minimum-area rectangle (square), minimum enclosing circle (circle) or minimum
  enclosing triangle (triangle). A clean square fills its rectangle fully, its circle
  to 64% and its triangle to 50%; a circle fills its circle fully, a triangle its
  triangle fully, so the best fill names the shape, independent of position and size.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from condkit.train.shapes_world import COLOURS, SHAPES

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], np.float32)  # (6, 3)

# A pixel belongs to the foreground when it is this far (RGB Euclidean) from the
# background colour; the closest two named colours (red/yellow... ) are > 150 apart.
FOREGROUND_DISTANCE = 60.0
# Fewer foreground pixels than this (of 4096 at 64x64) means "no shape drawn".
MIN_FOREGROUND_FRACTION = 0.02


@dataclasses.dataclass(frozen=True)
class ShapeReading:
    """What :func:`read_image` found.

    Attributes:
        colour: the dominant foreground colour name, or None when no foreground.
        background: the background colour name.
        shape: ``circle``/``square``/``triangle``, or None when no foreground.
        foreground_fraction: share of pixels counted as foreground.
    """

    colour: str | None
    background: str
    shape: str | None
    foreground_fraction: float


def nearest_colour_indices(pixels: np.ndarray) -> np.ndarray:
    """Index into the named colours of the nearest colour for each pixel.

    Args:
        pixels: (..., 3) RGB values.
    """
    distances = np.linalg.norm(pixels[..., None, :].astype(np.float32) - _PALETTE, axis=-1)  # (..., 6)
    return distances.argmin(axis=-1)


def border_pixels(image: np.ndarray, width: int = 2) -> np.ndarray:
    """The (n, 3) pixels of the ``width``-pixel frame around ``image``."""
    mask = np.zeros(image.shape[:2], bool)
    mask[:width] = mask[-width:] = True
    mask[:, :width] = mask[:, -width:] = True
    return image[mask]


def classify_contour(contour: np.ndarray) -> str:
    """Name the shape of one contour by its best-filled enclosing figure.

    Args:
        contour: an OpenCV contour, (n, 1, 2) int32.
    """
    area = cv2.contourArea(contour)
    if area <= 0:
        return "circle"
    (_, _), radius = cv2.minEnclosingCircle(contour)
    (_, _), (width, height), _ = cv2.minAreaRect(contour)
    triangle_area, _ = cv2.minEnclosingTriangle(contour.astype(np.float32))
    # Pixel contours run through pixel centres, so each enclosing figure is half a
    # pixel too small all round; grow them by that before comparing fills.
    fills = {
        "circle": area / (np.pi * (radius + 0.5) ** 2),
        "square": area / max((width + 1) * (height + 1), 1e-6) * min(width + 1, height + 1) / max(width + 1, height + 1),
        "triangle": area / max(triangle_area * 1.06, 1e-6),
    }
    return max(SHAPES, key=lambda name: fills[name])


def read_image(image: np.ndarray) -> ShapeReading:
    """Measure the colour, background and shape of one shapes-world-like image.

    Args:
        image: (H, W, 3) uint8 RGB (a PIL image converts with ``np.asarray``).
    """
    image = np.asarray(image)[..., :3]
    border = border_pixels(image)
    background_rgb = np.median(border, axis=0)
    background = _NAMES[int(nearest_colour_indices(background_rgb))]
    distance = np.linalg.norm(image.astype(np.float32) - background_rgb.astype(np.float32), axis=-1)  # (H, W)
    mask = distance > FOREGROUND_DISTANCE
    fraction = float(mask.mean())
    if fraction < MIN_FOREGROUND_FRACTION:
        return ShapeReading(colour=None, background=background, shape=None, foreground_fraction=fraction)
    votes = np.bincount(nearest_colour_indices(image[mask]), minlength=len(_NAMES))
    votes[_NAMES.index(background)] = 0  # near-background pixels are edge blur, not the shape
    colour = _NAMES[int(votes.argmax())] if votes.any() else None
    mask8 = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(mask8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    shape = classify_contour(max(contours, key=cv2.contourArea)) if contours else None
    return ShapeReading(colour=colour, background=background, shape=shape, foreground_fraction=fraction)


def score_readings(readings: list[ShapeReading], labels: list[tuple[str, str, str]]) -> dict[str, float]:
    """Accuracy of readings against (colour, shape, background) labels.

    Args:
        readings: one per image, from :func:`read_image`.
        labels: the (colour, shape, background) each image was asked for.

    Returns:
        ``colour_accuracy``, ``background_accuracy``, ``shape_accuracy``, ``all_accuracy``
        (all three right), each in [0, 1].
    """
    if len(readings) != len(labels) or not readings:
        raise ValueError(f"need equally many readings and labels, got {len(readings)} and {len(labels)}")
    colour = [r.colour == c for r, (c, _, _) in zip(readings, labels)]
    shape = [r.shape == s for r, (_, s, _) in zip(readings, labels)]
    background = [r.background == b for r, (_, _, b) in zip(readings, labels)]
    return {
        "colour_accuracy": float(np.mean(colour)),
        "background_accuracy": float(np.mean(background)),
        "shape_accuracy": float(np.mean(shape)),
        "all_accuracy": float(np.mean([a and b and c for a, b, c in zip(colour, shape, background)])),
    }


def sample_and_score(
    pipe,
    combos: list[tuple[str, str, str]],
    seeds: list[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 12,
) -> tuple[dict[str, float], list, list[tuple[str, str, str]]]:
    """Sample every combo with every seed through a text-to-image pipeline and score the images.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline`` (or anything called the same way).
        combos: (colour, shape, background) triples to prompt for.
        seeds: one image per combo and seed; image ``(combo, seed)`` uses
            ``torch.Generator().manual_seed(seed)``, independent of batching.
        num_inference_steps, guidance_scale: sampling settings.
        batch_size: prompts per pipeline call.

    Returns:
        ``(scores, images, labels)``: :func:`score_readings` figures, the PIL images
        and the label of each, in (combo, seed) order.
    """
    import torch

    from condkit.train.shapes_world import caption_for

    jobs = [(combo, seed) for combo in combos for seed in seeds]
    images = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images += pipe(
            [caption_for(*combo) for combo, _ in chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
        ).images
    labels = [combo for combo, _ in jobs]
    scores = score_readings([read_image(np.asarray(image)) for image in images], labels)
    return scores, images, labels
