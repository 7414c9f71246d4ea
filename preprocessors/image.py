"""Image plumbing shared by every preprocessor: any input to RGB uint8, sizes, resizing.

Preprocessors work on numpy RGB arrays ``(H, W, 3) uint8``. Everything else a user may
hand over (PIL images in any mode, grayscale or RGBA arrays, 16-bit or float data) is
converted here, once, so each preprocessor stays a few lines of OpenCV.

:func:`load_image` is condkit's one image-file loader (training data, condition maps,
reference images, ``condkit preprocess``, ``--ip-image``/``--control-image``): it refuses
files above the pixel limit (``$CONDKIT_MAX_IMAGE_PIXELS``, default 64 megapixels) from
their header before decoding, applies EXIF orientation and composites transparency on
white, so every path sees the same pixels.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import ExifTags, Image

from condkit.errors import UserError

# SD latents are 1/8 of the pixel size, so every output side is a multiple of this.
SIZE_MULTIPLE = 8
# The pixel limit: 64 megapixels (e.g. 8000 x 8000) decodes to 192 MB of RGB; larger
# files are refused from their header, before any decoding, unless the variable says more.
MAX_PIXELS_ENV = "CONDKIT_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# How to make an EXIF-oriented image upright (the table of PIL's ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIDES_SWAPPED = (5, 6, 7, 8)


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


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten any image with transparency onto white (what a viewer shows)."""
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA"))


def _deep_gray_to_uint8(image: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a 16/32-bit integer or float gray image, scaled rather than clipped.

    16-bit modes (and integer data above 255) are scaled from 0..65535; float data in
    [0, 1] from that range; anything else is taken as 0..255.
    """
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or top > 255:
        scale = 65535.0
    elif image.mode == "F" and top <= 1.0:
        scale = 1.0
    else:
        scale = 255.0
    return np.clip(np.nan_to_num(values) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)


def pil_to_array(image: Image.Image, keep_alpha: bool = False) -> np.ndarray:
    """Convert a PIL image of any mode to an RGB (or RGBA) uint8 array.

    Transparency (RGBA, LA, PA, P or RGB with a transparent colour) is composited on
    white, so a transparent PNG gives the same pixels in training, preprocessing and
    generation.

    Args:
        image: a PIL image: RGB, RGBA, L, LA, P (with or without transparency), 1, CMYK,
            YCbCr, I;16, I or F.
        keep_alpha: return ``(H, W, 4)`` with the alpha channel (opaque if the image has none).
    """
    if image.mode.startswith("I") or image.mode == "F":
        # PIL's own convert("RGB") clips these at 255 instead of scaling them down.
        gray = cv2.cvtColor(_deep_gray_to_uint8(image), cv2.COLOR_GRAY2RGB)
        if keep_alpha:
            return np.dstack([gray, np.full(gray.shape[:2], 255, np.uint8)])
        return gray
    if keep_alpha:
        return np.asarray(image.convert("RGBA"))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = _composite_on_white(image)
    if image.mode != "RGB":  # convert() copies even when the mode already matches
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image))


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


def max_image_pixels() -> int:
    """The largest image (width x height) condkit decodes: ``$CONDKIT_MAX_IMAGE_PIXELS``,
    else :data:`DEFAULT_MAX_IMAGE_PIXELS`.

    Raises:
        UserError: the variable is set but is not a positive whole number.
    """
    text = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r}: must be a positive whole number of pixels")
    return int(text)


@contextlib.contextmanager
def _pil_bomb_check_replaced() -> Iterator[None]:
    """PIL's fixed decompression-bomb check off while :func:`open_image` applies condkit's.

    PIL raises its own ``DecompressionBombError`` (a traceback, and a limit the user
    cannot set) inside ``Image.open``; condkit checks the same header size itself with
    the user's limit, so PIL's check is off for that one call only.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@contextlib.contextmanager
def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """Open an image lazily (header only) and refuse it before decoding when it is too large.

    Args:
        path: the image file.
        max_pixels: the limit on width x height; default :func:`max_image_pixels`.

    Yields:
        The opened, not yet decoded, PIL image (closed on exit).

    Raises:
        UserError: the file is missing, is not an image, or has more pixels than the limit.
    """
    path = Path(path)
    limit = max_pixels or max_image_pixels()
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with _pil_bomb_check_replaced():
            image = Image.open(path)
    except Exception as exc:  # PIL raises many types for files that are not images
        raise UserError(f"{path}: not an image that can be decoded ({_reason(exc)})") from None
    with image:
        width, height = image.size
        if width * height > limit:
            raise UserError(
                f"{path}: image is {width}x{height} px ({width * height / 1e6:.0f} megapixels), over the limit of "
                f"{limit / 1e6:g} megapixels; set {MAX_PIXELS_ENV} to a larger number of pixels to allow it"
            )
        yield image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) from an opened image's header, without decoding it.

    PNG keeps EXIF in an ``eXIf`` chunk; only one before the pixel data (in the header)
    counts, as asking PIL for a later one would decode the whole image.

    Args:
        image: an image from :func:`open_image`.
    """
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block: show the pixels as stored
        return 1
    return orientation if orientation in _ORIENTATION_TRANSPOSE or orientation == 1 else 1


def oriented_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`load_image` returns it, from the header only.

    Args:
        path: the image file.

    Raises:
        UserError: as :func:`open_image`.
    """
    with open_image(path) as image:
        width, height = image.size
        return (height, width) if exif_orientation(image) in _SIDES_SWAPPED else (width, height)


def load_image(path: str | os.PathLike, keep_alpha: bool = False, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as RGB (or RGBA) uint8: THE image loader of condkit.

    Training data, condition maps, reference images, ``condkit preprocess`` and
    ``--ip-image``/``--control-image`` all read files here, so they all get the same
    pixels: the size is checked from the header before decoding (see
    :func:`open_image`), EXIF orientation is applied, transparency is composited on
    white (see :func:`pil_to_array`), and every failure is one line naming the file.

    Args:
        path: the image file.
        keep_alpha: return ``(H, W, 4)`` with the alpha channel.
        max_pixels: the limit on width x height; default :func:`max_image_pixels`.

    Raises:
        UserError: the file is missing, too large, or not an image PIL can decode.
    """
    with open_image(path, max_pixels) as image:
        orientation = exif_orientation(image)
        try:
            image.load()
            upright = image.transpose(_ORIENTATION_TRANSPOSE[orientation]) if orientation != 1 else image
            return pil_to_array(upright, keep_alpha=keep_alpha)
        except UserError:
            raise
        except Exception as exc:  # PIL raises many types for broken files
            raise UserError(f"{path}: not an image that can be decoded ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
