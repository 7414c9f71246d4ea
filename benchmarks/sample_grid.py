"""Write the README's grid of embedded-base samples (``docs/embedded_samples.png``).

Each row is one held-out prompt (a combo no training sample has), each column a seed;
sampled with the stock ``StableDiffusionPipeline`` at 64x64, DDIM 25 steps, guidance
7.5, and shown at 2x (nearest neighbour) so the pixels stay visible.

    python benchmarks/sample_grid.py [--out docs/embedded_samples.png] [--rows 6] [--columns 6]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> int:
    """Sample and save the grid; print the prompts row by row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/embedded_samples.png"))
    parser.add_argument("--rows", type=int, default=6, help="prompts (the first held-out combos)")
    parser.add_argument("--columns", type=int, default=6, help="seeds per prompt")
    parser.add_argument("--first-seed", type=int, default=777)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args()

    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from condkit.base import export_embedded
    from condkit.train.shapes_world import HELD_OUT_COMBOS, caption_for
    from condkit.train.validation import make_grid, save_grid

    torch.set_num_threads(2)
    combos = list(HELD_OUT_COMBOS)[: args.rows]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionPipeline.from_pretrained(export_embedded(Path(tmp) / "base"), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        rows = []
        for combo in combos:
            seeds = range(args.first_seed, args.first_seed + args.columns)
            images = pipe(
                [caption_for(*combo)] * args.columns,
                num_inference_steps=25,
                guidance_scale=7.5,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            ).images
            rows.append([image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST) for image in images])
            print(caption_for(*combo))
    save_grid(make_grid(rows, pad=4), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
