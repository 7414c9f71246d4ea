"""LoRA adapter: zero init, scale, several LoRAs, fuse/unfuse, detach, save/load, stock diffusers."""

import copy
import json

import pytest
import torch
from lora_utils import randomise, sample, stock_pipeline, text_output, unet_output

from condkit.adapters.lora import LoraAdapter, LoraConfig
from condkit.base import load_base
from condkit.errors import UserError


@pytest.fixture(scope="module")
def pristine():
    """The embedded base, loaded once; tests work on copies."""
    return load_base("embedded")


@pytest.fixture(scope="module")
def pristine_unet_output(pristine):
    return unet_output(pristine)


@pytest.fixture
def base(pristine):
    return copy.deepcopy(pristine)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(rank=4, alpha=2.0, train_text_encoder=True),
        LoraConfig(rank=2, target_modules="conv", init="gaussian", dropout=0.1),
        LoraConfig(rank=3, target_modules="all_linear"),
    ],
    ids=["attention+te", "conv-gaussian", "all_linear"],
)
def test_fresh_lora_equals_base_bit_exactly(base, config):
    before_unet, before_text = unet_output(base), text_output(base)
    adapter = LoraAdapter(config)
    adapter.attach(base)
    base.unet.eval()
    assert torch.equal(unet_output(base), before_unet)
    assert torch.equal(text_output(base), before_text)
    assert all(p.requires_grad for p in adapter.trainable_parameters())
    # B is zero, A is not: the update starts at zero but gets gradients.
    ups = [p for n, p in base.unet.named_parameters() if "lora_B" in n]
    downs = [p for n, p in base.unet.named_parameters() if "lora_A" in n]
    assert ups and all(torch.count_nonzero(p) == 0 for p in ups)
    assert all(torch.count_nonzero(p) > 0 for p in downs)


def test_targets_and_parameter_groups(base):
    adapter = LoraAdapter(LoraConfig(rank=4, target_modules="attention+proj", train_text_encoder=True, text_encoder_rank=2))
    adapter.attach(base)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in base.unet.named_parameters() if ".lora_A." in n}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"to_q", "to_k", "to_v", "0", "proj_in", "proj_out"}
    groups = adapter.parameter_groups(1e-4, 5e-6)
    assert [(g["name"], g["lr"]) for g in groups] == [("lora_unet", 1e-4), ("lora_text_encoder", 5e-6)]
    te_ranks = {p.shape[0] for n, p in base.text_encoder.named_parameters() if ".lora_A." in n}
    assert te_ranks == {2}
    assert sum(len(g["params"]) for g in groups) == len(adapter.trainable_parameters())


def test_unknown_target_module_is_a_user_error(base):
    with pytest.raises(UserError, match="adapter.target_modules"):
        LoraAdapter(LoraConfig(target_modules=["no_such_layer"])).attach(base)


@pytest.mark.parametrize(
    "options, key",
    [({"rank": 0}, "adapter.rank"), ({"alpha": -1}, "adapter.alpha"), ({"dropout": 1.0}, "adapter.dropout"),
     ({"target_modules": "everything"}, "adapter.target_modules"), ({"init": "zeros"}, "adapter.init")],
)
def test_config_validation_names_the_key(options, key):
    with pytest.raises(UserError, match=key):
        LoraConfig(**options)


def _linear_layer(base):
    return base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q


def test_scale_zero_is_base_and_scale_is_linear_on_a_layer(base):
    before = unet_output(base)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    layer = _linear_layer(base)
    with torch.no_grad():
        plain = layer(x)
    adapter = LoraAdapter(LoraConfig(rank=4, alpha=8.0))
    adapter.attach(base)
    randomise(adapter)
    layer = _linear_layer(base)  # now peft's lora.Linear around it
    with torch.no_grad():
        full = layer(x)
        adapter.set_scale(0.0)
        assert torch.equal(layer(x), plain)
        adapter.set_scale(0.25)
        quarter = layer(x)
    assert not torch.allclose(full, plain)
    torch.testing.assert_close(quarter, plain + 0.25 * (full - plain), rtol=0, atol=1e-6)
    adapter.set_scale(0.0)
    assert torch.equal(unet_output(base), before)


def test_two_loras_with_weights_sum_on_a_linear_layer(base):
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    plain = _linear_layer(base)
    weight = plain.weight.detach().clone()  # (32, 32); attention q has no bias
    first, second = LoraAdapter(LoraConfig(rank=4, alpha=2.0), name="first"), LoraAdapter(LoraConfig(rank=2, alpha=4.0), name="second")
    first.attach(base)
    randomise(first, seed=1)
    second.attach(base)
    randomise(second, seed=2)
    first.set_scale(0.5)
    second.set_scale(-1.5)
    layer = q = _linear_layer(base)  # peft lora.Linear
    delta_first = 2.0 / 4 * q.lora_B["first"].weight @ q.lora_A["first"].weight
    delta_second = 4.0 / 2 * q.lora_B["second"].weight @ q.lora_A["second"].weight
    expected = x @ (weight + 0.5 * delta_first - 1.5 * delta_second).T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert set(q.active_adapters) == {"first", "second"}


def test_frozen_lora_stays_frozen_next_to_a_trained_one(base, pristine, tmp_path):
    trained = LoraAdapter(LoraConfig(rank=2))
    trained.attach(base)
    randomise(trained)
    trained.save(tmp_path / "a")
    fresh = copy.deepcopy(pristine)
    frozen = LoraAdapter.load(tmp_path / "a", fresh, name="frozen")
    new = LoraAdapter(LoraConfig(rank=2), name="new")
    new.attach(fresh)
    frozen_params = [p for g in frozen.parameter_groups(1.0, 1.0) for p in g["params"]]
    assert frozen_params and not any(p.requires_grad for p in frozen_params)
    assert all(p.requires_grad for p in new.trainable_parameters())
    trainable = {id(p) for p in fresh.unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in new.trainable_parameters()}
    # both active: the frozen one still changes the output
    assert torch.equal(unet_output(fresh), unet_output(base))


def test_fuse_then_unfuse_restores_the_base_bit_exactly(base):
    weights_before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    adapter = LoraAdapter(LoraConfig(rank=4, alpha=3.0, target_modules="conv"))
    adapter.attach(base)
    randomise(adapter)
    adapter.set_scale(0.7)
    unfused = unet_output(base)
    adapter.fuse()
    torch.testing.assert_close(unet_output(base), unfused, rtol=0, atol=1e-4)
    fused_conv = base.unet.down_blocks[0].resnets[0].conv1
    assert type(fused_conv) is torch.nn.Conv2d  # peft's wrapper is out of the forward path while fused
    assert not torch.equal(fused_conv.weight, weights_before["down_blocks.0.resnets.0.conv1.weight"])
    adapter.unfuse()
    assert torch.equal(unet_output(base), unfused)
    adapter.detach()
    after = base.unet.state_dict()
    assert after.keys() == weights_before.keys()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())


def test_two_fused_loras_match_unfused_and_unfuse_in_reverse_order(base, tmp_path):
    weights_before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    first, second = LoraAdapter(LoraConfig(rank=2), name="first"), LoraAdapter(LoraConfig(rank=3), name="second")
    first.attach(base)
    second.attach(base)
    randomise(first, seed=3)
    randomise(second, seed=4)
    first.set_scale(0.5)
    both = unet_output(base)
    first.fuse()
    second.fuse()
    torch.testing.assert_close(unet_output(base), both, rtol=0, atol=1e-4)
    saved = second.save(tmp_path / "second")  # saving while fused sees the LoRA layers
    assert saved[0].is_file()
    with pytest.raises(UserError, match="unfuse LoRA 'second' first"):
        first.unfuse()
    second.unfuse()
    first.unfuse()
    assert torch.equal(unet_output(base), both)
    first.detach()
    second.detach()
    after = base.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())


def test_detach_one_of_two_keeps_the_other(base):
    before = unet_output(base)
    first, second = LoraAdapter(LoraConfig(rank=2), name="first"), LoraAdapter(LoraConfig(rank=2), name="second")
    first.attach(base)
    randomise(first, seed=3)
    only_first = unet_output(base)
    second.attach(base)
    randomise(second, seed=4)
    second.detach()
    assert torch.equal(unet_output(base), only_first)
    first.detach()
    assert torch.equal(unet_output(base), before)
    assert not hasattr(base.unet, "peft_config") or not base.unet.peft_config


def test_save_load_round_trip_is_exact(base, pristine, pristine_unet_output, tmp_path):
    config = LoraConfig(rank=4, alpha=2.0, target_modules="conv", train_text_encoder=True, text_encoder_rank=2, text_encoder_alpha=5.0)
    adapter = LoraAdapter(config)
    adapter.attach(base)
    randomise(adapter)
    files = adapter.save(tmp_path / "out")
    assert [f.name for f in files] == ["pytorch_lora_weights.safetensors", "condkit_adapter.json", "README.md"]
    described = json.loads((tmp_path / "out" / "condkit_adapter.json").read_text())
    assert described["kind"] == "lora" and described["config"]["rank"] == 4
    assert "load_lora_weights" in (tmp_path / "out" / "README.md").read_text()
    fresh = copy.deepcopy(pristine)
    loaded = LoraAdapter.load(tmp_path / "out", fresh)
    assert loaded.config == config
    assert torch.equal(unet_output(fresh), unet_output(base))
    assert torch.equal(text_output(fresh), text_output(base))
    assert not torch.equal(unet_output(fresh), pristine_unet_output)


def test_stock_load_lora_weights_gives_condkit_images(base, tmp_path, exported_base):
    adapter = LoraAdapter(LoraConfig(rank=4, alpha=6.0, target_modules="attention+ff", train_text_encoder=True))
    adapter.attach(base)
    randomise(adapter, std=0.1)
    adapter.save(tmp_path / "out")
    condkit_images = sample(base.pipeline())
    stock = stock_pipeline(exported_base)
    plain = sample(stock)
    stock.load_lora_weights(tmp_path / "out")
    stock_images = sample(stock)
    assert not (abs(stock_images - plain).max() < 1e-3)  # the LoRA does something
    assert (stock_images == condkit_images).all()


def test_dora_round_trip_through_stock_diffusers(base, pristine, tmp_path, exported_base):
    before = unet_output(base)
    adapter = LoraAdapter(LoraConfig(rank=2, use_dora=True))
    adapter.attach(base)
    base.unet.eval()
    # DoRA's magnitude starts at |W|, so the output matches the base up to float rounding only.
    torch.testing.assert_close(unet_output(base), before, rtol=0, atol=1e-5)
    randomise(adapter)
    adapter.save(tmp_path / "dora")
    fresh = copy.deepcopy(pristine)
    LoraAdapter.load(tmp_path / "dora", fresh)
    assert torch.equal(unet_output(fresh), unet_output(base))
    stock = stock_pipeline(exported_base)
    stock.load_lora_weights(tmp_path / "dora")
    assert (sample(stock) == sample(base.pipeline())).all()
