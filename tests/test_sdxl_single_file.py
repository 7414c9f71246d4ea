"""``condkit merge --single-file`` on SDXL: the original SDXL layout, read back by stock ``from_single_file``.

On the tiny SDXL-architecture base (``tests/sdxl_tiny.py``): two LoRAs (U-Net and both text
encoders; one as a kohya file) merged into the base give a diffusers folder and one
``.safetensors`` in the A1111/ComfyUI layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``conditioner.embedders.0.transformer.*`` (CLIP-L),
``conditioner.embedders.1.model.*`` (OpenCLIP)). Stock
``StableDiffusionXLPipeline.from_single_file(OUT, config=BASE_FOLDER)`` reads the very same
weights and draws the same images as the folder.

What ``from_single_file`` needs: ``config=`` the base's diffusers folder. diffusers detects
SDXL by ``conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias``, which the
tiny model's two-layer OpenCLIP lacks (without ``config=`` it takes the file for SD 1.x and
goes to the hub); the text encoders are told apart by the width of their position
embeddings, which must match each encoder's config in the folder.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from lora_utils import randomise
from safetensors.torch import load_file

from condkit import lora_tools
from condkit.adapters.lora import LoraAdapter, LoraConfig
from condkit.base import load_base
from condkit.cli import main
from condkit.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def pristine(tiny_sdxl):
    return load_base(tiny_sdxl)


def _lora(pristine, folder, seed, **options):
    base = copy.deepcopy(pristine)
    adapter = LoraAdapter(LoraConfig(train_text_encoder=True, **options))
    adapter.attach(base)
    randomise(adapter, std=0.1, seed=seed)
    adapter.save(folder)
    return folder


@pytest.fixture(scope="module")
def merged(pristine, tiny_sdxl, tmp_path_factory):
    """Two LoRAs (a: kohya file x0.8, conv + text-encoder MLPs; b: diffusers x-0.5) merged: folder and single file."""
    out = tmp_path_factory.mktemp("sdxl_merged")
    a = _lora(pristine, out / "a", 0, rank=4, alpha=2.0, target_modules="conv", text_encoder_target_modules="attention+mlp")
    b = _lora(pristine, out / "b", 1, rank=2, alpha=4.0)
    assert main(["convert", str(a), str(out / "a_kohya.safetensors"), "--to", "kohya"]) == 0
    args = [str(tiny_sdxl), f"{out / 'a_kohya.safetensors'}:0.8", f"{b}:-0.5"]
    assert main(["merge", *args, "--output", str(out / "folder")]) == 0
    assert main(["merge", *args, "--output", str(out / "model.safetensors"), "--single-file"]) == 0
    return out


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle on a blue background", num_inference_steps=3, guidance_scale=5.0, generator=generator, output_type="np").images


def test_sdxl_single_file_has_the_original_layout(merged, pristine):
    state = load_file(merged / "model.safetensors")
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "conditioner"}
    assert {k for k in state if "label_emb" in k} == {f"model.diffusion_model.label_emb.0.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    # the second level's transformer has depth 2 (transformer_layers_per_block=(1, 2))
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in state
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in state
    clip = "conditioner.embedders.1.model."
    attention = pristine.text_encoder_2.text_model.encoder.layers[0].self_attn
    fused = state[f"{clip}transformer.resblocks.0.attn.in_proj_weight"]
    assert fused.shape == (3 * 48, 48)
    assert not torch.equal(fused[:48], attention.q_proj.weight)  # the LoRAs changed q
    merged_te2 = load_base(merged / "folder").text_encoder_2
    merged_attention = merged_te2.text_model.encoder.layers[0].self_attn
    assert torch.equal(fused, torch.cat([merged_attention.q_proj.weight, merged_attention.k_proj.weight, merged_attention.v_proj.weight]))
    assert torch.equal(state[f"{clip}text_projection"], merged_te2.text_projection.weight.T)  # (width 48, projection 32)
    for key in ("positional_embedding", "token_embedding.weight", "ln_final.weight", "transformer.resblocks.1.mlp.c_fc.weight",
                "transformer.resblocks.1.ln_2.bias", "transformer.resblocks.1.attn.out_proj.weight", "transformer.resblocks.1.attn.in_proj_bias"):
        assert clip + key in state, key


def test_sdxl_single_file_loads_in_stock_from_single_file_with_the_folders_images(merged, pristine, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    single = StableDiffusionXLPipeline.from_single_file(
        # image_encoder=None: the config folder's image encoder is no part of an SDXL checkpoint (IP-Adapter's)
        str(merged / "model.safetensors"), config=str(tiny_sdxl), local_files_only=True, image_encoder=None,
    )
    folder = StableDiffusionXLPipeline.from_pretrained(merged / "folder", local_files_only=True)
    for name in COMPONENTS:
        a, b, before = (getattr(m, name).state_dict() for m in (single, folder, pristine))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        changed = any(not torch.equal(a[k], before[k]) for k in a)
        assert changed == (name != "vae"), name  # the LoRAs reached the U-Net and both text encoders
    images = [_images(p) for p in (single, folder)]
    np.testing.assert_allclose(images[0], images[1], atol=1e-5, rtol=0)
    assert np.abs(images[0] - _images(pristine.pipeline())).max() > 1e-3  # and the picture
    # why config= is needed here: the tiny OpenCLIP has no resblocks.9, diffusers' SDXL marker
    state = load_file(merged / "model.safetensors")
    assert infer_diffusers_model_type(state) == "v1"
    marker = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
    assert infer_diffusers_model_type({**state, marker: torch.zeros(1)}) == "xl_base"


def test_sdxl_original_layout_round_trips_through_condkit_load_base(pristine, tiny_sdxl, tmp_path):
    """No LoRA: the tiny base written in the original layout loads back (condkit's loader) as the very same weights."""
    out = lora_tools.save_base_single_file(pristine, tmp_path / "base.safetensors")
    reloaded = load_base(out, tiny_sdxl)
    assert reloaded.family.name == "sdxl"
    for name in COMPONENTS:
        a, b = getattr(reloaded, name).state_dict(), getattr(pristine, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_round_trip_check_catches_a_wrong_qkv_order(pristine):
    from condkit.original_layout import check_round_trip
    from condkit.original_layout_sdxl import open_clip_to_original

    encoder = pristine.text_encoder_2
    state = open_clip_to_original(encoder.state_dict())
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    q, k, v = state[key].chunk(3)
    check_round_trip(state, {"text encoder 2": (encoder.state_dict(), encoder)})  # as written: passes
    state[key] = torch.cat([k, q, v])
    with pytest.raises(UserError, match=r"text encoder 2 key 'text_model\.encoder\.layers\.0\.self_attn\.[qk]_proj\.weight'"):
        check_round_trip(state, {"text encoder 2": (encoder.state_dict(), encoder)})


def test_sdxl_base_without_both_text_encoders_is_refused(pristine, tmp_path):
    refiner_like = dataclasses.replace(pristine, text_encoder=None)
    with pytest.raises(UserError, match="sdxl base without text_encoder: write a diffusers folder"):
        lora_tools.save_base_single_file(refiner_like, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
