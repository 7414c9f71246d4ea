"""``condkit base``: export or describe base models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    """Register ``base export`` and ``base info``."""
    parser = subparsers.add_parser("base", help="export or describe base models", description="Work with base models.")
    actions = parser.add_subparsers(dest="base_action", metavar="ACTION", required=True)
    export = actions.add_parser(
        "export",
        help="write the embedded base as a standard diffusers folder",
        description="Write the embedded tiny base as a diffusers folder that StableDiffusionPipeline.from_pretrained(DIR) loads "
        "in a plain diffusers install (image_encoder/ included, for IP-Adapter); --base embedded-sdxl writes the SDXL one "
        "(StableDiffusionXLPipeline) once it is trained and installed.",
    )
    export.add_argument("dir", type=Path, help="destination folder (must not exist unless --overwrite)")
    export.add_argument("--base", default="embedded", help="which embedded base: embedded (default) or embedded-sdxl")
    export.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    export.set_defaults(run=run_export)
    info = actions.add_parser("info", help="describe a base", description="Load a base offline and print its model family and sizes.")
    info.add_argument("spec", nargs="?", default="embedded", help="'embedded', 'embedded-sdxl', a diffusers folder, or a checkpoint file")
    info.add_argument("--base-config", help="local diffusers folder with configs, for a single-file base")
    info.set_defaults(run=run_info)


def run_export(args: argparse.Namespace) -> int:
    """Export the embedded base."""
    from condkit.base import export_embedded

    out = export_embedded(args.dir, overwrite=args.overwrite, name=args.base)
    print(f"condkit: {args.base} base written to {out.resolve()}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print what a base is."""
    from condkit.base import load_base

    base = load_base(args.spec, args.base_config)
    info = base.fingerprint() | {
        "family": base.family.name,
        "text_encoders": list(base.family.text_encoders(base)),
        "prediction_type": base.prediction_type,
        "vae_scale_factor": base.vae_scale_factor,
        "image_encoder": base.image_encoder is not None,
        "unet_parameters": sum(p.numel() for p in base.unet.parameters()),
    }
    print(json.dumps(info, indent=2))
    return 0
