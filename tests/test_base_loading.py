"""Loading a base: embedded, a diffusers folder, and original single-file checkpoints, offline.

Single files are written from the embedded base by ``tests/original_format.py``, loaded back
through ``condkit.base.load_base(file, config=folder)`` (diffusers' ``from_single_file``) and
compared with the embedded base weight by weight and image by image.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from original_format import (
    controlnet_to_original,
    save_original,
    text_encoder_to_original,
    unet_to_original,
    vae_to_original,
    write_original_checkpoint,
)

from condkit.base import load_base
from condkit.embedded import EMBEDDED_BASE_DIR
from condkit.errors import UserError

PROMPT = "a red circle on a blue background"


@pytest.fixture
def no_network(monkeypatch):
    """Make any socket connection fail loudly (AssertionError is not turned into a UserError)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a base load tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def embedded():
    return load_base("embedded")


@pytest.fixture(scope="module")
def tiny_safetensors(tmp_path_factory, exported_base):
    """The embedded base as one original-format .safetensors file (written once; tests copy it)."""
    return write_original_checkpoint(exported_base, tmp_path_factory.mktemp("single") / "tiny.safetensors")


@pytest.fixture(scope="module")
def embedded_images(embedded):
    return _generate(embedded)


def _generate(base) -> np.ndarray:
    """Two DDIM steps from a fixed seed: (1, 64, 64, 3) floats in [0, 1]."""
    pipe = base.pipeline()
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="np").images


def _assert_same_weights(module_a, module_b, name: str) -> None:
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys(), name
    differing = [key for key in state_a if not torch.equal(state_a[key], state_b[key])]
    assert not differing, f"{name}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def _assert_same_base(base, reference) -> None:
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        _assert_same_weights(getattr(base, name), getattr(reference, name), name)


def test_embedded_base_loads_offline_from_its_shipped_weights(no_network):
    from safetensors.torch import load_file

    base = load_base("embedded")
    assert base.resolution == 64 and base.vae_scale_factor == 4
    shipped = load_file(str(EMBEDDED_BASE_DIR / "unet" / "diffusion_pytorch_model.safetensors"))
    loaded = base.unet.state_dict()
    assert shipped.keys() == loaded.keys()
    assert all(torch.equal(shipped[key], loaded[key]) for key in shipped)
    assert base.image_encoder is not None and base.feature_extractor is not None
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_exported_folder_loads_like_embedded(no_network, exported_base, embedded):
    base = load_base(exported_base)
    assert base.source == str(exported_base)
    _assert_same_base(base, embedded)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_exactly(
    no_network, tmp_path, exported_base, tiny_safetensors, embedded, embedded_images, suffix
):
    if suffix == ".safetensors":
        checkpoint = tiny_safetensors
    else:
        checkpoint = write_original_checkpoint(exported_base, tmp_path / f"tiny{suffix}")
    base = load_base(checkpoint, config=exported_base)
    assert base.source == str(checkpoint)
    _assert_same_base(base, embedded)
    assert base.vae.config.scaling_factor == embedded.vae.config.scaling_factor
    assert np.array_equal(_generate(base), embedded_images)


def test_single_file_without_config_says_what_to_pass(tiny_safetensors):
    with pytest.raises(UserError) as info:
        load_base(tiny_safetensors)
    message = str(info.value)
    assert str(tiny_safetensors) in message and "base_config" in message and "\n" not in message


def test_single_file_with_missing_config_folder(tmp_path, tiny_safetensors):
    with pytest.raises(UserError, match="nowhere.*no such folder"):
        load_base(tiny_safetensors, config=tmp_path / "nowhere")


def test_truncated_safetensors_is_one_line_user_error(tmp_path, exported_base, tiny_safetensors):
    data = tiny_safetensors.read_bytes()
    checkpoint = tmp_path / "truncated.safetensors"
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as info:
        load_base(checkpoint, config=exported_base)
    assert str(checkpoint) in str(info.value) and "\n" not in str(info.value)


def test_garbage_safetensors_is_one_line_user_error(tmp_path, exported_base):
    checkpoint = tmp_path / "garbage.safetensors"
    checkpoint.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError) as info:
        load_base(checkpoint, config=exported_base)
    assert str(checkpoint) in str(info.value) and "\n" not in str(info.value)


def test_safetensors_without_sd_weights_is_user_error(tmp_path, exported_base):
    # A valid safetensors file that is not an SD checkpoint (e.g. a LoRA passed as the base).
    checkpoint = save_original({"lora_unet_down.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(UserError) as info:
        load_base(checkpoint, config=exported_base)
    assert str(checkpoint) in str(info.value) and "\n" not in str(info.value)


class _CreatesFileWhenUnpickled:
    """A pickle payload: unpickling it calls ``open(path, "w")``, i.e. runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_ckpt_with_code_payload_is_refused_without_running_it(tmp_path, exported_base):
    marker = tmp_path / "payload_ran"
    checkpoint = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": _CreatesFileWhenUnpickled(marker)},
        checkpoint,
    )
    # The payload is live: a plain (unsafe) unpickle does run it.
    torch.load(checkpoint, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UserError) as info:
        load_base(checkpoint, config=exported_base)
    assert not marker.exists()
    assert str(checkpoint) in str(info.value) and "weights-only" in str(info.value)


# --- the converter itself: general layouts, real SD 1.5 key names, stock diffusers loading ---

LAYOUTS = {
    # levels x layers_per_block: the tiny base, SD 1.5's pattern, and attention only at the bottom.
    "3x1": {
        "block_out_channels": (32, 64, 96),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    },
    "4x2": {
        "block_out_channels": (16, 32, 32, 48),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    },
    "2x3": {
        "block_out_channels": (16, 32),
        "layers_per_block": 3,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    },
}


def _assert_same_state(converted: dict, expected: dict) -> None:
    assert converted.keys() == expected.keys(), sorted(set(converted) ^ set(expected))[:5]
    assert all(torch.equal(converted[key], expected[key]) for key in expected)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_converter_inverts_diffusers_single_file_converters(layout):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_controlnet_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    torch.manual_seed(0)
    config = LAYOUTS[layout]
    unet = UNet2DConditionModel(
        sample_size=8, cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4, **config
    )
    original = unet_to_original(unet.state_dict(), unet.config)
    assert all(key.startswith("model.diffusion_model.") for key in original)
    _assert_same_state(convert_ldm_unet_checkpoint(original, unet.config), unet.state_dict())

    controlnet = ControlNetModel.from_unet(unet)
    original = controlnet_to_original(controlnet.state_dict(), controlnet.config)
    _assert_same_state(convert_controlnet_checkpoint(original, controlnet.config), controlnet.state_dict())

    levels = len(config["block_out_channels"])
    vae = AutoencoderKL(
        block_out_channels=config["block_out_channels"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=config["layers_per_block"],
        norm_num_groups=8,
    )
    original = vae_to_original(vae.state_dict(), vae.config)
    width = config["block_out_channels"][-1]
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (width, width, 1, 1)
    _assert_same_state(convert_ldm_vae_checkpoint(original, vae.config), vae.state_dict())


def test_sd15_shaped_models_get_the_real_sd15_key_names():
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # SD 1.5 sizes, no memory
        unet = UNet2DConditionModel(cross_attention_dim=768)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
        controlnet = ControlNetModel(cross_attention_dim=768)
    checkpoint = unet_to_original(unet.state_dict(), unet.config)  # meta tensors with the real shapes
    checkpoint.update(vae_to_original(vae.state_dict(), vae.config))
    checkpoint.update(text_encoder_to_original(text_encoder.state_dict()))
    keys = set(checkpoint)
    # Keys every SD 1.5 checkpoint has (downsamplers, upsamplers after/without attention,
    # channel-changing shortcuts, the VAE's reversed decoder numbering, CLIP's text_model level).
    for key in (
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.11.1.proj_out.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.2.downsample.conv.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.block.2.conv2.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    ):
        assert key in keys, key
    for absent in (
        "model.diffusion_model.input_blocks.12.0.op.weight",
        "first_stage_model.encoder.down.3.downsample.conv.weight",
        "first_stage_model.decoder.up.0.upsample.conv.weight",
    ):
        assert absent not in keys, absent
    assert infer_diffusers_model_type(checkpoint) == "v1"

    control_checkpoint = controlnet_to_original(controlnet.state_dict(), controlnet.config)
    for key in (
        "control_model.input_hint_block.0.weight",
        "control_model.input_hint_block.14.weight",
        "control_model.zero_convs.11.0.weight",
        "control_model.middle_block_out.0.weight",
        "control_model.input_blocks.11.0.in_layers.2.weight",
    ):
        assert key in control_checkpoint, key
    assert infer_diffusers_model_type(control_checkpoint) == "controlnet"


@pytest.mark.parametrize(("prefix", "suffix"), [("control_model.", ".safetensors"), ("", ".pth")])
def test_original_controlnet_file_loads_in_stock_diffusers(no_network, tmp_path, embedded, prefix, suffix):
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(embedded.unet)
    for parameter in controlnet.parameters():  # zero convs start at 0: make every weight distinct
        torch.nn.init.normal_(parameter, std=0.02)
    controlnet.save_pretrained(tmp_path / "config")
    original = controlnet_to_original(controlnet.state_dict(), controlnet.config, prefix=prefix)
    checkpoint = save_original(original, tmp_path / f"control_tiny{suffix}")
    loaded = ControlNetModel.from_single_file(str(checkpoint), config=str(tmp_path / "config"), local_files_only=True)
    _assert_same_weights(loaded, controlnet, "controlnet")
