"""ControlNet training data: pairs of images and condition maps, in four layouts.

:func:`find_pair_records` reads a ``data.path`` folder (first match wins):

(c) **fill50k**: ``prompt.json``, one JSON object per line with ``source`` (the
    condition map), ``target`` (the image) and ``prompt``, paths relative to the folder;
(b) **metadata.jsonl**: one object per line; image column ``file_name`` or ``image``,
    condition column ``condition_file_name``, ``conditioning_image`` or ``condition``,
    caption column ``text``, ``caption`` or ``prompt``;
(a) **images/ + conditions/**: maps matched to images by file stem; captions from a
    same-stem ``.txt`` beside the image, else ``data.caption``;
(d) **images only** plus ``data.condition_preprocessor`` (any registered preprocessor):
    maps are computed once at the image's size and cached on disk (see
    :func:`cached_condition`), so later runs reuse them. In (a)-(c) a missing map is
    also computed when a preprocessor is set.

Layouts (a), (b) and (d) are read by condkit's one folder reader
(:func:`condkit.train.data.read_folder`) from the :data:`CONDITION_INPUT` declaration;
this module adds fill50k and the checks. A missing condition (no preprocessor set) or a map whose size differs from its image
(both as the loader shows them: after EXIF orientation) raises a one-line
:class:`UserError` naming the files; nothing is silently skipped. Paths in
``metadata.jsonl`` / ``prompt.json`` must stay inside the folder unless
``data.allow_outside_paths`` is true.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from condkit.adapters.base import SampleInput
from condkit.errors import UserError
from condkit.io import atomic_path
from condkit.preprocessors.image import oriented_size

CONDITION_COLUMNS = ("condition_file_name", "conditioning_image", "condition")
CONDITIONS_FOLDER = "conditions"
CACHE_ENV = "CONDKIT_CACHE_DIR"
# Part of every cached map's key: bumped when the image loader changes what pixels a
# file gives (v2: transparency composited on white, pixel limit), so old maps are redone.
CONDITION_CACHE_VERSION = b"condkit-conditions-v2"
# The per-sample input ControlNet declares: the generic data layer reads it from these
# metadata.jsonl columns, from conditions/ beside images/, or makes it with
# data.condition_preprocessor; batches carry it as "condition".
CONDITION_INPUT = SampleInput(
    name="condition",
    label="condition map",
    columns=CONDITION_COLUMNS,
    folder=CONDITIONS_FOLDER,
    preprocessor_key="condition_preprocessor",
    preprocessor_help="compute condition maps from the images with this preprocessor (ControlNet, T2I-Adapter)",
    aligned=True,
)


def find_pair_records(data: Any) -> list:
    """Records (image, condition, caption) for a ControlNet ``data`` section.

    fill50k's ``prompt.json`` is read here; the other layouts by the generic reader
    (:func:`condkit.train.data.read_folder`), after which every record must have a map
    (or one is computed and cached with ``data.condition_preprocessor``) of its image's size.

    Args:
        data: a :class:`condkit.train.config.DataConfig` (``path``, ``caption``,
            ``condition_preprocessor``).

    Returns:
        :class:`condkit.train.data.Record` objects whose ``condition`` input is a file.

    Raises:
        UserError: no layout matches, or a condition is missing or of the wrong size.
    """
    from condkit.train.data import IMAGES_FOLDER, Record, read_folder

    root = Path(data.path)
    if not root.is_dir():
        raise UserError(f"data.path {data.path!r}: no such folder")
    preprocessor = data.condition_preprocessor or ""
    allow_outside = bool(getattr(data, "allow_outside_paths", False))
    if (root / "prompt.json").is_file():
        records = [Record(image=i, caption=c, inputs={CONDITION_INPUT.name: m}) for i, m, c in fill50k_pairs(root, allow_outside)]
        return [make_record(record, preprocessor) for record in records]
    if (root / "metadata.jsonl").is_file():
        return [make_record(record, preprocessor) for record in read_folder(root, data)]
    images_dir, conditions_dir = root / IMAGES_FOLDER, root / CONDITIONS_FOLDER
    if images_dir.is_dir():
        if not conditions_dir.is_dir() and not preprocessor:
            raise UserError(f"{root}: has images/ but no conditions/ folder (add the maps, or set data.condition_preprocessor)")
        records = read_folder(root, data)
        if not records:
            raise UserError(f"{images_dir}: no images found")
        # Without a preprocessor conditions/ exists, so the reader took the images from images/.
        return [make_record(r, preprocessor, "" if preprocessor else _missing_in_folder(r.image, images_dir, conditions_dir)) for r in records]
    if not preprocessor:
        raise UserError(
            f"data.path {str(root)!r}: no condition maps (use images/ + conditions/, metadata.jsonl with a condition "
            "column, fill50k's prompt.json, or set data.condition_preprocessor)"
        )
    records = read_folder(root, data)
    if not records:
        raise UserError(f"data.path {str(root)!r}: no images found")
    return [make_record(record, preprocessor) for record in records]


def _missing_in_folder(image: Path, images_dir: Path, conditions_dir: Path) -> str:
    """The error text for an image of layout (a) whose map is missing from ``conditions/``."""
    return f"no condition map {conditions_dir / Path(image).relative_to(images_dir).with_suffix('')}.* (matched by file stem)"


def make_record(record: Any, preprocessor: str, missing: str = "no condition map for this image (give one, or set data.condition_preprocessor)"):
    """One checked training record; computes (and caches) a missing map with ``preprocessor``.

    Args:
        record: a :class:`condkit.train.data.Record` (its ``condition`` input may be absent).
        preprocessor: preprocessor name for a missing map ('' = a missing map is an error).
        missing: what the error says after the image's name when the map is missing.
    """
    image, condition = Path(record.image), record.inputs.get(CONDITION_INPUT.name)
    if condition is None:
        if not preprocessor:
            raise UserError(f"{image}: {missing}")
        condition = cached_condition(image, preprocessor)
    elif not Path(condition).is_file():
        raise UserError(f"{condition}: condition map for {image} does not exist")
    check_same_size(image, Path(condition))
    return dataclasses.replace(record, inputs={**record.inputs, CONDITION_INPUT.name: condition})


def fill50k_pairs(root: Path, allow_outside: bool = False) -> list[tuple[Path, Path | None, str]]:
    """Layout (c): ``prompt.json`` lines with ``source``, ``target``, ``prompt``.

    Args:
        root: the dataset folder.
        allow_outside: ``data.allow_outside_paths`` (paths may leave ``root``).
    """
    from condkit.train.data import data_file, row_text

    pairs = []
    for number, row in _json_lines(root / "prompt.json"):
        where = f"{root / 'prompt.json'}:{number}"
        missing = next((key for key in ("source", "target") if key not in row), None)
        if missing:
            raise UserError(f"{where}: missing key {missing!r} (need source, target, prompt)")
        image = data_file(root, row["target"], where, "target", allow_outside)
        if not image.is_file():
            raise UserError(f"{where}: target image {row['target']!r} does not exist")
        condition = data_file(root, row["source"], where, "source", allow_outside)
        pairs.append((image, condition, row_text(row, ("prompt",), where, "")))
    return pairs


def cache_root() -> Path:
    """Where computed condition maps are cached: ``$CONDKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/condkit``, else ``~/.cache/condkit`` (never inside the dataset)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "condkit"


def cached_condition(image: Path, preprocessor: str) -> Path:
    """The condition map of ``image`` made by ``preprocessor``, computed once and cached.

    The cache key is the preprocessor name and the bytes (SHA-256) of the image and of
    the keypoint files the ``openpose`` preprocessor reads beside it, so an edited image
    gets a new map and a renamed one reuses its old map.

    Args:
        image: the image file.
        preprocessor: a registered preprocessor name (with its default options).
    """
    from condkit.preprocessors import get_preprocessor

    digest = hashlib.sha256(CONDITION_CACHE_VERSION)
    digest.update(image.read_bytes())
    for sidecar in (image.with_name(f"{image.stem}_keypoints.json"), image.with_suffix(".json")):
        if sidecar.is_file():
            digest.update(sidecar.name.encode() + sidecar.read_bytes())
    cached = cache_root() / "conditions" / preprocessor / f"{digest.hexdigest()}.png"
    if not cached.is_file():
        condition = get_preprocessor(preprocessor).from_file(image)  # (H, W, 3) uint8 at the image's size
        with atomic_path(cached) as tmp:
            Image.fromarray(condition).save(tmp, format="PNG")
    return cached


def check_same_size(image: Path, condition: Path) -> None:
    """Raise unless the map has the image's size (read from the headers only).

    Sizes are compared as the loader returns the pixels, after EXIF orientation: a
    portrait photo stored landscape with orientation 6 and the upright map condkit made
    from it match.

    Args:
        image: the image file.
        condition: its condition map.
    """
    image_size, condition_size = oriented_size(image), oriented_size(condition)
    if image_size != condition_size:
        raise UserError(
            f"{condition}: condition map is {condition_size[0]}x{condition_size[1]} px but its image {image} "
            f"is {image_size[0]}x{image_size[1]} px"
        )


def read_condition_map(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A condition map file as (H, W, 3) uint8, resized to ``size`` = (H, W) (nearest).

    Args:
        path: the map file.
        size: target (height, width).
    """
    from condkit.train.data import load_rgb

    rgb = load_rgb(path)
    if rgb.shape[:2] != tuple(size):
        # Nearest keeps thin edge maps binary (bilinear would grey them).
        rgb = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.NEAREST))
    return rgb


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    from condkit.train.data import read_utf8

    rows = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: not a JSON object")
        rows.append((number, row))
    return rows


def batch_condition_maps(batch: dict, who: str) -> dict:
    """``{condition: (b, C, H, W)}`` from a training batch, for the kinds that take condition maps.

    Args:
        batch: the loop's batch; needs ``condition`` (float in [0, 1] at image resolution).
        who: the adapter, for the message (e.g. ``controlnet default``).

    Raises:
        UserError: the dataset gives no condition maps.
    """
    from condkit.errors import UserError

    if CONDITION_INPUT.name not in batch:
        raise UserError(f"{who}: the dataset gives no condition maps (add conditions/, a condition column, or data.condition_preprocessor)")
    return {CONDITION_INPUT.name: batch[CONDITION_INPUT.name]}
