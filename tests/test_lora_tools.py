"""LoRA tools: merge into a base (folder and A1111 single file), resize, extract, merge-lora; stock diffusers loads every output."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from lora_utils import randomise, stock_pipeline, unet_output
from safetensors.torch import load_file, save_file

from condkit import lora_tools
from condkit.adapters.lora import LoraAdapter, LoraConfig, formats
from condkit.base import load_base
from condkit.cli import main

WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def pristine():
    return load_base("embedded")


def _make_lora(pristine, folder, seed, **options):
    """A condkit LoRA with random weights saved to ``folder``; returns the base carrying it (unfused)."""
    base = copy.deepcopy(pristine)
    adapter = LoraAdapter(LoraConfig(**options))
    adapter.attach(base)
    randomise(adapter, std=0.1, seed=seed)
    adapter.save(folder)
    return base


@pytest.fixture(scope="module")
def lora_a(pristine, tmp_path_factory):
    """Rank 4, alpha 2, conv layers, a text-encoder part (rank 2, alpha 3)."""
    folder = tmp_path_factory.mktemp("lora") / "a"
    options = dict(rank=4, alpha=2.0, target_modules="conv", train_text_encoder=True, text_encoder_rank=2, text_encoder_alpha=3.0)
    return folder, _make_lora(pristine, folder, 0, **options)


@pytest.fixture(scope="module")
def lora_b(pristine, tmp_path_factory):
    """Rank 3 on attention only."""
    folder = tmp_path_factory.mktemp("lora") / "b"
    return folder, _make_lora(pristine, folder, 1, rank=3, alpha=6.0)


@pytest.fixture(scope="module")
def kohya_a(lora_a, tmp_path_factory):
    path = tmp_path_factory.mktemp("kohya") / "a_kohya.safetensors"
    assert main(["convert", str(lora_a[0]), str(path), "--to", "kohya"]) == 0
    return path


def _deltas(path) -> dict[str, torch.Tensor]:
    weights, _ = lora_tools.read_lora(path)
    return {f"{m.component}.{m.path}": m.delta_weight().double() for m in weights.modules}


def _overall(text: str) -> float:
    return float(re.search(r"overall relative error ([0-9.e-]+)", text).group(1))


def _layer_errors(text: str) -> dict[str, float]:
    return {m.group(2): float(m.group(1)) for m in re.finditer(r"error ([0-9.]+)  (\S+)", text)}


# ---- resize ---------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["diffusers", "kohya"])
def test_resize_at_full_rank_keeps_every_delta(source, lora_a, kohya_a, tmp_path, capsys):
    src = lora_a[0] if source == "diffusers" else kohya_a
    before = (src / WEIGHTS if src.is_dir() else src).read_bytes()
    out = tmp_path / "resized.safetensors"
    assert main(["resize", str(src), "--rank", "8", "--output", str(out)]) == 0
    assert _overall(capsys.readouterr().out) < 1e-6
    assert (src / WEIGHTS if src.is_dir() else src).read_bytes() == before  # input untouched
    expected, got = _deltas(src), _deltas(out)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    keys = load_file(out).keys()
    if source == "kohya":  # same format out as in
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    else:
        assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)


@pytest.mark.parametrize("source", ["diffusers", "kohya"])
def test_resize_lower_rank_reports_the_true_error_and_loads_in_stock_diffusers(source, lora_a, kohya_a, exported_base, tmp_path, capsys):
    src = lora_a[0] if source == "diffusers" else kohya_a
    out = tmp_path / "small.safetensors"
    assert main(["resize", str(src), "--rank", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    reported = _layer_errors(text)
    expected, got = _deltas(src), _deltas(out)
    assert set(reported) == set(expected)
    squared_error = squared_norm = 0.0
    for key in expected:
        error = float((got[key] - expected[key]).norm() / expected[key].norm())
        assert reported[key] == pytest.approx(error, abs=2e-6), key
        squared_error += float((got[key] - expected[key]).norm()) ** 2
        squared_norm += float(expected[key].norm()) ** 2
    overall = _overall(text)
    assert overall == pytest.approx((squared_error / squared_norm) ** 0.5, abs=2e-6) and overall > 0.01
    weights, _ = lora_tools.read_lora(out)
    assert max(m.rank for m in weights.modules) == 2
    pipe = stock_pipeline(exported_base)
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name)  # stock diffusers takes it
    assert not torch.equal(unet_output(pipe), unet_output(load_base("embedded")))


# ---- merge-lora --------------------------------------------------------------------------------
def test_merge_lora_sums_the_deltas_exactly_or_at_a_rank(lora_a, lora_b, kohya_a, exported_base, tmp_path, capsys):
    exact = tmp_path / "exact.safetensors"
    assert main(["merge-lora", f"{kohya_a}:0.5", f"{lora_b[0]}:-1.5", "--output", str(exact)]) == 0
    assert "kohya LoRA" in capsys.readouterr().out  # the first input's format
    a, b, merged = _deltas(kohya_a), _deltas(lora_b[0]), _deltas(exact)
    assert merged.keys() == a.keys() | b.keys()
    for key in merged:
        expected = 0.5 * a.get(key, 0) + -1.5 * b.get(key, 0)
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-5)
    # svd_merge_lora style: re-factorised, error reported, loads in stock diffusers
    small = tmp_path / "small.safetensors"
    assert main(["merge-lora", f"{lora_a[0]}:0.5", f"{lora_b[0]}:-1.5", "--rank", "2", "--output", str(small), "--to", "kohya", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert len(text.strip().splitlines()) == 1 and _overall(text) > 0
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in load_file(small))
    pipe = stock_pipeline(exported_base)
    pipe.load_lora_weights(str(tmp_path), weight_name=small.name)


# ---- merge into the base ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged(lora_a, lora_b, kohya_a, tmp_path_factory):
    """The embedded base with LoRA a (kohya file, x0.7) and b (x1) merged: folder and single file."""
    out = tmp_path_factory.mktemp("merged")
    args = ["embedded", f"{kohya_a}:0.7", str(lora_b[0])]
    assert main(["merge", *args, "--output", str(out / "folder")]) == 0
    assert main(["merge", *args, "--output", str(out / "model.safetensors"), "--single-file"]) == 0
    return out


def test_merged_folder_equals_the_base_with_the_loras_attached(merged, pristine, lora_b, kohya_a):
    from diffusers import StableDiffusionPipeline

    reference = copy.deepcopy(pristine)
    LoraAdapter.load(kohya_a, reference, name="a").set_scale(0.7)
    LoraAdapter.load(lora_b[0], reference, name="b")
    folder = StableDiffusionPipeline.from_pretrained(merged / "folder", local_files_only=True)
    torch.testing.assert_close(unet_output(folder), unet_output(reference), atol=1e-5, rtol=1e-4)
    ids = pristine.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(folder.text_encoder(ids)[0], reference.text_encoder(ids)[0], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(folder.text_encoder(ids)[0], pristine.text_encoder(ids)[0])  # LoRA a's text-encoder part is in


def test_single_file_loads_in_stock_from_single_file_with_the_folders_images(merged, exported_base):
    from diffusers import StableDiffusionPipeline

    keys = load_file(merged / "model.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    single = StableDiffusionPipeline.from_single_file(
        # image_encoder=None: the config folder's image encoder is no part of an SD checkpoint (IP-Adapter's)
        str(merged / "model.safetensors"), config=str(exported_base), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, image_encoder=None,
    )
    folder = StableDiffusionPipeline.from_pretrained(merged / "folder", local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
    images = [p.set_progress_bar_config(disable=True) or p("a red circle on a blue background", generator=torch.Generator().manual_seed(0), **kwargs).images for p in (single, folder)]
    np.testing.assert_allclose(images[0], images[1], atol=1e-5)


def test_original_layout_round_trips_through_from_single_file(pristine, exported_base, tmp_path):
    """No LoRA: the embedded base written in the original layout loads back as the very same weights."""
    base = copy.deepcopy(pristine)
    out = lora_tools.save_base_single_file(base, tmp_path / "base.safetensors")
    reloaded = load_base(out, exported_base)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(reloaded, name).state_dict(), getattr(pristine, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_merge_takes_loha_and_lokr(kind, pristine, tmp_path):
    package = pytest.importorskip(f"condkit.adapters.{kind}")
    name = kind.capitalize()
    base = copy.deepcopy(pristine)
    adapter = getattr(package, f"{name}Adapter")(getattr(package, f"{name}Config")(rank=4, alpha=2.0, target_modules="conv"))
    adapter.attach(base)
    randomise(adapter, std=0.1, seed=5)
    adapter.save(tmp_path / kind)
    adapter.set_scale(0.5)
    assert main(["merge", "embedded", f"{tmp_path / kind}:0.5", "--output", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(unet_output(load_base(tmp_path / "merged")), unet_output(base), atol=1e-5, rtol=1e-4)


# ---- extract -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned_folder(pristine, tmp_path_factory):
    """The embedded base with perturbed U-Net linear/conv weights, one text-encoder layer and one bias."""
    base = copy.deepcopy(pristine)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in base.unet.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ("attn2" in name or "resnets.0.conv1" in name):
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.02)
        layer = base.text_encoder.get_submodule(formats.model_path(base.text_encoder, "text_encoder", "text_model.encoder.layers.0.self_attn.v_proj"))
        layer.weight.add_(torch.randn(layer.weight.shape, generator=generator) * 0.02)
    return lora_tools.save_base_folder(base, tmp_path_factory.mktemp("tuned") / "tuned"), base


def test_extract_at_full_rank_reproduces_the_tuned_model_in_stock_diffusers(tuned_folder, exported_base, tmp_path, capsys):
    folder, tuned = tuned_folder
    assert main(["extract", str(folder), "embedded", "--rank", "512", "--output", str(tmp_path / "x")]) == 0
    text = capsys.readouterr().out
    assert _overall(text) < 1e-5
    assert "text_encoder.text_model.encoder.layers.0.self_attn.v_proj" in text
    pipe = stock_pipeline(exported_base)
    pipe.load_lora_weights(tmp_path / "x")
    torch.testing.assert_close(unet_output(pipe), unet_output(tuned), atol=1e-4, rtol=1e-3)


def test_extract_at_low_rank_reports_the_error_and_names_biases(tuned_folder, tmp_path, capsys):
    biased_base = copy.deepcopy(tuned_folder[1])
    with torch.no_grad():
        biased_base.unet.conv_in.bias.add_(0.1)
    biased = lora_tools.save_base_folder(biased_base, tmp_path / "biased")
    out = tmp_path / "low_kohya.safetensors"
    assert main(["extract", str(biased), "embedded", "--rank", "2", "--output", str(out), "--to", "kohya"]) == 0
    text = capsys.readouterr().out
    assert _overall(text) > 0.05
    assert "cannot be held by a LoRA (e.g. conv_in.bias)" in text
    weights, _ = lora_tools.read_lora(out)
    assert {m.rank for m in weights.modules} == {2}


def test_extract_from_a_full_unet_run(pristine, tmp_path, capsys):
    from condkit.adapters.full_unet import FullUnetAdapter, FullUnetConfig

    base = copy.deepcopy(pristine)
    adapter = FullUnetAdapter(FullUnetConfig())
    adapter.attach(base)
    with torch.no_grad():
        base.unet.mid_block.attentions[0].proj_out.weight.mul_(1.5)
    adapter.save(tmp_path / "run")
    assert main(["extract", str(tmp_path / "run"), "embedded", "--rank", "64", "--output", str(tmp_path / "x.safetensors"), "--quiet"]) == 0
    weights, _ = lora_tools.read_lora(tmp_path / "x.safetensors")
    assert [m.path for m in weights.modules] == ["mid_block.attentions.0.proj_out"]


# ---- user errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["resize", "{missing}", "--rank", "2", "--output", "{tmp}/o.safetensors"], "no such file"),
        (["resize", "{lora}", "--rank", "0", "--output", "{tmp}/o.safetensors"], "--rank"),
        (["resize", "{lora}", "--rank", "2", "--output", "{lora}/pytorch_lora_weights.safetensors"], "input file"),
        (["merge", "embedded", "{missing}", "--output", "{tmp}/m"], "no such file"),
        (["merge", "embedded", "{lora}", "--output", "{tmp}/m.ckpt", "--single-file"], ".safetensors"),
        (["merge-lora", "{lora}", "{notlora}", "--output", "{tmp}/o.safetensors"], "notlora"),
        (["extract", "{tmp}", "embedded", "--rank", "2", "--output", "{tmp}/o.safetensors"], "not a diffusers folder"),
        (["extract", "embedded", "embedded", "--rank", "2", "--output", "{tmp}/o.safetensors"], "nothing to extract"),
    ],
)
def test_bad_input_is_one_line_naming_it(argv, expected, lora_a, tmp_path, capsys):
    notlora = tmp_path / "notlora.safetensors"
    save_file({"weight": torch.zeros(2)}, str(notlora))
    values = {"missing": str(tmp_path / "missing.safetensors"), "tmp": str(tmp_path), "lora": str(lora_a[0]), "notlora": str(notlora)}
    assert main([part.format(**values) for part in argv]) == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # loaders may draw progress bars before it
    assert err.startswith("condkit: error:") and expected in err and "Traceback" not in stderr, err


def test_existing_output_is_refused_unless_overwrite(lora_a, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    assert main(["resize", str(lora_a[0]), "--rank", "2", "--output", str(out)]) == 2
    assert out.read_bytes() == b"keep" and "--overwrite" in capsys.readouterr().err
    assert main(["resize", str(lora_a[0]), "--rank", "2", "--output", str(out), "--overwrite", "--quiet"]) == 0
    assert out.read_bytes() != b"keep"
