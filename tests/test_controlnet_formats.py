"""ControlNet files: save/load round trips, the stock diffusers pipeline, original single files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from condkit.adapters import detect_kind, load_adapter
from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
from condkit.adapters.controlnet import formats
from condkit.adapters.controlnet.branch import controlnet_from_unet
from condkit.adapters.controlnet.generate import generate_controlled, shapes_conditions
from condkit.base import export_embedded, load_base
from condkit.errors import UserError
from condkit.io import save_safetensors_atomic

STEPS = 2  # sampler steps: enough to exercise the scheduler loop, cheap on CPU
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    return load_base("embedded")


@pytest.fixture(scope="module")
def maps():
    return shapes_conditions([("red", "circle", "blue"), ("green", "square", "white")], 64)


def perturbed_adapter(base, seed: int, name: str = "default", **options) -> ControlNetAdapter:
    """A branch with every weight moved off its initial value (zero convs included)."""
    adapter = ControlNetAdapter(ControlNetConfig(**options), name=name)
    adapter.attach(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.controlnet.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return adapter


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip_is_exact(base, tmp_path):
    adapter = perturbed_adapter(base, 1, conditioning_scale=0.7, edge_tolerance=1)
    written = adapter.save(tmp_path / "run")
    folder = tmp_path / "run" / "controlnet"
    assert {p.name for p in written} == {"config.json", "diffusion_pytorch_model.safetensors", "condkit_adapter.json"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    assert detect_kind(tmp_path / "run") == "controlnet" and detect_kind(folder) == "controlnet"
    for path in (tmp_path / "run", folder):
        loaded = load_adapter(path, base)
        assert isinstance(loaded, ControlNetAdapter)
        assert same_weights(loaded.controlnet, adapter.controlnet)
        assert loaded.config == adapter.config and loaded.scale == 0.7
    described = ControlNetAdapter.describe(tmp_path / "run")
    assert described["format"] == "diffusers" and described["conditioning_embedding_out_channels"] == [16, 32, 64]
    assert described["trained_on"]["resolution"] == 64


def test_export_runs_in_the_stock_pipeline_with_the_same_images(base, maps, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    adapter = perturbed_adapter(base, 2)
    adapter.save(tmp_path / "run")
    ours = generate_controlled(base, [adapter], PROMPTS, [[m] for m in maps], num_inference_steps=STEPS, guidance_scale=4.0, seed=5)

    # Plain diffusers from here on: nothing condkit-specific is needed to use the export.
    controlnet = ControlNetModel.from_pretrained(tmp_path / "run" / "controlnet", local_files_only=True)
    export_embedded(tmp_path / "base")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tmp_path / "base", controlnet=controlnet, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    stock = [
        pipe(prompt, image=Image.fromarray(m), num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(5 + i)).images[0]
        for i, (prompt, m) in enumerate(zip(PROMPTS, maps))
    ]
    for a, b in zip(ours, stock):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # and the branch matters: the same call without it differs
    plain = base.pipeline()(PROMPTS[0], num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(5)).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(ours[0]))


def test_scale_zero_gives_the_base_and_options_reach_the_pipeline(base, maps):
    from PIL import Image

    adapter = perturbed_adapter(base, 3)
    prompt, control = PROMPTS[0], Image.fromarray(maps[0])
    common = dict(num_inference_steps=STEPS, guidance_scale=4.0)
    plain = base.pipeline()(prompt, generator=torch.Generator().manual_seed(0), **common).images[0]
    pipe = base.pipeline(controlnet=adapter.controlnet)

    def run(**overrides):
        call = adapter.pipeline_call_kwargs({"condition": control, **overrides})
        return np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(0), **common, **call).images[0])

    assert np.array_equal(run(conditioning_scale=0.0), np.asarray(plain))
    full = run()
    assert not np.array_equal(full, np.asarray(plain))
    assert not np.array_equal(run(guess_mode=True), full)
    assert not np.array_equal(run(control_guidance_end=0.5), full)


def test_several_controlnets_each_with_its_own_map_and_scale(base, maps, tmp_path):
    from diffusers import ControlNetModel
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    from PIL import Image

    from condkit.generate import build_pipeline

    first, second = perturbed_adapter(base, 4, name="edges"), perturbed_adapter(base, 5, name="other")
    second.set_scale(0.5)
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    pipe, call = build_pipeline(base, [first, second], {"control_images": [Image.fromarray(maps[0]), Image.fromarray(maps[1])]})
    assert isinstance(pipe.controlnet, MultiControlNetModel)
    assert call["controlnet_conditioning_scale"] == [1.0, 0.5]
    ours = pipe(PROMPTS[0], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), **call).images[0]

    stock_nets = [ControlNetModel.from_pretrained(tmp_path / n / "controlnet", local_files_only=True) for n in ("a", "b")]
    stock_pipe = base.pipeline(controlnet=MultiControlNetModel(stock_nets))
    stock = stock_pipe(
        PROMPTS[0],
        image=[Image.fromarray(maps[0]), Image.fromarray(maps[1])],
        controlnet_conditioning_scale=[1.0, 0.5],
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(stock))

    # The second branch at scale 0 contributes nothing: the result is the first alone.
    second.set_scale(0.0)
    pipe, call = build_pipeline(base, [first, second], {"control_images": [Image.fromarray(maps[0]), Image.fromarray(maps[1])]})
    both = pipe(PROMPTS[0], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), **call).images[0]
    single = generate_controlled(base, [first], [PROMPTS[0]], [[maps[0]]], num_inference_steps=STEPS, guidance_scale=7.5, seed=1)[0]
    assert np.array_equal(np.asarray(both), np.asarray(single))
    assert not np.array_equal(np.asarray(both), np.asarray(ours))
    with pytest.raises(UserError, match="no condition map for ControlNet number 2"):
        build_pipeline(base, [first, second], {"control_images": [maps[0]]})


@pytest.fixture(scope="module")
def base_8x(base):
    """The embedded U-Net with an 8x VAE: the only hint encoder the original format has."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    return dataclasses.replace(base, vae=vae, source="tiny-8x")


@pytest.mark.parametrize("suffix, prefixed", [(".safetensors", True), (".pth", False)])
def test_original_single_file_imports_exactly(base_8x, tmp_path, suffix, prefixed):
    controlnet = controlnet_from_unet(base_8x.unet, (16, 32, 96, 256), ControlNetConfig())
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param in controlnet.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    original = formats.to_original_state_dict(controlnet, prefix="control_model." if prefixed else "")
    # Spot-check the names against lllyasviel's layout (SD's with one layer per block).
    prefix = "control_model." if prefixed else ""
    for key in ("input_hint_block.14.weight", "zero_convs.5.0.weight", "middle_block_out.0.bias", "input_blocks.2.0.op.weight",
                "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.2.emb_layers.1.weight", "time_embed.2.bias"):
        assert prefix + key in original
    path = tmp_path / f"control_tiny_canny{suffix}"
    if suffix == ".pth":
        torch.save(original, path)
    else:
        save_safetensors_atomic(original, path)
    assert formats.detect_format(path) == "original"
    adapter = ControlNetAdapter.load(path, base_8x)
    assert same_weights(adapter.controlnet, controlnet)
    info = ControlNetAdapter.describe(path)
    assert info["format"] == "original" and info["conditioning_embedding_out_channels"] == [16, 32, 96, 256]


def test_write_original_file_round_trips_through_diffusers(base_8x, tmp_path):
    controlnet = controlnet_from_unet(base_8x.unet, (16, 32, 96, 256), ControlNetConfig())
    path = formats.write_original_file(controlnet, tmp_path / "control_out.safetensors")
    assert same_weights(formats.read_controlnet(path, base_8x, ControlNetConfig()), controlnet)


def test_original_file_for_another_vae_factor_is_refused(base, base_8x, tmp_path):
    controlnet = controlnet_from_unet(base_8x.unet, (16, 32, 96, 256), ControlNetConfig())
    path = formats.write_original_file(controlnet, tmp_path / "control_sd.safetensors")
    with pytest.raises(UserError, match=r"control_sd.safetensors: ControlNet hint encoder downsamples 8x but the base's VAE factor is 4x"):
        ControlNetAdapter.load(path, base)
    small = controlnet_from_unet(base.unet, (16, 32, 64), ControlNetConfig())
    with pytest.raises(UserError, match="original ControlNet format needs the SD 8x hint encoder"):
        formats.write_original_file(small, tmp_path / "control_small.safetensors")


def test_bad_files_are_named(base, tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        ControlNetAdapter.load(tmp_path / "missing", base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no ControlNet here"):
        ControlNetAdapter.load(tmp_path / "empty", base)
    not_control = tmp_path / "control_x.safetensors"
    save_safetensors_atomic({"foo.weight": torch.zeros(2)}, not_control)
    with pytest.raises(UserError, match=r"control_x.safetensors: not an original ControlNet checkpoint"):
        ControlNetAdapter.load(not_control, base)
    assert not ControlNetAdapter.can_load(not_control)
    # A ControlNet made for another U-Net (text width 32) is refused naming both values.
    from diffusers import UNet2DConditionModel

    other_unet = UNet2DConditionModel.from_config({**base.unet.config, "cross_attention_dim": 32})
    other = controlnet_from_unet(other_unet, (16, 32, 64), ControlNetConfig())
    formats.write_diffusers_folder(other, tmp_path / "other", ControlNetConfig(), None)
    with pytest.raises(UserError, match=r"other: ControlNet cross_attention_dim=32 does not fit the base U-Net's cross_attention_dim=64"):
        ControlNetAdapter.load(tmp_path / "other", base)
