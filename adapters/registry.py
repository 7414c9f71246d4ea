"""Adapter kinds by name: ``kind: lora`` in a recipe finds :class:`LoraAdapter`."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from condkit.adapters.base import ADAPTER_CONFIG_FILE, Adapter
from condkit.errors import UserError

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

    Args:
        path: an adapter file or folder.

    Raises:
        UserError: the path does not exist or no kind recognises it.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    described = path / ADAPTER_CONFIG_FILE if path.is_dir() else path.parent / ADAPTER_CONFIG_FILE
    if described.is_file():
        try:
            kind = json.loads(described.read_text())["kind"]
        except (KeyError, ValueError):
            raise UserError(f"{described}: not a valid condkit adapter description (needs a 'kind' key)") from None
        if kind in ADAPTER_KINDS:
            return kind
    for kind in list_kinds():
        if get_adapter_class(kind).can_load(path):
            return kind
    raise UserError(f"{path}: not an adapter file condkit recognises (kinds: {', '.join(list_kinds())})")


def load_adapter(path: str | Path, base, name: str | None = None, kind: str | None = None) -> Adapter:
    """Load an adapter of any kind from ``path`` and attach it to ``base``.

    Args:
        path: an adapter file or folder.
        base: the :class:`condkit.base.BaseModel` to attach to.
        name: instance name; defaults to the file's stem.
        kind: force a kind instead of detecting it.
    """
    kind = kind or detect_kind(path)
    return get_adapter_class(kind).load(path, base, name=name or Path(path).stem.replace(".", "_"))
