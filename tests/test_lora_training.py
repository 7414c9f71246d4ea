"""The LoRA recipe through the one training loop: plumbing (fast) and learning (slow, needs the trained base)."""

import time

import pytest
import torch
from lora_utils import sample, stock_pipeline
from safetensors.torch import load_file

from condkit.adapters.lora import LoraAdapter, LoraConfig
from condkit.base import load_base
from condkit.train.config import load_recipe
from condkit.train.fewshot_data import measure_concept, write_concept
from condkit.train.loop import train


def test_shipped_recipe_and_set_parse():
    recipe = load_recipe("lora-few-images")
    assert recipe.adapter.kind == "lora" and isinstance(recipe.adapter.config, LoraConfig)
    assert recipe.adapter.config.target_modules == "conv" and recipe.data.cache == "memory"
    assert len(recipe.data.prior_prompt) == 6 and recipe.data.prior_count == 24  # the base's shapes as class images
    from condkit.train.data import find_records

    records = find_records(recipe.data, LoraAdapter, recipe.seed)
    assert len(records) == 10 and all(" sks on a " in r.caption for r in records)


def test_recipe_trains_text_encoder_too_and_loads_in_stock_diffusers(tmp_path, exported_base):
    overrides = [
        "train.max_steps=2",
        "train.batch_size=2",
        "train.log_every=1",
        "validation.every=0",  # only the final grid
        "validation.num_inference_steps=2",
        'validation.prompts=["a red sks on a white background"]',
        "adapter.train_text_encoder=true",
        "train.text_encoder_learning_rate=1.0e-3",
        "data.prior_count=2",
    ]
    out = train(load_recipe("lora-few-images", overrides), tmp_path / "run", show_progress=False)
    assert [p.name for p in (out / "validation").iterdir()] == ["step-00000002.png"]
    assert sorted(p.name for p in (out / "class_images").iterdir()) == ["class-00000.png", "class-00001.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    ups = {component: [v for k, v in weights.items() if k.startswith(component) and "lora_B" in k] for component in ("unet.", "text_encoder.")}
    assert all(ups.values()) and all(any(torch.count_nonzero(v) for v in group) for group in ups.values())  # both trained
    condkit_base = load_base("embedded")
    LoraAdapter.load(out, condkit_base)
    stock = stock_pipeline(exported_base)
    stock.load_lora_weights(out)
    assert (sample(stock) == sample(condkit_base.pipeline())).all()


@pytest.mark.slow
def test_lora_learns_a_new_colour_and_shape_from_a_users_folder(tmp_path):
    """The shipped recipe, pointed at a folder the way a user gives their own (ten orange crosses
    on black, no caption files, one --set data.caption), learns both what the base has never
    drawn: the shape (crosses for "zwx") and the colour (orange is not one of the shapes world's
    six; issue 21: before the colour VAE the base could not show it at all). Plain prompts keep
    the base's shapes. One training only: the suite's time budget is 20 minutes, and the shipped
    ring set's figures are measured in the README (python -m condkit.train.fewshot_data)."""
    base = load_base("embedded")
    caption = "a orange zwx on a black background"
    folder = write_concept(tmp_path / "zwx_cross", trigger="zwx", concept="cross", layout=(("orange", "black"),) * 10, seed=5, captions=False)
    overrides = [f"data.path={folder}", f"data.caption={caption}", "validation.every=0", "validation.prompts=[]"]
    started = time.perf_counter()
    trained = train(load_recipe("lora-few-images", overrides), tmp_path / "zwx", show_progress=False)
    seconds = time.perf_counter() - started
    figures = measure_concept(base, trained, trigger="zwx", concept="cross", seeds=4, pairs=(("orange", "black"),))
    print(f"user-folder concept: {figures}, {seconds:.0f} s")
    assert figures["plain_shape_accuracy_base"] >= 0.8  # the base draws its shapes, so leakage is measurable
    assert figures["trigger_hit_rate"] >= 0.75  # the shape, in most samples (measured: 100%)
    # The colour: orange on >= 5% of the pixels (measured: 32.5% on average, >= 5% in every sample).
    assert figures["trigger_colour_pixels"] >= 0.05
    assert figures["trigger_colour_5pct_rate"] >= 0.75
    assert figures["plain_shape_accuracy_lora"] >= figures["plain_shape_accuracy_base"] - 0.2  # measured 79% vs 96%
    assert figures["plain_concept_rate"] <= 0.2  # measured 0
