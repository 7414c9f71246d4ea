"""Does an IP-Adapter transfer a reference image's colours? Measured on held-out references.

    python benchmarks/ip_adapter_transfer.py --train runs/ip-adapter      # train the recipe, then measure
    python benchmarks/ip_adapter_transfer.py --adapter runs/ip-adapter    # measure a trained adapter

For every held-out shapes-world combo (never in training data) it draws references,
samples the prompt ``a shape`` once with the base alone and once with the adapter (same
seeds), and compares each output with its reference: the shapes-world reading of the
output's shape colour and background (condkit.train.shapes_metrics) against the
reference's labels, the colour-histogram intersection and the cosine similarity in the
image encoder's space (condkit.adapters.ip_adapter.metrics). Prints a table and
optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def held_out_references(per_combo: int, seed: int = 2024):
    """(PIL reference, (colour, shape, background)) for each held-out combo, ``per_combo`` placements each."""
    from PIL import Image

    from condkit.train.shapes_world import HELD_OUT_COMBOS, ShapesWorld

    world = ShapesWorld(seed=seed, include_held_out=True)
    rng = np.random.default_rng(seed)
    return [
        (Image.fromarray(world.draw(*combo, rng).reference), combo)
        for combo in HELD_OUT_COMBOS
        for _ in range(per_combo)
    ]


def sample(base, adapter, references, args) -> list:
    """One ``a shape`` sample per reference, seed ``args.seed + i``; the base alone when ``adapter`` is None."""
    pipe = base.pipeline(**(adapter.pipeline_components() if adapter else {}))
    outputs = []
    for number, reference in enumerate(references):
        extra = adapter.pipeline_call_kwargs({"ip_images": [reference]}) if adapter else {}
        outputs.append(
            pipe(
                args.prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=torch.Generator().manual_seed(args.seed + number),
                **extra,
            ).images[0]
        )
    return outputs


def score(outputs, pairs, image_encoder, feature_extractor) -> dict[str, float]:
    """Colour/background match rates and similarity figures of outputs against references."""
    from condkit.adapters.ip_adapter.metrics import similarity_report
    from condkit.train.shapes_metrics import read_image

    readings = [read_image(np.asarray(out)) for out in outputs]
    colour = [r.colour == c for r, (_, (c, _, _)) in zip(readings, pairs)]
    background = [r.background == b for r, (_, (_, _, b)) in zip(readings, pairs)]
    report = similarity_report([ref for ref, _ in pairs], outputs, image_encoder, feature_extractor)
    return {
        "shape_colour_match": float(np.mean(colour)),
        "background_match": float(np.mean(background)),
        "both_colours_match": float(np.mean([a and b for a, b in zip(colour, background)])),
        **report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--adapter", type=Path, help="a trained IP-Adapter folder")
    group.add_argument("--train", type=Path, metavar="OUT", help="train the ip-adapter recipe into OUT first")
    parser.add_argument("--recipe", default="ip-adapter", help="recipe for --train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides for --train")
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--per-combo", type=int, default=2, help="references per held-out combo (12 combos)")
    parser.add_argument("--prompt", default="a shape")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from condkit.adapters.ip_adapter import IPAdapter
    from condkit.base import load_base
    from condkit.io import write_json_atomic

    results: dict = {}
    if args.train:
        from condkit.train.config import load_recipe
        from condkit.train.loop import train

        recipe = load_recipe(args.recipe, args.set)
        start, cpu_start = time.perf_counter(), time.process_time()
        train(recipe, args.train, overwrite=True)
        results["train_seconds"] = time.perf_counter() - start
        results["train_cpu_seconds"] = time.process_time() - cpu_start
        args.adapter = args.train

    base = load_base(args.base)
    pairs = held_out_references(args.per_combo)
    references = [ref for ref, _ in pairs]
    adapter = IPAdapter.load(args.adapter, base)
    encoder, processor = adapter.image_encoder, adapter.feature_extractor
    adapter.detach()
    results["base"] = score(sample(base, None, references, args), pairs, encoder, processor)
    adapter.attach(base)
    results["ip_adapter"] = score(sample(base, adapter, references, args), pairs, encoder, processor)
    results["settings"] = {"references": len(pairs), "prompt": args.prompt, "steps": args.steps, "guidance": args.guidance}

    print(f"{'figure':24s} {'base':>8s} {'ip_adapter':>11s}")
    for key in results["base"]:
        print(f"{key:24s} {results['base'][key]:8.3f} {results['ip_adapter'][key]:11.3f}")
    for key in ("train_seconds", "train_cpu_seconds"):
        if key in results:
            print(f"{key}: {results[key]:.0f}")
    if args.json:
        write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
