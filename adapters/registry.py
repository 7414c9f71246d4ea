"""Adapter kinds by name: ``kind: lora`` in a recipe finds :class:`LoraAdapter`.

Kinds are found through Python entry points, group ``condkit.adapters``: condkit's own
kinds are registered in its ``pyproject.toml`` exactly as a third-party package
registers one (``NAME = "module:AdapterClass"``), so a kind shipped in another package
trains, loads and is inspected with no change to condkit. Entry points are read without
importing anything; a kind's module is imported on first use, so ``condkit --help``
stays fast and a broken or missing dependency of one kind never breaks another (it is
reported in one line naming the entry point).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
from importlib.metadata import entry_points
from pathlib import Path

from condkit.adapters.base import ADAPTER_CONFIG_FILE, Adapter, check_config_keys, read_adapter_description
from condkit.errors import UserError
from condkit.io import PICKLE_SUFFIXES, check_safetensors_header as check_weight_file_header, check_weight_file

WEIGHT_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
MAX_HINT_KEYS = 5

ENTRY_POINT_GROUP = "condkit.adapters"
CONDKIT_PACKAGE = "condkit"
# Kinds registered in-process on top of the entry points (name -> "module:Class"), for
# tests and applications that define a kind without packaging it. Empty in an install.
ADAPTER_KINDS: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class KindEntry:
    """Where a kind comes from.

    Args:
        name: the kind name (``adapter.kind`` in recipes).
        target: ``module:Class`` of its :class:`Adapter` subclass.
        package: the distribution that registered it (``condkit`` for the built-in kinds).
    """

    name: str
    target: str
    package: str


@functools.cache
def entry_point_kinds() -> dict[str, KindEntry]:
    """The kinds registered under the ``condkit.adapters`` entry-point group (read once per process).

    condkit's own registrations win over a third-party package registering the same
    name, which is reported in one line; among third parties the first found wins.
    """
    found: dict[str, KindEntry] = {}
    points = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: _package(p) != CONDKIT_PACKAGE)
    for point in points:
        entry = KindEntry(point.name, point.value, _package(point))
        if point.name in found:
            kept = found[point.name]
            warn_once(f"adapter kind {point.name!r} of {entry.package} ({entry.target}) is ignored: {kept.package} registers it too ({kept.target})")
            continue
        found[point.name] = entry
    return found


def kind_entries() -> dict[str, KindEntry]:
    """Every registered kind: the entry points plus in-process registrations (:data:`ADAPTER_KINDS`)."""
    entries = dict(entry_point_kinds())
    entries.update({name: KindEntry(name, target, "in-process registration") for name, target in ADAPTER_KINDS.items()})
    return entries


def list_kinds() -> list[str]:
    """Names of all registered adapter kinds (condkit's own first, then plugins; each group sorted)."""
    entries = kind_entries()
    return sorted(entries, key=lambda name: (entries[name].package != CONDKIT_PACKAGE, name))


def get_adapter_class(kind: str) -> type[Adapter]:
    """Return the adapter class registered under ``kind``.

    Args:
        kind: a registered kind name, e.g. ``"lora"``.

    Raises:
        UserError: the kind is unknown (the message lists the valid ones), or its entry
            point cannot be imported or is not an :class:`Adapter` of that kind (one
            line naming the entry point and its package).
    """
    entries = kind_entries()
    if not entries:  # e.g. a source tree on sys.path that was never pip-installed
        raise UserError(f"adapter kind {kind!r}: no adapter kinds are registered ({ENTRY_POINT_GROUP} entry points missing; reinstall condkit: pip install -e .)")
    if kind not in entries:
        raise UserError(f"unknown adapter kind {kind!r}; valid kinds: {', '.join(list_kinds())}")
    entry = entries[kind]
    where = f"adapter kind {kind!r} ({ENTRY_POINT_GROUP} entry point {entry.target} of {entry.package})"
    module_name, _, class_name = entry.target.partition(":")
    try:
        cls = importlib.import_module(module_name.strip())
        for part in class_name.strip().split("."):
            cls = getattr(cls, part)
    except Exception as exc:  # any failure of third-party code: one line, never a crash of condkit
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"{where} cannot be loaded: {type(exc).__name__}{': ' + reason if reason else ''}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise UserError(f"{where} is not a condkit.adapters.Adapter subclass")
    if getattr(cls, "kind", None) != kind:
        raise UserError(f"{where}: its class says kind = {getattr(cls, 'kind', None)!r}, the entry point {kind!r}")
    return cls


def loadable_adapter_classes() -> list[type[Adapter]]:
    """The classes of every kind that loads, in :func:`list_kinds` order; a broken one is skipped with one line."""
    classes = []
    for kind in list_kinds():
        try:
            classes.append(get_adapter_class(kind))
        except UserError as exc:
            warn_once(f"{exc}; skipped")
    return classes


@functools.cache
def warn_once(message: str) -> None:
    """Print ``condkit: warning: MESSAGE`` on stderr, once per process."""
    print(f"condkit: warning: {message}", file=sys.stderr)


def _package(point) -> str:
    """The name of the distribution an entry point belongs to."""
    dist = getattr(point, "dist", None)
    return dist.name if dist is not None else "an unknown package"


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
    for cls in loadable_adapter_classes():
        if cls.can_load(path):
            return cls.kind
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
    if kind not in kind_entries():
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
