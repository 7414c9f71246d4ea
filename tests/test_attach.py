"""condkit.attach: condkit adapters on a user's own diffusers pipeline, equal to the stock loaders."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from lora_utils import PROMPT, randomise, stock_pipeline
from PIL import Image

import condkit
from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
from condkit.adapters.lora import LoraAdapter, LoraConfig, formats
from condkit.adapters.lora.adapter import read_lora_file
from condkit.base import load_base
from condkit.errors import UserError
from condkit.io import save_safetensors_atomic


@pytest.fixture(scope="module")
def pristine():
    return load_base("embedded")


@pytest.fixture(scope="module")
def lora_folder(pristine, tmp_path_factory):
    """A condkit LoRA export with trained-like (random, non-zero B) weights, conv layers, alpha != rank."""
    base = copy.deepcopy(pristine)
    adapter = LoraAdapter(LoraConfig(rank=4, alpha=2.0, target_modules="conv"))
    adapter.attach(base)
    randomise(adapter, std=0.1)
    folder = tmp_path_factory.mktemp("attach") / "lora"
    adapter.save(folder)
    return folder


@pytest.fixture(scope="module")
def ip_folder(pristine, tmp_path_factory):
    """A condkit IP-Adapter export (weights + image_encoder/) with random non-trivial weights."""
    base = copy.deepcopy(pristine)
    adapter = IPAdapter(IPAdapterConfig())
    adapter.attach(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("attach") / "ip"
    adapter.save(folder)
    return folder


@pytest.fixture(scope="module")
def controlnet_run(pristine, tmp_path_factory):
    """A condkit ControlNet output folder (``run/controlnet/``) whose zero convolutions are non-zero, as if trained."""
    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(copy.deepcopy(pristine))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in [adapter.controlnet.controlnet_mid_block, *adapter.controlnet.controlnet_down_blocks]:
            module.weight.add_(0.2 * torch.randn(module.weight.shape, generator=generator))
    folder = tmp_path_factory.mktemp("attach") / "run"
    adapter.save(folder)
    return folder


def img2img_pipeline(folder, **components):
    """A user's own img2img pipeline of the exported embedded base."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, local_files_only=True, **components
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def init_image() -> Image.Image:
    array = np.zeros((64, 64, 3), np.uint8)
    array[:] = (30, 60, 200)
    array[16:48, 16:48] = (220, 40, 40)
    return Image.fromarray(array)


def run_img2img(pipe, **kwargs) -> np.ndarray:
    """Two img2img steps as a float array (1, 64, 64, 3), fixed seed."""
    return pipe(
        PROMPT, image=init_image(), strength=0.7, num_inference_steps=3, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0), output_type="np", **kwargs,
    ).images


def sample(pipe, **kwargs) -> np.ndarray:
    """Two txt2img steps as a float array (1, 64, 64, 3), fixed seed."""
    return pipe(
        PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    ).images


def peft_layers(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for model in (pipe.unet, pipe.text_encoder) for m in model.modules())


def test_lora_on_img2img_equals_stock_load_lora_weights_scales_and_detaches(lora_folder, exported_base):
    pipe = img2img_pipeline(exported_base)
    bare = run_img2img(pipe)
    handle = condkit.attach(pipe, lora_folder)
    ours = run_img2img(pipe)

    stock = img2img_pipeline(exported_base)
    stock.load_lora_weights(lora_folder)
    assert np.abs(ours - run_img2img(stock)).max() == 0
    assert np.abs(ours - bare).max() > 1e-3  # the LoRA really changes the images

    handle.set_scale(0.5)
    half = run_img2img(pipe)
    stock.set_adapters(stock.get_active_adapters(), adapter_weights=[0.5])
    assert np.abs(half - run_img2img(stock)).max() == 0  # what set_adapters gives
    assert np.abs(half - ours).max() > 1e-4 and np.abs(half - bare).max() > 1e-4
    handle.set_scale(0.0)
    assert np.abs(run_img2img(pipe) - bare).max() == 0
    handle.set_scale(1.0)
    assert np.abs(run_img2img(pipe) - ours).max() == 0

    handle.detach()
    assert np.abs(run_img2img(pipe) - bare).max() == 0
    assert peft_layers(pipe) == 0 and not any(pipe.get_list_adapters().values())  # the bare modules again
    handle.detach()  # twice is harmless
    with pytest.raises(UserError, match="detached"):
        handle.set_scale(0.5)


def test_a_second_lora_keeps_the_first_active_with_its_scale(lora_folder, exported_base):
    pipe = stock_pipeline(exported_base)
    first = condkit.attach(pipe, lora_folder, scale=0.7, name="first")
    only_first = sample(pipe)
    second = condkit.attach(pipe, lora_folder, scale=0.3, name="second")  # same weights, another name
    assert pipe.get_active_adapters() == ["first", "second"]
    both = sample(pipe)
    second.set_scale(0.0)
    assert np.abs(sample(pipe) - only_first).max() == 0  # the first kept its 0.7
    second.set_scale(0.3)
    assert np.abs(sample(pipe) - both).max() == 0
    with pytest.raises(UserError, match="already has a LoRA named 'first'"):
        condkit.attach(pipe, lora_folder, name="first")
    second.detach()
    assert np.abs(sample(pipe) - only_first).max() == 0
    first.detach()
    assert peft_layers(pipe) == 0


def test_kohya_file_attaches_like_condkit_loads_it(lora_folder, pristine, exported_base, tmp_path):
    models = {"unet": pristine.unet, "text_encoder": pristine.text_encoder}
    weights = read_lora_file(lora_folder / "pytorch_lora_weights.safetensors", models)
    tensors, metadata = formats.write_kohya(weights)
    kohya = tmp_path / "lora_kohya.safetensors"
    save_safetensors_atomic(tensors, kohya, metadata=metadata)
    assert formats.detect_format(tensors) == "kohya"

    pipe = stock_pipeline(exported_base)  # txt2img
    bare = sample(pipe)
    handle = condkit.attach(pipe, kohya, scale=1.0)
    assert handle.kind == "lora" and handle.name == "lora_kohya" and handle.pipeline is pipe
    base = copy.deepcopy(pristine)
    LoraAdapter.load(kohya, base)
    expected = sample(base.pipeline())
    assert np.abs(sample(pipe) - expected).max() == 0
    assert np.abs(expected - bare).max() > 1e-3
    handle.detach()
    assert np.abs(sample(pipe) - bare).max() == 0


def test_ip_adapter_on_img2img_equals_stock_load_ip_adapter(ip_folder, exported_base):
    reference = init_image().rotate(90)
    pipe = img2img_pipeline(exported_base, image_encoder=None, feature_extractor=None)
    processors = dict(pipe.unet.attn_processors)
    bare = run_img2img(pipe)
    handle = condkit.attach(pipe, ip_folder)
    assert pipe.image_encoder is not None  # from the export's image_encoder/
    ours = run_img2img(pipe, ip_adapter_image=reference)

    stock = img2img_pipeline(exported_base, image_encoder=None, feature_extractor=None)
    stock.load_ip_adapter(str(ip_folder), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder="image_encoder")
    assert np.abs(ours - run_img2img(stock, ip_adapter_image=reference)).max() == 0
    assert np.abs(ours - bare).max() > 1e-3

    handle.set_scale(0.5)
    half = run_img2img(pipe, ip_adapter_image=reference)
    stock.set_ip_adapter_scale(0.5)
    assert np.abs(half - run_img2img(stock, ip_adapter_image=reference)).max() == 0
    assert np.abs(half - ours).max() > 1e-4
    handle.set_scale(0.0)
    assert np.abs(run_img2img(pipe, ip_adapter_image=reference) - bare).max() == 0

    handle.detach()
    assert np.abs(run_img2img(pipe) - bare).max() == 0
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    assert pipe.unet.encoder_hid_proj is None and pipe.unet.config.encoder_hid_dim_type is None
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())  # the very processors of before


def test_original_ip_adapter_bin_attaches_like_its_flat_safetensors(ip_folder, exported_base, tmp_path):
    from safetensors.torch import load_file

    flat = load_file(ip_folder / "ip_adapter.safetensors")
    nested = {part: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(part + ".")} for part in ("image_proj", "ip_adapter")}
    torch.save(nested, tmp_path / "ip-adapter_tiny.bin")  # the original ip-adapter_sd15.bin layout
    reference = init_image().rotate(90)
    images = []
    for source in (ip_folder, tmp_path / "ip-adapter_tiny.bin"):
        pipe = img2img_pipeline(exported_base)  # keeps the base's own image encoder
        encoder = pipe.image_encoder
        handle = condkit.attach(pipe, source)
        assert handle.kind == "ip_adapter" and pipe.image_encoder is encoder
        images.append(run_img2img(pipe, ip_adapter_image=reference))
        handle.detach()
        assert pipe.image_encoder is encoder  # unload_ip_adapter alone would drop it
    assert np.abs(images[0] - images[1]).max() == 0

    # A projection made for another image encoder is refused before anything changes.
    proj = nested["image_proj"]["proj.weight"]
    nested["image_proj"]["proj.weight"] = torch.zeros(proj.shape[0], proj.shape[1] + 8)
    torch.save(nested, tmp_path / "ip-adapter_other_encoder.bin")
    with pytest.raises(UserError, match=r"ip-adapter_other_encoder.bin: the projection takes \d+-dim image features") as caught:
        condkit.attach(pipe, tmp_path / "ip-adapter_other_encoder.bin")
    assert "\n" not in str(caught.value) and pipe.unet.encoder_hid_proj is None


def test_controlnet_folder_on_txt2img_gives_a_controlnet_pipeline(controlnet_run, exported_base):
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    condition = init_image()
    pipe = stock_pipeline(exported_base)
    bare = sample(pipe)
    handle = condkit.attach(pipe, controlnet_run)
    controlled = handle.pipeline
    assert isinstance(controlled, StableDiffusionControlNetPipeline) and type(pipe).__name__ == "StableDiffusionPipeline"
    assert controlled.unet is pipe.unet and controlled.text_encoder is pipe.text_encoder  # shared, not copied
    images = sample(controlled, image=condition, **handle.call_kwargs)
    assert images.shape == (1, 64, 64, 3) and np.abs(images - bare).max() > 1e-3
    handle.set_scale(0.0)
    assert np.abs(sample(controlled, image=condition, **handle.call_kwargs) - bare).max() == 0

    # On a ControlNet pipeline a second ControlNet goes next to the first; detach puts the first back.
    second = condkit.attach(controlled, controlnet_run / "controlnet")
    assert second.pipeline is controlled and isinstance(controlled.controlnet, MultiControlNetModel)
    sample(controlled, image=[condition, condition])
    second.detach()
    assert controlled.controlnet is handle.controlnet
    handle.detach()
    assert handle.pipeline is pipe and np.abs(sample(pipe) - bare).max() == 0


def test_img2img_and_inpaint_get_their_controlnet_pipelines_and_a_lora(controlnet_run, lora_folder, exported_base):
    from diffusers import (
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionInpaintPipeline,
    )

    img2img = img2img_pipeline(exported_base)
    inpaint = StableDiffusionInpaintPipeline.from_pipe(img2img)
    inpaint.set_progress_bar_config(disable=True)
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    settings = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")

    def run_inpaint(pipe, **kwargs):
        return pipe(PROMPT, image=init_image(), mask_image=mask, generator=torch.Generator().manual_seed(0), **settings, **kwargs).images

    bare = run_inpaint(inpaint)
    lora = condkit.attach(inpaint, lora_folder)
    with_lora = run_inpaint(inpaint)
    assert np.abs(with_lora - bare).max() > 1e-3
    for pipe, expected in ((img2img, StableDiffusionControlNetImg2ImgPipeline), (inpaint, StableDiffusionControlNetInpaintPipeline)):
        handle = condkit.attach(pipe, controlnet_run)
        assert type(handle.pipeline) is expected and handle.pipeline.unet is pipe.unet
        images = handle.pipeline(PROMPT, image=init_image(), control_image=init_image(), mask_image=mask, **settings).images
        assert images.shape == (1, 64, 64, 3)
        handle.detach()
    lora.detach()
    assert np.abs(run_inpaint(inpaint) - bare).max() == 0


@pytest.mark.parametrize("content", [b"\x00\x01not a safetensors file", None], ids=["garbage", "truncated"])
def test_unreadable_source_is_one_line_naming_the_file(lora_folder, exported_base, tmp_path, content):
    path = tmp_path / "broken.safetensors"
    if content is None:  # a real LoRA file cut short
        data = (lora_folder / "pytorch_lora_weights.safetensors").read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    pipe = stock_pipeline(exported_base)
    with pytest.raises(UserError) as caught:
        condkit.attach(pipe, path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    assert peft_layers(pipe) == 0 and pipe.unet.encoder_hid_proj is None  # the pipeline is untouched
    with pytest.raises(UserError, match="no such file"):
        condkit.attach(pipe, tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="scale"):
        condkit.attach(pipe, lora_folder, scale=float("nan"))
    with pytest.raises(UserError, match="adapter name 'a.b'"):
        condkit.attach(pipe, lora_folder, name="a.b")
    assert peft_layers(pipe) == 0
