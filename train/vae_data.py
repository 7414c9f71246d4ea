"""Images beyond the shapes world for the embedded VAE: any colour, simple forms, photos.

The shapes world has six colours, so a VAE trained on it alone maps every other colour
onto one of them (grey came back green). The VAE stage mixes the shapes world with
three other sources so that round trips of arbitrary colours and simple forms are
faithful, as a real SD VAE's are:

* **flat scenes**: a background of a uniformly random colour (or a linear gradient
  between two), with one to four random forms (filled or outlined circles, ellipses,
  rectangles, triangles, stars, rings, lines) in uniformly random colours, drawn with or
  without anti-aliasing;
* **photos**: random 64 px crops of scikit-image's sample photos, rescaled at random
  (scikit-image is a test dependency; the VAE stage is a developer step);
* **shapes world** samples, which the stage also anchors to the previous VAE's latents
  (see :mod:`condkit.train.vae`).

Everything is drawn from a ``numpy.random.Generator`` passed in, so a batch depends only
on its seed.
"""

from __future__ import annotations

import cv2
import numpy as np

# scikit-image sample images that ship inside the package (no download). The held-out ones
# are only used to measure PSNR.
TRAINING_PHOTOS: tuple[str, ...] = (
    "astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "camera", "coins", "grass", "gravel", "brick", "moon",
)
HELD_OUT_PHOTOS: tuple[str, ...] = ("chelsea", "clock", "cell")

FORMS: tuple[str, ...] = ("circle", "ellipse", "rectangle", "triangle", "star", "ring", "line")


def load_photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """scikit-image sample photos as (H, W, 3) uint8 RGB arrays (grey ones replicated).

    Args:
        names: attribute names in ``skimage.data``.
    """
    import skimage.data

    photos = []
    for name in names:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(image[:, :, :3]).astype(np.uint8))
    return photos


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour drawn uniformly from the RGB cube."""
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def gradient_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random colours in a random direction: (size, size, 3) uint8."""
    start, end = np.array(random_colour(rng), np.float32), np.array(random_colour(rng), np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    t = (np.cos(angle) * (xs - 0.5) + np.sin(angle) * (ys - 0.5)) / np.sqrt(0.5) + 0.5  # (size, size) ~[0, 1]
    t = np.clip(t, 0.0, 1.0)[:, :, None]
    return (start * (1 - t) + end * t).round().astype(np.uint8)


def star_points(cx: float, cy: float, radius: float, points: int, rotation: float) -> np.ndarray:
    """Vertices of a star polygon (outer radius ``radius``, inner 0.45 of it) as int32 (2*points, 2)."""
    angles = rotation + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, radius, 0.45 * radius)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1).round().astype(np.int32)


def draw_form(image: np.ndarray, rng: np.random.Generator) -> None:
    """Draw one random form in a random colour onto ``image`` (in place)."""
    size = image.shape[0]
    form = FORMS[int(rng.integers(len(FORMS)))]
    colour = random_colour(rng)
    line_type = cv2.LINE_AA if rng.random() < 0.5 else cv2.LINE_8
    filled = rng.random() < 0.7
    thickness = -1 if filled else int(rng.integers(1, 5))
    cx, cy = (float(v) for v in rng.uniform(0.1 * size, 0.9 * size, size=2))
    radius = float(rng.uniform(0.08, 0.4) * size)
    if form == "circle":
        cv2.circle(image, (round(cx), round(cy)), round(radius), colour, thickness, line_type)
    elif form == "ellipse":
        axes = (round(radius), round(radius * rng.uniform(0.3, 1.0)))
        cv2.ellipse(image, (round(cx), round(cy)), axes, float(rng.uniform(0, 180)), 0, 360, colour, thickness, line_type)
    elif form == "rectangle":
        corner = (round(cx - radius), round(cy - radius * rng.uniform(0.4, 1.0)))
        cv2.rectangle(image, corner, (round(cx + radius), round(cy + radius)), colour, thickness, line_type)
    elif form in ("triangle", "star"):
        if form == "star":
            polygon = star_points(cx, cy, radius, int(rng.integers(4, 7)), float(rng.uniform(0, np.pi)))
        else:
            polygon = np.ascontiguousarray(star_points(cx, cy, radius, 3, float(rng.uniform(0, np.pi)))[::2])
        if filled:
            cv2.fillPoly(image, [polygon], colour, line_type)
        else:
            cv2.polylines(image, [polygon], True, colour, thickness, line_type)
    elif form == "ring":
        cv2.circle(image, (round(cx), round(cy)), round(radius), colour, max(2, round(radius * 0.35)), line_type)
    else:  # line
        end = tuple(int(v) for v in rng.uniform(0, size, size=2).round())
        cv2.line(image, (round(cx), round(cy)), end, colour, int(rng.integers(1, 6)), line_type)


def flat_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A flat or gradient background with 1-4 random forms: (size, size, 3) uint8 RGB."""
    if rng.random() < 0.3:
        image = gradient_background(rng, size)
    else:
        image = np.empty((size, size, 3), np.uint8)
        image[:] = random_colour(rng)
    for _ in range(int(rng.integers(1, 5))):
        draw_form(image, rng)
    return image


def photo_crop(photos: list[np.ndarray], rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a random photo, rescaled so its side is ``size``: uint8 RGB.

    The crop side is drawn between ``size`` and the photo's short side, so crops range
    from full detail to a whole-photo thumbnail.
    """
    photo = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    side = int(rng.integers(min(size, height, width), min(height, width) + 1))
    y0, x0 = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = photo[y0 : y0 + side, x0 : x0 + side]
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return crop[:, ::-1].copy() if rng.random() < 0.5 else crop
