"""LoHa and LoKr kinds: fresh == base bit for bit, exact save/load, and files checked against LyCORIS itself.

The ``lycoris-lora`` package (a test dependency) is an independent implementation: a file
condkit writes must give LyCORIS's output when ``create_network_from_weights`` loads it,
and a file LyCORIS writes (``create_network(..., algo=...)``, random weights) must give
LyCORIS's output when condkit loads it. Tiny U-Net and CLIP text encoder built from configs.
"""

from __future__ import annotations

import copy
import logging
import types

import pytest
import torch

from condkit.adapters.loha import LohaAdapter, LohaConfig
from condkit.adapters.lokr import LokrAdapter, LokrConfig
from condkit.adapters.registry import detect_kind
from condkit.base import BaseModel
from condkit.errors import UserError

lycoris_kohya = pytest.importorskip("lycoris.kohya")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

TOLERANCE = 1e-4


def tiny_models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A two-level U-Net (linear, 1x1 and 3x3 conv layers) and a two-layer CLIP text encoder, seeded."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
        sample_size=8, attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100))
    return unet.eval(), text_encoder.eval()


@pytest.fixture(scope="module")
def pristine():
    return tiny_models()


@pytest.fixture
def base(pristine):
    unet, text_encoder = copy.deepcopy(pristine)
    vae = types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=(32,)))  # resolution for fingerprint()
    return BaseModel(source="tiny", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=None, scheduler=None)


def unet_out(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 7, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), text).sample


def text_out(text_encoder) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.tensor([[0, 5, 17, 42, 99, 3, 1]]))[0]


def randomise(adapter, std: float = 0.2, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


CONFIGS = [
    (LohaAdapter, LohaConfig(rank=4, alpha=2.0, target_modules="conv")),
    (LohaAdapter, LohaConfig(rank=3, alpha=6.0, conv_rank=2, conv_alpha=1.0, target_modules="conv", use_effective_conv2d=True)),
    (LokrAdapter, LokrConfig(rank=2, alpha=1.0, target_modules="conv")),
    (LokrAdapter, LokrConfig(rank=2, alpha=4.0, target_modules="conv", decompose_both=True, init="lycoris")),
    (LokrAdapter, LokrConfig(rank=8, alpha=2.0, target_modules="all_linear", decompose_factor=4)),
]
IDS = ["loha-conv", "loha-tucker-convrank", "lokr-conv", "lokr-both", "lokr-factor4-linear"]


@pytest.mark.parametrize("cls, config", CONFIGS, ids=IDS)
def test_fresh_equals_base_bit_for_bit_and_round_trip_is_exact(base, cls, config, tmp_path):
    before = unet_out(base.unet)
    adapter = cls(config)
    adapter.attach(base)
    assert torch.equal(unet_out(base.unet), before)
    params = adapter.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    randomise(adapter)
    trained = unet_out(base.unet)
    assert not torch.allclose(trained, before)
    adapter.save(tmp_path)
    assert detect_kind(tmp_path) == cls.kind and detect_kind(tmp_path / f"{cls.kind}.safetensors") == cls.kind
    adapter.detach()
    assert torch.equal(unet_out(base.unet), before)  # detach restores the base exactly

    loaded = cls.load(tmp_path, base)
    assert loaded.config == config
    assert torch.equal(unet_out(base.unet), trained)
    loaded.set_scale(0.0)
    assert torch.equal(unet_out(base.unet), before)
    loaded.detach()
    # The weight file alone (no condkit_adapter.json) loads the same layers.
    (tmp_path / "condkit_adapter.json").unlink()
    alone = cls.load(tmp_path / f"{cls.kind}.safetensors", base)
    assert torch.equal(unet_out(base.unet), trained)
    assert alone.config.target_modules and alone.kind == cls.kind


def test_alpha_is_independent_of_rank(base):
    """The update scales with alpha / rank: alpha 2 at rank 4 is half of alpha 4 at rank 4, whatever the rank."""
    before = unet_out(base.unet)
    deltas = {}
    for alpha in (2.0, 4.0):
        adapter = LohaAdapter(LohaConfig(rank=4, alpha=alpha, target_modules=["to_q"]))
        adapter.attach(base)
        randomise(adapter, std=0.05)
        layer = next(layer for _, layer in adapter._layers())
        assert layer.scaling[adapter.name] == alpha / 4
        deltas[alpha] = layer.get_delta_weight(adapter.name)
        adapter.detach()
    assert torch.allclose(deltas[4.0], 2 * deltas[2.0])
    assert torch.equal(unet_out(base.unet), before)
    # LoKr with both factors full: alpha is ignored (scale 1), as in LyCORIS.
    adapter = LokrAdapter(LokrConfig(rank=64, alpha=3.0, target_modules=["to_q"]))
    adapter.attach(base)
    layers = [layer for _, layer in adapter._layers()]
    assert all(adapter.name in layer.lokr_w1 and adapter.name in layer.lokr_w2 for layer in layers)
    assert {layer.scaling[adapter.name] for layer in layers} == {1.0}


# ---- cross-checks with LyCORIS ----------------------------------------------------------------
PRESET_CLASS_ATTRIBUTES = (
    "ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME",
)


@pytest.fixture
def sd_preset(monkeypatch):
    """LyCORIS's ``full`` preset without its ``TimestepEmbedding`` target (restored afterwards).

    LyCORIS 4.1.3's default preset targets the ``TimestepEmbedding`` class (for Anima) and the
    names ``time_embedding.linear_1/2``; on a diffusers SD U-Net both select the same layers
    and its network constructor stops with "duplicated lora name: lora_unet_time_embedding_linear_1"
    (``create_network_from_weights`` builds that network too). Presets are class attributes
    in LyCORIS, so they are put back after each test.
    """
    network_class = lycoris_kohya.LycorisNetworkKohya
    for attribute in PRESET_CLASS_ATTRIBUTES:
        monkeypatch.setattr(network_class, attribute, getattr(network_class, attribute))
    preset = dict(lycoris_kohya.PRESET["full"])
    preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
    monkeypatch.setitem(lycoris_kohya.PRESET, "condkit-test-sd", preset)
    network_class.apply_preset(preset)
    return "condkit-test-sd"


def lycoris_network(unet, text_encoder, algo: str, preset: str, **kwargs):
    """LyCORIS's own network (kohya entry point) over the models, random weights, applied."""
    network = lycoris_kohya.create_network(
        1.0, kwargs.pop("dim", 4), kwargs.pop("alpha", 2.0), None, text_encoder, unet, algo=algo, preset=preset, **kwargs
    )
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return network


LYCORIS_MADE = [
    ("loha", {"dim": 4, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0}),
    ("loha", {"dim": 2, "alpha": 1.0, "conv_dim": 3, "conv_alpha": 3.0, "use_tucker": True}),
    ("lokr", {"dim": 2, "alpha": 4.0, "conv_dim": 2, "conv_alpha": 1.0}),
    ("lokr", {"dim": 2, "alpha": 1.0, "decompose_both": True, "factor": 4, "use_tucker": True}),
    ("lokr", {"dim": 100000, "alpha": 1.0, "full_matrix": True}),
]


@pytest.mark.parametrize("algo, options", LYCORIS_MADE, ids=["loha", "loha-tucker", "lokr", "lokr-both-factor4-tucker", "lokr-full"])
def test_lycoris_made_file_loads_into_condkit_with_lycoris_outputs(pristine, base, algo, options, tmp_path, sd_preset):
    unet, text_encoder = copy.deepcopy(pristine)
    network = lycoris_network(unet, text_encoder, algo, sd_preset, **dict(options))
    expected_unet, expected_text = unet_out(unet), text_out(text_encoder)
    file = tmp_path / f"lycoris_{algo}.safetensors"
    network.save_weights(str(file), torch.float32, None)
    assert any(k.startswith("lora_te_encoder_layers_") for k in __import__("safetensors.torch").torch.load_file(file))  # transformers 5 spelling

    before_unet, before_text = unet_out(base.unet), text_out(base.text_encoder)
    assert detect_kind(file) == algo
    cls = {"loha": LohaAdapter, "lokr": LokrAdapter}[algo]
    adapter = cls.load(file, base)
    assert (unet_out(base.unet) - expected_unet).abs().max() <= TOLERANCE
    assert (text_out(base.text_encoder) - expected_text).abs().max() <= TOLERANCE
    assert not torch.allclose(expected_unet, before_unet, atol=1e-3)
    assert not torch.allclose(expected_text, before_text, atol=1e-3)
    info = cls.describe(file)
    assert info["kind"] == algo and info["unet"]["modules"] > 0 and info["text_encoder"]["modules"] > 0
    adapter.detach()
    assert torch.equal(unet_out(base.unet), before_unet) and torch.equal(text_out(base.text_encoder), before_text)


@pytest.mark.parametrize("cls, config", CONFIGS, ids=IDS)
def test_condkit_file_loads_into_lycoris_with_condkit_outputs(pristine, base, cls, config, tmp_path, sd_preset):
    adapter = cls(config)
    adapter.attach(base)
    randomise(adapter)
    expected = unet_out(base.unet)
    adapter.save(tmp_path)

    unet, text_encoder = copy.deepcopy(pristine)
    before = unet_out(unet)
    network, weights = lycoris_kohya.create_network_from_weights(1.0, str(tmp_path / f"{cls.kind}.safetensors"), None, text_encoder, unet)
    assert len(network.unet_loras) == len(adapter.modules())
    network.apply_to(text_encoder, unet, apply_text_encoder=False, apply_unet=True)
    assert (unet_out(unet) - expected).abs().max() <= TOLERANCE
    assert not torch.allclose(expected, before, atol=1e-3)


# ---- bad files -----------------------------------------------------------------------------
def test_bad_files_are_one_line_user_errors(base, tmp_path):
    from safetensors.torch import save_file

    adapter = LokrAdapter(LokrConfig(rank=2, target_modules=["to_q"]))
    adapter.attach(base)
    randomise(adapter)
    tensors, _ = LokrAdapter.write_file(adapter.modules())
    adapter.detach()
    name = next(k for k in tensors if k.endswith(".lokr_w1")).rpartition(".")[0]

    def refused(changed: dict, match: str, cls=LokrAdapter) -> None:
        file = tmp_path / "bad.safetensors"
        save_file({k: v.contiguous() for k, v in changed.items()}, file)
        with pytest.raises(UserError, match=match) as info:
            cls.load(file, base)
        assert "\n" not in str(info.value)

    refused({**tensors, f"{name}.lokr_t1": torch.zeros(2, 2, 1, 1)}, rf"{name}\.lokr_t1: a Tucker core on w1")
    refused({**tensors, f"{name}.dora_scale": torch.ones(32, 1)}, rf"{name}\.dora_scale: LyCORIS DoRA")
    refused({**tensors, "lora_unet_no_such_layer.lokr_w1": torch.zeros(2, 2)}, r"1 lokr key\(s\) match no module.*lora_unet_no_such_layer\.lokr_w1")
    refused({**tensors, f"{name}.lora_down.weight": torch.zeros(2, 32)}, rf"{name}\.lora_down\.weight is a LoRA/LoCon tensor")
    refused({k: (torch.zeros(3, 3) if k == f"{name}.lokr_w1" else v) for k, v in tensors.items()}, rf"{name} does not fit this base.*module weight \(32, 32\)")
    refused({k: v for k, v in tensors.items() if not k.endswith(".lokr_w1")}, r"LoKr w1 needs lokr_w1 or both")
    refused({**tensors, f"{name}.alpha": torch.tensor([1.0, 2.0])}, rf"{name}\.alpha has shape \(2,\)")
    refused({f"{name}.hada_w1_a": torch.zeros(32, 2), f"{name}.hada_w1_b": torch.zeros(2, 32)}, rf"{name}\.hada_w2_a is missing", cls=LohaAdapter)
    with pytest.raises(UserError, match="adapter.dropout"):
        LohaConfig(dropout=0.1)
    with pytest.raises(UserError, match="adapter.decompose_factor"):
        LokrConfig(decompose_factor=0)
    with pytest.raises(UserError, match="adapter.target_modules"):
        LohaAdapter(LohaConfig(target_modules=["no_such_layer"])).attach(base)
