"""The training loop's guarantees on SDXL (issue 15): caching and crash + resume.

On the tiny SDXL-architecture base (``tests/sdxl_tiny.py``):
- the disk cache keeps, per unique caption, both text encoders' hidden states side by side (32 + 48
  wide), the pooled embedding of ``text_encoder_2`` (``text_embeds``) and, per image, its
  latents and original size / crop; a cached run trains the same LoRA as an uncached one;
- a LoRA run on the U-Net and both text encoders, killed with SIGKILL after a checkpoint and
  resumed with ``--resume latest``, ends bit for bit where an uninterrupted run ends, all three
  components included.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from crash import train_killed_after_checkpoint
from condkit.io import load_state_dict
from condkit.train.config import recipe_from_dict
from condkit.train.loop import train
from sdxl_tiny import HIDDEN, HIDDEN_2, POOLED

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four images of two sizes (one not square), two captions."""
    folder = tmp_path_factory.mktemp("sdxl_images")
    for i in range(4):
        shape = (48, 80, 3) if i % 2 else (64, 64, 3)
        array = np.full(shape, 255, np.uint8)
        array[10 + 2 * i : 30 + 2 * i, 12:36] = (220, 30 + 40 * i, 30)
        Image.fromarray(array).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red zq on a white background" if i % 2 else "a red square on a white background")
    return folder


def _recipe(tiny_sdxl, folder, **data):
    return {
        "base": str(tiny_sdxl),
        "adapter": {"kind": "lora", "rank": 2},
        "data": {"path": str(folder), "resolution": 32, "flip": True, "caption_dropout": 0.3, **data},
        "train": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-2, "log_every": 1},
        "seed": 5,
    }


def _lora(folder):
    return load_state_dict(folder / "pytorch_lora_weights.safetensors")


def test_cache_keeps_both_encoders_and_the_pooled_embedding_and_trains_as_uncached(tiny_sdxl, images, tmp_path):
    torch.set_num_threads(1)
    disk = train(recipe_from_dict(_recipe(tiny_sdxl, images, cache="disk")), tmp_path / "disk", show_progress=False)
    cached = load_state_dict(disk / "cache" / "data.safetensors")
    # One row per unique caption; text_encoder's and text_encoder_2's states side by side.
    states = [v for k, v in cached.items() if k.startswith("text.") and v.ndim == 3]
    assert len(states) == 1 and states[0].shape[0] == 2 and states[0].shape[-1] == HIDDEN + HIDDEN_2
    pooled = cached["text.unet_kwargs.added_cond_kwargs.text_embeds"]
    assert pooled.shape == (2, POOLED) and torch.count_nonzero(pooled) > 0
    # Each image's original size (h, w), crop and target size, for SDXL's time_ids.
    assert {tuple(row[:2].tolist()) for row in cached["sizes"][0]} == {(64, 64), (48, 80)}
    assert cached["sizes"][..., 4:].eq(32).all()
    uncached = train(recipe_from_dict(_recipe(tiny_sdxl, images, cache="off")), tmp_path / "off", show_progress=False)
    a, b = _lora(disk), _lora(uncached)
    assert a.keys() == b.keys() and any(torch.count_nonzero(v) for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_kill_9_then_resume_of_an_sdxl_lora_with_both_text_encoders_equals_an_uninterrupted_run(tiny_sdxl, images, tmp_path):
    data = _recipe(tiny_sdxl, images)
    data["adapter"]["train_text_encoder"] = True
    data["train"].update({"max_steps": 8, "checkpoint_every": 4, "text_encoder_2_learning_rate": 3e-3})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# condkit train recipe.yaml\n" + yaml.safe_dump(data))

    straight = tmp_path / "straight"
    run = subprocess.run([sys.executable, "-m", "condkit", "train", str(recipe), "--output", str(straight), "--no-progress"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]

    crashed = tmp_path / "crashed"
    train_killed_after_checkpoint(recipe, crashed, step=4)
    assert not (crashed / "pytorch_lora_weights.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "condkit", "train", str(recipe), "--output", str(crashed), "--resume", "latest", "--no-progress"],
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = _lora(straight), _lora(crashed)
    components = {key.split(".")[0] for key in a if "lora_B" in key and torch.count_nonzero(a[key])}
    assert components == {"unet", "text_encoder", "text_encoder_2"}  # all three trained
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
