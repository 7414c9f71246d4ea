"""``condkit generate``: a base plus any adapters to PNG files."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from condkit.generate import MAX_ADAPTER_SCALE

# Guidance beyond this only saturates images; NaN/inf would give black ones.
MAX_GUIDANCE = 100.0
# Which adapter kind consumes each per-adapter image option.
IMAGE_OPTIONS = {"control_image": ("--control-image", "controlnet", "ControlNet"), "ip_image": ("--ip-image", "ip_adapter", "IP-Adapter")}


def add_parser(subparsers) -> None:
    """Register ``generate``."""
    parser = subparsers.add_parser(
        "generate",
        help="generate images with a base and any adapters",
        description="Generate PNG images from a base model with any number of adapters attached "
        "(LoRA files/folders, ControlNet folders, IP-Adapter folders; the kind is detected).",
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
    parser.add_argument("--control-image", action="append", default=[], metavar="IMAGE", help="condition map for each ControlNet, in --adapter order")
    parser.add_argument("--ip-image", action="append", default=[], metavar="IMAGE", help="reference image for each IP-Adapter, in --adapter order")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt")
    parser.add_argument("--num", type=int, default=1, help="images to generate (seeds seed, seed+1, ...)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=7.5, help=f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g}")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--fuse", action="store_true", help="fuse LoRA weights into the base before sampling (faster)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the PNG files")
    parser.set_defaults(run=run)


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
    """Refuse ``--control-image``/``--ip-image`` that no attached adapter would use.

    Args:
        args: the parsed arguments.
        kinds: the kinds of the attached adapters, in ``--adapter`` order.

    Raises:
        UserError: images given for a kind with no adapter, or more control images
            than ControlNets (each ControlNet takes one).
    """
    from condkit.errors import UserError

    for attribute, (option, kind, label) in IMAGE_OPTIONS.items():
        given, adapters = len(getattr(args, attribute)), kinds.count(kind)
        if given and not adapters:
            raise UserError(f"{option} given ({given}) but no {label} among the --adapter files; it would be ignored")
        if kind == "controlnet" and given > adapters:
            raise UserError(f"{option} given {given} times for {adapters} ControlNet(s); pass one per ControlNet, in --adapter order")


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

    inputs = {
        "control_images": [Image.fromarray(load_rgb(p)) for p in args.control_image],
        "ip_images": [Image.fromarray(load_rgb(p)) for p in args.ip_image],
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
