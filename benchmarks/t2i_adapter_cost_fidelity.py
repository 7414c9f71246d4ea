"""T2I-Adapter vs the bare base vs ControlNet: edge fidelity on held-out maps and inference cost, in one run.

Optionally trains the T2I-Adapter canny recipe first (``--train``, timed), then on the
12 held-out shapes-world prompts (no training caption contains them) at
``--placements`` placements each, with the Canny map of the intended image as
condition, reports:

* fidelity: edge F1 (tolerance 2 px) between each map and the output's Canny edges,
  for the base alone (no adapter), the trained T2I-Adapter and, with ``--controlnet``,
  a trained ControlNet; the T2I-Adapter's ratio to the base is what the recipe must
  reach (>= 2x);
* cost per generation (``--steps`` sampling steps, guidance on, one image): median
  seconds of the bare base, base + T2I-Adapter and base + ControlNet, timed
  interleaved, and how often each adapter's forward ran in one generation (forward
  hooks): the T2I-Adapter once, ControlNet once per step. Cost does not depend on the
  weights, so an untrained ControlNet branch is timed when none is given.

    python benchmarks/t2i_adapter_cost_fidelity.py --train runs/t2i-adapter-canny [--set train.max_steps=300]
    python benchmarks/t2i_adapter_cost_fidelity.py --t2i runs/t2i-adapter-canny --controlnet runs/controlnet-canny [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def edge_fidelity(base, adapters, pairs, steps: int, guidance: float, seed: int, tolerance: int) -> dict:
    """Mean edge precision/recall/F1 of outputs on held-out pairs.

    Args:
        base: the base, with ``adapters`` attached.
        adapters: [] (the base alone), T2I-Adapters or ControlNets (one kind; one map each).
        pairs: ``(prompt, combo, image, condition)`` from ``controlnet_fidelity.held_out_pairs``.
        steps: sampling steps.
        guidance: guidance scale.
        seed: image i uses seed + i.
        tolerance: edge matching radius in pixels.
    """
    import numpy as np

    from condkit.adapters.controlnet.metrics import condition_edge_f1, mean_edge_scores

    outputs = sample(base, adapters, pairs, steps, guidance, seed)
    return mean_edge_scores([condition_edge_f1(cond, np.asarray(out), tolerance) for (_, _, _, cond), out in zip(pairs, outputs)])


def sample(base, adapters, pairs, steps: int, guidance: float, seed: int) -> list:
    """One image per pair through condkit's generate path; the adapters' kind picks the map input."""
    prompts = [prompt for prompt, _, _, _ in pairs]
    maps = [[cond] * max(1, len(adapters)) for _, _, _, cond in pairs]
    if adapters and adapters[0].kind == "controlnet":
        from condkit.adapters.controlnet.generate import generate_controlled

        return generate_controlled(base, adapters, prompts, maps, num_inference_steps=steps, guidance_scale=guidance, seed=seed)
    from condkit.adapters.t2i_adapter.generate import generate_with_maps

    return generate_with_maps(base, adapters, prompts, maps, num_inference_steps=steps, guidance_scale=guidance, seed=seed)


def forward_calls(module, run) -> int:
    """How often ``module.forward`` runs during ``run()`` (a forward hook counts)."""
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def inference_cost(base, t2i, controlnet, pair, steps: int, guidance: float, repetitions: int) -> dict:
    """Seconds per generation (median, interleaved) and adapter forward calls per generation.

    Args:
        base: the base with both adapters attached (each is used alone).
        t2i: a T2I-Adapter adapter.
        controlnet: a ControlNet adapter.
        pair: one held-out pair (its prompt and map are used).
        steps: sampling steps per generation.
        guidance: guidance scale (> 1: the batch of two the pipelines run per step).
        repetitions: timed generations per contender.
    """
    from harness import interleaved, median

    one = [pair]
    contenders = {
        "base": lambda: sample(base, [], one, steps, guidance, 0),
        "t2i_adapter": lambda: sample(base, [t2i], one, steps, guidance, 0),
        "controlnet": lambda: sample(base, [controlnet], one, steps, guidance, 0),
    }
    times = interleaved(contenders, repetitions)
    seconds = {name: round(median(values), 4) for name, values in times.items()}
    return {
        "steps": steps,
        "seconds_per_generation": seconds,
        "t2i_over_base": round(seconds["t2i_adapter"] / seconds["base"], 3),
        "controlnet_over_base": round(seconds["controlnet"] / seconds["base"], 3),
        "t2i_forward_calls": forward_calls(t2i.model, contenders["t2i_adapter"]),
        "controlnet_forward_calls": forward_calls(controlnet.controlnet, contenders["controlnet"]),
        "unet_forward_calls": forward_calls(base.unet, contenders["base"]),
    }


def main() -> int:
    """Run the benchmark and print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t2i", type=Path, help="a trained T2I-Adapter (condkit output folder or diffusers folder)")
    parser.add_argument("--train", type=Path, metavar="OUTPUT", help="first train the T2I-Adapter recipe into OUTPUT (timed)")
    parser.add_argument("--recipe", default="t2i-adapter-canny", help="recipe for --train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for --train (repeatable)")
    parser.add_argument("--controlnet", type=Path, help="a trained ControlNet to compare fidelity with (cost is measured either way)")
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--placements", type=int, default=2, help="random placements per held-out prompt")
    parser.add_argument("--seed", type=int, default=4242, help="placement and sampling seed")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--tolerance", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=5, help="timed generations per contender")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not (args.t2i or args.train):
        parser.error("give --t2i or --train")

    import torch
    from controlnet_fidelity import held_out_pairs

    from condkit.adapters import load_adapter
    from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
    from condkit.base import load_base

    torch.set_num_threads(args.threads)
    results: dict = {}
    if args.train:
        from condkit.train import train
        from condkit.train.config import load_recipe

        recipe = load_recipe(args.recipe, args.set)
        start = time.perf_counter()
        train(recipe, args.train, overwrite=True, show_progress=False)
        results["train_seconds"] = round(time.perf_counter() - start, 1)
        results["train_steps"] = recipe.train.max_steps
        results["train_batch_size"] = recipe.train.batch_size
        args.t2i = args.t2i or args.train

    base = load_base(args.base)
    pairs = held_out_pairs(base.resolution, args.placements, args.seed)
    t2i = load_adapter(args.t2i, base, name="t2i")
    controlnet = load_adapter(args.controlnet, base, name="cn") if args.controlnet else ControlNetAdapter(ControlNetConfig(), name="cn")
    if controlnet.base is None:
        controlnet.attach(base)
    figures = dict(steps=args.steps, guidance=args.guidance, seed=args.seed, tolerance=args.tolerance)
    results["samples"] = len(pairs)
    results["fidelity"] = {"base": edge_fidelity(base, [], pairs, **figures), "t2i_adapter": edge_fidelity(base, [t2i], pairs, **figures)}
    if args.controlnet:
        results["fidelity"]["controlnet"] = edge_fidelity(base, [controlnet], pairs, **figures)
    results["t2i_f1_over_base"] = round(results["fidelity"]["t2i_adapter"]["edge_f1"] / max(results["fidelity"]["base"]["edge_f1"], 1e-9), 3)
    results["cost"] = inference_cost(base, t2i, controlnet, pairs[0], args.steps, args.guidance, args.repetitions)
    print(json.dumps(results, indent=2))
    if args.json:
        from condkit.io import write_json_atomic

        write_json_atomic(args.json, results)
    fid, cost = results["fidelity"], results["cost"]
    print(
        f"edge F1: base {fid['base']['edge_f1']:.3f}, T2I-Adapter {fid['t2i_adapter']['edge_f1']:.3f} ({results['t2i_f1_over_base']:.2f}x)"
        + (f", ControlNet {fid['controlnet']['edge_f1']:.3f}" if "controlnet" in fid else "")
    )
    print(
        f"seconds per generation ({args.steps} steps): base {cost['seconds_per_generation']['base']:.3f}, "
        f"T2I-Adapter {cost['seconds_per_generation']['t2i_adapter']:.3f} ({cost['t2i_over_base']:.2f}x, "
        f"{cost['t2i_forward_calls']} adapter call), ControlNet {cost['seconds_per_generation']['controlnet']:.3f} "
        f"({cost['controlnet_over_base']:.2f}x, {cost['controlnet_forward_calls']} branch calls)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
