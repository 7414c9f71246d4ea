"""``condkit generate``: a base plus any adapters to PNG files."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from condkit.generate import MAX_ADAPTER_SCALE

# Guidance beyond this only saturates images; NaN/inf would give black ones.
MAX_GUIDANCE = 100.0


class KindInputsParser(argparse.ArgumentParser):
    """The ``generate`` parser: the adapter kinds' input options join it on first use.

    Listing them imports every kind (seconds of torch/diffusers imports), which every
    ``condkit`` start would pay if they were added when the command line is built.
    """

    def _add_kind_inputs(self) -> None:
        if not getattr(self, "_kind_inputs_added", False):
            self._kind_inputs_added = True
            add_kind_input_options(self)

    def parse_known_args(self, args=None, namespace=None):
        """Add the kinds' options, then parse as argparse does."""
        self._add_kind_inputs()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        """Add the kinds' options, then format the help as argparse does."""
        self._add_kind_inputs()
        return super().format_help()


def kind_inputs() -> list[tuple[str, object]]:
    """``(kind, GenerateInput)`` for every ``condkit generate`` input the registered kinds declare."""
    from condkit.adapters.registry import loadable_adapter_classes

    return [(kind_class.kind, declared) for kind_class in loadable_adapter_classes() for declared in kind_class.generate_inputs]


def option_dest(option: str) -> str:
    """The argparse attribute of an option: ``--control-image`` -> ``control_image``."""
    return option.lstrip("-").replace("-", "_")


def add_kind_input_options(parser: argparse.ArgumentParser) -> None:
    """Add each kind's declared inputs as repeatable options (in their own help section).

    Args:
        parser: the ``generate`` parser.
    """
    group = parser.add_argument_group("adapter inputs", "files the attached adapter kinds take")
    for _, declared in kind_inputs():
        group.add_argument(declared.option, action="append", default=[], metavar=declared.metavar, help=declared.help)


def add_parser(subparsers) -> None:
    """Register ``generate``."""
    parser = subparsers.add_parser(
        "generate",
        help="generate images with a base and any adapters",
        description="Generate PNG images from a base model with any number of adapters attached "
        "(files or folders of any kind condkit reads; the kind is detected).",
        epilog="example: condkit generate --adapter runs/my-lora --prompt 'a sks circle on a white background' --num 4 --output samples",
    )
    parser.add_argument("--base", default="embedded", help="'embedded' (default), a diffusers folder, or a .safetensors/.ckpt file")
    parser.add_argument("--base-config", help="local diffusers folder with configs + tokenizer, for a single-file base")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help=f"adapter file or folder, optional strength after a colon, from -{MAX_ADAPTER_SCALE:g} to {MAX_ADAPTER_SCALE:g} (repeatable)",
    )
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt")
    parser.add_argument("--num", type=int, default=1, help="images to generate (seeds seed, seed+1, ...)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=7.5, help=f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g}")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--fuse", action="store_true", help="fuse LoRA weights into the base before sampling (faster)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the PNG files")
    parser.set_defaults(run=run)
    parser.__class__ = KindInputsParser  # subparsers build plain parsers; this one adds the kinds' options lazily


def split_scale(spec: str) -> tuple[str, float | None]:
    """``path:0.8`` -> (``path``, 0.8); a path without a numeric suffix keeps its colons.

    Args:
        spec: the ``--adapter`` value.
    """
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, None


def check_image_options(args: argparse.Namespace, kinds: list[str]) -> None:
    """Refuse kind inputs (e.g. an image option) that no attached adapter would use.

    Args:
        args: the parsed arguments.
        kinds: the kinds of the attached adapters, in ``--adapter`` order.

    Raises:
        UserError: values given for a kind with no adapter, or more values than adapters
            of a kind whose adapters take one each.
    """
    from condkit.errors import UserError

    for kind, declared in kind_inputs():
        given, adapters = len(getattr(args, option_dest(declared.option), [])), kinds.count(kind)
        label = declared.label
        if given and not adapters:
            raise UserError(f"{declared.option} given ({given}) but no {label} among the --adapter files; it would be ignored")
        if declared.one_per_adapter and given > adapters:
            raise UserError(
                f"{declared.option} given {given} times for {adapters} {label}(s); pass one per {label}, in --adapter order"
            )


def finite_image(pixels, path: Path, seed: int):
    """The PIL image of one sample, refused when it holds NaN/inf.

    Args:
        pixels: the pipeline's ``np`` output, (1, h, w, 3) floats in [0, 1].
        path: where it would be written, for the message.
        seed: its seed, for the message.

    Raises:
        UserError: the sample is not finite (it would be a black image).
    """
    import numpy as np
    from diffusers.utils import numpy_to_pil

    from condkit.errors import UserError

    if not np.isfinite(pixels).all():
        raise UserError(
            f"{path}: not written: the image of seed {seed} is NaN/inf (overflow in the base or an adapter: "
            "check the adapter scales and weights)"
        )
    return numpy_to_pil(pixels)[0]


def run(args: argparse.Namespace) -> int:
    """Load the base and adapters, sample, write PNGs atomically."""
    import torch

    from condkit.adapters import load_adapter
    from condkit.base import load_base
    from condkit.errors import UserError
    from condkit.generate import build_pipeline, check_scale
    from condkit.io import atomic_path
    from condkit.train.data import load_rgb

    if args.num < 1 or args.steps < 1:
        raise UserError(f"--num and --steps must be at least 1 (got {args.num}, {args.steps})")
    if not math.isfinite(args.guidance) or not 0 <= args.guidance <= MAX_GUIDANCE:
        raise UserError(f"--guidance {args.guidance!r}: must be a finite number from 0 to {MAX_GUIDANCE:g}")
    specs = [split_scale(spec) for spec in args.adapter]
    for spec, (_, scale) in zip(args.adapter, specs):
        if scale is not None:
            check_scale(scale, f"--adapter {spec}")
    base = load_base(args.base, args.base_config)
    adapters = []
    for number, (path, scale) in enumerate(specs):
        adapter = load_adapter(path, base, name=f"adapter_{number}")
        if scale is not None:
            adapter.set_scale(scale)
        if args.fuse and hasattr(adapter, "fuse"):
            adapter.fuse()
        adapters.append(adapter)
    check_image_options(args, [adapter.kind for adapter in adapters])
    from PIL import Image

    # Every declared input is an image file, read through condkit's one image loader.
    inputs = {
        declared.key: [Image.fromarray(load_rgb(p)) for p in getattr(args, option_dest(declared.option), [])]
        for _, declared in kind_inputs()
    }
    pipe, call_kwargs = build_pipeline(base, adapters, inputs)
    written = []
    for i in range(args.num):
        generator = torch.Generator().manual_seed(args.seed + i)
        pixels = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
            output_type="np",  # floats, so NaN/inf are seen before PIL turns them into black
            **call_kwargs,
        ).images  # (1, h, w, 3) in [0, 1]
        path = args.output / f"{args.seed + i:06d}.png"
        image = finite_image(pixels, path, args.seed + i)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        written.append(path)
    print(f"condkit: wrote {len(written)} image(s) to {args.output.resolve()}")
    return 0
