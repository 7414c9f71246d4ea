"""T2I-Adapter kind: config, fit to the base, training hooks, export to stock diffusers, composition.

Issue 16: diffusers' ``T2IAdapter`` whose features enter the U-Net's down blocks; its
export runs in stock ``StableDiffusionAdapterPipeline`` with the same image as condkit's
generate path, several adapters become ``MultiAdapter``, it composes with LoRA, runs
once per generation, and the generic code names none of it.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from condkit.adapters import detect_kind, load_adapter
from condkit.adapters.controlnet.generate import shapes_conditions
from condkit.adapters.t2i_adapter import T2IAdapterConfig, T2IAdapterKind
from condkit.adapters.t2i_adapter.adapter import RESIDUALS_KEY, residual_shapes
from condkit.adapters.t2i_adapter.generate import generate_with_maps
from condkit.base import load_base
from condkit.errors import UserError

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
STEPS = 3


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    return load_base("embedded")


def randomised(base, seed: int, name: str = "default", **options) -> T2IAdapterKind:
    """A T2I-Adapter on ``base`` with seeded, large-ish weights (so it visibly steers)."""
    adapter = T2IAdapterKind(T2IAdapterConfig(**options), name=name)
    torch.manual_seed(seed)
    adapter.attach(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return adapter


@pytest.fixture(scope="module")
def maps():
    return shapes_conditions([("red", "circle", "blue"), ("green", "square", "white")], 64)  # (64, 64, 3) uint8 each


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("t2i")
    adapter = randomised(base, 1)
    adapter.save(folder)
    adapter.detach()
    return folder


def stock_adapter_pipeline(folder, adapter):
    """diffusers' own StableDiffusionAdapterPipeline of the exported base (no condkit)."""
    from diffusers import StableDiffusionAdapterPipeline

    pipe = StableDiffusionAdapterPipeline.from_pretrained(
        folder, adapter=adapter, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_images(pipe, maps_per_prompt, **call):
    out = []
    for index, (prompt, images) in enumerate(zip(PROMPTS, maps_per_prompt)):
        image = [Image.fromarray(m) for m in images]
        result = pipe(
            prompt, image=image if len(image) > 1 else image[0], height=64, width=64, num_inference_steps=STEPS,
            guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(index), **call,
        )
        out.append(np.asarray(result.images[0], dtype=np.int16))
    return out


def as_arrays(images):
    return [np.asarray(image, dtype=np.int16) for image in images]


# ---- config and fit -----------------------------------------------------------------
@pytest.mark.parametrize(
    "options, key",
    [
        ({"adapter_type": "huge_adapter"}, "adapter.adapter_type"),
        ({"channels": 32}, "adapter.channels"),
        ({"num_res_blocks": 0}, "adapter.num_res_blocks"),
        ({"downscale_factor": 3}, "adapter.downscale_factor"),
        ({"timestep_sampling": "linear"}, "adapter.timestep_sampling"),
        ({"edge_tolerance": 20}, "adapter.edge_tolerance"),
    ],
)
def test_config_errors_name_the_key(options, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        T2IAdapterConfig.from_dict(options, "recipe.yaml", "adapter")


def test_channels_and_downscale_follow_the_base(base):
    adapter = T2IAdapterKind(T2IAdapterConfig())
    adapter.attach(base)
    config = adapter.model.config
    assert list(config.channels) == list(base.unet.config.block_out_channels) == [32, 64, 96]
    assert config.downscale_factor == base.vae_scale_factor == 4 and config.adapter_type == "full_adapter"
    features = adapter.features(torch.zeros(1, 3, 64, 64))
    # one feature per down block: (32, 16, 16) inside block 0, (64, 8, 8) inside block 1, (96, 4, 4) after block 2
    assert [tuple(f.shape[1:]) for f in features] == residual_shapes(base.unet.config, 16)[:3]
    with pytest.raises(UserError, match="already attached"):
        adapter.attach(base)


def test_light_variant_fits_a_unet_whose_last_blocks_match_and_is_refused_otherwise(base):
    from diffusers import UNet2DConditionModel

    with pytest.raises(UserError, match="do not fit the base U-Net's down blocks"):
        T2IAdapterKind(T2IAdapterConfig(adapter_type="light_adapter")).attach(base)
    unet = UNet2DConditionModel(**{**base.unet.config, "block_out_channels": (32, 64, 64)})
    light_base = dataclasses.replace(base, unet=unet)
    adapter = T2IAdapterKind(T2IAdapterConfig(adapter_type="light_adapter", num_res_blocks=1))
    adapter.attach(light_base)  # channels (32, 64): features 32@16, 64@8, 64@4
    kwargs = adapter.unet_kwargs(torch.zeros(1, 4, 16, 16), torch.tensor([10]), torch.zeros(1, 77, 64), {"condition": torch.rand(1, 3, 64, 64)})
    with torch.no_grad():
        unet(torch.zeros(1, 4, 16, 16), 10, torch.zeros(1, 77, 64), **kwargs)


# ---- training hooks -------------------------------------------------------------------
def test_scale_zero_is_the_base_bit_for_bit_and_features_steer_the_unet(base):
    adapter = randomised(base, 2)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    condition = (torch.rand(2, 3, 64, 64, generator=g) > 0.8).float()
    timesteps = torch.tensor([17, 731])
    with torch.no_grad():
        plain = base.unet(latents, timesteps, text).sample
        adapter.set_scale(0.0)
        zero = base.unet(latents, timesteps, text, **adapter.unet_kwargs(latents, timesteps, text, {"condition": condition})).sample
        adapter.set_scale(1.0)
        steered = base.unet(latents, timesteps, text, **adapter.unet_kwargs(latents, timesteps, text, {"condition": condition})).sample
    assert torch.equal(zero, plain)
    assert (steered - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="do not match latents"):
        adapter.unet_kwargs(latents, timesteps, text, {"condition": condition[..., :32, :32]})


def test_cubic_timesteps_favour_early_noisy_steps():
    adapter = T2IAdapterKind(T2IAdapterConfig())
    t = adapter.sample_timesteps(20_000, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) < 1000
    assert 0.72 < float(t.float().mean()) / 1000 < 0.78  # E[1 - u^3] = 3/4
    uniform = T2IAdapterKind(T2IAdapterConfig(timestep_sampling="uniform")).sample_timesteps(20_000, 1000, torch.Generator().manual_seed(0))
    assert 0.47 < float(uniform.float().mean()) / 1000 < 0.53


def test_the_recipe_validates_and_trains_a_step(tmp_path):
    from condkit.train import train
    from condkit.train.config import load_recipe

    recipe = load_recipe("t2i-adapter-canny", ["train.max_steps=2", "train.batch_size=2", "data.shapes_count=8", "validation.prompts=[]", "validation.every=0"])
    assert recipe.adapter.kind == "t2i_adapter" and recipe.adapter.config.timestep_sampling == "cubic"
    train(recipe, tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / "t2i_adapter" / "diffusion_pytorch_model.safetensors").is_file()


# ---- export, import, stock pipeline -----------------------------------------------
def test_export_loads_in_stock_diffusers_and_gives_condkits_images(base, saved, maps, exported_base):
    from diffusers import T2IAdapter

    folder = saved / "t2i_adapter"
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "T2IAdapter"
    stock = T2IAdapter.from_pretrained(folder, local_files_only=True)
    adapter = load_adapter(saved, base)
    assert isinstance(adapter, T2IAdapterKind) and detect_kind(saved) == "t2i_adapter"
    for key, value in stock.state_dict().items():
        assert torch.equal(value, adapter.model.state_dict()[key]), key
    ours = as_arrays(generate_with_maps(base, [adapter], PROMPTS, [[m] for m in maps], num_inference_steps=STEPS, guidance_scale=5.0))
    theirs = stock_images(stock_adapter_pipeline(exported_base, stock), [[m] for m in maps])
    plain = as_arrays(generate_with_maps(base, [], PROMPTS, [[m] for m in maps], num_inference_steps=STEPS, guidance_scale=5.0))
    for a, b, c in zip(ours, theirs, plain):
        assert np.abs(a - b).max() <= 1, "condkit's generate path and stock diffusers differ"
        assert np.abs(a - c).max() > 10, "the adapter changed nothing"
    adapter.detach()


def test_a_diffusers_made_t2i_adapter_is_imported(base, tmp_path):
    from diffusers import T2IAdapter

    made = T2IAdapter(in_channels=3, channels=[32, 64, 96], num_res_blocks=1, downscale_factor=4)
    made.save_pretrained(tmp_path / "third_party")
    assert detect_kind(tmp_path / "third_party") == "t2i_adapter"
    adapter = load_adapter(tmp_path / "third_party", base)
    assert adapter.model.config.num_res_blocks == 1 and not any(p.requires_grad for p in adapter.model.parameters())
    assert T2IAdapterKind.describe(tmp_path / "third_party")["channels"] == [32, 64, 96]
    adapter.detach()
    wrong = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=4)
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(UserError, match="do not fit the base U-Net's down blocks"):
        load_adapter(tmp_path / "wrong", base)


def test_cli_generate_with_a_t2i_adapter(saved, maps, tmp_path):
    from condkit.cli import main

    Image.fromarray(maps[0]).save(tmp_path / "map.png")
    code = main(["generate", "--adapter", str(saved), "--t2i-image", str(tmp_path / "map.png"), "--prompt", PROMPTS[0], "--steps", "2", "--output", str(tmp_path / "out")])
    assert code in (0, None) and len(list((tmp_path / "out").glob("*.png"))) == 1


# ---- several adapters, composition ------------------------------------------------
def test_two_t2i_adapters_are_a_multi_adapter_like_stock_diffusers(base, maps, exported_base, tmp_path):
    from diffusers import MultiAdapter, T2IAdapter

    first, second = randomised(base, 3, name="a", conditioning_scale=0.7), randomised(base, 4, name="b", conditioning_scale=0.5)
    from condkit.generate import build_pipeline

    pipe, call = build_pipeline(base, [first, second], {"t2i_images": [maps[0], maps[1]]})
    assert isinstance(pipe.adapter, MultiAdapter) and call["adapter_conditioning_scale"] == [0.7, 0.5]
    pairs = [[maps[0], maps[1]], [maps[1], maps[0]]]
    ours = as_arrays(generate_with_maps(base, [first, second], PROMPTS, pairs, num_inference_steps=STEPS, guidance_scale=5.0))
    for adapter, name in ((first, "a"), (second, "b")):
        adapter.save(tmp_path / name)
    stock = MultiAdapter([T2IAdapter.from_pretrained(tmp_path / n / "t2i_adapter", local_files_only=True) for n in "ab"])
    theirs = stock_images(stock_adapter_pipeline(exported_base, stock), pairs, adapter_conditioning_scale=[0.7, 0.5])
    for a, b in zip(ours, theirs):
        assert np.abs(a - b).max() <= 1
    # In training the loop merges their U-Net arguments: features add up, as MultiAdapter sums them.
    from condkit.adapters.base import merge_unet_kwargs

    condition = torch.from_numpy(maps[0]).permute(2, 0, 1)[None].float() / 255  # (1, 3, 64, 64)
    args = (torch.zeros(1, 4, 16, 16), torch.tensor([5]), torch.zeros(1, 77, 64), {"condition": condition})
    merged = merge_unet_kwargs([(a, a.unet_kwargs(*args)) for a in (first, second)])[RESIDUALS_KEY]
    with torch.no_grad():
        summed = stock([condition, condition], [0.7, 0.5])
    for m, s in zip(merged, summed):
        torch.testing.assert_close(m, s, rtol=1e-5, atol=1e-6)
    first.detach(), second.detach()


def test_t2i_adapter_with_a_lora_matches_stock_load_lora_weights(base, saved, maps, exported_base, tmp_path):
    from diffusers import T2IAdapter

    from condkit.adapters.lora import LoraAdapter, LoraConfig

    own = dataclasses.replace(base, unet=copy.deepcopy(base.unet))  # peft layers stay out of other tests
    lora = LoraAdapter(LoraConfig(rank=4), name="style")
    lora.attach(own)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in lora.trainable_parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    lora.save(tmp_path / "lora")
    t2i = load_adapter(saved, own)
    ours = as_arrays(generate_with_maps(own, [lora, t2i], PROMPTS, [[m] for m in maps], num_inference_steps=STEPS, guidance_scale=5.0))
    without_lora = load_adapter(saved, base)  # the shared base carries no LoRA
    alone = as_arrays(generate_with_maps(base, [without_lora], PROMPTS, [[m] for m in maps], num_inference_steps=STEPS, guidance_scale=5.0))
    without_lora.detach()
    # StableDiffusionAdapterPipeline has no load_lora_weights: a stock StableDiffusionPipeline
    # loads the LoRA, and the adapter pipeline is built from its modules.
    from diffusers import StableDiffusionAdapterPipeline, StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(exported_base, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    sd.load_lora_weights(tmp_path / "lora")
    pipe = StableDiffusionAdapterPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet, scheduler=sd.scheduler,
        adapter=T2IAdapter.from_pretrained(saved / "t2i_adapter", local_files_only=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = stock_images(pipe, [[m] for m in maps])
    for a, b, c in zip(ours, theirs, alone):
        assert np.abs(a - b).max() <= 1
        assert np.abs(a - c).max() > 5, "the LoRA changed nothing"


def test_t2i_runs_once_per_generation_controlnet_every_step(base, maps):
    from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
    from condkit.adapters.controlnet.generate import generate_controlled

    t2i, controlnet = randomised(base, 6), ControlNetAdapter(ControlNetConfig())
    controlnet.attach(base)
    calls = {"t2i": 0, "controlnet": 0}
    hooks = [
        t2i.model.register_forward_hook(lambda *_: calls.__setitem__("t2i", calls["t2i"] + 1)),
        controlnet.controlnet.register_forward_hook(lambda *_: calls.__setitem__("controlnet", calls["controlnet"] + 1)),
    ]
    generate_with_maps(base, [t2i], PROMPTS[:1], [[maps[0]]], num_inference_steps=4, guidance_scale=5.0)
    generate_controlled(base, [controlnet], PROMPTS[:1], [[maps[0]]], num_inference_steps=4, guidance_scale=5.0)
    for hook in hooks:
        hook.remove()
    assert calls == {"t2i": 1, "controlnet": 4}


def test_with_an_ip_adapter_the_stock_pipeline_refuses_in_one_line(base, maps):
    from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
    from condkit.generate import build_pipeline

    own = dataclasses.replace(base, unet=copy.deepcopy(base.unet))
    ip = IPAdapter(IPAdapterConfig())
    ip.attach(own)
    t2i = randomised(own, 7)
    with pytest.raises(UserError, match="StableDiffusionAdapterPipeline takes no 'image_encoder'"):
        build_pipeline(own, [ip, t2i], {"t2i_images": [maps[0]], "ip_images": [maps[0]]})


# ---- the plugin contract ------------------------------------------------------------
def test_generic_code_names_no_t2i_adapter():
    import importlib.util
    import re

    from test_generic_code import code_without_comments  # names and strings, docstrings and comments aside

    for module in ("condkit.train.loop", "condkit.train.data", "condkit.train.cache", "condkit.base", "condkit.generate", "condkit.cli.generate", "condkit.adapters.base"):
        source = open(importlib.util.find_spec(module).origin).read()
        found = [text for _, text in code_without_comments(source) if re.search(r"t2i[_-]?adapter|intrablock", text, re.IGNORECASE)]
        assert not found, f"{module} names the T2I-Adapter: {found}"
