"""Training data: find image records, load any image mode, crop and flip reproducibly.

A data folder is read in one of these ways (first match wins):
  * an adapter kind's own layouts, asked through ``find_records`` on the kind's class;
  * ``metadata.jsonl`` (the Hugging Face imagefolder convention): an image column
    (``file_name`` or ``image``), a caption column (``text``, ``caption`` or
    ``prompt``), and the columns of the kinds' per-sample inputs;
  * ``images/`` beside the folders of the kinds' per-sample inputs, matched by stem;
  * every image below the folder, captioned by a same-stem ``.txt`` file, else by
    ``data.caption``;
  * ``path: shapes``: the built-in shapes world, generated in memory from the seed.

This module knows no adapter kind: the per-sample inputs (a kind's extra images, e.g.
a map of the image or a second picture) come from the
:class:`~condkit.adapters.base.SampleInput` declarations of the registered kinds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from condkit.adapters.base import SampleInput
from condkit.errors import UserError
from condkit.preprocessors.image import load_image, pil_to_array

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MIN_IMAGE_SIDE = 8  # smaller images carry too little to upscale into a training sample
IMAGE_COLUMNS = ("file_name", "image")
CAPTION_COLUMNS = ("text", "caption", "prompt")
IMAGES_FOLDER = "images"
# Sample key of the image sizes: (6,) int64 (original height, original width, crop top,
# crop left in the resized image (mirrored with the image on a flip), target height,
# target width) in pixels; a batch holds (b, 6), which the model family reads.
SIZES = "sizes"


def sample_inputs() -> tuple[SampleInput, ...]:
    """Every per-sample input the registered kinds declare, each name once, by kind name.

    Raises:
        ValueError: two kinds declare one input name differently.
    """
    from condkit.adapters.registry import loadable_adapter_classes

    found: dict[str, tuple[str, SampleInput]] = {}
    for kind_class in loadable_adapter_classes():  # a broken plugin is named once and skipped
        kind = kind_class.kind
        for declared in kind_class.sample_inputs:
            earlier = found.setdefault(declared.name, (kind, declared))
            if earlier[1] != declared:
                raise ValueError(f"kinds {earlier[0]!r} and {kind!r} declare sample input {declared.name!r} differently")
    return tuple(declared for _, declared in found.values())


@dataclasses.dataclass(frozen=True)
class Record:
    """One training sample before loading: where its image, caption and inputs are.

    ``image`` and each of ``inputs`` (a kind's per-sample inputs by name, see
    :class:`~condkit.adapters.base.SampleInput`) are file paths or in-memory uint8 RGB
    arrays (H, W, 3); ``preprocessors`` names, per input the sample lacks, the
    preprocessor that makes it from the image. A declared input also reads as an
    attribute (``record.<name>``, None when the sample has none).
    """

    image: Any
    caption: str
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    preprocessors: dict[str, str] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        """A declared per-sample input by name (called only for names that are not fields)."""
        if name.startswith("__") or name in ("inputs", "preprocessors"):
            raise AttributeError(name)  # e.g. pickle probing before __dict__ is filled
        inputs = self.__dict__.get("inputs") or {}
        if name in inputs:
            return inputs[name]
        if name in {declared.name for declared in sample_inputs()}:
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def find_records(data, adapter_cls=None, seed: int = 0) -> list[Record]:
    """List the samples a recipe's ``data`` section describes.

    Args:
        data: a :class:`condkit.train.config.DataConfig`.
        seed: the recipe seed (the shapes world is drawn from it).
        adapter_cls: the adapter kind being trained; its ``find_records(data)`` class
            method, if it has one and returns a list, takes precedence.

    Raises:
        UserError: the folder is missing or holds no images.
    """
    inputs = sample_inputs()
    if data.path == "shapes":
        records = _shapes_records(data, seed, inputs)
    else:
        root = Path(data.path)
        if data.path.startswith("fewshot/") and not root.is_dir():
            # A shipped few-image set (package data of condkit.train), e.g. fewshot/sks_purple.
            root = Path(__file__).resolve().parent / data.path
        if not data.path or not root.is_dir():
            raise UserError(f"data.path {data.path!r}: no such folder")
        custom = getattr(adapter_cls, "find_records", None)
        records = custom(data) if custom is not None else None
        if records is None:
            records = read_folder(root, data, inputs)
    if not records:
        raise UserError(f"data.path {data.path!r}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    uncaptioned = next((r for r in records if not r.caption), None)
    if uncaptioned is not None:
        raise UserError(
            f"{uncaptioned.image}: no caption (no same-name .txt file or metadata.jsonl text) and data.caption is empty"
        )
    for declared in inputs:
        if declared.folder_key and getattr(data, declared.folder_key, ""):
            records = _attach_from_folder(records, declared, Path(getattr(data, declared.folder_key)))
        if declared.preprocessor_key and getattr(data, declared.preprocessor_key, ""):
            made_by = getattr(data, declared.preprocessor_key)
            records = [r if r.inputs.get(declared.name) is not None else _with_preprocessor(r, declared.name, made_by) for r in records]
    return records * data.repeats


def _with_preprocessor(record: Record, name: str, preprocessor: str) -> Record:
    """``record`` with input ``name`` to be made by ``preprocessor`` from its image."""
    return dataclasses.replace(record, preprocessors={**record.preprocessors, name: preprocessor})


def _shapes_records(data, seed: int, inputs: tuple[SampleInput, ...]) -> list[Record]:
    """The built-in shapes world in memory: image, caption, and each declared input the
    world draws (a sample attribute of the input's name)."""
    from condkit.train.shapes_world import ShapesWorld

    return [
        Record(
            image=s.image,
            caption=s.caption,
            inputs={d.name: getattr(s, d.name) for d in inputs if getattr(s, d.name, None) is not None},
        )
        for s in ShapesWorld.for_recipe(data, seed).batch(0, data.shapes_count)
    ]


def list_images(root: Path) -> list[Path]:
    """Every image file below ``root``, sorted, skipping hidden files and folders and loss
    masks (``NAME.mask.png``: :mod:`condkit.train.masks`).

    Args:
        root: the folder to search recursively.
    """
    from condkit.train.masks import is_mask_file

    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and not is_mask_file(p)
    )


def read_utf8(path: Path) -> str:
    """A caption or metadata file's text (UTF-8, with or without a byte-order mark).

    Args:
        path: the text file.

    Raises:
        UserError: the file is not UTF-8 (e.g. Latin-1 or UTF-16), naming it.
    """
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start} is invalid); save it as UTF-8") from None


def caption_beside(image: Path, default_caption: str) -> str:
    """The caption of ``image``: its same-stem ``.txt`` file, else ``default_caption``.

    Args:
        image: the image file.
        default_caption: ``data.caption``.
    """
    caption_file = image.with_suffix(".txt")
    return read_utf8(caption_file).strip() if caption_file.is_file() else default_caption


def data_file(root: Path, value: Any, where: str, key: str, allow_outside: bool) -> Path:
    """The file a dataset row names: a non-empty string, inside ``root`` unless allowed.

    The check is on the path as written (absolute, or ``..`` climbing out of the
    folder), so files the user linked into the folder still count as inside.

    Args:
        root: the data folder.
        value: the row's value for ``key``.
        where: ``FILE:LINE`` of the row, for messages.
        key: the column name.
        allow_outside: ``data.allow_outside_paths``.

    Raises:
        UserError: the value is not a file name, or points outside ``root``.
    """
    if not isinstance(value, str) or not value.strip():
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise UserError(f"{where}: {key!r} must be a file name (a string), not {shown}")
    normal = os.path.normpath(value)
    if not allow_outside and (os.path.isabs(value) or normal == os.pardir or normal.startswith(os.pardir + os.sep)):
        raise UserError(
            f"{where}: {key!r} = {value!r} is outside the data folder {root}; set data.allow_outside_paths: true to allow it"
        )
    return root / value


def row_text(row: dict, keys: tuple[str, ...], where: str, default: str) -> str:
    """A row's caption: the first of ``keys`` present, else ``default``; must be a string.

    Args:
        row: the JSON object.
        keys: caption columns in order of preference.
        where: ``FILE:LINE`` of the row, for messages.
        default: ``data.caption``.

    Raises:
        UserError: the caption is not a string.
    """
    key = next((k for k in keys if row.get(k) not in (None, "")), None)
    if key is None:
        return default
    if not isinstance(row[key], str):
        raise UserError(f"{where}: {key!r} must be a string, not {type(row[key]).__name__}")
    return row[key] or default


def read_folder(root: Path, data: Any, inputs: tuple[SampleInput, ...] | None = None) -> list[Record]:
    """The records of a data folder: ``metadata.jsonl``, else ``images/`` beside input
    folders, else every image below it (see the module docstring).

    Input files are not checked for existence here (a kind that requires its input
    names a missing one in its own words); images and paths are.

    Args:
        root: the data folder.
        data: the recipe's ``data`` section (``caption``, ``allow_outside_paths``).
        inputs: the per-sample inputs to read; default: all the registered kinds declare.
    """
    inputs = sample_inputs() if inputs is None else inputs
    caption, allow_outside = data.caption, bool(getattr(data, "allow_outside_paths", False))
    if (root / "metadata.jsonl").is_file():
        return _records_from_metadata(root, caption, allow_outside, inputs)
    folders = {d.name: root / d.folder for d in inputs if d.folder and (root / d.folder).is_dir()}
    if (root / IMAGES_FOLDER).is_dir() and folders:
        return _records_from_input_folders(root, caption, folders)
    return [Record(image=image, caption=caption_beside(image, caption)) for image in list_images(root)]


def _records_from_input_folders(root: Path, default_caption: str, folders: dict[str, Path]) -> list[Record]:
    """``images/`` plus one folder per input, files matched by path below them without suffix."""
    images_dir = root / IMAGES_FOLDER
    by_stem = {name: {p.relative_to(folder).with_suffix(""): p for p in list_images(folder)} for name, folder in folders.items()}
    records = []
    for image in list_images(images_dir):
        stem = image.relative_to(images_dir).with_suffix("")
        found = {name: files[stem] for name, files in by_stem.items() if stem in files}
        records.append(Record(image=image, caption=caption_beside(image, default_caption), inputs=found))
    return records


def _records_from_metadata(root: Path, default_caption: str, allow_outside: bool, inputs: tuple[SampleInput, ...]) -> list[Record]:
    records = []
    path = root / "metadata.jsonl"
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        image_key = next((k for k in IMAGE_COLUMNS if row.get(k)), None) if isinstance(row, dict) else None
        if image_key is None:
            raise UserError(f"{where}: each line must be a JSON object with a 'file_name' key (or 'image')")
        image = data_file(root, row[image_key], where, image_key, allow_outside)
        if not image.is_file():
            raise UserError(f"{where}: image {row[image_key]!r} does not exist")
        files = {}
        for declared in inputs:
            key = next((k for k in declared.columns if row.get(k)), None)
            if key:
                files[declared.name] = data_file(root, row[key], where, key, allow_outside)
        records.append(Record(image=image, caption=row_text(row, CAPTION_COLUMNS, where, default_caption), inputs=files))
    return records


def _attach_from_folder(records: list[Record], declared: SampleInput, folder: Path) -> list[Record]:
    """Each record's input ``declared`` from ``folder`` (the ``data.<folder_key>`` recipe key),
    matched by the image's file stem."""
    key = f"data.{declared.folder_key}"
    if not folder.is_dir():
        raise UserError(f"{key} {str(folder)!r}: no such folder")
    by_stem = {p.stem: p for p in list_images(folder)}
    out = []
    for record in records:
        stem = Path(record.image).stem if isinstance(record.image, (str, Path)) else None
        if stem not in by_stem:
            raise UserError(f"{key}: no {declared.label} for {record.image} in {folder} (matched by file stem)")
        out.append(dataclasses.replace(record, inputs={**record.inputs, declared.name: by_stem[stem]}))
    return out


def load_rgb(source: Any) -> np.ndarray:
    """Load an image as a uint8 RGB array (H, W, 3), whatever its mode.

    RGBA/LA/P-with-transparency are composited on white; L, P, CMYK and 16-bit
    images are converted; EXIF orientation is applied; files over the pixel limit are
    refused before decoding (see :func:`condkit.preprocessors.image.load_image`).

    Args:
        source: a file path, a PIL image, or an (H, W, 3) uint8 array (returned as is).

    Raises:
        UserError: the file cannot be decoded, is too large, or is tiny (names the file).
    """
    if isinstance(source, np.ndarray):
        return source
    if hasattr(source, "load_rgb"):  # a source that reads itself (a loss mask: condkit.train.masks.MaskSource)
        return source.load_rgb()
    # Files go through condkit's one image loader, as in `condkit preprocess`: pixel
    # limit checked from the header, EXIF orientation, transparency on white.
    rgb = to_rgb(source) if isinstance(source, Image.Image) else load_image(source)
    if min(rgb.shape[:2]) < MIN_IMAGE_SIDE:
        raise UserError(f"{source}: image is {rgb.shape[1]}x{rgb.shape[0]} px, smaller than {MIN_IMAGE_SIDE} px")
    return rgb


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a PIL image of any common mode to a uint8 RGB array (H, W, 3).

    The same conversion as the preprocessors' (:func:`condkit.preprocessors.image.pil_to_array`).

    Args:
        image: the image (RGB, RGBA, LA, L, P, CMYK, I;16, I, F ...).
    """
    return pil_to_array(image)


def resize_and_crop(rgb: np.ndarray, size: int | tuple[int, int], crop: str, rng: random.Random) -> np.ndarray:
    """Resize the image to cover ``size`` (the shorter side for a square) and crop it to ``size``.

    Args:
        rgb: (H, W, 3) uint8.
        size: output side in pixels, or ``(height, width)`` (an aspect-ratio bucket).
        crop: ``center`` or ``random``.
        rng: source of the random crop offset (seeded per sample for reproducibility).
    """
    return resize_and_crop_box(rgb, size, crop, rng)[0]


def resize_and_crop_box(
    rgb: np.ndarray, size: int | tuple[int, int], crop: str, rng: random.Random
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """:func:`resize_and_crop`, also saying where the crop lies.

    Args:
        rgb: (H, W, 3) uint8.
        size: output side in pixels, or ``(height, width)`` (an aspect-ratio bucket).
        crop: ``center`` or ``random``.
        rng: source of the random crop offset.

    Returns:
        The (out_h, out_w, 3) crop and ``(top, left, resized width)``: the crop's top-left
        corner in the resized image and that image's width (to mirror ``left`` on a flip).
    """
    height, width = rgb.shape[:2]
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    scale = max(out_h / height, out_w / width)  # the smallest resize that covers the output
    new_w, new_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
    image = Image.fromarray(rgb)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    if crop == "random":
        left, top = rng.randint(0, new_w - out_w), rng.randint(0, new_h - out_h)
    else:
        left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    return np.asarray(image.crop((left, top, left + out_w, top + out_h))), (top, left, new_w)


def to_tensor(rgb: np.ndarray, signed: bool) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1] (signed) or [0, 1].

    Args:
        rgb: the image array.
        signed: scale to [-1, 1] (VAE input) instead of [0, 1] (conditions).
    """
    tensor = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0  # copy: crops are read-only views
    return tensor * 2.0 - 1.0 if signed else tensor


class TrainingSet(torch.utils.data.Dataset):
    """Records turned into tensors: ``pixel_values`` (3, H, W) in [-1, 1], ``caption``,
    ``sizes`` (see :data:`SIZES`) and each per-sample input the sample has (3, H, W) in
    [0, 1], under its name.

    Augmentation (random crop, flip) is drawn from ``(seed, epoch, index)``, so a
    sample is the same after a resume. Index ``i`` with ``flip`` fixed: see
    :meth:`item`.

    Args:
        records: from :func:`find_records`.
        size: square side in pixels.
        crop: ``center`` or ``random``.
        flip: random horizontal flips.
        seed: recipe seed.
        inputs: the per-sample inputs to load; default: all the registered kinds declare.
        targets: per record, the ``(height, width)`` of its aspect-ratio bucket
            (:mod:`condkit.train.buckets`); None = every sample is a ``size`` square.
    """

    def __init__(
        self, records: list[Record], size: int, crop: str, flip: bool, seed: int, inputs: tuple[SampleInput, ...] | None = None,
        targets: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        self.records = records
        self.size = size
        self.targets = targets
        self.crop = crop
        self.flip = flip
        self.seed = seed
        self.inputs = sample_inputs() if inputs is None else tuple(inputs)
        self._preprocessors: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = random.Random(hash((self.seed, epoch, index)))
        flip = self.flip and rng.random() < 0.5
        return self.item(index, flip=flip, rng=rng)

    def item(self, index: int, flip: bool, rng: random.Random | None = None) -> dict[str, Any]:
        """Load sample ``index`` with a given flip (used by the latent cache for both flips).

        Args:
            index: record index.
            flip: mirror the image (and its inputs) horizontally.
            rng: random source for the crop; center crops ignore it.
        """
        record = self.records[index]
        rng = rng or random.Random(index)
        crop_state = rng.getstate()
        original = load_rgb(record.image)
        target = self.targets[index] if self.targets is not None else (self.size, self.size)  # (height, width)
        image, (top, left, resized_width) = resize_and_crop_box(original, target, self.crop, rng)
        loaded = {}
        for declared in self.inputs:
            value = self._load_input(record, declared, original, image, rng, crop_state)
            if value is not None:
                loaded[declared.name] = value
        if flip:
            image = image[:, ::-1]
            loaded = {name: value[:, ::-1] for name, value in loaded.items()}
            left = resized_width - target[1] - left  # the crop as seen in the mirrored image
        sample: dict[str, Any] = {"caption": record.caption, "pixel_values": to_tensor(image, signed=True)}  # (3, H, W) in [-1, 1]
        # Sizes the model family may condition on (its size ids), whatever the family.
        sample[SIZES] = torch.tensor([original.shape[0], original.shape[1], top, left, *target])  # (6,)
        for name, value in loaded.items():
            sample[name] = to_tensor(value, signed=False)  # (3, H, W) in [0, 1]
        return sample

    def _load_input(
        self, record: Record, declared: SampleInput, original: np.ndarray, image: np.ndarray, rng: random.Random, crop_state: Any
    ) -> np.ndarray | None:
        """One per-sample input, cropped (before any flip), or None when the sample has none.

        Args:
            record: the sample's record.
            declared: the input's declaration.
            original: the sample's image before cropping (an aligned input must match its size).
            image: the cropped image (preprocessors and ``default_to_image`` start from it).
            rng: the sample's random source.
            crop_state: ``rng``'s state before the image's crop (an aligned input repeats it).
        """
        source = record.inputs.get(declared.name)
        if source is None:
            if declared.name in record.preprocessors:
                return self._preprocess(record.preprocessors[declared.name], image)
            return image if declared.default_to_image else None
        rgb = load_rgb(source)
        if not declared.aligned:
            return resize_and_crop(rgb, self.size, "center", rng)
        if rgb.shape[:2] != original.shape[:2]:
            raise UserError(
                f"{source}: {declared.label} is {rgb.shape[1]}x{rgb.shape[0]} px but its image "
                f"{record.image} is {original.shape[1]}x{original.shape[0]} px"
            )
        rng.setstate(crop_state)  # the same crop as the image
        return resize_and_crop(rgb, image.shape[:2], self.crop, rng)

    def _preprocess(self, name: str, image: np.ndarray) -> np.ndarray:
        if name not in self._preprocessors:
            from condkit.preprocessors import get_preprocessor

            self._preprocessors[name] = get_preprocessor(name)
        return self._preprocessors[name](image)

    def check_all(self) -> None:
        """Decode every image once before training, so a bad file fails before any work.

        Raises:
            UserError: naming the first file that cannot be read.
        """
        for record in self.records:
            for source in (record.image, *record.inputs.values()):
                if source is not None and not isinstance(source, np.ndarray):
                    load_rgb(source)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples into a batch (captions stay a list of strings).

    Tensors every sample has (the image and the per-sample inputs) are stacked.

    Args:
        samples: items from :class:`TrainingSet`.
    """
    batch: dict[str, Any] = {"caption": [s["caption"] for s in samples]}
    for key in samples[0] if samples else ():
        if key != "caption" and all(key in s for s in samples):
            batch[key] = torch.stack([s[key] for s in samples])
    return batch
