"""T2I-Adapter on SDXL: diffusers' ``full_adapter_xl`` layout, fitted to the SDXL U-Net.

An SDXL U-Net adds the first adapter feature after its plain first down block's
downsampler (half the latents' size), so the kind builds ``FullAdapterXL`` there, as
diffusers' ``train_t2i_adapter_sdxl.py`` does. On the tiny SDXL-architecture base
(``tests/sdxl_tiny.py``): the default is that layout with the U-Net's channels and
scale 0 gives the base bit for bit beside the family's ``added_cond_kwargs``; condkit's
generation equals stock ``StableDiffusionXLAdapterPipeline`` with the export (and
``condkit generate`` equals it too, also with an IP-Adapter, which the SDXL adapter pipeline
takes); a plain diffusers-format SDXL T2I-Adapter folder
imports exactly; the ``t2i-adapter-canny`` recipe trains with ``--set base=<sdxl
folder>`` (validation included) and a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from condkit.adapters import adapter_unet_kwargs, detect_kind, load_adapter, merge_unet_kwargs
from condkit.adapters.controlnet.generate import shapes_conditions
from condkit.adapters.t2i_adapter import T2IAdapterConfig, T2IAdapterKind
from condkit.adapters.t2i_adapter.adapter import RESIDUALS_KEY, residual_shapes
from condkit.adapters.t2i_adapter.generate import generate_with_maps
from condkit.base import load_base
from condkit.cli import main
from condkit.errors import UserError

STEPS = 2  # sampler steps: enough to exercise the scheduler loop, cheap on CPU
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
WEIGHTS = "diffusion_pytorch_model.safetensors"
# SDXL 1.0's U-Net (diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
SDXL_BLOCKS = (320, 640, 1280)
SDXL_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    torch.set_num_threads(1)
    return load_base(tiny_sdxl)


@pytest.fixture(scope="module")
def maps():
    return shapes_conditions([("red", "circle", "blue"), ("green", "square", "white")], 64)  # (64, 64, 3) uint8 each


def perturbed(base, seed: int, **options) -> T2IAdapterKind:
    """A default T2I-Adapter on ``base`` with seeded, large-ish weights (so it visibly steers)."""
    adapter = T2IAdapterKind(T2IAdapterConfig(**options))
    torch.manual_seed(seed)
    adapter.attach(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return adapter


def unet_inputs(base, seed: int = 0):
    """Latents (2, 4, 16, 16), timesteps, the family's conditioning and edge-like maps (2, 3, 64, 64)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    conditioning = base.family.encode_prompts(base, PROMPTS)
    condition = (torch.rand(2, 3, 64, 64, generator=g) > 0.8).float()
    return latents, torch.tensor([17, 731]), conditioning, condition


def test_sdxl_layout_is_what_diffusers_sdxl_training_script_builds():
    from diffusers import T2IAdapter

    arguments = T2IAdapterConfig().model_config(SDXL_BLOCKS, 8, SDXL_TYPES)
    # train_t2i_adapter_sdxl.py: T2IAdapter(in_channels=3, channels=(320, 640, 1280, 1280), num_res_blocks=2,
    # downscale_factor=16, adapter_type="full_adapter_xl")
    assert arguments == {"in_channels": 3, "channels": [320, 640, 1280, 1280], "num_res_blocks": 2, "downscale_factor": 16, "adapter_type": "full_adapter_xl"}
    unet = type("UNetConfig", (), {"block_out_channels": SDXL_BLOCKS, "down_block_types": SDXL_TYPES})
    with torch.device("meta"):  # shapes only: a 1024 px map through the full-size adapter
        features = T2IAdapter(**arguments)(torch.zeros(1, 3, 1024, 1024))
    assert [tuple(f.shape[1:]) for f in features] == residual_shapes(unet, 128) == [(320, 64, 64), (640, 64, 64), (1280, 32, 32), (1280, 32, 32)]
    # SD 1.x keeps the full adapter at the VAE factor.
    sd = T2IAdapterConfig().model_config((320, 640, 1280, 1280), 8, ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    assert sd["adapter_type"] == "full_adapter" and sd["downscale_factor"] == 8 and sd["channels"] == [320, 640, 1280, 1280]


def test_default_is_the_xl_layout_and_scale_zero_leaves_the_sdxl_unet_bit_exact(base):
    adapter = perturbed(base, seed=1)
    config = adapter.model.config
    assert (config.adapter_type, list(config.channels), config.downscale_factor) == ("full_adapter_xl", [32, 64], 8)
    latents, timesteps, conditioning, condition = unet_inputs(base)
    hidden = conditioning.encoder_hidden_states  # (2, 77, 80)
    with torch.no_grad():
        alone = base.unet(latents, timesteps, hidden, **conditioning.unet_kwargs).sample

        def steered(scale: float) -> torch.Tensor:
            adapter.set_scale(scale)
            own = adapter_unet_kwargs(adapter, latents, timesteps, conditioning, {"condition": condition})
            assert [tuple(f.shape[1:]) for f in own[RESIDUALS_KEY]] == residual_shapes(base.unet.config, 16)[:2] == [(32, 8, 8), (64, 8, 8)]
            kwargs = merge_unet_kwargs([(None, dict(conditioning.unet_kwargs)), (adapter, own)])
            assert "added_cond_kwargs" in kwargs  # SDXL's pooled text and size ids beside the features
            return base.unet(latents, timesteps, hidden, **kwargs).sample

        assert torch.equal(steered(0.0), alone)
        assert (steered(1.0) - alone).abs().max() > 1e-3
    with pytest.raises(UserError, match=r"first down block takes 8 px ones .*adapter_type full_adapter_xl"):
        T2IAdapterKind(T2IAdapterConfig(adapter_type="full_adapter")).attach(base)


def test_export_runs_in_stock_sdxl_adapter_pipeline_with_the_same_images(base, maps, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter

    adapter = perturbed(base, seed=2)
    adapter.save(tmp_path / "run")
    ours = generate_with_maps(base, [adapter], PROMPTS, [[m] for m in maps], num_inference_steps=STEPS, guidance_scale=4.0, seed=5)
    plain = generate_with_maps(base, [], PROMPTS[:1], [[maps[0]]], num_inference_steps=STEPS, guidance_scale=4.0, seed=5)
    adapter.detach()

    # Plain diffusers from here on: nothing condkit-specific is needed to use the export.
    stock = T2IAdapter.from_pretrained(tmp_path / "run" / "t2i_adapter", local_files_only=True)
    assert stock.config.adapter_type == "full_adapter_xl"
    pipe = StableDiffusionXLAdapterPipeline.from_pretrained(tiny_sdxl, adapter=stock, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = [
        pipe(prompt, image=Image.fromarray(m), num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(5 + i)).images[0]
        for i, (prompt, m) in enumerate(zip(PROMPTS, maps))
    ]
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(ours[0]))  # and the adapter matters


def test_diffusers_format_sdxl_t2i_adapter_folder_imports_exactly(base, tmp_path):
    from diffusers import T2IAdapter

    theirs = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter_xl")
    with torch.no_grad():
        for index, param in enumerate(theirs.parameters()):
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(index)) * 0.05)
    theirs.save_pretrained(tmp_path / "plain")  # config.json + safetensors, no condkit description
    assert detect_kind(tmp_path / "plain") == "t2i_adapter"
    assert T2IAdapterKind.describe(tmp_path / "plain")["adapter_type"] == "full_adapter_xl"
    adapter = load_adapter(tmp_path / "plain", base)
    assert isinstance(adapter, T2IAdapterKind) and not any(p.requires_grad for p in adapter.model.parameters())
    latents, timesteps, conditioning, condition = unet_inputs(base, seed=4)
    with torch.no_grad():
        ours = adapter_unet_kwargs(adapter, latents, timesteps, conditioning, {"condition": condition})[RESIDUALS_KEY]
        wanted = theirs(condition)
    assert len(ours) == len(wanted) == 2 and all(torch.equal(a, b) for a, b in zip(ours, wanted))
    adapter.detach()
    # An SD-layout adapter does not fit an SDXL U-Net: one line, before any generation.
    T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=4).save_pretrained(tmp_path / "sd")
    with pytest.raises(UserError, match="adapter_type full_adapter_xl") as error:
        load_adapter(tmp_path / "sd", base)
    assert "\n" not in str(error.value)


def test_condkit_generate_on_sdxl_equals_stock_diffusers(base, maps, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter

    adapter = perturbed(base, seed=3, conditioning_scale=0.8)
    adapter.save(tmp_path / "t2i")
    adapter.detach()
    Image.fromarray(maps[0]).save(tmp_path / "map.png")
    assert main([
        "generate", "--base", str(tiny_sdxl), "--adapter", str(tmp_path / "t2i"), "--t2i-image", str(tmp_path / "map.png"),
        "--prompt", PROMPTS[0], "--steps", str(STEPS), "--guidance", "4", "--seed", "3", "--output", str(tmp_path / "out"),
    ]) == 0
    ours = np.asarray(Image.open(tmp_path / "out" / "000003.png"))
    stock = T2IAdapter.from_pretrained(tmp_path / "t2i" / "t2i_adapter", local_files_only=True)
    pipe = StableDiffusionXLAdapterPipeline.from_pretrained(tiny_sdxl, adapter=stock, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(image=Image.open(tmp_path / "map.png").convert("RGB"), num_inference_steps=STEPS, guidance_scale=4.0)
    theirs = np.asarray(pipe(PROMPTS[0], adapter_conditioning_scale=0.8, generator=torch.Generator().manual_seed(3), **call).images[0])
    np.testing.assert_array_equal(ours, theirs)


def _train(tiny_sdxl, out, *extra: str) -> int:
    overrides = [
        f"base={tiny_sdxl}", "data.shapes_count=8", "train.max_steps=4", "train.batch_size=2", "train.log_every=1",
        "train.lr_warmup_steps=0", "train.checkpoint_every=2", "validation.every=2", "validation.num_inference_steps=2",
        "validation.prompts=[a red circle on a blue background]",
    ]
    args = ["train", "t2i-adapter-canny", "--output", str(out)]
    for item in overrides:
        args += ["--set", item]
    return main([*args, *extra])


def test_canny_recipe_trains_on_sdxl_validates_and_resumes_bit_exactly(tiny_sdxl, tmp_path):
    from diffusers import T2IAdapter

    assert _train(tiny_sdxl, tmp_path / "straight") == 0
    straight = load_file(tmp_path / "straight" / "t2i_adapter" / WEIGHTS)
    assert (tmp_path / "straight" / "validation" / "step-00000002.png").is_file()  # validation during training
    assert (tmp_path / "straight" / "validation" / "step-00000004.png").is_file()
    exported = T2IAdapter.from_pretrained(tmp_path / "straight" / "t2i_adapter", local_files_only=True)
    assert exported.config.adapter_type == "full_adapter_xl" and list(exported.config.channels) == [32, 64]
    # Steps 3 and 4 moved every weight, so the resumed run below has something to repeat.
    halfway = load_file(tmp_path / "straight" / "checkpoints" / "step-00000002" / "trainable.safetensors")  # keys "adapter0." + ours
    assert all(not torch.equal(value, halfway[f"adapter0.{key}"]) for key, value in straight.items())
    # The same run stopped after its step-2 checkpoint, then resumed to step 4.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000002", resumed_dir / "checkpoints" / "step-00000002")
    assert _train(tiny_sdxl, resumed_dir, "--resume", "latest") == 0
    resumed = load_file(resumed_dir / "t2i_adapter" / WEIGHTS)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_condkit_generate_with_an_ip_adapter_on_sdxl_equals_stock_diffusers(maps, tiny_sdxl, tmp_path):
    """Unlike SD's, stock ``StableDiffusionXLAdapterPipeline`` takes an IP-Adapter: the pair composes."""
    from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter

    from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig

    fresh = load_base(tiny_sdxl)  # the IP-Adapter's layers stay off the module's base
    ip = IPAdapter(IPAdapterConfig())
    ip.attach(fresh)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for param in ip.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
    ip.save(tmp_path / "ip")
    ip.detach()
    perturbed(fresh, seed=9).save(tmp_path / "t2i")
    Image.fromarray(maps[0]).save(tmp_path / "map.png")
    Image.fromarray(maps[1]).save(tmp_path / "ref.png")
    assert main([
        "generate", "--base", str(tiny_sdxl), "--adapter", str(tmp_path / "ip"), "--adapter", str(tmp_path / "t2i"),
        "--t2i-image", str(tmp_path / "map.png"), "--ip-image", str(tmp_path / "ref.png"),
        "--prompt", PROMPTS[0], "--steps", str(STEPS), "--guidance", "4", "--seed", "3", "--output", str(tmp_path / "out"),
    ]) == 0
    ours = np.asarray(Image.open(tmp_path / "out" / "000003.png"))
    stock = T2IAdapter.from_pretrained(tmp_path / "t2i" / "t2i_adapter", local_files_only=True)
    pipe = StableDiffusionXLAdapterPipeline.from_pretrained(tiny_sdxl, adapter=stock, image_encoder=None, feature_extractor=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(tmp_path / "ip"), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder="image_encoder")
    call = dict(image=Image.open(tmp_path / "map.png").convert("RGB"), ip_adapter_image=Image.open(tmp_path / "ref.png").convert("RGB"))
    run = dict(num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(3))
    theirs = np.asarray(pipe(PROMPTS[0], **call, **run).images[0])
    np.testing.assert_array_equal(ours, theirs)
    pipe.set_ip_adapter_scale(0.0)  # the image prompt matters in the composition
    run["generator"] = torch.Generator().manual_seed(3)
    assert not np.array_equal(np.asarray(pipe(PROMPTS[0], **call, **run).images[0]), theirs)
