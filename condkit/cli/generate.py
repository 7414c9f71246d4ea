"""``condkit generate``: a base plus any adapters to PNG files."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]", help="adapter file or folder, optional strength after a colon (repeatable)")
    parser.add_argument("--control-image", action="append", default=[], metavar="IMAGE", help="condition map for each ControlNet, in --adapter order")
    parser.add_argument("--ip-image", action="append", default=[], metavar="IMAGE", help="reference image for each IP-Adapter, in --adapter order")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt")
    parser.add_argument("--num", type=int, default=1, help="images to generate (seeds seed, seed+1, ...)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
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


def run(args: argparse.Namespace) -> int:
    """Load the base and adapters, sample, write PNGs atomically."""
    import torch

    from condkit.adapters import load_adapter
    from condkit.base import load_base
    from condkit.errors import UserError
    from condkit.generate import build_pipeline
    from condkit.io import atomic_path
    from condkit.train.data import load_rgb

    if args.num < 1 or args.steps < 1:
        raise UserError(f"--num and --steps must be at least 1 (got {args.num}, {args.steps})")
    base = load_base(args.base, args.base_config)
    adapters = []
    for number, spec in enumerate(args.adapter):
        path, scale = split_scale(spec)
        adapter = load_adapter(path, base, name=f"adapter_{number}")
        if scale is not None:
            adapter.set_scale(scale)
        if args.fuse and hasattr(adapter, "fuse"):
            adapter.fuse()
        adapters.append(adapter)
    from PIL import Image

    inputs = {
        "control_images": [Image.fromarray(load_rgb(p)) for p in args.control_image],
        "ip_images": [Image.fromarray(load_rgb(p)) for p in args.ip_image],
    }
    pipe, call_kwargs = build_pipeline(base, adapters, inputs)
    written = []
    for i in range(args.num):
        generator = torch.Generator().manual_seed(args.seed + i)
        image = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
            **call_kwargs,
        ).images[0]
        path = args.output / f"{args.seed + i:06d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        written.append(path)
    print(f"condkit: wrote {len(written)} image(s) to {args.output.resolve()}")
    return 0
