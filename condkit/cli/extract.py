"""``condkit extract TUNED ORIGINAL --rank R --output F``: a LoRA from the difference of two bases."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    """Register ``extract``."""
    parser = subparsers.add_parser(
        "extract",
        help="extract a LoRA approximating a fine-tuned base minus its original, by SVD",
        description=(
            "For every Linear/Conv2d layer of the U-Net (and of the text encoder(s) when they differ) whose "
            "weight differs between TUNED and ORIGINAL, factorise the difference to rank R by truncated SVD "
            "(conv layers as kohya's LoCon: kxk down, 1x1 up). Prints the relative Frobenius error per layer "
            "and overall, and names tensors a LoRA cannot hold (biases, norms) when they differ. TUNED is a "
            "diffusers folder, a single-file checkpoint (with --tuned-config) or a full_unet run folder."
        ),
    )
    parser.add_argument("tuned", help="the fine-tuned model: diffusers folder, checkpoint file, or full_unet run")
    parser.add_argument("original", help="the model it was tuned from: 'embedded', a diffusers folder or a checkpoint file")
    parser.add_argument("--rank", type=int, required=True, help="rank of every extracted layer (capped at its size)")
    parser.add_argument("--output", type=Path, required=True, help="output .safetensors file, or folder (diffusers)")
    parser.add_argument("--to", choices=("diffusers", "kohya"), default="diffusers", help="output format (default diffusers)")
    parser.add_argument("--tuned-config", default=None, help="config folder for a single-file TUNED")
    parser.add_argument("--base-config", default=None, help="config folder for a single-file ORIGINAL")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", action="store_true", help="print only the overall error, not one line per layer")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load both models, extract, write, report."""
    from condkit import lora_tools
    from condkit.adapters.lora.adapter import base_models
    from condkit.base import load_base
    from condkit.cli.merge import print_report

    lora_tools.check_rank(args.rank)
    lora_tools.tuned_kind(args.tuned)  # a bad TUNED fails before any model loads
    original = load_base(args.original, args.base_config)
    tuned = lora_tools.tuned_models(args.tuned, args.tuned_config, original)
    weights, report = lora_tools.extract_lora(tuned, base_models(original), args.rank, original.family.name)
    out = lora_tools.write_lora(weights, args.output, args.to, overwrite=args.overwrite)
    print_report(report, quiet=args.quiet)
    print(f"{out}: {args.to} LoRA of {len(weights.modules)} layers at rank <= {args.rank}; overall relative error {report.overall:.6f}")
    return 0
