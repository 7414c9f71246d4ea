"""The embedded base follows shapes-world prompts, through the stock diffusers pipeline.

The base is exported as a plain diffusers folder and sampled with an unmodified
``StableDiffusionPipeline`` (DDIM, 25 steps, guidance 7.5, 64x64) on the held-out
prompts (combos no training sample has) with seeds outside the training run, and the
samples are read by the shapes classifier (condkit.train.shapes_metrics). Targets:
foreground colour >= 85%, background colour >= 85%, shape >= 70%, all asserted
(benchmarks/embedded_base_quality.py measures on more samples).
"""

from __future__ import annotations

import pytest

from condkit.base import export_embedded
from condkit.train.shapes_metrics import sample_and_score
from condkit.train.shapes_world import HELD_OUT_COMBOS

# 12 held-out prompts x 3 seeds = 36 samples (about 20-40 s on 2 cores).
SEEDS = [424_242, 424_243, 424_244]


@pytest.fixture(scope="module")
def held_out_scores():
    import tempfile
    from pathlib import Path

    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_embedded(Path(tmp) / "base")
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.sample_size * 4 == 64  # native size: 64 px
    scores, images, _ = sample_and_score(pipe, list(HELD_OUT_COMBOS), SEEDS)
    assert images[0].size == (64, 64)
    print(f"\nembedded base, {len(images)} held-out samples: " + ", ".join(f"{k} {v:.0%}" for k, v in scores.items()))
    return scores


def test_stock_pipeline_meets_the_targets_on_held_out_prompts(held_out_scores):
    assert held_out_scores["colour_accuracy"] >= 0.85, held_out_scores
    assert held_out_scores["background_accuracy"] >= 0.85, held_out_scores
    assert held_out_scores["shape_accuracy"] >= 0.70, held_out_scores
