"""LoRA on SDXL: U-Net and both text encoders, diffusers and kohya (lora_te1_/lora_te2_) formats.

On the tiny SDXL-architecture base (``tests/sdxl_tiny.py``): a condkit LoRA gives the same
images as stock ``StableDiffusionXLPipeline.load_lora_weights``; kohya export/import and
``condkit convert`` are lossless; ``condkit train`` runs the LoRA recipe on the base.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora_utils import randomise
from safetensors.torch import load_file, save_file

from condkit.adapters.lora import LoraAdapter, LoraConfig
from condkit.adapters.lora import formats
from condkit.base import load_base
from condkit.cli import main
from condkit.io import read_safetensors_metadata


def _sample(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle on a blue background", num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def trained(tiny_sdxl, tmp_path_factory):
    """A LoRA on the U-Net and both text encoders with seeded random weights, saved (diffusers format)."""
    base = load_base(tiny_sdxl)
    adapter = LoraAdapter(LoraConfig(rank=4, alpha=2.0, train_text_encoder=True, target_modules="transformer"))
    adapter.attach(base)
    randomise(adapter)
    out = tmp_path_factory.mktemp("sdxl_lora") / "lora"
    adapter.save(out)
    return {"base": base, "adapter": adapter, "dir": out, "images": _sample(base.pipeline())}


def test_zero_init_equals_base_and_each_encoder_has_its_rate(tiny_sdxl):
    base = load_base(tiny_sdxl)
    before = _sample(base.pipeline())
    adapter = LoraAdapter(LoraConfig(rank=2, train_text_encoder=True))
    adapter.attach(base)
    assert adapter.components == ("unet", "text_encoder", "text_encoder_2")
    assert (_sample(base.pipeline()) == before).all()  # B = 0: exactly the base
    groups = {g["name"]: g["lr"] for g in adapter.parameter_groups(1e-4, {"text_encoder": 2e-5, "text_encoder_2": 3e-6})}
    assert groups == {"lora_unet": 1e-4, "lora_text_encoder": 2e-5, "lora_text_encoder_2": 3e-6}
    groups = {g["name"]: g["lr"] for g in adapter.parameter_groups(1e-4, 5e-6)}  # one rate for both encoders
    assert groups == {"lora_unet": 1e-4, "lora_text_encoder": 5e-6, "lora_text_encoder_2": 5e-6}
    from condkit.train.config import load_recipe

    rates = load_recipe("lora-few-images", ["train.text_encoder_learning_rate=2e-5", "train.text_encoder_2_learning_rate=3e-6"]).train
    assert rates.text_encoder_rates() == {"text_encoder": 2e-5, "text_encoder_2": 3e-6}
    adapter.detach()


def test_diffusers_export_loads_in_stock_sdxl_pipeline(trained, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    keys = load_file(trained["dir"] / "pytorch_lora_weights.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    base_images = _sample(stock)
    stock.load_lora_weights(trained["dir"])
    images = _sample(stock)
    assert np.abs(images - base_images).max() > 1e-3  # the LoRA changes the picture
    np.testing.assert_allclose(images, trained["images"], atol=1e-5, rtol=0)


def test_kohya_export_names_te1_te2_and_imports_exactly(trained, tiny_sdxl, tmp_path):
    tensors, metadata = formats.write_kohya(trained["adapter"].lora_weights())
    prefixes = {k.split("_text_model_")[0] if "_text_model_" in k else k[:10] for k in tensors}
    assert prefixes == {"lora_unet_", "lora_te1", "lora_te2"}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha" in tensors
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_network_train_unet_only"] == "False"
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, path, metadata=metadata)
    base = load_base(tiny_sdxl)
    LoraAdapter.load(path, base)
    np.testing.assert_allclose(_sample(base.pipeline()), trained["images"], atol=1e-5, rtol=0)
    # transformers-5 tools drop text_model_ from te names: read as well.
    short = {k.replace("_text_model_", "_"): v for k, v in tensors.items()}
    save_file(short, tmp_path / "short.safetensors", metadata=metadata)
    other = load_base(tiny_sdxl)
    LoraAdapter.load(tmp_path / "short.safetensors", other)
    np.testing.assert_allclose(_sample(other.pipeline()), trained["images"], atol=1e-5, rtol=0)


def test_convert_both_ways_is_lossless(trained, tiny_sdxl, tmp_path):
    src = trained["dir"] / "pytorch_lora_weights.safetensors"
    assert main(["convert", str(trained["dir"]), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    assert main(["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "d"), "--to", "diffusers", "--base", str(tiny_sdxl)]) == 0
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "k2.safetensors"), "--to", "kohya"]) == 0
    original, back = load_file(src), load_file(tmp_path / "d" / "pytorch_lora_weights.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    kohya, kohya_again = load_file(tmp_path / "k.safetensors"), load_file(tmp_path / "k2.safetensors")
    assert kohya.keys() == kohya_again.keys() and all(torch.equal(kohya[k], kohya_again[k]) for k in kohya)
    configs = json.loads(read_safetensors_metadata(tmp_path / "d" / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    assert configs["text_encoder_2.lora_alpha"] == 2.0 and configs["text_encoder_2.r"] == 4


def test_sdxl_kohya_names_convert_without_a_base(tmp_path):
    """Real SDXL module names (SDXL 1.0 layout on the meta device) without --base."""
    names = {
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k": (8, 2048, 1280),
        "lora_te1_text_model_encoder_layers_11_mlp_fc1": (8, 768, 3072),
        "lora_te2_text_model_encoder_layers_31_self_attn_q_proj": (8, 1280, 1280),
    }
    tensors = {}
    for name, (rank, fan_in, fan_out) in names.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in)
        tensors[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, tmp_path / "xl.safetensors")
    assert main(["convert", str(tmp_path / "xl.safetensors"), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    keys = load_file(tmp_path / "d" / "pytorch_lora_weights.safetensors").keys()
    assert "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.lora_A.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.31.self_attn.q_proj.lora_B.weight" in keys
    assert LoraAdapter.describe(tmp_path / "xl.safetensors")["family"] == "sdxl"


def test_condkit_train_runs_the_lora_recipe_on_sdxl(tiny_sdxl, tmp_path):
    run = tmp_path / "run"
    overrides = [
        f"base={tiny_sdxl}", "train.max_steps=2", "train.batch_size=2", "data.prior_prompt=[]", "adapter.rank=4",
        "adapter.train_text_encoder=true", "train.text_encoder_2_learning_rate=1e-4", "validation.every=0",
        'validation.prompts=["a red sks on a white background"]', "validation.num_inference_steps=2",
    ]
    args = ["train", "lora-few-images", "--output", str(run)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    weights = load_file(run / "pytorch_lora_weights.safetensors")
    ups = {c: [v for k, v in weights.items() if k.startswith(c + ".") and "lora_B" in k] for c in ("unet", "text_encoder", "text_encoder_2")}
    assert all(ups.values()) and all(any(torch.count_nonzero(v) for v in group) for group in ups.values())  # all three trained
    assert (run / "validation" / "step-00000002.png").is_file()
