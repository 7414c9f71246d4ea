"""``condkit resize LORA --rank R --output F``: lower a LoRA's rank by SVD, reporting the error."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    """Register ``resize``."""
    parser = subparsers.add_parser(
        "resize",
        help="lower a LoRA's rank by truncated SVD, reporting the error per layer and overall",
        description=(
            "Re-factorise every layer's update (alpha/rank * up @ down; conv layers flattened) to at most "
            "rank R by truncated SVD, with alpha = the new rank (scale 1, so the file's update is exactly the "
            "truncated one). Prints the relative Frobenius error per layer and overall. The output has the "
            "input's format (kohya in, kohya out; diffusers in, diffusers out). Layers already at rank <= R "
            "keep their rank and their update."
        ),
    )
    parser.add_argument("lora", type=Path, help="LoRA file or folder (diffusers or kohya/A1111)")
    parser.add_argument("--rank", type=int, required=True, help="the new largest rank")
    parser.add_argument("--output", type=Path, required=True, help="output .safetensors file, or folder (diffusers)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", action="store_true", help="print only the overall error, not one line per layer")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Read, resize, write, report."""
    from condkit import lora_tools
    from condkit.cli.merge import print_report

    lora_tools.check_rank(args.rank)
    weights, file = lora_tools.read_lora(args.lora)
    resized, report = lora_tools.resize_lora(weights, args.rank, source=str(file))
    out = lora_tools.write_lora(resized, args.output, weights.format, overwrite=args.overwrite, inputs=[file])
    print_report(report, quiet=args.quiet)
    print(f"{out}: {weights.format} LoRA at rank <= {args.rank} ({len(resized.modules)} modules); overall relative error {report.overall:.6f}")
    return 0
