"""Masked loss (``train.masked_loss``): weight the diffusion loss per pixel by a mask.

Where a mask comes from, per training image: a same-stem ``NAME.mask.png`` beside it
(any image suffix; white = learn, black = ignore, grey in between; read as luminance),
else the image's alpha channel (opaque = learn), else none: full weight, said once in the
log. Files named ``*.mask.<suffix>`` are never training images themselves
(:func:`condkit.train.data.list_images`).

A mask travels as one of the image's aligned per-sample inputs (:data:`MASK_INPUT`), so it
is resized, cropped (the same random crop, the same aspect-ratio bucket) and flipped by
exactly the code that does it to the image, then averaged down to the latent grid (area
interpolation). With a latent cache it is cached beside the latents (both flips), and the
cache key covers its file (path, size, modification time).

Normalisation: a weighted mean per sample, ``sum(mask * err) / sum(mask)`` over the latent
pixels (and channels), i.e. the loss averaged over the learned area (OneTrainer's
``normalize_masked_area_loss``). A sample with a small mask counts as much as a full one,
and the learning rate needs no change; kohya's ``masked_loss`` instead takes the plain mean
of ``mask * err``, which equals this times the mask's mean. An all-black mask contributes 0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from condkit.adapters.base import SampleInput
from condkit.errors import UserError

LOSS_MASK = "loss_mask"  # the batch / cache key: pixels (b, 3, H, W) in [0, 1]; latents (b, 1, h, w)
MASK_INPUT = SampleInput(name=LOSS_MASK, label="loss mask", aligned=True)
MASK_STEM_SUFFIX = ".mask"  # NAME.mask.png beside NAME.png


def is_mask_file(path: Path) -> bool:
    """Whether a file is a loss mask by its name (``NAME.mask.png``, any image suffix).

    Args:
        path: the file.
    """
    from condkit.train.data import IMAGE_SUFFIXES

    return path.suffix.lower() in IMAGE_SUFFIXES and Path(path.stem).suffix.lower() == MASK_STEM_SUFFIX


def mask_file_of(image: Path) -> Path | None:
    """The mask beside an image (``NAME.mask.png`` first, then other image suffixes), or None.

    Args:
        image: the training image's file.
    """
    from condkit.train.data import IMAGE_SUFFIXES

    for suffix in IMAGE_SUFFIXES:
        for spelling in (suffix, suffix.upper()):
            candidate = image.with_name(image.stem + MASK_STEM_SUFFIX + spelling)
            if candidate.is_file():
                return candidate
    return None


@dataclasses.dataclass(frozen=True)
class MaskSource:
    """Where one image's mask is read from: a mask file, or the image's alpha channel.

    It loads itself (:meth:`load_rgb`, called by :func:`condkit.train.data.load_rgb`) and
    names a file (``os.fspath``), which the latent cache's key records.

    Attributes:
        image: the training image.
        file: its ``NAME.mask.png``, or None: the alpha channel (opaque where there is none).
    """

    image: Path
    file: Path | None = None

    def __fspath__(self) -> str:
        return str(self.file or self.image)

    def __str__(self) -> str:
        return self.__fspath__()

    def load_rgb(self) -> np.ndarray:
        """The mask as (H, W, 3) uint8, the same value in each channel (255 = learn)."""
        from PIL import Image

        from condkit.preprocessors.image import load_image

        if self.file is not None:
            gray = np.asarray(Image.fromarray(load_image(self.file)).convert("L"))  # luminance of any mode
        else:
            gray = load_image(self.image, keep_alpha=True)[..., 3]  # 255 everywhere without alpha
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def training_inputs(masked_loss: bool) -> tuple[SampleInput, ...] | None:
    """The per-sample inputs a training set loads: the kinds' and, with masked loss, the mask.

    Args:
        masked_loss: ``train.masked_loss``.

    Returns:
        None (the kinds' inputs, the training set's default) when masked loss is off.
    """
    if not masked_loss:
        return None
    from condkit.train.data import sample_inputs

    return (*sample_inputs(), MASK_INPUT)


def attach_masks(records: list, masked_loss: bool, log: Callable[[str], Any]) -> list:
    """Give every record its mask source (``train.masked_loss``), checking mask sizes first.

    Images without a mask file or alpha channel get full weight (one log line says how
    many); in-memory images (the shapes world) always do.

    Args:
        records: the training records (:func:`condkit.train.data.find_records`).
        masked_loss: ``train.masked_loss``; off returns ``records`` unchanged.
        log: prints the one line (the accelerator's ``print``).

    Raises:
        UserError: a mask file whose size differs from its image's (naming both).
    """
    if not masked_loss:
        return records
    out, unmasked, full = [], set(), {}
    for record in records:
        image = record.image
        if isinstance(image, (str, Path)):
            image = Path(image)
            file = mask_file_of(image)
            if file is not None:
                _check_size(file, image)
            elif not _has_alpha(image):
                unmasked.add(str(image))
            source: Any = MaskSource(image, file)
        else:  # an array (or PIL image) in memory: no file can sit beside it
            from condkit.train.data import load_rgb

            shape = load_rgb(image).shape[:2]
            source = full.setdefault(shape, np.full((*shape, 3), 255, np.uint8))
            unmasked.add(id(image))
        out.append(dataclasses.replace(record, inputs={**record.inputs, LOSS_MASK: source}))
    if unmasked:
        total = len({str(r.image) if isinstance(r.image, (str, Path)) else id(r.image) for r in records})
        log(f"condkit: train.masked_loss: {len(unmasked)} of {total} images have no mask (no NAME.mask.png beside them, no alpha channel): trained at full weight")
    return out


def _upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as loaded (EXIF orientation applied), from its header."""
    from condkit.preprocessors.image import exif_orientation, open_image

    with open_image(path) as image:
        width, height = image.size
        return (height, width) if exif_orientation(image) in (5, 6, 7, 8) else (width, height)


def _check_size(file: Path, image: Path) -> None:
    """Refuse a mask whose size is not its image's (one line naming both)."""
    mask_size, image_size = _upright_size(file), _upright_size(image)
    if mask_size != image_size:
        raise UserError(
            f"{file}: loss mask is {mask_size[0]}x{mask_size[1]} px but its image {image.name} is {image_size[0]}x{image_size[1]} px"
        )


def _has_alpha(image: Path) -> bool:
    """Whether an image file has transparency (from its header)."""
    from condkit.preprocessors.image import open_image

    with open_image(image) as opened:
        return opened.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in opened.info


def latent_mask(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask averaged down to the latent grid.

    Args:
        pixels: (b, 3, H, W) in [0, 1] (the batch's ``loss_mask``).
        size: the latents' (h, w).

    Returns:
        (b, 1, h, w) float32: each latent pixel's share of "learn" (area interpolation).
    """
    return F.interpolate(pixels.float().mean(dim=1, keepdim=True), size=tuple(size), mode="area")


def with_loss_mask(extras: dict, latents: torch.Tensor, masked_loss: bool, batch: dict | None = None) -> dict:
    """A batch's extras with its latent mask under :data:`LOSS_MASK` (masked loss only).

    Cached batches already carry it; uncached ones get it from the pixel mask of
    ``batch``; batches without masks (prior-preservation class images) get ones, so the
    two halves concatenate.

    Args:
        extras: the adapters' encodings of the batch (name -> (b, ...)).
        latents: the batch's latents (b, c, h, w).
        masked_loss: ``train.masked_loss``; off returns ``extras`` unchanged.
        batch: the collated pixel batch, when not cached.
    """
    if not masked_loss or LOSS_MASK in extras:
        return extras
    if batch is not None and LOSS_MASK in batch:
        mask = latent_mask(batch[LOSS_MASK], latents.shape[-2:])
    else:
        mask = torch.ones(latents.shape[0], 1, *latents.shape[-2:])
    return {**extras, LOSS_MASK: mask}


def cacheable_mask(batch: dict, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the latent cache stores of a batch's mask: ``{LOSS_MASK: (b, 1, h, w)}``, or nothing.

    Args:
        batch: the collated pixel batch.
        latents: its latent distribution's mean (b, c, h, w), for the grid size.
    """
    return {LOSS_MASK: latent_mask(batch[LOSS_MASK], latents.shape[-2:])} if LOSS_MASK in batch else {}


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The per-sample MSE: the plain mean, or with a mask the mean over the masked area.

    Args:
        prediction, target: (b, c, h, w).
        mask: (b, 1, h, w) in [0, 1], or None (masked loss off).

    Returns:
        (b,) float32.
    """
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")  # (b, c, h, w)
    dims = tuple(range(1, prediction.ndim))
    if mask is None:
        return error.mean(dim=dims)
    weights = mask.float().expand_as(error)
    return (error * weights).sum(dim=dims) / weights.sum(dim=dims).clamp_min(1e-8)
