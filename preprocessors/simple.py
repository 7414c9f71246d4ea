"""Maps that are the image itself, rearranged: ``shuffle``, ``tile``, ``color`` and ``inpaint``."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import cv2
import numpy as np

from condkit.errors import UserError
from condkit.preprocessors.image import load_image, pil_to_array, resize_to, target_size, to_rgb
from condkit.preprocessors.registry import Preprocessor, register


def smooth_noise(height: int, width: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field in [0, 1]: uniform noise on a ``cell``-px grid, cubic-upsampled.

    The same construction as ControlNet v1.1's ``make_noise_disk``.

    Args:
        height: output height.
        width: output width.
        cell: grid spacing in pixels (larger: bigger shuffled patches).
        rng: the random generator.
    """
    coarse = rng.uniform(0.0, 1.0, size=(height // cell + 2, width // cell + 2))
    noise = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    noise = noise[cell : cell + height, cell : cell + width]
    noise = noise - noise.min()
    return noise / max(float(noise.max()), 1e-12)


@register("shuffle")
@dataclasses.dataclass
class Shuffle(Preprocessor):
    """ControlNet v1.1 content shuffle: the image warped by a smooth random flow field.

    Args:
        cell: noise grid spacing in pixels (v1.1 uses 256).
        seed: random seed; None draws a new shuffle every call.
    """

    cell: int = 256
    seed: int | None = None

    def process(self, rgb: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        height, width = rgb.shape[:2]
        map_x = smooth_noise(height, width, self.cell, rng) * float(width - 1)
        map_y = smooth_noise(height, width, self.cell, rng) * float(height - 1)
        return cv2.remap(rgb, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR)


@register("tile")
@dataclasses.dataclass
class Tile(Preprocessor):
    """ControlNet v1.1 tile: the image shrunk by ``2**pyr_up_iters`` and ``cv2.pyrUp``-ed back.

    Args:
        pyr_up_iters: number of halvings (3: 1/8 size, as the tile annotator).
    """

    pyr_up_iters: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.pyr_up_iters <= 8:
            raise UserError(f"tile: pyr_up_iters must be in 0..8, got {self.pyr_up_iters}")

    def process(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        factor = 2**self.pyr_up_iters
        small = cv2.resize(
            rgb, (max(1, round(width / factor)), max(1, round(height / factor))), interpolation=cv2.INTER_AREA
        )
        for _ in range(self.pyr_up_iters):
            small = cv2.pyrUp(small)
        # pyrUp doubles exactly; bring the rounding remainder back to the work size.
        return resize_to(small, (height, width), cv2.INTER_LINEAR)


@register("color", "palette")
@dataclasses.dataclass
class Color(Preprocessor):
    """T2I-Adapter colour palette: cubic shrink by ``block`` then nearest-neighbour blow-up.

    Args:
        block: block size in pixels (the adapter's convention is 64).
    """

    block: int = 64
    output_interpolation = cv2.INTER_NEAREST  # keep the blocks crisp at any output size

    def process(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        small = cv2.resize(
            rgb, (max(1, width // self.block), max(1, height // self.block)), interpolation=cv2.INTER_CUBIC
        )
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def load_mask(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """A boolean inpaint mask (True = repaint) at ``size`` from a path, PIL image or array.

    Args:
        mask: file path, PIL image or array; white / nonzero marks the area to repaint.
        size: ``(height, width)`` wanted.
    """
    if isinstance(mask, (str, os.PathLike)):
        mask = load_image(mask)
    gray = to_rgb(mask).max(axis=2)
    return resize_to(gray, size, cv2.INTER_NEAREST) >= 128


def inpaint_condition(image: Any, mask: Any) -> np.ndarray:
    """The float condition of the ControlNet v1.1 inpaint model: RGB in [0, 1], -1 where masked.

    This is what ``control_v11p_sd15_inpaint`` was trained on (and what diffusers'
    example ``make_inpaint_condition`` builds); a uint8 PNG cannot hold -1, so pass this
    array (``(H, W, 3) float32``) to the pipeline instead of the saved map.

    Args:
        image: the image (PIL or array).
        mask: white / nonzero where to repaint (path, PIL image or array).
    """
    rgb = to_rgb(image)
    condition = rgb.astype(np.float32) / 255.0
    condition[load_mask(mask, rgb.shape[:2])] = -1.0
    return condition


@register("inpaint")
@dataclasses.dataclass
class Inpaint(Preprocessor):
    """Inpaint helper: the image with the area to repaint blacked out, or the mask itself.

    The mask comes from the ``mask`` option (a file or array, white = repaint) or else
    from the input's alpha channel (transparent = repaint). ControlNet v1.1 inpaint wants
    -1 in the masked area, which uint8 cannot hold: the saved map has 0 there and
    :func:`inpaint_condition` builds the exact float condition.

    Args:
        mask: mask file or array; None reads the input's alpha channel.
        output: ``"masked"`` (image, masked area black) or ``"mask"`` (white on black).
    """

    mask: Any = None
    output: str = "masked"
    wants_alpha = True

    def __post_init__(self) -> None:
        if self.output not in ("masked", "mask"):
            raise UserError(f"inpaint: output must be 'masked' or 'mask', got {self.output!r}")

    def __call__(self, image: Any) -> np.ndarray:
        rgba = pil_to_array(image, keep_alpha=True) if not isinstance(image, np.ndarray) else image
        rgb = to_rgb(rgba)
        if self.mask is not None:
            hole = load_mask(self.mask, rgb.shape[:2])
        elif rgba.ndim == 3 and rgba.shape[2] == 4:
            hole = rgba[:, :, 3] < 128
        else:
            raise UserError("inpaint: no mask given and the image has no alpha channel; pass mask=FILE")
        out_size = target_size(*rgb.shape[:2], self.image_resolution)
        if self.output == "mask":
            result = np.repeat(hole[:, :, None], 3, axis=2).astype(np.uint8) * 255
        else:
            result = rgb.copy()
            result[hole] = 0
        return resize_to(result, out_size, cv2.INTER_NEAREST)
