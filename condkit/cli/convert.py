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
            "format (lora_unet_*/lora_te_* with .alpha tensors and ss_* metadata; SDXL: lora_te1_*/lora_te2_*) or to the "
            "diffusers format. kohya names are matched against SD 1.x/2.x or SDXL module names (told from the file), or those of --base."
        ),
    )
    parser.add_argument("src", type=Path, help="LoRA file or folder")
    parser.add_argument("dst", type=Path, help="output .safetensors file (diffusers: a folder is fine too)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--base", default=None, help="match module names against this base (embedded, folder or checkpoint)")
    parser.add_argument("--base-config", default=None, help="config folder for a single-file --base")
    parser.add_argument(
        "--base-model-version", default=None, help="ss_base_model_version written to kohya files (default the family's: sd_v1, sdxl_base_v1-0)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Read SRC in whatever format it is, write DST in ``--to``'s format."""
    from condkit.adapters.lora import formats
    from condkit.adapters.lora.adapter import WEIGHTS_NAME, read_lora_file, weights_file
    from condkit.errors import UserError
    from condkit.io import save_safetensors_atomic

    _refuse_other_kinds(args.src)
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
    models, family = _name_models(src, args.base, args.base_config)
    weights = read_lora_file(src, models, family=family)
    if args.to == "kohya":
        tensors, metadata = formats.write_kohya(weights, args.base_model_version)
    else:
        tensors, metadata = formats.write_diffusers(weights)
    save_safetensors_atomic(tensors, dst, metadata=metadata)
    counts = ", ".join(f"{len(weights.component_modules(c))} {c}" for c in formats.COMPONENTS if weights.component_modules(c))
    print(f"{dst}: {args.to} LoRA ({counts} modules, from {weights.format} {src})")
    return 0


def _refuse_other_kinds(src: Path) -> None:
    """One line for a LoHa/LoKr (or other non-LoRA) file: there is nothing lossless to convert it to.

    Args:
        src: ``convert``'s SRC.

    Raises:
        UserError: SRC holds another kind than LoRA.
    """
    from condkit.adapters.registry import detect_kind
    from condkit.errors import UserError

    try:
        kind = detect_kind(src)
    except UserError:
        return  # not recognised at all: the LoRA reader names what is wrong
    if kind != "lora":
        raise UserError(
            f"{src}: a {kind} adapter, not a LoRA; its file is already in the one layout every tool reads, "
            "and no lossless conversion to a LoRA exists (use condkit merge to bake it into a base)"
        )


def _name_models(src: Path, base: str | None, base_config: str | None) -> tuple[dict, str]:
    """The models kohya names are matched against, and their model family.

    Args:
        src: the LoRA file (without ``--base``, its keys tell SD from SDXL).
        base: ``--base``, or None for the family's usual architecture on the meta device.
        base_config: ``--base-config``.
    """
    from condkit.adapters.lora import formats
    from condkit.adapters.lora.adapter import base_models

    if base is None:
        from condkit.io import check_safetensors_header, load_state_dict, read_safetensors_metadata

        if src.suffix == ".safetensors":
            keys, metadata = [k for k in check_safetensors_header(src) if k != "__metadata__"], read_safetensors_metadata(src)
        else:
            keys, metadata = list(load_state_dict(src)), {}
        family = formats.family_of_keys(keys, metadata)
        if formats.detect_format(keys) != "kohya":  # only kohya names need modules to match
            return {}, family
        return formats.skeleton_models(family), family
    from condkit.base import load_base

    loaded = load_base(base, base_config)
    return base_models(loaded), loaded.family.name
