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
import sys
import json
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # drawn_references beside this file


def held_out_references(per_combo: int, seed: int = 2024):
    """(PIL reference, (colour, shape, background), target image) for each held-out combo,
    ``per_combo`` placements each; the target shows the reference's combo elsewhere."""
    from PIL import Image

    from condkit.train.shapes_world import HELD_OUT_COMBOS, ShapesWorld

    world = ShapesWorld(seed=seed, include_held_out=True)
    rng = np.random.default_rng(seed)
    samples = [world.draw(*combo, rng) for combo in HELD_OUT_COMBOS for _ in range(per_combo)]
    return [(Image.fromarray(s.reference), (s.colour, s.shape, s.background), s.image) for s in samples]


def sample(base, adapter, references, args, guidance: float) -> list:
    """condkit's path: one ``a shape`` sample per reference, seed ``args.seed + i``; the base alone when ``adapter`` is None."""
    pipe = base.pipeline(**(adapter.pipeline_components() if adapter else {}))
    outputs = []
    for number, reference in enumerate(references):
        extra = adapter.pipeline_call_kwargs({"ip_images": [reference]}) if adapter else {}
        outputs.append(
            pipe(
                args.prompt,
                num_inference_steps=args.steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(args.seed + number),
                **extra,
            ).images[0]
        )
    return outputs


def stock_pipeline(base_folder: Path, adapter_folder: Path | None):
    """A user's path: the stock pipeline of the exported base's ``model_index.json``
    (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``), plus ``load_ip_adapter``
    exactly as the README gives it (scale 1.0) when ``adapter_folder`` is set."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base_folder)
    pipe.set_progress_bar_config(disable=True)
    if adapter_folder is not None:
        pipe.load_ip_adapter(
            str(adapter_folder), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder="image_encoder"
        )
        pipe.set_ip_adapter_scale(1.0)
    return pipe


def sample_stock(pipe, references, args, guidance: float, with_reference: bool) -> list:
    """The stock pipeline's ``a shape`` samples, seed ``args.seed + i`` (the same seeds as :func:`sample`)."""
    outputs = []
    for number, reference in enumerate(references):
        extra = {"ip_adapter_image": reference} if with_reference else {}
        outputs.append(
            pipe(
                args.prompt,
                num_inference_steps=args.steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(args.seed + number),
                **extra,
            ).images[0]
        )
    return outputs


def max_pixel_difference(first: list, second: list) -> int:
    """Largest absolute difference (0-255) between two lists of PIL images."""
    return max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(first, second))


def score(outputs, references, labels, image_encoder, feature_extractor) -> dict[str, float]:
    """Colour/background match rates and similarity figures of outputs against references.

    Args:
        outputs, references: PIL images, one output per reference.
        labels: (colour, shape, background) names of what each reference shows.
        image_encoder, feature_extractor: for the encoder similarity.
    """
    from condkit.adapters.ip_adapter.metrics import similarity_report
    from condkit.train.shapes_metrics import read_image

    readings = [read_image(np.asarray(out)) for out in outputs]
    colour = [r.colour == c for r, (c, _, _) in zip(readings, labels)]
    background = [r.background == b for r, (_, _, b) in zip(readings, labels)]
    report = similarity_report(references, outputs, image_encoder, feature_extractor)
    return {
        "shape_colour_match": float(np.mean(colour)),
        "background_match": float(np.mean(background)),
        "both_colours_match": float(np.mean([a and b for a, b in zip(colour, background)])),
        **report,
    }


def reference_sets(per_combo: int, drawn: int) -> dict[str, tuple[list, list]]:
    """The two test sets: held-out shapes-world references and independently drawn ones.

    Returns:
        name -> (PIL references, (colour, shape, background) labels).
    """
    from drawn_references import drawn_references

    pairs = held_out_references(per_combo)
    users = drawn_references(drawn)
    return {
        "shapes world, held-out combos": ([ref for ref, _, _ in pairs], [labels for _, labels, _ in pairs]),
        "drawn independently": ([d.image for d in users], [(d.colour, d.shape, d.background) for d in users]),
    }


def transfer_table(base, adapter, base_folder: Path, adapter_folder: Path, sets: dict, args) -> dict:
    """Every cell: reference set x guidance x path (condkit's pipeline, stock ``load_ip_adapter``),
    with the base alone beside it (stock pipeline, same seeds) and the two paths' largest pixel difference."""
    stock_base = stock_pipeline(base_folder, None)
    stock_adapter = stock_pipeline(base_folder, adapter_folder)
    encoder, processor = adapter.image_encoder, adapter.feature_extractor
    cells = {}
    for set_name, (references, labels) in sets.items():
        for guidance in args.guidance:
            through_condkit = sample(base, adapter, references, args, guidance)
            through_stock = sample_stock(stock_adapter, references, args, guidance, with_reference=True)
            base_alone = sample_stock(stock_base, references, args, guidance, with_reference=False)
            cells[f"{set_name} | {guidance}"] = {
                "base alone": score(base_alone, references, labels, encoder, processor),
                "condkit": score(through_condkit, references, labels, encoder, processor),
                "stock load_ip_adapter": score(through_stock, references, labels, encoder, processor),
                "stock_vs_condkit_max_difference": max_pixel_difference(through_condkit, through_stock),
                "outputs": (references, base_alone, through_stock),
            }
    stock_adapter.set_ip_adapter_scale(0.0)
    references = sets["drawn independently"][0][:4]
    zero = sample_stock(stock_adapter, references, args, args.guidance[-1], with_reference=True)
    alone = sample_stock(stock_base, references, args, args.guidance[-1], with_reference=False)
    return {"cells": cells, "scale_0_vs_base_max_difference": max_pixel_difference(zero, alone)}


def print_table(table: dict) -> None:
    """The transfer cells as a Markdown table."""
    print("| references | guidance | path | shape colour | background | both | colour-histogram similarity |")
    print("|---|---|---|---|---|---|---|")
    for name, cell in table["cells"].items():
        set_name, guidance = name.split(" | ")
        for path in ("stock load_ip_adapter", "condkit", "base alone"):
            row = cell[path]
            print(
                f"| {set_name} | {guidance} | {path} | {row['shape_colour_match']:.0%} | {row['background_match']:.0%} "
                f"| {row['both_colours_match']:.0%} | {row['colour_similarity']:.2f} |"
            )
    differences = [cell["stock_vs_condkit_max_difference"] for cell in table["cells"].values()]
    print(f"stock vs condkit path, largest pixel difference: {max(differences)}; "
          f"stock scale 0 vs base alone: {table['scale_0_vs_base_max_difference']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--adapter", type=Path, help="a trained IP-Adapter folder")
    group.add_argument("--train", type=Path, metavar="OUT", help="train the ip-adapter recipe into OUT first")
    parser.add_argument("--recipe", default="ip-adapter", help="recipe for --train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides for --train")
    parser.add_argument("--base", default="embedded", help="embedded, embedded-sdxl or a diffusers base folder")
    parser.add_argument("--per-combo", type=int, default=2, help="shapes-world references per held-out combo (12 combos)")
    parser.add_argument("--drawn", type=int, default=24, help="independently drawn references")
    parser.add_argument("--prompt", default="a shape")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[5.0, 7.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--grid", type=Path, help="write a PNG: drawn references / base alone / stock pipeline with the "
                        "adapter at the last guidance, one column per reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tempfile

    from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
    from condkit.adapters.ip_adapter.metrics import reference_dependence
    from condkit.base import EMBEDDED_BASES, export_embedded, load_base
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
    adapter = IPAdapter.load(args.adapter, base)
    sets = reference_sets(args.per_combo, args.drawn)
    with tempfile.TemporaryDirectory() as scratch:
        base_folder = export_embedded(Path(scratch) / "base", name=args.base) if args.base in EMBEDDED_BASES else Path(args.base)
        table = transfer_table(base, adapter, base_folder, args.adapter, sets, args)
    print_table(table)
    results["transfer"] = {
        name: {key: value for key, value in cell.items() if key != "outputs"} for name, cell in table["cells"].items()
    }
    results["scale_0_vs_base_max_difference"] = table["scale_0_vs_base_max_difference"]

    # Does the denoiser use the reference? Loss with another target's reference over the
    # right one, for the trained adapter and for a freshly initialised one (shapes-world targets).
    # Placement-major order, so that neighbours (the "wrong" pairs) are different combos.
    pairs = held_out_references(args.per_combo)
    order = [i for first in range(args.per_combo) for i in range(first, len(pairs), args.per_combo)]
    images, arrays = [pairs[i][2] for i in order], [np.asarray(pairs[i][0]) for i in order]
    results["loss_trained"] = reference_dependence(adapter, base, images, arrays, args.prompt, seed=args.seed, repeats=4)
    adapter.detach()
    torch.manual_seed(args.seed)
    own_encoder = args.adapter / "image_encoder"
    encoder_path = str(own_encoder) if (own_encoder / "config.json").is_file() else ""
    fresh = IPAdapter(IPAdapterConfig(variant=adapter.config.variant, num_tokens=adapter.config.num_tokens, image_encoder=encoder_path))
    fresh.attach(base)
    results["loss_fresh"] = reference_dependence(fresh, base, images, arrays, args.prompt, seed=args.seed, repeats=4)
    results["settings"] = {"prompt": args.prompt, "steps": args.steps, "guidance": args.guidance,
                           "references": {name: len(refs) for name, (refs, _) in sets.items()}}
    print(f"denoising loss, another reference / own: trained {results['loss_trained']['wrong_over_right']:.2f}x, "
          f"fresh adapter {results['loss_fresh']['wrong_over_right']:.2f}x")
    for key in ("train_seconds", "train_cpu_seconds"):
        if key in results:
            print(f"{key}: {results[key]:.0f}")
    if args.json:
        write_json_atomic(args.json, results)
    if args.grid:
        from condkit.train.validation import make_grid, save_grid

        last = table["cells"][f"drawn independently | {args.guidance[-1]}"]["outputs"]
        columns = slice(0, 12)
        references = [image.resize((base.resolution, base.resolution)) for image in last[0][columns]]
        save_grid(make_grid([references, last[1][columns], last[2][columns]]), args.grid)


if __name__ == "__main__":
    main()
