"""Does an IP-Adapter transfer a reference image's colours? Measured on held-out references.

    python benchmarks/ip_adapter_transfer.py --train runs/ip-adapter      # train the recipe, then measure
    python benchmarks/ip_adapter_transfer.py --adapter runs/ip-adapter    # measure a trained adapter

For every held-out shapes-world combo (never in training data) it draws references,
samples the prompt ``a shape`` once with the base alone and once with the adapter (same
seeds), and compares each output with its reference: the shapes-world reading of the
output's shape colour and background (condkit.train.shapes_metrics) against the
reference's labels, the colour-histogram intersection and the cosine similarity in the
image encoder's space (condkit.adapters.ip_adapter.metrics). It also measures whether
the denoiser uses the reference at all: the loss on the held-out targets with another
target's reference over the loss with their own (``wrong_over_right``), for the trained
adapter and for a freshly initialised one. Prints a table and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def held_out_references(per_combo: int, seed: int = 2024):
    """(PIL reference, (colour, shape, background), target image) for each held-out combo,
    ``per_combo`` placements each; the target shows the reference's combo elsewhere."""
    from PIL import Image

    from condkit.train.shapes_world import HELD_OUT_COMBOS, ShapesWorld

    world = ShapesWorld(seed=seed, include_held_out=True)
    rng = np.random.default_rng(seed)
    samples = [world.draw(*combo, rng) for combo in HELD_OUT_COMBOS for _ in range(per_combo)]
    return [(Image.fromarray(s.reference), (s.colour, s.shape, s.background), s.image) for s in samples]


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
    colour = [r.colour == c for r, (_, (c, _, _), _) in zip(readings, pairs)]
    background = [r.background == b for r, (_, (_, _, b), _) in zip(readings, pairs)]
    report = similarity_report([ref for ref, _, _ in pairs], outputs, image_encoder, feature_extractor)
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
    parser.add_argument("--grid", type=Path, help="write a PNG: references / base alone / with the adapter, one column per combo")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
    from condkit.adapters.ip_adapter.metrics import reference_dependence
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
    references = [ref for ref, _, _ in pairs]
    adapter = IPAdapter.load(args.adapter, base)
    encoder, processor = adapter.image_encoder, adapter.feature_extractor
    adapter.detach()
    base_outputs = sample(base, None, references, args)
    results["base"] = score(base_outputs, pairs, encoder, processor)
    adapter.attach(base)
    adapter_outputs = sample(base, adapter, references, args)
    results["ip_adapter"] = score(adapter_outputs, pairs, encoder, processor)
    # Does the denoiser use the reference? Loss with another target's reference over the
    # right one, for the trained adapter and for a freshly initialised one.
    # Placement-major order, so that neighbours (the "wrong" pairs) are different combos.
    order = [i for first in range(args.per_combo) for i in range(first, len(pairs), args.per_combo)]
    images, arrays = [pairs[i][2] for i in order], [np.asarray(references[i]) for i in order]
    results["ip_adapter"].update(reference_dependence(adapter, base, images, arrays, args.prompt, seed=args.seed, repeats=4))
    adapter.detach()
    torch.manual_seed(args.seed)
    own_encoder = args.adapter / "image_encoder"
    encoder_path = str(own_encoder) if (own_encoder / "config.json").is_file() else ""
    fresh = IPAdapter(IPAdapterConfig(variant=adapter.config.variant, num_tokens=adapter.config.num_tokens, image_encoder=encoder_path))
    fresh.attach(base)
    results["base"].update(reference_dependence(fresh, base, images, arrays, args.prompt, seed=args.seed, repeats=4))
    results["settings"] = {"references": len(pairs), "prompt": args.prompt, "steps": args.steps, "guidance": args.guidance}

    print(f"{'figure':24s} {'base*':>8s} {'ip_adapter':>11s}   (*loss figures: a freshly initialised adapter)")
    for key in results["base"]:
        print(f"{key:24s} {results['base'][key]:8.3f} {results['ip_adapter'][key]:11.3f}")
    for key in ("train_seconds", "train_cpu_seconds"):
        if key in results:
            print(f"{key}: {results[key]:.0f}")
    if args.json:
        write_json_atomic(args.json, results)
    if args.grid:  # one column per held-out combo: reference / base alone / with the adapter
        from condkit.train.validation import make_grid, save_grid

        first = slice(0, None, args.per_combo)
        save_grid(make_grid([references[first], base_outputs[first], adapter_outputs[first]]), args.grid)


if __name__ == "__main__":
    main()
