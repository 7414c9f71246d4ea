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
    parser.add_argument("path", type=Path, help="adapter file or folder (condkit, diffusers, kohya/A1111, original ControlNet/IP-Adapter)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Detect the kind and print its description."""
    from condkit.adapters import detect_kind, get_adapter_class

    kind = detect_kind(args.path)
    info = {"path": str(args.path), **get_adapter_class(kind).describe(args.path)}
    info.setdefault("kind", kind)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0
