"""SDXL as a model family: detection, loading, prompt conditioning, micro-conditioning sizes.

All on the tiny SDXL-architecture base of ``tests/sdxl_tiny.py`` (random weights), compared
with what stock diffusers' ``StableDiffusionXLPipeline`` does with the same folder.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from condkit.base import load_base
from condkit.errors import UserError
from condkit.families import Conditioning, family_of_folder, get_family


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    return load_base(tiny_sdxl)


@pytest.fixture(scope="module")
def stock(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle on a blue background", num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type="np").images


def test_family_told_from_unet_config_and_model_index(tiny_sdxl, exported_base, tmp_path):
    assert family_of_folder(tiny_sdxl).name == "sdxl"
    assert family_of_folder(exported_base).name == "sd"
    only_index = tmp_path / "index_only"
    only_index.mkdir()
    (only_index / "model_index.json").write_text((tiny_sdxl / "model_index.json").read_text())
    assert family_of_folder(only_index).name == "sdxl"  # no unet/config.json: the pipeline class decides
    odd = tmp_path / "odd"
    (odd / "unet").mkdir(parents=True)
    (odd / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "image"}))
    with pytest.raises(UserError, match=r"unet/config.json: addition_embed_type='image'"):
        family_of_folder(odd)
    family = get_family("sdxl")
    assert family.kohya_prefixes == {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    # the pipeline classes of the kinds that need their own pipeline: family prefix + kind's variant
    from condkit.adapters.registry import get_adapter_class

    controlnet, t2i = (get_adapter_class(kind).pipeline_variant for kind in ("controlnet", "t2i_adapter"))
    assert family.pipeline_class("text2image", controlnet).__name__ == "StableDiffusionXLControlNetPipeline"
    assert family.pipeline_class("inpaint", controlnet).__name__ == "StableDiffusionXLControlNetInpaintPipeline"
    assert family.pipeline_class("text2image", t2i).__name__ == "StableDiffusionXLAdapterPipeline"
    with pytest.raises(UserError, match=r"model family 'sdxl': diffusers .* has no StableDiffusionXLAdapterInpaintPipeline"):
        family.pipeline_class("inpaint", t2i)


def test_folder_loads_with_both_encoders_and_draws_like_stock(base, stock):
    assert base.family.name == "sdxl"
    assert list(base.family.text_encoders(base)) == ["text_encoder", "text_encoder_2"]
    assert type(base.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and base.tokenizer_2 is not None
    assert not any(p.requires_grad for m in base.modules() for p in m.parameters())
    pipe = base.pipeline()
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert (_sample(pipe) == _sample(stock)).all()


def test_conditioning_equals_stock_encode_prompt(base, stock):
    prompts = ["a red circle on a blue background", ""]
    conditioning = base.family.encode_prompts(base, prompts)
    embeds, _, pooled, _ = stock.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert conditioning.encoder_hidden_states.shape == (2, 77, 80)  # 32 + 48 from the two encoders
    torch.testing.assert_close(conditioning.encoder_hidden_states, embeds, rtol=0, atol=0)
    added = conditioning.unet_kwargs["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)
    assert added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # native size, no crop
    # Named tensors round-trip (the cache stores them so).
    again = Conditioning.from_tensors(conditioning.tensors())
    assert again.unet_kwargs["added_cond_kwargs"].keys() == added.keys()


def test_base_info_names_the_family(tiny_sdxl, capsys):
    from condkit.cli import main

    assert main(["base", "info", str(tiny_sdxl)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["text_encoders"] == ["text_encoder", "text_encoder_2"]


def test_non_square_cropped_image_gives_its_time_ids(tmp_path, base):
    """A 100x50 image trained at 32 px: resized to 64x32, crop at left 16 (center) or drawn
    (random); a flip mirrors the crop's left edge, as SDXL's training scripts record it."""
    from condkit.train.data import SIZES, Record, TrainingSet, collate

    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 100, 3), dtype=np.uint8)).save(path)
    records = [Record(image=path, caption="a wide picture")]
    center = TrainingSet(records, 32, "center", flip=False, seed=0)
    assert center.item(0, flip=False)[SIZES].tolist() == [50, 100, 0, 16, 32, 32]
    assert center.item(0, flip=True)[SIZES].tolist() == [50, 100, 0, 16, 32, 32]  # 64 - 32 - 16
    drawn = TrainingSet(records, 32, "random", flip=True, seed=0)
    left = random.Random(7).randint(0, 64 - 32)  # the crop's draw from the sample's rng
    assert drawn.item(0, flip=False, rng=random.Random(7))[SIZES].tolist() == [50, 100, 0, left, 32, 32]
    assert drawn.item(0, flip=True, rng=random.Random(7))[SIZES].tolist() == [50, 100, 0, 64 - 32 - left, 32, 32]

    # The family puts them into time_ids; SD ignores them.
    batch = collate([center.item(0, flip=False)])
    conditioning = base.family.encode_prompts(base, batch["caption"])
    sized = base.family.with_sample_sizes(conditioning, batch[SIZES])
    assert sized.unet_kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[50, 100, 0, 16, 32, 32]]
    assert get_family("sd").with_sample_sizes(conditioning, batch[SIZES]) is conditioning


def test_training_hands_the_unet_each_samples_time_ids(tmp_path, tiny_sdxl):
    """Through the loop, cached: the U-Net sees the image's own sizes, not the default ones."""
    from condkit.train.config import load_recipe
    from condkit.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((48, 80, 3), 200, dtype=np.uint8)).save(data / "a.png")
    (data / "a.txt").write_text("a grey picture")
    base = load_base(tiny_sdxl)
    seen = []
    hook = base.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].tolist()), with_kwargs=True
    )
    overrides = [f"base={tiny_sdxl}", f"data.path={data}", "data.prior_prompt=[]", "data.flip=false", "data.resolution=32",
                 "train.max_steps=1", "train.batch_size=1", "validation.every=0", "validation.prompts=[]"]
    try:
        train(load_recipe("lora-few-images", overrides), tmp_path / "run", show_progress=False, base=base)
    finally:
        hook.remove()
    # 80x48 resized to 53x32 (shorter side 32), center crop left (53 - 32) // 2 = 10.
    assert seen[0] == [[48, 80, 0, 10, 32, 32]]


def _sdxl_to_original(folder) -> dict[str, torch.Tensor]:
    """The tiny SDXL folder in the original SDXL single-file layout (``sd_xl_base_1.0.safetensors``):
    U-Net with ``label_emb`` (the text_time embedding), VAE, CLIP-L under
    ``conditioner.embedders.0.transformer.`` and the second encoder in OpenCLIP's layout under
    ``conditioner.embedders.1.model.`` (fused q/k/v ``in_proj``, ``text_projection`` transposed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from original_format import unet_to_original, vae_to_original
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    body = {k: v for k, v in unet.state_dict().items() if not k.startswith("add_embedding.")}
    out = unet_to_original(body, unet.config)
    for diffusers_name, original in (("linear_1", "0"), ("linear_2", "2")):
        for part in ("weight", "bias"):
            out[f"model.diffusion_model.label_emb.0.{original}.{part}"] = unet.state_dict()[f"add_embedding.{diffusers_name}.{part}"]
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    out.update(vae_to_original(vae.state_dict(), vae.config))
    te1 = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    out.update({f"conditioner.embedders.0.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in te1.state_dict().items()})
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True).state_dict()
    prefix = "conditioner.embedders.1.model."
    out[prefix + "token_embedding.weight"] = te2["text_model.embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = te2["text_model.embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = te2["text_model.final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = te2["text_model.final_layer_norm.bias"]
    out[prefix + "text_projection"] = te2["text_projection.weight"].T  # OpenCLIP: (width, projection)
    layers = {k.split(".")[3] for k in te2 if k.startswith("text_model.encoder.layers.")}
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat([te2[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"])  # (3 * width, ...)
            for old, new in renames.items():
                out[f"{dst}{new}.{part}"] = te2[f"{src}{old}.{part}"]
    return out


def test_single_file_sdxl_loads_exactly_with_config_folder(tmp_path, tiny_sdxl, base):
    from original_format import save_original

    path = save_original(_sdxl_to_original(tiny_sdxl), tmp_path / "tiny_xl.safetensors")
    loaded = load_base(path, config=tiny_sdxl)
    assert loaded.family.name == "sdxl"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(loaded, name).state_dict(), getattr(base, name).state_dict()
        differing = [k for k in theirs if k not in mine or not torch.equal(mine[k], theirs[k])]
        assert not differing, f"{name}: {differing[:3]}"
    with pytest.raises(UserError, match="single-file checkpoint needs a local config folder"):
        load_base(path)
