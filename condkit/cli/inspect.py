"""``condkit inspect FILE``: what an adapter file is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    """Register ``inspect``."""
    parser = subparsers.add_parser(
        "inspect",
        help="tell what an adapter file or folder is",
        description="Print an adapter's kind, format, rank/targets and which base it fits, without loading a base.",
    )
    parser.add_argument("path", type=Path, nargs="?", help="adapter file or folder (condkit, diffusers, kohya/A1111, original ControlNet/IP-Adapter)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--kinds", action="store_true", help="list the registered adapter kinds (built-in and plugins) instead")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Detect the kind and print its description (or, with ``--kinds``, list the kinds)."""
    from condkit.adapters import detect_kind, get_adapter_class
    from condkit.errors import UserError

    if args.kinds:
        info = kinds_info()
    elif args.path is None:
        raise UserError("inspect: give an adapter file or folder, or --kinds")
    else:
        kind = detect_kind(args.path)
        info = {"path": str(args.path), **get_adapter_class(kind).describe(args.path)}
        info.setdefault("kind", kind)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0


def kinds_info() -> dict[str, str]:
    """Each registered kind -> where it comes from and its one-line summary (or why it cannot load)."""
    from condkit.adapters.registry import get_adapter_class, kind_entries, list_kinds
    from condkit.errors import UserError

    entries = kind_entries()
    info = {}
    for kind in list_kinds():
        entry = entries[kind]
        try:
            summary = (get_adapter_class(kind).__doc__ or "").strip().splitlines()[0:1]
        except UserError as exc:
            summary = [f"cannot be loaded: {str(exc).partition(' cannot be loaded: ')[2] or exc}"]
        info[kind] = f"{entry.package} ({entry.target}){': ' + summary[0] if summary else ''}"
    return info
