"""``condkit merge``: bake adapters into a base; ``condkit merge-lora``: several LoRAs into one file."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    """Register ``merge`` and ``merge-lora``."""
    parser = subparsers.add_parser(
        "merge",
        help="bake LoRAs (LoHa/LoKr too) into a base: a diffusers folder or one A1111/ComfyUI checkpoint",
        description=(
            "Add each adapter's update times its scale to the base's U-Net and text-encoder weights "
            "(LoRA in the diffusers or kohya/A1111 format; LoHa and LoKr files too) and write the result "
            "as a diffusers folder, or with --single-file as one .safetensors in the original SD/SDXL layout "
            "(model.diffusion_model.*, first_stage_model.*, and cond_stage_model.transformer.* for SD or "
            "conditioner.embedders.0/1.* for SDXL's two text encoders) that A1111 and ComfyUI load. Inputs "
            "are never modified; OUT is written atomically."
        ),
    )
    parser.add_argument("base", help="'embedded', a diffusers folder, or a single-file checkpoint (with --base-config)")
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER[:SCALE]", help="adapter file or folder, optional scale after a colon (default 1)")
    parser.add_argument("--output", type=Path, required=True, help="output diffusers folder, or .safetensors file with --single-file")
    parser.add_argument("--single-file", action="store_true", help="write one original-layout .safetensors (SD 1.x/2.x and SDXL bases)")
    parser.add_argument("--base-config", default=None, help="config folder for a single-file BASE")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.set_defaults(run=run_merge)

    lora = subparsers.add_parser(
        "merge-lora",
        help="merge several LoRAs into one LoRA file (sum of updates, optionally re-factorised by SVD)",
        description=(
            "Sum the weight updates of several LoRAs (each times its scale) into one LoRA. With --rank R each "
            "summed layer is re-factorised to rank R by truncated SVD (as sd-scripts' svd_merge_lora.py "
            "--new_rank) and the relative error is reported per layer and overall; without --rank the factors "
            "are concatenated, which is exact (rank = the sum of the ranks)."
        ),
    )
    lora.add_argument("loras", nargs="+", metavar="LORA[:SCALE]", help="LoRA files or folders (any format), optional scale after a colon")
    lora.add_argument("--output", type=Path, required=True, help="output .safetensors file, or folder (diffusers)")
    lora.add_argument("--rank", type=int, default=None, help="re-factorise to this rank by SVD (default: concatenate, exact)")
    lora.add_argument("--to", choices=("diffusers", "kohya"), default=None, help="output format (default: the first input's)")
    lora.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    lora.add_argument("--quiet", action="store_true", help="print only the overall error, not one line per layer")
    lora.set_defaults(run=run_merge_lora)


def weighted(specs: list[str]) -> list[tuple[str, float]]:
    """``PATH[:SCALE]`` values -> (path, scale); scale 1 when not given.

    Args:
        specs: the command-line values.
    """
    import math

    from condkit.cli.generate import split_scale
    from condkit.errors import UserError

    out = []
    for spec in specs:
        path, scale = split_scale(spec)
        scale = 1.0 if scale is None else scale
        if not math.isfinite(scale):
            raise UserError(f"{spec}: the scale after the colon must be a finite number")
        if not Path(path).exists():
            raise UserError(f"{path}: no such file or folder")
        out.append((path, scale))
    return out


def run_merge(args: argparse.Namespace) -> int:
    """Load the base, merge the adapters, write the folder or single file."""
    from condkit import lora_tools
    from condkit.base import load_base

    from condkit.errors import UserError

    adapters = weighted(args.adapters)
    if args.output.exists() and not args.overwrite:
        raise UserError(f"{args.output}: already exists (pass --overwrite to replace it)")
    if args.single_file and args.output.suffix != ".safetensors":
        raise UserError(f"{args.output}: --single-file writes one .safetensors file; give an OUT ending in .safetensors")
    base = lora_tools.merge_into_base(load_base(args.base, args.base_config), adapters)
    if args.single_file:
        out = lora_tools.save_base_single_file(base, args.output, overwrite=args.overwrite)
    else:
        out = lora_tools.save_base_folder(base, args.output, overwrite=args.overwrite)
    merged = ", ".join(f"{path} x{scale:g}" for path, scale in adapters)
    print(f"{out}: {'single-file checkpoint' if args.single_file else 'diffusers folder'} of {base.source} with {merged} merged")
    return 0


def run_merge_lora(args: argparse.Namespace) -> int:
    """Read the LoRAs, sum them, write one file and print the error."""
    from condkit import lora_tools

    inputs = []
    for path, scale in weighted(args.loras):
        weights, file = lora_tools.read_lora(path)
        inputs.append((weights, scale, str(file)))
    merged, report = lora_tools.merge_loras(inputs, args.rank)
    to = args.to or inputs[0][0].format
    out = lora_tools.write_lora(merged, args.output, to, overwrite=args.overwrite, inputs=[Path(s) for _, _, s in inputs])
    print_report(report, quiet=args.quiet)
    print(f"{out}: {to} LoRA, {len(merged.modules)} modules merged from {len(inputs)} LoRAs; overall relative error {report.overall:.6f}")
    return 0


def print_report(report, quiet: bool = False) -> None:
    """Print a :class:`condkit.lora_tools.FitReport`: one line per layer unless ``quiet``, then notes.

    Args:
        report: the report.
        quiet: leave out the per-layer lines.
    """
    if not quiet and report.layers:
        print(report.table())
    for note in report.notes:
        print(f"note: {note}")
