"""IP-Adapter: attach/detach exactness, key numbering, formats, stock diffusers loading."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
from condkit.adapters.ip_adapter import formats
from condkit.adapters.ip_adapter.adapter import IMAGE_EMBEDS_KEY
from condkit.adapters.registry import detect_kind, load_adapter
from condkit.base import load_base
from condkit.embedded import EMBEDDED_BASE_DIR
from condkit.errors import UserError


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    return load_base("embedded")


@pytest.fixture
def attached(base):
    """A fresh base-variant adapter with distinct random weights per layer, detached afterwards."""
    adapter = IPAdapter(IPAdapterConfig())
    adapter.attach(base)
    perturb(adapter, seed=0)
    yield adapter
    adapter.detach()


def perturb(adapter: IPAdapter, seed: int) -> None:
    """Give every trainable weight its own random offset, so layer mix-ups show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def unet_inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)  # (b, 4, 16, 16)
    timesteps = torch.tensor([50, 700][:batch])
    text = torch.randn(batch, 77, 64, generator=generator)  # (b, 77, 64)
    return latents, timesteps, text


def references(count: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, 64, 64) images in [0, 1] quantised to 8 bits, like loaded PNGs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 64, 64), generator=generator).float() / 255


def reference_image(colour: tuple[int, int, int]) -> Image.Image:
    array = np.zeros((64, 64, 3), np.uint8)
    array[:] = colour
    array[16:48, 16:48] = (255 - np.array(colour)) // 2
    return Image.fromarray(array)


@torch.no_grad()
def run_unet(base, adapter=None, refs=None):
    latents, timesteps, text = unet_inputs(len(refs) if refs is not None else 2)
    kwargs = {}
    if adapter is not None:
        extras = adapter.encode_extras({"reference": refs}, base)
        kwargs = adapter.unet_kwargs(latents, timesteps, text, extras)
    return base.unet(latents, timesteps, text, **kwargs).sample


# ---- config -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, needle",
    [
        ({"variant": "large"}, "adapter.variant"),
        ({"num_tokens": 8}, "adapter.num_tokens = 8"),
        ({"drop_image": 0.5, "drop_text": 0.4, "drop_both": 0.2}, "drop_image + drop_text + drop_both"),
        ({"scale": -1.0}, "adapter.scale"),
        ({"layer_scales": {"middle": 1.0}}, "adapter.layer_scales"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(options, needle):
    with pytest.raises(UserError, match=needle.replace("+", r"\+")):
        IPAdapterConfig(**options)


def test_config_resolves_token_defaults():
    assert IPAdapterConfig().tokens == 4
    assert IPAdapterConfig(variant="plus").tokens == 16
    assert IPAdapterConfig(variant="plus", num_tokens=8).tokens == 8


# ---- attach / detach ----------------------------------------------------------------
def test_fresh_ip_weights_start_from_the_layers_text_projections(base):
    adapter = IPAdapter(IPAdapterConfig())
    adapter.attach(base)
    try:
        for name, processor in adapter.processors.items():
            attn = base.unet.get_submodule(name.removesuffix(".processor"))
            assert torch.equal(processor.to_k_ip[0].weight, attn.to_k.weight)
            assert torch.equal(processor.to_v_ip[0].weight, attn.to_v.weight)
        # Only the projection and the *_ip weights train.
        trainable = {id(p) for p in adapter.trainable_parameters()}
        expected = {id(p) for p in adapter.image_projection.parameters()}
        expected |= {id(p) for proc in adapter.processors.values() for p in proc.parameters()}
        assert trainable == expected
        assert not any(id(p) in trainable for p in base.text_encoder.parameters())
        assert not any(id(p) in trainable for p in base.image_encoder.parameters())
    finally:
        adapter.detach()


def test_scale_zero_and_detach_reproduce_the_base_bit_exactly(base):
    original = dict(base.unet.attn_processors)
    before = run_unet(base)
    adapter = IPAdapter(IPAdapterConfig())
    adapter.attach(base)
    perturb(adapter, seed=3)
    refs = references(2)
    active = run_unet(base, adapter, refs)
    assert (active - before).abs().max() > 1e-3  # the image branch does something
    adapter.set_scale(0.0)
    assert torch.equal(run_unet(base, adapter, refs), before)
    adapter.detach()
    assert torch.equal(run_unet(base), before)
    assert base.unet.encoder_hid_proj is None and base.unet.config.encoder_hid_dim_type is None
    assert all(base.unet.attn_processors[n] is p for n, p in original.items())


def test_a_second_ip_adapter_on_the_same_base_is_refused(base, attached):
    with pytest.raises(UserError, match="encoder_hid_proj"):
        IPAdapter(IPAdapterConfig()).attach(base)


def test_layer_scales_follow_diffusers_block_names(base):
    config = IPAdapterConfig(scale=0.5, layer_scales={"up": {"block_1": 2.0}})
    adapter = IPAdapter(config)
    adapter.attach(base)
    try:
        scales = {name: proc.scale[0] for name, proc in adapter.processors.items()}
        assert {n: s for n, s in scales.items() if n.startswith("up_blocks.1.")} and all(
            s == 1.0 for n, s in scales.items() if n.startswith("up_blocks.1.")
        )
        assert all(s == 0.0 for n, s in scales.items() if not n.startswith("up_blocks.1."))
        adapter.set_scale(1.0)
        assert all(proc.scale[0] == 2.0 for n, proc in adapter.processors.items() if n.startswith("up_blocks.1."))
    finally:
        adapter.detach()


# ---- training hooks -----------------------------------------------------------------
def test_encode_extras_defaults_to_the_target_image(base, attached):
    refs = references(2)
    from_reference = attached.encode_extras({"reference": refs, "pixel_values": refs * 2 - 1}, base)
    from_target = attached.encode_extras({"pixel_values": refs * 2 - 1}, base)
    assert from_reference[IMAGE_EMBEDS_KEY].shape == (2, 64)
    torch.testing.assert_close(from_reference[IMAGE_EMBEDS_KEY], from_target[IMAGE_EMBEDS_KEY])


def test_joint_condition_dropout_rates_and_dropped_image_is_zero(base):
    from condkit.families import Conditioning

    adapter = IPAdapter(IPAdapterConfig(drop_image=0.1, drop_text=0.2, drop_both=0.3))
    adapter.attach(base)
    try:
        n = 4000
        text = torch.ones(n, 77, 64)
        empty = torch.zeros(1, 77, 64)
        extras = {IMAGE_EMBEDS_KEY: torch.ones(n, 64)}
        new_text, new_extras = adapter.drop_conditions(Conditioning(text), extras, Conditioning(empty), 0.0, torch.Generator().manual_seed(0))
        text_dropped = new_text.encoder_hidden_states[:, 0, 0] == 0
        image_dropped = (new_extras[IMAGE_EMBEDS_KEY] == 0).all(dim=1)
        assert not (new_extras[IMAGE_EMBEDS_KEY][~image_dropped] == 0).any()  # whole embeddings only
        rates = {
            "image only": (image_dropped & ~text_dropped).float().mean().item(),
            "text only": (text_dropped & ~image_dropped).float().mean().item(),
            "both": (text_dropped & image_dropped).float().mean().item(),
        }
        for (key, rate), expected in zip(rates.items(), (0.1, 0.2, 0.3)):
            assert abs(rate - expected) < 0.03, (key, rate)
    finally:
        adapter.detach()


def test_one_training_step_moves_only_the_adapter(base, attached):
    refs = references(2)
    latents, timesteps, text = unet_inputs()
    extras = attached.encode_extras({"reference": refs}, base)
    frozen_before = {n: p.detach().clone() for n, p in base.unet.named_parameters() if "processor" not in n and "encoder_hid_proj" not in n}
    params = attached.trainable_parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    prediction = base.unet(latents, timesteps, text, **attached.unet_kwargs(latents, timesteps, text, extras)).sample
    prediction.pow(2).mean().backward()
    optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(p, frozen_before[n]) for n, p in base.unet.named_parameters() if n in frozen_before)
    optimizer.zero_grad()


# ---- formats ------------------------------------------------------------------------
def test_export_numbers_cross_attention_layers_1_3_5_in_attn_processors_order(base, attached, tmp_path):
    attached.save(tmp_path)
    flat = formats.read_state_dicts(tmp_path / formats.WEIGHT_NAME)
    attached.detach()
    names = [n for n in base.unet.attn_processors if n.endswith("attn2.processor")]
    assert sorted(int(k.split(".")[0]) for k in flat["ip_adapter"] if k.endswith("to_k_ip.weight")) == list(range(1, 2 * len(names), 2))
    # In the original file every processor had an index and only attn2 ones had weights.
    all_names = list(base.unet.attn_processors)
    for name in names:
        key = all_names.index(name)
        assert torch.equal(flat["ip_adapter"][f"{key}.to_k_ip.weight"], attached.processors[name].to_k_ip[0].weight)
        assert torch.equal(flat["ip_adapter"][f"{key}.to_v_ip.weight"], attached.processors[name].to_v_ip[0].weight)
    assert set(flat["image_proj"]) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    # diffusers' own converter puts each weight back on the layer it came from.
    _, rebuilt = formats.build_modules(base.unet, flat, "export")
    for name, processor in rebuilt.items():
        assert torch.equal(processor.to_k_ip[0].weight, attached.processors[name].to_k_ip[0].weight)
    attached.attach(base)  # the fixture detaches


def test_save_load_round_trip_is_exact(base, attached, tmp_path):
    refs = references(2)
    expected = run_unet(base, attached, refs)
    attached.save(tmp_path / "out")
    attached.detach()
    assert detect_kind(tmp_path / "out") == "ip_adapter"
    loaded = load_adapter(tmp_path / "out", base)
    try:
        assert isinstance(loaded, IPAdapter)
        assert torch.equal(run_unet(base, loaded, refs), expected)
        description = json.loads((tmp_path / "out" / "condkit_adapter.json").read_text())
        assert description["kind"] == "ip_adapter" and description["config"]["variant"] == "base"
    finally:
        loaded.detach()
    attached.attach(base)


def test_stock_diffusers_load_ip_adapter_gives_the_same_images(base, attached, tmp_path):
    from diffusers import StableDiffusionPipeline

    from condkit.generate import build_pipeline

    attached.save(tmp_path)
    reference = reference_image((200, 40, 40))
    settings = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="np")
    pipe, call = build_pipeline(base, [attached], {"ip_images": [reference]})
    ours = pipe("a shape", generator=torch.Generator().manual_seed(0), **call, **settings).images
    stock = StableDiffusionPipeline.from_pretrained(
        EMBEDDED_BASE_DIR, image_encoder=None, feature_extractor=None, safety_checker=None, requires_safety_checker=False
    )
    stock.set_progress_bar_config(disable=True)
    stock.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder="image_encoder")
    assert stock.image_encoder is not None  # came from OUT/image_encoder
    theirs = stock("a shape", ip_adapter_image=reference, generator=torch.Generator().manual_seed(0), **settings).images
    np.testing.assert_array_equal(ours, theirs)
    attached.set_scale(0.0)
    without = pipe("a shape", generator=torch.Generator().manual_seed(0), **call, **settings).images
    assert np.abs(without - ours).max() > 1e-3


def test_original_bin_layout_imports_like_diffusers(base, tmp_path):
    """An ``ip-adapter_sd15.bin``-layout pickle and its flat .safetensors give diffusers' result."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(5)
    names = formats.cross_attention_names(base.unet)
    ip_layers = {}
    for index, name in enumerate(names):
        attn = base.unet.get_submodule(name.removesuffix(".processor"))
        shape = tuple(attn.to_k.weight.shape)
        ip_layers[f"{2 * index + 1}.to_k_ip.weight"] = torch.randn(shape, generator=generator) * 0.2
        ip_layers[f"{2 * index + 1}.to_v_ip.weight"] = torch.randn(shape, generator=generator) * 0.2
    image_proj = {
        "proj.weight": torch.randn(4 * 64, 64, generator=generator) * 0.1,
        "proj.bias": torch.randn(4 * 64, generator=generator) * 0.1,
        "norm.weight": torch.rand(64, generator=generator) + 0.5,
        "norm.bias": torch.randn(64, generator=generator) * 0.1,
    }
    torch.save({"image_proj": image_proj, "ip_adapter": ip_layers}, tmp_path / "ip-adapter_tiny.bin")
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()} | {f"ip_adapter.{k}": v for k, v in ip_layers.items()}
    save_file(flat, tmp_path / "ip-adapter_tiny.safetensors")

    reference = references(2)
    stock_unet = copy.deepcopy(base.unet)  # a plain diffusers U-Net, loaded by diffusers' own code below
    stock_unet._load_ip_adapter_weights({"image_proj": image_proj, "ip_adapter": ip_layers})
    adapter_for_embeds = IPAdapter(IPAdapterConfig())
    adapter_for_embeds.attach(base)
    embeds = adapter_for_embeds.encode_extras({"reference": reference}, base)[IMAGE_EMBEDS_KEY]
    adapter_for_embeds.detach()
    latents, timesteps, text = unet_inputs()
    with torch.no_grad():
        expected = stock_unet(latents, timesteps, text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample

    for file in ("ip-adapter_tiny.bin", "ip-adapter_tiny.safetensors"):
        assert IPAdapter.can_load(tmp_path / file)
        adapter = IPAdapter.load(tmp_path / file, base)
        try:
            torch.testing.assert_close(run_unet(base, adapter, reference), expected, rtol=0, atol=1e-6)
        finally:
            adapter.detach()
    assert IPAdapter.describe(tmp_path / "ip-adapter_tiny.bin")["format"] == "original pickle"


def test_plus_variant_exports_and_reimports_through_diffusers_converter(base, tmp_path):
    adapter = IPAdapter(IPAdapterConfig(variant="plus"))
    adapter.attach(base)
    try:
        perturb(adapter, seed=7)
        refs = references(2)
        extras = adapter.encode_extras({"reference": refs}, base)
        assert extras[IMAGE_EMBEDS_KEY].shape == (2, 65, 64)  # penultimate hidden states: 64 patches + CLS
        expected = run_unet(base, adapter, refs)
        adapter.save(tmp_path)
        original_state = {k: v.clone() for k, v in adapter.image_projection.state_dict().items()}
    finally:
        adapter.detach()
    state = formats.read_state_dicts(tmp_path / formats.WEIGHT_NAME)
    assert state["image_proj"]["latents"].shape == (1, 16, 64)
    assert "layers.0.0.to_kv.weight" in state["image_proj"]
    # diffusers' forward converter reproduces the module condkit trained.
    rebuilt = base.unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
    assert rebuilt.state_dict().keys() == original_state.keys()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in original_state.items())
    # the original pickle layout of the plus variant loads too
    torch.save(state, tmp_path / "ip-adapter-plus_tiny.bin")
    for path in (tmp_path, tmp_path / "ip-adapter-plus_tiny.bin"):
        loaded = IPAdapter.load(path, base)
        try:
            assert loaded.config.variant == "plus" and loaded.config.tokens == 16
            torch.testing.assert_close(run_unet(base, loaded, refs), expected, rtol=0, atol=1e-6)
        finally:
            loaded.detach()


def test_bad_files_fail_with_one_line_naming_the_key(base, attached, tmp_path):
    from safetensors.torch import save_file

    flat = attached.state_dict_flat()
    attached.detach()
    try:
        missing = {k: v for k, v in flat.items() if k != "ip_adapter.5.to_v_ip.weight"}
        save_file(missing, tmp_path / "missing.safetensors")
        with pytest.raises(UserError, match=r"missing key ip_adapter\.5\.to_v_ip\.weight"):
            IPAdapter.load(tmp_path / "missing.safetensors", base)
        wrong = dict(flat, **{"ip_adapter.3.to_k_ip.weight": torch.zeros(32, 64)})
        save_file(wrong, tmp_path / "wrong.safetensors")
        with pytest.raises(UserError, match=r"ip_adapter\.3\.to_k_ip\.weight has shape \(32, 64\).*\(64, 64\)"):
            IPAdapter.load(tmp_path / "wrong.safetensors", base)
        faceid = {"image_proj.proj.0.weight": torch.zeros(4, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)}
        save_file(faceid, tmp_path / "faceid.safetensors")
        with pytest.raises(UserError, match="unsupported IP-Adapter projection"):
            IPAdapter.load(tmp_path / "faceid.safetensors", base)
        save_file({"lora.down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
        assert not IPAdapter.can_load(tmp_path / "lora.safetensors")
        assert base.unet.encoder_hid_proj is None  # failed loads leave the base untouched
    finally:
        attached.attach(base)


def test_several_reference_images_become_side_by_side_tokens(base, attached):
    """diffusers concatenates the tokens of several images; the same image twice = once."""
    pipe_inputs = attached.pipeline_call_kwargs({"ip_images": [reference_image((10, 200, 10))] * 2})
    assert len(pipe_inputs["ip_adapter_image"]) == 1 and len(pipe_inputs["ip_adapter_image"][0]) == 2
    refs = references(2)
    latents, timesteps, text = unet_inputs(1)
    embeds = attached.encode_extras({"reference": refs}, base)[IMAGE_EMBEDS_KEY]  # (2, 64)
    with torch.no_grad():
        one = base.unet(latents, timesteps, text, added_cond_kwargs={"image_embeds": [embeds[None, :1]]}).sample
        twice = base.unet(latents, timesteps, text, added_cond_kwargs={"image_embeds": [embeds[None, [0, 0]]]}).sample
        two = base.unet(latents, timesteps, text, added_cond_kwargs={"image_embeds": [embeds[None, :2]]}).sample
    torch.testing.assert_close(twice, one, rtol=0, atol=1e-5)
    assert (two - one).abs().max() > 1e-3
    with pytest.raises(UserError, match="needs a reference image"):
        attached.pipeline_call_kwargs({"ip_images": []})


def test_shipped_recipe_trains_only_an_ip_adapter_with_joint_dropout():
    from condkit.train.config import load_recipe

    recipe = load_recipe("ip-adapter")
    assert recipe.adapter.kind == "ip_adapter"
    config = recipe.adapter.config
    assert isinstance(config, IPAdapterConfig) and config.variant == "base" and config.tokens == 4
    # More empty prompts than the 5% default, and captions that never say everything,
    # so the reference has something to carry (README: what the recipe learns).
    assert (config.drop_image, config.drop_text, config.drop_both) == (0.05, 0.2, 0.05)
    assert recipe.data.path == "shapes" and recipe.data.shapes_partial_captions == 1.0
    assert recipe.validation.prompts == ["a shape"] and recipe.validation.every > 0
    with pytest.raises(UserError, match="adapter.variant"):
        load_recipe("ip-adapter", ["adapter.variant=huge"])
