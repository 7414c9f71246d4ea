"""``condkit convert SRC DST --to kohya|diffusers``: LoRA files between diffusers and kohya/A1111.

Conversions copy tensors unchanged (alpha travels as the kohya ``.alpha`` tensor or
the diffusers ``lora_adapter_metadata`` header), so converting back gives the same
file contents, and stock diffusers gives the same images from either file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("kohya", "diffusers")


def add_parser(subparsers) -> None:
    """Register ``convert``."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a LoRA between the diffusers and kohya/A1111 formats",
        description=(
            "Convert a LoRA file (or a folder with pytorch_lora_weights.safetensors) to the kohya/A1111/ComfyUI "
            "format (lora_unet_*/lora_te_* with .alpha tensors and ss_* metadata) or to the diffusers format. "
            "kohya names are matched against SD 1.x/2.x module names, or those of --base."
        ),
    )
    parser.add_argument("src", type=Path, help="LoRA file or folder")
    parser.add_argument("dst", type=Path, help="output .safetensors file (diffusers: a folder is fine too)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--base", default=None, help="match module names against this base (embedded, folder or checkpoint)")
    parser.add_argument("--base-config", default=None, help="config folder for a single-file --base")
    parser.add_argument("--base-model-version", default="sd_v1", help="ss_base_model_version written to kohya files (default sd_v1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Read SRC in whatever format it is, write DST in ``--to``'s format."""
    from condkit.adapters.lora import formats
    from condkit.adapters.lora.adapter import WEIGHTS_NAME, read_lora_file, weights_file
    from condkit.errors import UserError
    from condkit.io import save_safetensors_atomic

    src = weights_file(args.src)
    dst = args.dst
    if dst.suffix != ".safetensors":
        if args.to == "kohya":
            raise UserError(f"{dst}: a kohya LoRA is one .safetensors file; give a DST ending in .safetensors")
        dst = dst / WEIGHTS_NAME
    if dst.resolve() == src.resolve():
        raise UserError(f"{dst}: is the input file; write the conversion somewhere else")
    if dst.exists() and not args.overwrite:
        raise UserError(f"{dst}: already exists (pass --overwrite to replace it)")
    weights = read_lora_file(src, _name_models(args.base, args.base_config))
    if args.to == "kohya":
        tensors, metadata = formats.write_kohya(weights, args.base_model_version)
    else:
        tensors, metadata = formats.write_diffusers(weights)
    save_safetensors_atomic(tensors, dst, metadata=metadata)
    counts = ", ".join(f"{len(weights.component_modules(c))} {c}" for c in formats.COMPONENTS if weights.component_modules(c))
    print(f"{dst}: {args.to} LoRA ({counts} modules, from {weights.format} {src})")
    return 0


def _name_models(base: str | None, base_config: str | None) -> dict:
    from condkit.adapters.lora import formats

    if base is None:
        return formats.sd_skeleton_models()
    from condkit.base import load_base

    loaded = load_base(base, base_config)
    return {formats.UNET: loaded.unet, formats.TEXT_ENCODER: loaded.text_encoder}
