"""ControlNet branch: config checks, zero-init equality, base locked, composition order."""

from __future__ import annotations

import pytest
import torch

from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
from condkit.adapters.controlnet.branch import COPIED_UNET_PARTS, controlnet_from_unet
from condkit.adapters.controlnet.config import default_hint_channels
from condkit.base import load_base
from condkit.errors import UserError


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    return load_base("embedded")


def unet_inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 16, 16, generator=g)  # embedded base: 64 px images, 4x VAE
    timesteps = torch.tensor([17, 731][:batch])
    text = torch.randn(batch, 77, 64, generator=g)
    condition = (torch.rand(batch, 3, 64, 64, generator=g) > 0.8).float()  # edge-like binary map
    return latents, timesteps, text, condition


def copied_weights(controlnet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in controlnet.state_dict().items() if k.split(".")[0] in COPIED_UNET_PARTS}


def add_lora(unet, seed: int = 0):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="style")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # non-zero B: the LoRA really changes the U-Net
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


def test_default_hint_channels_match_vae_factor():
    assert default_hint_channels(8) == (16, 32, 96, 256)  # SD 1.5's hint block
    assert default_hint_channels(4) == (16, 32, 64)
    assert ControlNetConfig().hint_channels(4) == (16, 32, 64)
    assert ControlNetConfig(conditioning_embedding_out_channels=[8, 8, 8]).hint_channels(4) == (8, 8, 8)


@pytest.mark.parametrize(
    "options, key",
    [
        ({"conditioning_channels": 0}, "adapter.conditioning_channels"),
        ({"conditioning_embedding_out_channels": 16}, "adapter.conditioning_embedding_out_channels"),
        ({"conditioning_channel_order": "rbg"}, "adapter.conditioning_channel_order"),
        ({"control_guidance_start": 0.5, "control_guidance_end": 0.5}, "adapter.control_guidance_start"),
        ({"fidelity_metric": "ssim"}, "adapter.fidelity_metric"),
        ({"edge_tolerance": 20}, "adapter.edge_tolerance"),
    ],
)
def test_config_rejects_bad_values(options, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        ControlNetConfig(**options)


def test_hint_channels_must_match_base_factor(base):
    config = ControlNetConfig(conditioning_embedding_out_channels=(16, 32, 96, 256))  # 8x, base is 4x
    with pytest.raises(UserError, match=r"downsamples by 8x but the base's VAE factor is 4x; give 3 entries"):
        ControlNetAdapter(config).attach(base)


def test_zero_init_branch_leaves_base_output_bit_exact(base):
    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(base)
    latents, timesteps, text, condition = unet_inputs()
    with torch.no_grad():
        kwargs = adapter.unet_kwargs(latents, timesteps, text, {"condition": condition})
        alone = base.unet(latents, timesteps, text).sample
        controlled = base.unet(latents, timesteps, text, **kwargs).sample
    assert len(kwargs["down_block_additional_residuals"]) == 6  # 3 blocks x (1 resnet + 1 downsampler/skip) ...
    assert all(torch.count_nonzero(r) == 0 for r in kwargs["down_block_additional_residuals"])
    assert torch.equal(controlled, alone)
    # The equality comes from the zero convolutions alone: a hint encoder with random
    # (non-zero) output still gives exactly the base's output.
    with torch.no_grad():
        torch.nn.init.normal_(adapter.controlnet.controlnet_cond_embedding.conv_out.weight)
        kwargs = adapter.unet_kwargs(latents, timesteps, text, {"condition": condition})
        assert torch.equal(base.unet(latents, timesteps, text, **kwargs).sample, alone)


def test_branch_copies_base_like_diffusers_from_unet(base):
    from diffusers import ControlNetModel

    ours = controlnet_from_unet(base.unet, (16, 32, 64), ControlNetConfig())
    theirs = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32, 64))
    assert ours.config == theirs.config
    mine, reference = copied_weights(ours), copied_weights(theirs)
    assert mine.keys() == reference.keys() and len(mine) > 50
    assert all(torch.equal(mine[k], reference[k]) for k in mine)
    for module in [ours.controlnet_mid_block, *ours.controlnet_down_blocks, ours.controlnet_cond_embedding.conv_out]:
        assert all(torch.count_nonzero(p) == 0 for p in module.parameters())


def test_branch_is_the_same_before_or_after_lora_attach():
    base = load_base("embedded")
    before = controlnet_from_unet(base.unet, (16, 32, 64), ControlNetConfig())
    add_lora(base.unet)
    after = controlnet_from_unet(base.unet, (16, 32, 64), ControlNetConfig())
    first, second = copied_weights(before), copied_weights(after)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # The LoRA is live in the U-Net (so the branch really had to see through it).
    latents, timesteps, text, _ = unet_inputs()
    with torch.no_grad():
        with_lora = base.unet(latents, timesteps, text).sample
        base.unet.disable_adapters()
        without = base.unet(latents, timesteps, text).sample
        base.unet.enable_adapters()
    assert not torch.allclose(with_lora, without)


def test_branch_builds_on_a_unet_carrying_an_ip_adapter():
    from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig

    base = load_base("embedded")
    clean = copied_weights(controlnet_from_unet(base.unet, (16, 32, 64), ControlNetConfig()))
    IPAdapter(IPAdapterConfig()).attach(base)
    assert base.unet.config.encoder_hid_dim_type == "ip_image_proj"
    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(base)
    built = copied_weights(adapter.controlnet)
    assert built.keys() == clean.keys()  # no IP processor weights copied
    assert all(torch.equal(built[k], clean[k]) for k in clean)
    assert adapter.controlnet.config.encoder_hid_dim_type is None


def test_training_step_updates_only_the_branch():
    base = load_base("embedded")
    add_lora(base.unet)  # a frozen LoRA on the same U-Net (composition in training)
    base.freeze()
    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(base)
    frozen_before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    branch_before = {k: v.clone() for k, v in adapter.controlnet.state_dict().items()}
    params = adapter.trainable_parameters()
    assert {id(p) for p in params} == {id(p) for p in adapter.controlnet.parameters()}
    assert all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    latents, timesteps, text, condition = unet_inputs(1)

    def step() -> None:
        optimizer.zero_grad()
        kwargs = adapter.unet_kwargs(latents, timesteps, text, {"condition": condition})
        base.unet(latents, timesteps, text, **kwargs).sample.pow(2).mean().backward()
        optimizer.step()

    step()
    # Step 1: the zero convolutions get gradients (their inputs are the copied encoder's
    # features); everything behind them gets none until they are non-zero.
    changed = [k for k, v in adapter.controlnet.state_dict().items() if not torch.equal(v, branch_before[k])]
    assert any(k.startswith("controlnet_down_blocks") for k in changed)
    assert torch.count_nonzero(adapter.controlnet.controlnet_cond_embedding.conv_out.weight.grad) == 0
    step()
    changed = [k for k, v in adapter.controlnet.state_dict().items() if not torch.equal(v, branch_before[k])]
    assert any(k.startswith("controlnet_cond_embedding.conv_out") for k in changed)
    assert any(k.startswith("down_blocks.0") for k in changed)
    assert all(torch.equal(v, frozen_before[k]) for k, v in base.unet.state_dict().items())


def test_unet_kwargs_rejects_a_condition_of_the_wrong_size(base):
    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(base)
    latents, timesteps, text, _ = unet_inputs()
    with pytest.raises(ValueError, match=r"condition maps \(32, 32\) do not match latents \(16, 16\) x 4"):
        adapter.unet_kwargs(latents, timesteps, text, {"condition": torch.zeros(2, 3, 32, 32)})


def test_encode_extras_names_the_missing_condition(base):
    adapter = ControlNetAdapter(ControlNetConfig(), name="edges")
    with pytest.raises(UserError, match="controlnet edges: the dataset gives no condition maps"):
        adapter.encode_extras({"pixel_values": torch.zeros(1, 3, 64, 64), "caption": ["x"]}, base)


def test_validation_samples_with_a_float32_branch_over_a_bf16_base():
    """Under bf16 training the base is bf16 and the branch float32; validation must still run."""
    from condkit.train.config import ValidationConfig

    base = load_base("embedded").to("cpu", dtype=torch.bfloat16)
    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(base)
    assert adapter.controlnet.dtype == torch.float32
    master = adapter.controlnet.controlnet_cond_embedding.conv_in.weight.clone()
    rows, metrics = adapter.validate(base, ValidationConfig(prompts=["a red circle on a blue background"], num_inference_steps=2), 1)
    assert len(rows) == 1 and [im.size for im in rows[0]] == [(64, 64), (64, 64)]
    assert set(metrics) == {"edge_precision", "edge_recall", "edge_f1"} and 0.0 <= metrics["edge_f1"] <= 1.0
    assert adapter.controlnet.dtype == torch.float32
    assert torch.equal(adapter.controlnet.controlnet_cond_embedding.conv_in.weight, master)
