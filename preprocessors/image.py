"""Image plumbing shared by every preprocessor: any input to RGB uint8, sizes, resizing.

Preprocessors work on numpy RGB arrays ``(H, W, 3) uint8``. Everything else a user may
hand over (PIL images in any mode, grayscale or RGBA arrays, 16-bit or float data) is
converted here, once, so each preprocessor stays a few lines of OpenCV.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from condkit.errors import UserError

# SD latents are 1/8 of the pixel size, so every output side is a multiple of this.
SIZE_MULTIPLE = 8


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale an integer or float array to uint8 without wrapping around.

    Args:
        array: uint8 (returned as is), uint16/other integers (high byte kept), bool, or
            float data in [0, 1].
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        top = max(int(array.max()), 1)
        return (array.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
    return (np.nan_to_num(array.astype(np.float64)) * 255.0).round().clip(0, 255).astype(np.uint8)


def hwc3(array: np.ndarray) -> np.ndarray:
    """Return ``array`` as ``(H, W, 3) uint8``: gray is repeated, alpha is dropped.

    Args:
        array: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` of any numeric dtype.
    """
    array = to_uint8(np.asarray(array))
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise UserError(f"image has shape {array.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if array.shape[2] == 1:
        return cv2.cvtColor(np.ascontiguousarray(array[:, :, 0]), cv2.COLOR_GRAY2RGB)  # ~8x faster than np.repeat
    return np.ascontiguousarray(array[:, :, :3])


def pil_to_array(image: Image.Image, keep_alpha: bool = False) -> np.ndarray:
    """Convert a PIL image of any mode to an RGB (or RGBA) uint8 array.

    Args:
        image: a PIL image: RGB, RGBA, L, LA, P (with or without transparency), 1, CMYK,
            YCbCr, I;16, I or F.
        keep_alpha: return ``(H, W, 4)`` with the alpha channel (opaque if the image has none).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's own convert("RGB") clips these at 255 instead of scaling them down.
        gray = hwc3(np.asarray(image))
        if keep_alpha:
            return np.dstack([gray, np.full(gray.shape[:2], 255, np.uint8)])
        return gray
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if keep_alpha:
        return np.asarray(image.convert("RGBA"))
    if has_alpha:
        image = image.convert("RGBA")
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """Return any supported image as a contiguous ``(H, W, 3) uint8`` RGB array.

    Args:
        image: a PIL image (any mode) or a numpy array (RGB, RGBA, gray; uint8, uint16,
            bool or float in [0, 1]). Arrays are taken to be RGB, not OpenCV's BGR.
    """
    if isinstance(image, Image.Image):
        return pil_to_array(image)
    if isinstance(image, np.ndarray):
        return hwc3(image)
    raise UserError(f"cannot use a {type(image).__name__} as an image; pass a PIL image or a numpy array")


def load_image(path: str | os.PathLike, keep_alpha: bool = False) -> np.ndarray:
    """Read an image file as RGB (or RGBA) uint8, honouring EXIF orientation.

    OpenCV decodes the common formats fastest; PIL is the fallback for the rest (GIF,
    CMYK JPEG, palette PNG with transparency when alpha is wanted).

    Args:
        path: the image file.
        keep_alpha: return ``(H, W, 4)`` with the alpha channel.

    Raises:
        UserError: the file is missing or is not an image either library can decode.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if not keep_alpha:
        # Both flags apply EXIF orientation; OpenCV >= 4.10 decodes straight to RGB.
        rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
        decoded = cv2.imread(str(path), cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag)
        if decoded is not None:
            return decoded if rgb_flag is not None else cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(path) as pil:
            pil.load()
            return pil_to_array(ImageOps.exif_transpose(pil), keep_alpha=keep_alpha)
    except Exception as exc:  # PIL raises many types for broken files
        raise UserError(f"{path}: not an image that can be decoded ({type(exc).__name__})") from None


def target_size(height: int, width: int, resolution: int | None) -> tuple[int, int]:
    """The ``(height, width)`` an image is resized to for a given resolution.

    Follows the ControlNet annotators' ``resize_image``: the short side becomes
    ``resolution`` and the long side keeps the aspect ratio; sides are rounded to a
    multiple of 8 (what SD needs) rather than 64, so aspect ratios are kept closer.

    Args:
        height: input height.
        width: input width.
        resolution: target short side in pixels, or None to keep the input size.
    """
    if resolution is None:
        return height, width
    if resolution < SIZE_MULTIPLE:
        raise UserError(f"resolution {resolution} is too small; use at least {SIZE_MULTIPLE}")
    scale = resolution / min(height, width)

    def side(n: int) -> int:
        return max(SIZE_MULTIPLE, int(round(n * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)

    return side(height), side(width)


def resize_to(image: np.ndarray, size: tuple[int, int], interpolation: int | None = None) -> np.ndarray:
    """Resize to ``(height, width)``; a no-op (no copy) when the size already matches.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array.
        size: ``(height, width)``.
        interpolation: an OpenCV flag; by default area for shrinking (no aliasing) and
            cubic for enlarging.
    """
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    if interpolation is None:
        shrinking = height * width < image.shape[0] * image.shape[1]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(image, (width, height), interpolation=interpolation)
