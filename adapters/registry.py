"""Adapter kinds by name: ``kind: lora`` in a recipe finds :class:`LoraAdapter`."""

from __future__ import annotations

import importlib
from pathlib import Path

from condkit.adapters.base import ADAPTER_CONFIG_FILE, Adapter, check_config_keys, read_adapter_description
from condkit.errors import UserError
from condkit.io import PICKLE_SUFFIXES, check_safetensors_header as check_weight_file_header, check_weight_file

WEIGHT_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
MAX_HINT_KEYS = 5

# kind name -> "module:Class". Kinds are imported on first use, so `condkit --help`
# stays fast and an optional dependency of one kind never breaks another.
ADAPTER_KINDS: dict[str, str] = {
    "lora": "condkit.adapters.lora:LoraAdapter",
    "controlnet": "condkit.adapters.controlnet:ControlNetAdapter",
    "ip_adapter": "condkit.adapters.ip_adapter:IPAdapter",
    "full_unet": "condkit.adapters.full_unet:FullUnetAdapter",
}


def list_kinds() -> list[str]:
    """Names of all registered adapter kinds."""
    return sorted(ADAPTER_KINDS)


def get_adapter_class(kind: str) -> type[Adapter]:
    """Return the adapter class registered under ``kind``.

    Args:
        kind: a registered kind name, e.g. ``"lora"``.

    Raises:
        UserError: the kind is unknown (the message lists the valid ones).
    """
    if kind not in ADAPTER_KINDS:
        raise UserError(f"unknown adapter kind {kind!r}; valid kinds: {', '.join(list_kinds())}")
    module_name, class_name = ADAPTER_KINDS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def detect_kind(path: str | Path) -> str:
    """Tell which adapter kind a file or folder holds.

    Reads ``condkit_adapter.json`` when present, else asks each kind's ``can_load``.
    When no kind recognises it, an unreadable weight file is reported with its real
    reason (truncated, a refused pickle, a forged header) rather than as unrecognised.

    Args:
        path: an adapter file or folder.

    Raises:
        UserError: the path does not exist, its description or a weight file is
            broken, or no kind recognises it.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    kind = described_kind(path)
    if kind is not None:
        return kind
    if path.is_file() and path.suffix == ".safetensors":
        check_weight_file(path)  # a header check is cheap: give its reason before guessing
    for kind in list_kinds():
        if get_adapter_class(kind).can_load(path):
            return kind
    for file in _weight_files(path):
        check_weight_file(file)
    raise UserError(f"{path}: not an adapter file condkit recognises (kinds: {', '.join(list_kinds())}){_key_hint(path)}")


def described_kind(path: str | Path) -> str | None:
    """The kind named by the ``condkit_adapter.json`` of an adapter folder or beside a file.

    The description is checked whole: a JSON that is not an object, an unknown key, an
    unknown kind or a config key the kind does not have is one line naming the file.

    Args:
        path: an adapter file or folder.

    Returns:
        The kind, or None when there is no description.
    """
    path = Path(path)
    described = path / ADAPTER_CONFIG_FILE if path.is_dir() else path.parent / ADAPTER_CONFIG_FILE
    if not described.is_file():
        return None
    description = read_adapter_description(described)
    kind = description["kind"]
    if kind not in ADAPTER_KINDS:
        raise UserError(f"{described}: unknown adapter kind {kind!r}; valid kinds: {', '.join(list_kinds())}")
    check_config_keys(description.get("config") or {}, get_adapter_class(kind).config_class, str(described))
    return kind


def _weight_files(path: Path) -> list[Path]:
    """The weight files of ``path``: itself, or those directly inside a folder."""
    if path.is_file():
        return [path] if path.suffix in WEIGHT_FILE_SUFFIXES else []
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_FILE_SUFFIXES)


def _key_hint(path: Path) -> str:
    """``; its tensors: a, b, c, ...`` for a readable safetensors file, to show what it holds."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return ""
    keys = sorted(k for k in check_weight_file_header(path) if k != "__metadata__")
    if not keys:
        return "; it holds no tensors"
    shown = ", ".join(keys[:MAX_HINT_KEYS])
    return f"; its {len(keys)} tensor(s): {shown}" + (", ..." if len(keys) > MAX_HINT_KEYS else "")


def load_adapter(path: str | Path, base, name: str | None = None, kind: str | None = None) -> Adapter:
    """Load an adapter of any kind from ``path`` and attach it to ``base``.

    Args:
        path: an adapter file or folder.
        base: the :class:`condkit.base.BaseModel` to attach to.
        name: instance name; defaults to the file's stem.
        kind: force a kind instead of detecting it (the description is still checked).
    """
    if kind is None:
        kind = detect_kind(path)
    elif Path(path).exists():
        described_kind(path)
    return get_adapter_class(kind).load(path, base, name=name or Path(path).stem.replace(".", "_"))
