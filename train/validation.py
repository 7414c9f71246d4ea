"""Validation samples: prompt grids, saved as PNG and to TensorBoard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from condkit.io import atomic_path


def sample_prompts(base, adapters, validation, extra_call_kwargs: dict | None = None) -> list[Image.Image]:
    """Sample one image per validation prompt with every attached adapter active.

    Args:
        base: the base model with adapters attached.
        adapters: the attached adapters (their pipeline components and call kwargs are used).
        validation: a :class:`condkit.train.config.ValidationConfig`.
        extra_call_kwargs: more pipeline call arguments (e.g. a condition image).
    """
    from condkit.generate import build_pipeline

    pipe, call_kwargs = build_pipeline(base, adapters, {})
    call_kwargs.update(extra_call_kwargs or {})
    images = []
    for number, prompt in enumerate(validation.prompts):
        generator = torch.Generator().manual_seed(validation.seed + number)
        images += pipe(
            prompt,
            num_inference_steps=validation.num_inference_steps,
            guidance_scale=validation.guidance_scale,
            generator=generator,
            **call_kwargs,
        ).images
    return images


def make_grid(rows: list[list[Image.Image]], pad: int = 2) -> Image.Image:
    """Paste rows of equally sized images into one grid image.

    Args:
        rows: the images, row by row (rows may differ in length).
        pad: pixels of black between cells.
    """
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * (cell_w + pad) - pad, len(rows) * (cell_h + pad) - pad))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (c * (cell_w + pad), r * (cell_h + pad)))
    return grid


def save_grid(grid: Image.Image, path: Path) -> Path:
    """Write a grid PNG atomically.

    Args:
        grid: the image.
        path: destination ``.png``.
    """
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def grid_array(grid: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a grid, for TensorBoard's ``add_image(..., dataformats="HWC")``."""
    return np.asarray(grid.convert("RGB"))
