"""IP-Adapter on SDXL, and LoRA + ControlNet + IP-Adapter together on one SDXL base.

On the tiny SDXL-architecture base (``tests/sdxl_tiny.py``, with a tiny CLIP image
encoder): the image projection and every cross-attention layer's ``to_k_ip``/``to_v_ip``
attach beside SDXL's own ``added_cond_kwargs``; scale 0 gives the base bit for bit; the
export loads with stock ``StableDiffusionXLPipeline.load_ip_adapter`` and gives condkit's
images; an original ``ip-adapter_sdxl.bin``-layout file imports as diffusers loads it;
the ``ip-adapter`` recipe trains and validates with ``--set base=<sdxl folder>``; and
``condkit generate`` with a LoRA, a ControlNet and an IP-Adapter equals stock diffusers.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from lora_utils import randomise
from PIL import Image
from safetensors.torch import load_file

from condkit.adapters import adapter_unet_kwargs, merge_unet_kwargs
from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
from condkit.adapters.ip_adapter import formats
from condkit.adapters.ip_adapter.adapter import IMAGE_EMBEDS_KEY
from condkit.base import load_base
from condkit.cli import main

SETTINGS = dict(num_inference_steps=2, guidance_scale=4.0, height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    torch.set_num_threads(1)
    return load_base(tiny_sdxl)


def perturb(params, seed: int, std: float = 0.1) -> None:
    """Give every weight its own random offset, so layer mix-ups show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(std * torch.randn(param.shape, generator=g))


def reference_image(colour: tuple[int, int, int]) -> Image.Image:
    array = np.zeros((64, 64, 3), np.uint8)
    array[:] = colour
    array[16:48, 16:48] = (255 - np.array(colour)) // 2
    return Image.fromarray(array)


@torch.no_grad()
def unet_output(base, adapter=None, embeds=None) -> torch.Tensor:
    """The U-Net's output on fixed inputs with the family's arguments (and the adapter's): (2, 4, 16, 16)."""
    g = torch.Generator().manual_seed(1)
    latents, timesteps = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([50, 700])
    conditioning = base.family.encode_prompts(base, ["a shape", "a red circle"])
    parts = [(None, dict(conditioning.unet_kwargs))]
    if adapter is not None:
        parts.append((adapter, adapter_unet_kwargs(adapter, latents, timesteps, conditioning, {IMAGE_EMBEDS_KEY: embeds})))
    return base.unet(latents, timesteps, conditioning.encoder_hidden_states, **merge_unet_kwargs(parts)).sample


def image_embeds(base, seed: int = 0) -> torch.Tensor:
    """(2, 24) image_embeds of two random references through the base's image encoder."""
    from condkit.adapters.ip_adapter.adapter import encode_images

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), generator=g).float() / 255
    return encode_images(pixels, base.image_encoder, base.feature_extractor, hidden_states=False)


def test_every_cross_attention_layer_gets_an_image_branch_and_scale_zero_is_the_base(base):
    before = unet_output(base)
    adapter = IPAdapter(IPAdapterConfig())
    adapter.attach(base)
    try:
        names = formats.cross_attention_names(base.unet)
        assert len(names) == 8 and set(adapter.processors) == set(names)  # attn2 of 2 down + 2 mid + 4 up transformer blocks
        assert type(next(iter(adapter.processors.values()))).__name__ == "IPAdapterAttnProcessor2_0"
        assert adapter.image_projection.image_embeds.weight.shape == (4 * 80, 24)  # 4 tokens of SDXL's 80-d context
        perturb(adapter.trainable_parameters(), seed=0)
        embeds = image_embeds(base)
        assert not torch.equal(unet_output(base, adapter, embeds), before)  # the image branch acts
        adapter.set_scale(0.0)
        assert torch.equal(unet_output(base, adapter, embeds), before)  # scale 0: the base, bit for bit
    finally:
        adapter.detach()
    assert torch.equal(unet_output(base), before)


def test_reference_dependence_runs_on_sdxl_with_the_familys_arguments(base):
    """The transfer benchmark's loss ratio passes SDXL's pooled text and time_ids to the U-Net;
    with the image branch at scale 0 the reference cannot matter (ratio exactly 1)."""
    from condkit.adapters.ip_adapter.metrics import reference_dependence

    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy() for _ in range(3)]
    references = [np.asarray(reference_image(colour)) for colour in ((220, 30, 30), (30, 30, 220), (30, 200, 30))]
    adapter = IPAdapter(IPAdapterConfig())
    adapter.attach(base)
    try:
        perturb(adapter.trainable_parameters(), seed=1)
        acting = reference_dependence(adapter, base, images, references, "a shape", seed=0, repeats=2)
        adapter.set_scale(0.0)
        silent = reference_dependence(adapter, base, images, references, "a shape", seed=0, repeats=2)
    finally:
        adapter.detach()
    assert acting["wrong_over_right"] != 1.0 and silent["wrong_over_right"] == 1.0
    assert silent["loss_right_reference"] > 0


def test_export_loads_in_stock_sdxl_load_ip_adapter_with_the_same_images(base, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from condkit.generate import build_pipeline

    adapter = IPAdapter(IPAdapterConfig())
    adapter.attach(base)
    try:
        perturb(adapter.trainable_parameters(), seed=2)
        adapter.save(tmp_path)
        reference = reference_image((200, 40, 40))
        pipe, call = build_pipeline(base, [adapter], {"ip_images": [reference]})
        ours = pipe("a shape", generator=torch.Generator().manual_seed(0), **call, **SETTINGS).images
        adapter.set_scale(0.0)
        without = pipe("a shape", generator=torch.Generator().manual_seed(0), **call, **SETTINGS).images
    finally:
        adapter.detach()
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, image_encoder=None, feature_extractor=None, local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    stock.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder="image_encoder")
    assert stock.image_encoder is not None  # came from OUT/image_encoder
    theirs = stock("a shape", ip_adapter_image=reference, generator=torch.Generator().manual_seed(0), **SETTINGS).images
    np.testing.assert_array_equal(ours, theirs)
    assert np.abs(without - ours).max() > 1e-3


def test_original_ip_adapter_sdxl_layout_imports_like_diffusers(base, tmp_path):
    """An ``ip-adapter_sdxl.bin``-layout pickle (``image_proj`` + ``ip_adapter``) gives diffusers' U-Net."""
    g = torch.Generator().manual_seed(5)
    ip_layers = {}
    for index, name in enumerate(formats.cross_attention_names(base.unet)):
        shape = tuple(base.unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape)  # (inner, 80)
        for which in ("to_k_ip", "to_v_ip"):
            ip_layers[f"{2 * index + 1}.{which}.weight"] = torch.randn(shape, generator=g) * 0.2
    image_proj = {
        "proj.weight": torch.randn(4 * 80, 24, generator=g) * 0.1,  # (tokens * cross_dim, image_embed_dim)
        "proj.bias": torch.randn(4 * 80, generator=g) * 0.1,
        "norm.weight": torch.rand(80, generator=g) + 0.5,
        "norm.bias": torch.randn(80, generator=g) * 0.1,
    }
    torch.save({"image_proj": image_proj, "ip_adapter": ip_layers}, tmp_path / "ip-adapter_sdxl.bin")

    stock_unet = copy.deepcopy(base.unet)  # a plain diffusers U-Net, loaded by diffusers' own code
    stock_unet._load_ip_adapter_weights({"image_proj": image_proj, "ip_adapter": ip_layers})
    embeds = image_embeds(base, seed=3)
    g = torch.Generator().manual_seed(1)
    latents, timesteps = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([50, 700])
    conditioning = base.family.encode_prompts(base, ["a shape", "a red circle"])
    added = {**conditioning.unet_kwargs["added_cond_kwargs"], "image_embeds": [embeds[:, None]]}
    with torch.no_grad():
        expected = stock_unet(latents, timesteps, conditioning.encoder_hidden_states, added_cond_kwargs=added).sample
    assert IPAdapter.can_load(tmp_path / "ip-adapter_sdxl.bin")
    adapter = IPAdapter.load(tmp_path / "ip-adapter_sdxl.bin", base)
    try:
        torch.testing.assert_close(unet_output(base, adapter, embeds), expected, rtol=0, atol=1e-6)
    finally:
        adapter.detach()
    described = IPAdapter.describe(tmp_path / "ip-adapter_sdxl.bin")
    assert described["cross_attention_dim"] == 80 and described["cross_attention_layers"] == 8


def test_ip_adapter_recipe_trains_and_validates_on_sdxl(tiny_sdxl, tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"base={tiny_sdxl}", "data.shapes_count=8", "train.max_steps=2", "train.batch_size=2", "train.lr_warmup_steps=0",
        "train.log_every=1", "validation.every=0", "validation.num_inference_steps=2",
    ]
    args = ["train", "ip-adapter", "--output", str(out)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    weights = load_file(out / "ip_adapter.safetensors")
    unet = load_base(tiny_sdxl).unet
    first = formats.cross_attention_names(unet)[0].removesuffix(".processor")
    # Fresh to_k_ip copies the layer's to_k; two steps moved it.
    assert not torch.equal(weights["ip_adapter.1.to_k_ip.weight"], unet.get_submodule(first).to_k.weight)
    assert (out / "validation" / "step-00000002.png").is_file()  # [reference | sample] rows on SDXL


def test_condkit_generate_composes_lora_controlnet_and_ip_adapter_like_stock_diffusers(base, tiny_sdxl, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
    from condkit.adapters.controlnet.generate import shapes_conditions
    from condkit.adapters.lora import LoraAdapter, LoraConfig

    fresh = load_base(tiny_sdxl)  # adapters are made on their own base, then saved
    lora = LoraAdapter(LoraConfig(rank=4, alpha=4.0, train_text_encoder=True), name="style")
    lora.attach(fresh)
    randomise(lora)
    lora.save(tmp_path / "lora")
    lora.detach()
    controlnet = ControlNetAdapter(ControlNetConfig())
    controlnet.attach(fresh)
    perturb(controlnet.controlnet.parameters(), seed=6, std=0.05)
    controlnet.save(tmp_path / "controlnet")
    ip = IPAdapter(IPAdapterConfig())
    ip.attach(fresh)
    perturb(ip.trainable_parameters(), seed=7)
    ip.save(tmp_path / "ip")
    ip.detach()
    Image.fromarray(shapes_conditions([("red", "circle", "blue")], 64)[0]).save(tmp_path / "map.png")
    reference_image((40, 200, 40)).save(tmp_path / "ref.png")

    prompt = "a red circle on a blue background"
    assert main([
        "generate", "--base", str(tiny_sdxl), "--adapter", str(tmp_path / "lora"), "--adapter", str(tmp_path / "controlnet"),
        "--adapter", str(tmp_path / "ip"), "--control-image", str(tmp_path / "map.png"), "--ip-image", str(tmp_path / "ref.png"),
        "--prompt", prompt, "--steps", "2", "--guidance", "4", "--seed", "3", "--output", str(tmp_path / "out"),
    ]) == 0
    ours = np.asarray(Image.open(tmp_path / "out" / "000003.png"))

    branch = ControlNetModel.from_pretrained(tmp_path / "controlnet" / "controlnet", local_files_only=True)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl, controlnet=branch, image_encoder=None, feature_extractor=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.load_ip_adapter(str(tmp_path / "ip"), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder="image_encoder")
    settings = {**SETTINGS, "output_type": "pil"}
    call = dict(image=Image.open(tmp_path / "map.png").convert("RGB"), ip_adapter_image=Image.open(tmp_path / "ref.png").convert("RGB"))
    theirs = np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(3), **call, **settings).images[0])
    np.testing.assert_array_equal(ours, theirs)
    pipe.set_ip_adapter_scale(0.0)  # the image prompt matters in the composition
    without_ip = np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(3), **call, **settings).images[0])
    assert not np.array_equal(without_ip, theirs)
