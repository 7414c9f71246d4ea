"""How well the embedded base follows shapes-world prompts, through stock diffusers.

Exports the embedded base (``--base embedded-sdxl``: the SDXL one; or takes ``--base
DIR``), loads it with the unmodified pipeline class its ``model_index.json`` names
(``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``) and samples at its native
64x64 with the folder's own scheduler (DDIM for the SD base, Euler for the SDXL one), 25
steps, guidance 7.5: the 12 held-out prompts (no training sample has them) and, separately, the 78
training prompts, on seeds no training run used. Prints foreground colour, background
colour and shape accuracy (shapes classifier: condkit.train.shapes_metrics) and the
time of one 25-step guided sample.

    python benchmarks/embedded_base_quality.py [--seeds 10] [--base DIR|embedded-sdxl] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> int:
    """Run the benchmark and print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="embedded", help="a diffusers base folder, or embedded (default) / embedded-sdxl: export that base")
    parser.add_argument("--seeds", type=int, default=10, help="samples per held-out prompt")
    parser.add_argument("--seen-seeds", type=int, default=2, help="samples per training prompt")
    parser.add_argument("--first-seed", type=int, default=900_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import torch
    from diffusers import DiffusionPipeline

    from condkit.base import EMBEDDED_BASES, export_embedded
    from condkit.train.shapes_metrics import sample_and_score
    from condkit.train.shapes_world import HELD_OUT_COMBOS, training_combos

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_embedded(Path(tmp) / "base", name=args.base) if args.base in EMBEDDED_BASES else Path(args.base)
        # The class model_index.json names: a stock StableDiffusion(XL)Pipeline, nothing of condkit's.
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        results = {"pipeline": type(pipe).__name__}
        pipe.set_progress_bar_config(disable=True)
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        results["held_out"], images, _ = sample_and_score(pipe, list(HELD_OUT_COMBOS), seeds)
        results["held_out"]["samples"] = len(images)
        seen_seeds = list(range(args.first_seed + 1000, args.first_seed + 1000 + args.seen_seeds))
        results["training_prompts"], images, _ = sample_and_score(pipe, training_combos(), seen_seeds)
        results["training_prompts"]["samples"] = len(images)
        pipe("a red circle on a blue background", num_inference_steps=25, guidance_scale=7.5)  # warm-up
        started = time.perf_counter()
        for seed in range(3):
            pipe("a red circle on a blue background", num_inference_steps=25, guidance_scale=7.5, generator=torch.Generator().manual_seed(seed))
        results["seconds_per_sample"] = round((time.perf_counter() - started) / 3, 3)
    for name in ("held_out", "training_prompts"):
        figures = results[name]
        print(
            f"{name:17s} n={figures['samples']:4d}  colour {figures['colour_accuracy']:.1%}  "
            f"background {figures['background_accuracy']:.1%}  shape {figures['shape_accuracy']:.1%}  all three {figures['all_accuracy']:.1%}"
        )
    print(f"one 64x64 sample ({results['pipeline']}), 25 steps, guidance 7.5: {results['seconds_per_sample']:.2f} s ({args.threads} threads)")
    if args.json:
        from condkit.io import write_json_atomic

        write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    from condkit.errors import report_user_errors

    raise SystemExit(report_user_errors(main, False))  # a base that is not installed yet: one line, not a traceback
