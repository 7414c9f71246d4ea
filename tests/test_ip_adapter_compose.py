"""IP-Adapter composed with a LoRA (peft, both attach orders) and with a ControlNet."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
from condkit.base import load_base
from condkit.embedded import EMBEDDED_BASE_DIR

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    return load_base("embedded")


@pytest.fixture(scope="module")
def ip_file(base, tmp_path_factory):
    """A saved IP-Adapter with random (non-initial) weights."""
    adapter = IPAdapter(IPAdapterConfig())
    adapter.attach(base)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("ip")
    adapter.save(folder)
    adapter.detach()
    return folder


def private_copy(base):
    """The base with its own U-Net, so peft layers added here never leak into other tests."""
    return dataclasses.replace(base, unet=copy.deepcopy(base.unet))


def add_lora(unet) -> None:
    """A peft LoRA on the attention projections with non-zero B (so it changes the output)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian"), adapter_name="style")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


@torch.no_grad()
def run(base, adapter=None):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=generator)  # (b, 4, 16, 16)
    text = torch.randn(2, 77, 64, generator=generator)  # (b, 77, 64)
    timesteps = torch.tensor([30, 600])
    kwargs = {}
    if adapter is not None:
        refs = torch.randint(0, 256, (2, 3, 64, 64), generator=generator).float() / 255
        kwargs = adapter.unet_kwargs(latents, timesteps, text, adapter.encode_extras({"reference": refs}, base))
    return base.unet(latents, timesteps, text, **kwargs).sample


def test_lora_and_ip_adapter_compose_in_either_order(base, ip_file):
    # LoRA first, then the IP-Adapter.
    first = private_copy(base)
    add_lora(first.unet)
    lora_only = run(first)
    from peft.utils import get_peft_model_state_dict

    lora_state = get_peft_model_state_dict(first.unet, adapter_name="style")
    ip = IPAdapter.load(ip_file, first)
    lora_then_ip = run(first, ip)
    ip.detach()
    assert torch.equal(run(first), lora_only)  # detaching the IP-Adapter leaves the LoRA alone

    # IP-Adapter first, then the LoRA with the same weights.
    second = private_copy(base)
    ip_only_adapter = IPAdapter.load(ip_file, second)
    ip_only = run(second, ip_only_adapter)
    add_lora(second.unet)
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(second.unet, lora_state, adapter_name="style")
    ip_then_lora = run(second, ip_only_adapter)
    # peft wrapped the text projections only, never the IP processors' to_k_ip/to_v_ip
    wrapped = [n for n, _ in second.unet.named_modules() if n.endswith("lora_A")]
    assert wrapped and not any(".processor." in n or "encoder_hid_proj" in n for n in wrapped)

    torch.testing.assert_close(ip_then_lora, lora_then_ip, rtol=0, atol=1e-6)
    assert (lora_then_ip - lora_only).abs().max() > 1e-3  # the image branch acts on top of the LoRA
    assert (lora_then_ip - ip_only).abs().max() > 1e-3  # the LoRA acts on top of the image branch
    ip_only_adapter.detach()
    torch.testing.assert_close(run(second), lora_only, rtol=0, atol=1e-6)


def test_controlnet_and_ip_adapter_match_stock_diffusers(base, ip_file):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    controlnet = ControlNetModel.from_unet(base.unet, conditioning_channels=3, conditioning_embedding_out_channels=(16, 32, 96))  # 4x: the VAE factor
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # zero convolutions -> small random, so the branch has an effect
        for name, param in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    control = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    reference = Image.fromarray(np.full((64, 64, 3), (30, 60, 220), np.uint8))
    settings = dict(image=control, num_inference_steps=3, guidance_scale=4.0, height=64, width=64, output_type="np")

    ip = IPAdapter.load(ip_file, base)
    try:
        call = ip.pipeline_call_kwargs({"ip_images": [reference]})
        pipe = base.pipeline(controlnet=controlnet, **ip.pipeline_components())
        ours = pipe("a shape", generator=torch.Generator().manual_seed(0), **call, **settings).images
        ip.set_scale(0.0)
        control_only_via_ip = pipe("a shape", generator=torch.Generator().manual_seed(0), **call, **settings).images
    finally:
        ip.detach()
    control_only = base.pipeline(controlnet=controlnet)("a shape", generator=torch.Generator().manual_seed(0), **settings).images
    np.testing.assert_array_equal(control_only_via_ip, control_only)  # scale 0 leaves the ControlNet result
    assert np.abs(ours - control_only).max() > 1e-3

    stock = StableDiffusionControlNetPipeline.from_pretrained(
        EMBEDDED_BASE_DIR, controlnet=controlnet, image_encoder=None, feature_extractor=None, safety_checker=None, requires_safety_checker=False
    )
    stock.set_progress_bar_config(disable=True)
    stock.load_ip_adapter(str(ip_file), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder="image_encoder")
    theirs = stock("a shape", ip_adapter_image=reference, generator=torch.Generator().manual_seed(0), **settings).images
    np.testing.assert_array_equal(ours, theirs)
