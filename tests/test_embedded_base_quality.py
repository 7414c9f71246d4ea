"""The embedded base follows shapes-world prompts, through the stock diffusers pipeline.

The base is exported as a plain diffusers folder and sampled with an unmodified
``StableDiffusionPipeline`` (DDIM, 25 steps, guidance 7.5, 64x64) on the held-out
prompts (combos no training sample has) with seeds outside the training run. The
colour targets are asserted so a regression of the shipped weights fails CI; shape
accuracy is reported (target >= 70%, see benchmarks/embedded_base_quality.py).
"""

from __future__ import annotations

import pytest

from condkit.base import export_embedded
from condkit.train.shapes_metrics import sample_and_score
from condkit.train.shapes_world import HELD_OUT_COMBOS

# 12 held-out prompts x 3 seeds = 36 samples (about 15-30 s on 2 cores).
SEEDS = [424_242, 424_243, 424_244]


@pytest.fixture(scope="module")
def stock_pipeline(tmp_path_factory):
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    folder = export_embedded(tmp_path_factory.mktemp("export") / "base")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stock_pipeline_follows_colour_prompts_on_held_out_prompts(stock_pipeline, capsys):
    assert stock_pipeline.unet.config.sample_size * 4 == 64  # native size: 64 px
    scores, images, _ = sample_and_score(stock_pipeline, list(HELD_OUT_COMBOS), SEEDS)
    assert images[0].size == (64, 64)
    with capsys.disabled():
        print(f"\nembedded base, {len(images)} held-out samples: " + ", ".join(f"{k} {v:.0%}" for k, v in scores.items()))
    assert scores["colour_accuracy"] >= 0.85, scores
    assert scores["background_accuracy"] >= 0.85, scores

