"""Train the embedded base's CLIP image encoder on the shapes world (stage 3 of the base).

A real IP-Adapter rests on CLIP's image encoder, whose ``image_embeds`` say what an image
shows because CLIP was trained to match images with their captions. A randomly
initialised encoder keeps only a faint, entangled trace of the colours (a linear probe
on its ``image_embeds`` reads the shape colour 78% of the time), so an adapter trained on
it has almost nothing to carry. This stage gives the tiny encoder what CLIP gives the
real one on this world: its ``image_embeds`` are trained, through three linear heads
that are then dropped, to name the shape's colour, the shape and the background colour.

This is separate from :mod:`condkit.train.loop` because it trains a classifier, not a
diffusion model. Run ``python -m condkit.train.image_encoder recipes/base/image_encoder.yaml
--output runs/base_image_encoder``; the output's ``base/`` is the input base with the
trained ``image_encoder/`` (nothing else changes), and ``image_encoder_summary.json``
holds held-out accuracies.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from condkit.errors import UserError
from condkit.train.config import load_stage_recipe, run_stage_cli
from condkit.train.shapes_world import COLOURS, HELD_OUT_COMBOS, SHAPES, ShapesWorld
from condkit.train.vae import warmup_cosine

LABELS: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "background": tuple(COLOURS)}


@dataclasses.dataclass(frozen=True)
class ImageEncoderRecipe:
    """The image-encoder stage's settings (``recipes/base/image_encoder.yaml``).

    Attributes:
        base: base folder (or ``embedded``) whose ``image_encoder/`` is trained further.
        seed: torch seed (head initialisation).
        shapes_seed: seed of the shapes world (training combos only) the images come from.
        max_steps, batch_size, learning_rate: optimisation.
        log_every: print a log line every this many steps.
        eval_per_combo: held-out images per held-out combo for the accuracy report.
    """

    base: str = "embedded"
    seed: int = 0
    shapes_seed: int = 3000
    max_steps: int = 600
    batch_size: int = 64
    learning_rate: float = 1e-3
    log_every: int = 50
    eval_per_combo: int = 20

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "log_every", "eval_per_combo"):
            if getattr(self, key) < 1:
                raise UserError(f"image encoder recipe: {key}={getattr(self, key)} must be at least 1")
        if not self.learning_rate > 0:
            raise UserError(f"image encoder recipe: learning_rate={self.learning_rate} must be > 0")


def load_image_encoder_recipe(path: str | Path) -> ImageEncoderRecipe:
    """Read an image-encoder recipe YAML (flat keys of :class:`ImageEncoderRecipe`).

    Args:
        path: the YAML file.
    """
    return load_stage_recipe(path, ImageEncoderRecipe)


def pixel_batch(images: list[np.ndarray], processor) -> torch.Tensor:
    """(b, 3, S, S) encoder input from uint8 RGB images, through the base's own processor
    (so training sees exactly what ``encode_image`` feeds at inference)."""
    return processor(images, return_tensors="pt").pixel_values


def label_batch(samples) -> dict[str, torch.Tensor]:
    """Class indices ``{"colour": (b,), "shape": (b,), "background": (b,)}`` of shapes-world samples."""
    return {key: torch.tensor([names.index(getattr(s, key)) for s in samples]) for key, names in LABELS.items()}


@torch.no_grad()
def held_out_accuracy(encoder, heads: torch.nn.ModuleDict, processor, per_combo: int, seed: int) -> dict[str, float]:
    """Accuracy of the heads on :data:`HELD_OUT_COMBOS` images (combos never trained on).

    Args:
        encoder: the ``CLIPVisionModelWithProjection``.
        heads: one linear head per :data:`LABELS` key on ``image_embeds``.
        processor: the ``CLIPImageProcessor``.
        per_combo: images per held-out combo.
        seed: where the placements are drawn from.
    """
    world = ShapesWorld(seed=seed, include_held_out=True)
    rng = np.random.default_rng(seed)
    samples = [world.draw(*combo, rng) for combo in HELD_OUT_COMBOS for _ in range(per_combo)]
    embeds = encoder(pixel_batch([s.image for s in samples], processor)).image_embeds  # (n, projection_dim)
    labels = label_batch(samples)
    return {key: float((heads[key](embeds).argmax(1) == labels[key]).float().mean()) for key in LABELS}


def train_image_encoder(recipe: ImageEncoderRecipe, output_dir: str | Path) -> Path:
    """Train the image encoder and write a full base folder with it to ``output_dir``.

    Args:
        recipe: the stage settings.
        output_dir: destination; gets ``base/`` (diffusers folder), ``image_encoder_log.jsonl``
            and ``image_encoder_summary.json``.

    Returns:
        The written ``base/`` folder.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from condkit.embedded import EMBEDDED_BASE_DIR
    from condkit.io import atomic_folder, write_json_atomic, write_text_atomic

    output_dir = Path(output_dir)
    source_dir = EMBEDDED_BASE_DIR if recipe.base == "embedded" else Path(recipe.base)
    if not (source_dir / "image_encoder" / "config.json").is_file():
        raise UserError(f"image encoder recipe: base {recipe.base!r} has no image_encoder/ folder")
    encoder = CLIPVisionModelWithProjection.from_pretrained(source_dir / "image_encoder", local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(source_dir / "feature_extractor", local_files_only=True)
    torch.manual_seed(recipe.seed)
    width = encoder.config.projection_dim
    heads = torch.nn.ModuleDict({key: torch.nn.Linear(width, len(names)) for key, names in LABELS.items()})
    params = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, warmup=max(1, recipe.max_steps // 20), total=recipe.max_steps)
    world = ShapesWorld(recipe.shapes_seed)  # training combos only: held-out ones measure generalisation
    encoder.train()
    log_lines: list[str] = []
    started = time.time()
    for step in range(recipe.max_steps):
        samples = world.batch(step * recipe.batch_size, recipe.batch_size)
        embeds = encoder(pixel_batch([s.image for s in samples], processor)).image_embeds  # (b, projection_dim)
        labels = label_batch(samples)
        losses = {key: torch.nn.functional.cross_entropy(heads[key](embeds), labels[key]) for key in LABELS}
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % recipe.log_every == 0 or step == recipe.max_steps - 1:
            row = {"step": step, **{k: round(v.item(), 4) for k, v in losses.items()}, "seconds": round(time.time() - started, 1)}
            log_lines.append(json.dumps(row))
            print(json.dumps(row), flush=True)
    encoder.eval().requires_grad_(False)
    accuracy = held_out_accuracy(encoder, heads, processor, recipe.eval_per_combo, seed=recipe.shapes_seed + 1)
    out_base = output_dir / "base"
    with atomic_folder(out_base) as tmp:
        shutil.copytree(source_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py", "image_encoder"))
        encoder.save_pretrained(tmp / "image_encoder")
    write_text_atomic(output_dir / "image_encoder_log.jsonl", "\n".join(log_lines) + "\n")
    summary = {"recipe": dataclasses.asdict(recipe), "held_out_accuracy": accuracy, "seconds": round(time.time() - started, 1)}
    write_json_atomic(output_dir / "image_encoder_summary.json", summary)
    print(json.dumps({"held_out_accuracy": accuracy}), flush=True)
    return out_base


def main(argv: list[str] | None = None) -> int:
    """``python -m condkit.train.image_encoder RECIPE --output DIR [--max-steps N] [--threads N]``."""
    return run_stage_cli(argv, "Train the embedded base's image encoder on the shapes world.", load_image_encoder_recipe, train_image_encoder)


if __name__ == "__main__":
    raise SystemExit(main())
