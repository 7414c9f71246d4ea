"""``condkit train RECIPE``: run a training recipe."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    """Register ``train``."""
    parser = subparsers.add_parser(
        "train",
        help="train an adapter from a recipe",
        description="Train an adapter from a YAML recipe (a file, or a shipped recipe name such as lora-few-images). "
        "Writes the adapter in its export formats, checkpoints, TensorBoard logs and validation grids to --output.",
        epilog="example: condkit train recipes/lora-few-images.yaml --set train.max_steps=200 --output runs/my-lora",
    )
    parser.add_argument("recipe", nargs="?", help="recipe YAML file or shipped recipe name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key, e.g. train.learning_rate=5e-5 (repeatable)")
    parser.add_argument("--output", type=Path, help="output folder (default: runs/<recipe>-<time>)")
    parser.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint in --output, or from a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="train afresh into an existing, non-empty --output (its earlier checkpoints are removed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--validate-only", action="store_true", help="check the recipe and exit")
    parser.add_argument(
        "--keys",
        nargs="?",
        const="",
        metavar="KIND",
        help="print every adapter.* key of an adapter kind (default, range, help) and exit; without KIND: the recipe's own keys and the kinds",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Validate the recipe, then train."""
    from condkit.errors import UserError
    from condkit.train.config import load_recipe

    if args.keys is not None:
        print(keys_text(args.keys))
        return 0
    if args.recipe is None:
        raise UserError("train: give a RECIPE (a YAML file or a shipped recipe name), or --keys [KIND]")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.validate_only:
        print(f"{recipe.source}: ok ({recipe.adapter.kind}, {recipe.train.max_steps} steps)")
        return 0
    if args.resume and args.output is None:
        raise UserError("--resume needs --output (the folder of the run to continue)")
    output = args.output or Path("runs") / f"{Path(recipe.source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    from condkit.train.loop import train

    started = time.perf_counter()
    train(recipe, output, resume=args.resume, overwrite=args.overwrite, show_progress=not args.no_progress)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"condkit: trained {recipe.adapter.kind} in {time.perf_counter() - started:.0f} s; outputs in {output.resolve()}")
    return 0


def keys_text(kind: str) -> str:
    """The keys of an adapter kind's ``adapter:`` section, or (``kind`` empty) the recipe's own, as aligned text.

    Generated from the config dataclasses' field metadata (default, range or choices, help).

    Args:
        kind: a registered adapter kind, or ``""`` for the recipe's sections.

    Raises:
        UserError: an unknown kind (the valid ones named).
    """
    from condkit.adapters.base import config_key_rows
    from condkit.adapters.registry import get_adapter_class, list_kinds
    from condkit.train.config import recipe_sections

    if kind:
        rows = [("adapter.kind", f'"{kind}"', "", "this kind")] + config_key_rows(get_adapter_class(kind).config_class, "adapter")
    else:
        rows = [
            ("base", '"embedded"', "", "embedded, a diffusers folder, or a .safetensors/.ckpt file"),
            ("base_config", '""', "", "local diffusers folder with configs + tokenizer, for a single-file base"),
            ("seed", "0", "", "seed for data order, noise and initialisation"),
            ("frozen_adapters", "[]", "", "adapter files attached frozen during training (composition)"),
            ("adapter.kind", "", " / ".join(list_kinds()), "the adapter to train; condkit train --keys KIND lists its keys"),
        ]
        for name, section in recipe_sections().items():  # data: with the registered kinds' keys
            rows += config_key_rows(section, name)
    header = ("key", "default", "range", "help")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)
