"""LoRA formats: kohya <-> diffusers lossless, stock diffusers agrees, foreign kohya files import exactly, strict errors."""

import copy

import pytest
import torch
from lora_utils import randomise, sample, stock_pipeline, unet_output
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from condkit.adapters.lora import LoraAdapter, LoraConfig
from condkit.adapters.lora import formats
from condkit.base import load_base
from condkit.cli import main
from condkit.errors import UserError

WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def pristine():
    return load_base("embedded")


@pytest.fixture(scope="module")
def trained(pristine, tmp_path_factory):
    """A condkit LoRA with conv layers, a text-encoder part and alpha != rank, saved; and its base."""
    base = copy.deepcopy(pristine)
    config = LoraConfig(rank=4, alpha=2.0, target_modules="conv", train_text_encoder=True, text_encoder_rank=2, text_encoder_alpha=3.0)
    adapter = LoraAdapter(config)
    adapter.attach(base)
    randomise(adapter, std=0.1)
    folder = tmp_path_factory.mktemp("lora") / "trained"
    adapter.save(folder)
    return folder, base


def _headers(path):
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def test_kohya_round_trip_is_lossless(trained, tmp_path):
    folder, _ = trained
    kohya, back, again = tmp_path / "k.safetensors", tmp_path / "back", tmp_path / "k2.safetensors"
    original_bytes = (folder / WEIGHTS).read_bytes()
    assert main(["convert", str(folder), str(kohya), "--to", "kohya"]) == 0
    assert main(["convert", str(kohya), str(back), "--to", "diffusers"]) == 0
    assert main(["convert", str(back), str(again), "--to", "kohya"]) == 0
    assert (folder / WEIGHTS).read_bytes() == original_bytes  # input untouched

    k = load_file(kohya)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in k
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in k
    assert k["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert k["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 4, 1, 1)
    assert k["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 2.0
    assert k["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 3.0
    meta = _headers(kohya)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1" and '"conv_dim": "4"' in meta["ss_network_args"]

    original, converted = load_file(folder / WEIGHTS), load_file(back / WEIGHTS)
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[key], converted[key]) for key in original)
    k2 = load_file(again)
    assert k.keys() == k2.keys() and all(torch.equal(k[key], k2[key]) for key in k)
    assert _headers(again) == meta


def test_stock_diffusers_same_images_from_both_formats(trained, tmp_path, exported_base):
    folder, base = trained
    kohya = tmp_path / "lora_kohya.safetensors"
    assert main(["convert", str(folder), str(kohya), "--to", "kohya"]) == 0
    from_diffusers = stock_pipeline(exported_base)
    from_diffusers.load_lora_weights(folder)
    from_kohya = stock_pipeline(exported_base)
    from_kohya.load_lora_weights(str(tmp_path), weight_name=kohya.name)
    images = sample(from_diffusers)
    assert (sample(from_kohya) == images).all()
    assert (sample(base.pipeline()) == images).all()
    # condkit loads the kohya file to the same model too
    again = copy.deepcopy(load_base("embedded"))
    LoraAdapter.load(kohya, again)
    assert torch.equal(unet_output(again), unet_output(base))


def _foreign_kohya(base) -> dict[str, torch.Tensor]:
    """A kohya file built by hand: attention, ff, 1x1/3x3 conv, time_emb_proj, text encoder; alpha != rank, one alpha missing."""
    g = torch.Generator().manual_seed(7)
    unet, te = base.unet, base.text_encoder
    spec = {
        # kohya name: (module, rank, alpha or None)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k, 4, 2.0),
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2": (unet.up_blocks[1].attentions[0].transformer_blocks[0].ff.net[2], 8, 4.0),
        "lora_unet_mid_block_attentions_0_proj_in": (unet.mid_block.attentions[0].proj_in, 4, None),
        "lora_unet_down_blocks_0_resnets_0_conv1": (unet.down_blocks[0].resnets[0].conv1, 2, 1.0),
        "lora_unet_down_blocks_0_downsamplers_0_conv": (unet.down_blocks[0].downsamplers[0].conv, 4, 16.0),
        "lora_unet_down_blocks_1_resnets_0_time_emb_proj": (unet.down_blocks[1].resnets[0].time_emb_proj, 4, 4.0),
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj": (te.encoder.layers[1].self_attn.q_proj if not hasattr(te, "text_model") else te.text_model.encoder.layers[1].self_attn.q_proj, 4, 8.0),
    }
    tensors = {}
    for name, (module, rank, alpha) in spec.items():
        if isinstance(module, torch.nn.Linear):
            down, up = (rank, module.in_features), (module.out_features, rank)
        else:
            down, up = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        tensors[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.1
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def _expected_delta(tensors, name):
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    rank = down.shape[0]
    alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else rank
    if down.ndim == 2:
        return alpha / rank * up @ down
    return alpha / rank * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


def test_foreign_kohya_file_imports_exactly(pristine, tmp_path):
    base = copy.deepcopy(pristine)
    tensors = _foreign_kohya(base)
    path = tmp_path / "foreign.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    before = {name: module.weight.detach().clone() for name, module in base.unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    before_te = base.text_encoder.state_dict()["encoder.layers.1.self_attn.q_proj.weight"].clone()
    adapter = LoraAdapter.load(path, base, name="foreign")
    lora_images = sample(base.pipeline())
    adapter.fuse()
    table = formats.kohya_name_table({"unet": base.unet, "text_encoder": base.text_encoder})
    for name in {k.split(".")[0] for k in tensors}:
        component, module_path = table[name]
        model = base.unet if component == "unet" else base.text_encoder
        layer = model.get_submodule(formats.model_path(model, component, module_path))
        assert type(layer) in (torch.nn.Linear, torch.nn.Conv2d)  # fused: the merged plain layer, no peft wrapper
        original = before[module_path] if component == "unet" else before_te
        delta = layer.weight.detach().double() - original.double()
        torch.testing.assert_close(delta, _expected_delta(tensors, name), rtol=1e-5, atol=1e-6)
    adapter.unfuse()
    assert not (sample(base.pipeline()) != lora_images).any()
    # Not compared with stock diffusers here: 0.42.1 drops per-module kohya alphas on
    # attention layers (its alpha_pattern keys keep ".processor.to_k_lora.down.weight")
    # and cannot read a text-encoder LoRA without out_proj. Files with one alpha per
    # component load identically in both (test_stock_diffusers_same_images_from_both_formats).


def test_unmatched_kohya_keys_are_listed(pristine, tmp_path):
    tensors = _foreign_kohya(pristine)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_made_up_layer.alpha"] = torch.tensor(1.0)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UserError) as error:
        LoraAdapter.load(path, copy.deepcopy(pristine))
    message = str(error.value)
    assert "2 LoRA key(s) match no module" in message
    assert "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight" in message and "lora_unet_made_up_layer.alpha" in message
    assert "\n" not in message


def test_unmatched_diffusers_keys_are_listed(trained, pristine, tmp_path):
    folder, _ = trained
    tensors = load_file(folder / WEIGHTS)
    tensors["unet.down_blocks.7.attentions.0.proj_in.lora.down.weight"] = torch.zeros(4, 8)
    tensors["unet.down_blocks.7.attentions.0.proj_in.lora.up.weight"] = torch.zeros(8, 4)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path), metadata=_headers(folder / WEIGHTS))
    with pytest.raises(UserError, match=r"2 LoRA key\(s\) match no module of this base: unet\.down_blocks\.7"):
        LoraAdapter.load(path, copy.deepcopy(pristine))


def test_lora_for_another_base_names_module_and_shapes(pristine, tmp_path):
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "sd15.safetensors"
    save_file(tensors, str(path))
    base = copy.deepcopy(pristine)
    with pytest.raises(UserError) as error:
        LoraAdapter.load(path, base)
    message = str(error.value)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in message
    assert "(4, 320)" in message and "(4, 32)" in message and "(32, 32)" in message
    assert not hasattr(base.unet, "peft_config")  # nothing half-loaded


def test_dora_refuses_kohya_and_describe_reports(trained, pristine, tmp_path):
    base = copy.deepcopy(pristine)
    adapter = LoraAdapter(LoraConfig(rank=2, use_dora=True))
    adapter.attach(base)
    adapter.save(tmp_path / "dora")
    assert main(["convert", str(tmp_path / "dora"), str(tmp_path / "d.safetensors"), "--to", "kohya"]) == 2
    assert not (tmp_path / "d.safetensors").exists()
    folder, _ = trained
    info = LoraAdapter.describe(folder)
    assert info["format"] == "diffusers" and info["unet"]["ranks"] == [4] and info["unet"]["alphas"] == [2.0]
    assert info["text_encoder"]["ranks"] == [2] and info["unet"]["conv_modules"] > 0


def test_convert_refuses_to_overwrite(trained, tmp_path, capsys):
    folder, _ = trained
    out = tmp_path / "k.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert", str(folder), str(out), "--to", "kohya"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["convert", str(folder), str(out), "--to", "kohya", "--overwrite"]) == 0
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in load_file(out)
    assert main(["convert", str(folder), str(tmp_path / "folder"), "--to", "kohya"]) == 2


def test_sd15_kohya_names_convert_without_a_base(tmp_path):
    """kohya names of a real SD 1.5 LoRA (blocks the embedded base lacks) map to diffusers module paths."""
    names = {
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k": ((4, 768), (1280, 4)),
        "lora_unet_up_blocks_3_attentions_2_proj_out": ((4, 320, 1, 1), (320, 4, 1, 1)),
        "lora_unet_down_blocks_3_resnets_1_conv2": ((4, 1280, 3, 3), (1280, 4, 1, 1)),
        "lora_unet_up_blocks_0_upsamplers_0_conv": ((4, 1280, 3, 3), (1280, 4, 1, 1)),
        "lora_te_text_model_encoder_layers_11_mlp_fc2": ((4, 3072), (768, 4)),
    }
    tensors = {}
    for name, (down, up) in names.items():
        tensors[f"{name}.lora_down.weight"] = torch.full(down, 0.01)
        tensors[f"{name}.lora_up.weight"] = torch.full(up, 0.02)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(tmp_path / "sd15.safetensors"))
    assert main(["convert", str(tmp_path / "sd15.safetensors"), str(tmp_path / "out"), "--to", "diffusers"]) == 0
    keys = set(load_file(tmp_path / "out" / WEIGHTS))
    assert "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.lora_A.weight" in keys
    assert "unet.up_blocks.3.attentions.2.proj_out.lora_B.weight" in keys
    assert "unet.up_blocks.0.upsamplers.0.conv.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.11.mlp.fc2.lora_A.weight" in keys
    alphas = formats.read_diffusers(load_file(tmp_path / "out" / WEIGHTS), _headers(tmp_path / "out" / WEIGHTS), "x").modules
    assert {m.alpha for m in alphas} == {1.0} and {m.rank for m in alphas} == {4}
