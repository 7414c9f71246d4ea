"""The preprocessor base class and the name -> class registry.

Each preprocessor is a small dataclass: its fields are its typed options, and calling
it maps one image to one ``(H, W, 3) uint8`` condition map. ``@register("name", ...)``
adds it to the registry under the name of the ControlNet family it feeds, plus aliases.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar

import cv2
import numpy as np

from condkit.errors import UserError
from condkit.preprocessors.image import SIZE_MULTIPLE, hwc3, load_image, resize_to, target_size, to_rgb

# name or alias -> class; filled by @register when the modules are imported.
_REGISTRY: dict[str, type["Preprocessor"]] = {}

# Largest --detect-resolution / --image-resolution (short side, px). ControlNet inputs in
# use are 512-1024 px (SD 1.5, SDXL) and tile upscaling workflows go to 4096; above that a
# map is only a way to fill a disk (16000 px made a 149 MB PNG from a 64 px image).
MAX_RESOLUTION = 4096
# Largest map (or work image) in pixels: 4096 x 8192, i.e. the largest resolution at a 2:1
# aspect ratio. Without it a thin strip at a legal short side becomes gigapixels.
MAX_MAP_PIXELS = 4096 * 8192


@dataclasses.dataclass
class Preprocessor:
    """Base class: image in, 3-channel uint8 condition map out.

    Args:
        detect_resolution: short side (px) the image is resized to before detection;
            None keeps the input size.
        image_resolution: short side (px) of the returned map; None keeps the input size.
    """

    detect_resolution: int | None = None
    image_resolution: int | None = None

    name: ClassVar[str] = ""
    # How the map is resized from the work size to the output size.
    output_interpolation: ClassVar[int] = cv2.INTER_LINEAR
    # Batch loads RGBA instead of RGB for preprocessors that read the alpha channel.
    wants_alpha: ClassVar[bool] = False

    def __call__(self, image: Any) -> np.ndarray:
        """Make the condition map of ``image``.

        Args:
            image: a PIL image (any mode) or a numpy RGB/RGBA/gray array.

        Returns:
            ``(H, W, 3) uint8``; H, W from ``image_resolution`` (default: the input's size).
        """
        rgb = to_rgb(image)
        out_size = target_size(*rgb.shape[:2], self.image_resolution)
        # Checked before any work: render() allocates both sizes.
        check_map_size(out_size, "map")
        check_map_size(target_size(*rgb.shape[:2], self.detect_resolution), "detection image")
        return self.render(rgb, out_size)

    def render(self, rgb: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
        """Resize to the work size, run :meth:`process`, resize the map to ``out_size``."""
        work = resize_to(rgb, target_size(*rgb.shape[:2], self.detect_resolution))
        return resize_to(hwc3(self.process(work)), out_size, self.output_interpolation)

    def process(self, rgb: np.ndarray) -> np.ndarray:
        """The map at the work size (subclasses); may be ``(H, W)`` or ``(H, W, 3)``."""
        raise NotImplementedError

    def from_file(self, path: str | os.PathLike) -> np.ndarray:
        """Read an image file and return its map (the batch command calls this).

        Args:
            path: an image file.
        """
        return self(load_image(path, keep_alpha=self.wants_alpha))

    def input_files(self, path: str | os.PathLike) -> list[Path]:
        """Every file the map of ``path`` is made from: the image and any file option.

        The batch command records their sizes and times to tell when a map is stale.

        Args:
            path: the image file.
        """
        files = [Path(path)]
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # A string option naming an existing file (inpaint mask=, openpose keypoints=)
            # is an input; other strings ("auto") just never name a file.
            if isinstance(value, (str, os.PathLike)) and value and os.path.isfile(value):
                files.append(Path(value))
        return files

    def made_by(self) -> dict[str, Any] | None:
        """What makes this preprocessor's maps: canonical name and every option's value.

        Returns:
            ``{"kind": name, "options": {...}}`` as plain JSON data (aliases give the
            same result), or None when an option is not plain data (e.g. a mask array
            passed from Python), so no map can be called up to date.
        """
        options: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if value is not None and not isinstance(value, (str, int, float, bool)):
                return None
            options[field.name] = value
        return {"kind": self.name, "options": options}


def check_map_size(size: tuple[int, int], what: str) -> None:
    """Refuse an image size above :data:`MAX_MAP_PIXELS`.

    Args:
        size: ``(height, width)``.
        what: what the size is of, for the message.

    Raises:
        UserError: too many pixels.
    """
    height, width = size
    if height * width > MAX_MAP_PIXELS:
        raise UserError(
            f"the {what} would be {width} x {height} px, above the limit of {MAX_MAP_PIXELS:,} px "
            "(4096 x 8192); use a smaller resolution"
        )


def check_resolution(name: str, key: str, value: Any) -> None:
    """Refuse a ``detect_resolution`` / ``image_resolution`` outside SIZE_MULTIPLE..MAX_RESOLUTION.

    Args:
        name: the preprocessor name, for the message.
        key: the option name.
        value: its value (None: keep the input size).

    Raises:
        UserError: not an integer, or out of range.
    """
    if value is None:
        return
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name}: {key} ({flag}) must be a whole number of pixels, got {value!r}")
    if not SIZE_MULTIPLE <= value <= MAX_RESOLUTION:
        raise UserError(f"{name}: {key} ({flag}) {value} is outside {SIZE_MULTIPLE}..{MAX_RESOLUTION} px (the short side of a map)")


def register(name: str, *aliases: str) -> Callable[[type[Preprocessor]], type[Preprocessor]]:
    """Class decorator: make a preprocessor available under ``name`` and ``aliases``.

    Args:
        name: the canonical name (the ControlNet family the map feeds).
        aliases: other accepted names.
    """

    def decorate(cls: type[Preprocessor]) -> type[Preprocessor]:
        cls.name = name
        for key in (name, *aliases):
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(f"preprocessor name {key!r} registered twice")
            _REGISTRY[key] = cls
        return cls

    return decorate


def _ensure_loaded() -> None:
    # Importing the modules runs their @register decorators.
    from condkit.preprocessors import edges, lines, pose, simple  # noqa: F401


def list_preprocessors(with_aliases: bool = False) -> list[str]:
    """Names of the registered preprocessors, sorted.

    Args:
        with_aliases: also list aliases such as ``lines`` for ``mlsd``.
    """
    _ensure_loaded()
    if with_aliases:
        return sorted(_REGISTRY)
    return sorted({cls.name for cls in _REGISTRY.values()})


def preprocessor_class(name: str) -> type[Preprocessor]:
    """The class registered under ``name`` (or an alias).

    Raises:
        UserError: unknown name; the message lists the known ones.
    """
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown preprocessor {name!r}; choose one of: {', '.join(list_preprocessors(True))}") from None


def option_types(cls: type[Preprocessor]) -> dict[str, Any]:
    """Option name -> annotated type, for a preprocessor class."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _coerce(name: str, key: str, value: Any, kind: Any) -> Any:
    """Turn a command-line string into the option's type (other values pass through)."""
    if not isinstance(value, str):
        return value
    choices = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) else (kind,)
    if type(None) in choices and value.lower() in ("none", "null", ""):
        return None
    for choice in choices:
        try:
            if choice is bool:
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                continue
            if choice in (int, float, str):
                return choice(value)
            if choice is Path:
                return Path(value)
        except ValueError:
            continue
    raise UserError(f"{name}: option {key}={value!r} is not a valid {kind}")


def get_preprocessor(name: str, **options: Any) -> Preprocessor:
    """Build a preprocessor by name.

    Args:
        name: a registered name or alias (see :func:`list_preprocessors`).
        **options: its options; strings (from the command line) are converted to the
            option's type.

    Returns:
        A callable: ``get_preprocessor("canny")(image) -> (H, W, 3) uint8``.

    Raises:
        UserError: unknown name, unknown option, a value of the wrong type, or a
            resolution above :data:`MAX_RESOLUTION`.
    """
    cls = preprocessor_class(name)
    kinds = option_types(cls)
    unknown = sorted(set(options) - set(kinds))
    if unknown:
        raise UserError(f"{name}: unknown option {unknown[0]!r}; its options are: {', '.join(kinds)}")
    values = {key: _coerce(name, key, value, kinds[key]) for key, value in options.items()}
    for key in ("detect_resolution", "image_resolution"):
        check_resolution(name, key, values.get(key))
    return cls(**values)
