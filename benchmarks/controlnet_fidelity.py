"""Control fidelity of a ControlNet on held-out shapes-world maps: edge F1, trained vs untrained.

Optionally trains the canny recipe first (``--train``, timing the run), then samples the
12 held-out shapes-world prompts (no training caption contains them) at ``--placements``
random placements each, with the Canny map of the intended image as condition, and
reports:

* edge F1 (tolerance 2 px) between each map and the output's Canny edges, for the
  trained ControlNet and for an untrained (zero-initialised) branch, which equals the
  base alone; plus the ceiling, the F1 of the true shapes images against their maps;
* the shapes classifier's colour/shape/background accuracy of the outputs (does the
  branch keep the prompt?) and the share of outputs whose shape sits where the map
  says (IoU of the filled map vs the output's foreground > 0.5);
* map dependence, which needs no sampling and no well-trained base: the held-out
  denoising loss with each sample's own map vs with another sample's map (same noise,
  same timesteps). An untrained branch gives both the same loss; a branch that uses
  the map has a lower loss with the right one;
* a grid PNG (condition | untrained | trained) when ``--grid`` is given.

    python benchmarks/controlnet_fidelity.py --train runs/controlnet-canny [--set train.max_steps=800]
    python benchmarks/controlnet_fidelity.py --controlnet runs/controlnet-canny [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def held_out_pairs(resolution: int, placements: int, seed: int):
    """(prompt, combo, image, condition) for every held-out combo at random placements."""
    import numpy as np

    from condkit.train.shapes_world import HELD_OUT_COMBOS, ShapesWorld

    world = ShapesWorld(seed, resolution, include_held_out=True)
    pairs = []
    for p in range(placements):
        for i, combo in enumerate(HELD_OUT_COMBOS):
            sample = world.draw(*combo, np.random.default_rng([seed, p, i]))
            pairs.append((sample.caption, combo, sample.image, sample.condition))
    return pairs


def placement_iou(condition, output) -> float:
    """IoU of the region the map encloses and the output's foreground (shapes classifier's)."""
    import cv2
    import numpy as np

    from condkit.train.shapes_metrics import FOREGROUND_DISTANCE, border_pixels

    edges = (np.asarray(condition).max(axis=2) > 127).astype(np.uint8)
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    wanted = np.zeros_like(edges)
    cv2.drawContours(wanted, contours, -1, 1, thickness=-1)  # the filled outline
    pixels = np.asarray(output, dtype=np.float32)
    background = np.median(border_pixels(np.asarray(output)), axis=0)
    found = (np.linalg.norm(pixels - background, axis=2) > FOREGROUND_DISTANCE).astype(np.uint8)
    union = np.logical_or(wanted, found).sum()
    return float(np.logical_and(wanted, found).sum() / union) if union else 0.0


def score(pairs, outputs, tolerance: int) -> dict:
    """Edge F1, placement and shapes-classifier figures of outputs for the pairs."""
    import numpy as np

    from condkit.adapters.controlnet.metrics import condition_edge_f1, mean_edge_scores
    from condkit.train.shapes_metrics import read_image, score_readings

    edges = mean_edge_scores([condition_edge_f1(cond, np.asarray(out), tolerance) for (_, _, _, cond), out in zip(pairs, outputs)])
    ious = [placement_iou(cond, out) for (_, _, _, cond), out in zip(pairs, outputs)]
    readings = score_readings([read_image(np.asarray(out)) for out in outputs], [combo for _, combo, _, _ in pairs])
    return {**edges, "placement_iou": float(np.mean(ious)), "placed_right": float(np.mean([v > 0.5 for v in ious])), **readings}


def map_dependence(base, adapter, pairs, seed: int) -> dict:
    """Held-out denoising MSE with the right maps vs the maps rolled by one sample.

    Args:
        base: the base the adapter is attached to.
        adapter: a ControlNet adapter.
        pairs: from :func:`held_out_pairs`.
        seed: noise and timestep seed (identical for both conditions).
    """
    import torch

    from condkit.adapters import unet_call_kwargs
    from condkit.train.encode import encode_conditioning, latent_distribution

    images = torch.stack([torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1 for _, _, img, _ in pairs])  # (n, 3, H, W)
    maps = torch.stack([torch.from_numpy(c).permute(2, 0, 1).float() / 255 for _, _, _, c in pairs])  # (n, 3, H, W) in [0, 1]
    g = torch.Generator().manual_seed(seed)
    scheduler = base.noise_scheduler()
    with torch.no_grad():
        latents, _ = latent_distribution(base, images)  # (n, 4, h, w); the mean: no sampling noise
        # The family's whole conditioning: (n, 77, d) hidden states, plus SDXL's pooled text and time_ids.
        conditioning = encode_conditioning(base, [prompt for prompt, _, _, _ in pairs])
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(pairs),), generator=g)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        losses = {}
        for name, condition in (("right_map", maps), ("wrong_map", maps.roll(1, dims=0))):
            kwargs = unet_call_kwargs([adapter], noisy, timesteps, conditioning, {"condition": condition})
            prediction = base.unet(noisy, timesteps, conditioning.encoder_hidden_states, **kwargs).sample
            losses[f"loss_{name}"] = float(torch.mean((prediction - target) ** 2))
    losses["wrong_over_right"] = losses["loss_wrong_map"] / losses["loss_right_map"]
    return losses


def main() -> int:
    """Run the benchmark and print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlnet", type=Path, help="a trained ControlNet (condkit output folder or diffusers folder)")
    parser.add_argument("--train", type=Path, metavar="OUTPUT", help="first train the canny recipe into OUTPUT (timed)")
    parser.add_argument("--recipe", default="controlnet-canny", help="recipe for --train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for --train (repeatable)")
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--placements", type=int, default=2, help="random placements per held-out prompt")
    parser.add_argument("--seed", type=int, default=4242, help="placement seed (not the validation maps')")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--tolerance", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loss-only", action="store_true", help="only the map-dependence figures (no sampling)")
    parser.add_argument("--grid", type=Path, help="write condition | untrained | trained rows here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not (args.controlnet or args.train):
        parser.error("give --controlnet or --train")

    import numpy as np
    import torch

    from condkit.adapters import load_adapter
    from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
    from condkit.adapters.controlnet.generate import generate_controlled
    from condkit.adapters.controlnet.metrics import condition_edge_f1, mean_edge_scores
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
        args.controlnet = args.controlnet or args.train

    base = load_base(args.base)
    pairs = held_out_pairs(base.resolution, args.placements, args.seed)
    prompts, conditions = [p[0] for p in pairs], [[p[3]] for p in pairs]
    sample = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)

    untrained = ControlNetAdapter(ControlNetConfig())
    untrained.attach(base)
    trained = load_adapter(args.controlnet, base)
    if args.loss_only:
        results["untrained"] = map_dependence(base, untrained, pairs, args.seed)
        results["trained"] = map_dependence(base, trained, pairs, args.seed)
        print(json.dumps(results, indent=2))
        return 0
    start = time.perf_counter()
    before = generate_controlled(base, [untrained], prompts, conditions, **sample)
    results["seconds_per_sample"] = round((time.perf_counter() - start) / len(pairs), 3)
    after = generate_controlled(base, [trained], prompts, conditions, **sample)

    results["samples"] = len(pairs)
    results["untrained"] = {**score(pairs, before, args.tolerance), **map_dependence(base, untrained, pairs, args.seed)}
    results["trained"] = {**score(pairs, after, args.tolerance), **map_dependence(base, trained, pairs, args.seed)}
    results["ceiling_true_images"] = mean_edge_scores([condition_edge_f1(c, img, args.tolerance) for _, _, img, c in pairs])
    if args.grid:
        from PIL import Image

        from condkit.train.validation import make_grid, save_grid

        rows = [[Image.fromarray(c[0]), b, a] for c, b, a in zip(conditions, before, after)]
        save_grid(make_grid(rows), args.grid)
    print(json.dumps(results, indent=2))
    if args.json:
        from condkit.io import write_json_atomic

        write_json_atomic(args.json, results)
    gain = results["trained"]["edge_f1"] - results["untrained"]["edge_f1"]
    print(f"edge F1: untrained {results['untrained']['edge_f1']:.3f} -> trained {results['trained']['edge_f1']:.3f} ({gain:+.3f})")
    return 0 if np.isfinite(gain) else 1


if __name__ == "__main__":
    raise SystemExit(main())
