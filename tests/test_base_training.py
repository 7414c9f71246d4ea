"""Training the embedded base: the VAE stage and the full_unet adapter kind."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from condkit.adapters.full_unet import FullUnetAdapter, FullUnetConfig
from condkit.adapters.registry import detect_kind, load_adapter
from condkit.base import load_base
from condkit.embedded import EMBEDDED_BASE_DIR
from condkit.errors import UserError
from condkit.io import load_state_dict
from condkit.train.vae import load_vae_recipe, train_vae

REPO = Path(__file__).resolve().parent.parent


def _unet_output(base, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, base.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return base.unet(latents, torch.tensor([10, 500]), text).sample


def _perturb(unet) -> None:
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.01 * torch.randn_like(param))


def test_full_unet_trains_every_weight_and_detach_restores_the_base():
    base = load_base("embedded")
    before = _unet_output(base)
    adapter = FullUnetAdapter(FullUnetConfig())
    adapter.attach(base)
    params = adapter.trainable_parameters()
    assert len(params) == len(list(base.unet.parameters())) and all(p.requires_grad for p in params)
    _perturb(base.unet)
    assert not torch.equal(_unet_output(base), before)
    adapter.detach()
    assert torch.equal(_unet_output(base), before)
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_full_unet_save_load_round_trip_and_scale(tmp_path):
    base = load_base("embedded")
    original = _unet_output(base)
    adapter = FullUnetAdapter()
    adapter.attach(base)
    _perturb(base.unet)
    tuned = _unet_output(base)
    files = adapter.save(tmp_path / "run")
    assert all(f.is_file() for f in files)
    assert json.loads((tmp_path / "run" / "condkit_adapter.json").read_text())["kind"] == "full_unet"
    assert detect_kind(tmp_path / "run") == "full_unet"
    assert not list((tmp_path / "run").glob(".*tmp*"))

    fresh = load_base("embedded")
    loaded = load_adapter(tmp_path / "run", fresh)
    assert isinstance(loaded, FullUnetAdapter)
    assert torch.equal(_unet_output(fresh), tuned)
    loaded.set_scale(0.0)
    assert torch.allclose(_unet_output(fresh), original, atol=1e-6)
    loaded.set_scale(1.0)
    assert torch.equal(_unet_output(fresh), tuned)
    # A stock diffusers load of the saved folder gives the same U-Net.
    from diffusers import UNet2DConditionModel

    stock = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "unet")
    fresh.unet = stock
    assert torch.equal(_unet_output(fresh), tuned)


def test_full_unet_load_rejects_a_different_architecture(tmp_path):
    from diffusers import UNet2DConditionModel

    config = dict(load_base("embedded").unet.config)
    config["cross_attention_dim"] = 32  # same keys, other shapes
    UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).save_pretrained(tmp_path / "unet")
    with pytest.raises(UserError, match="has shape"):
        FullUnetAdapter.load(tmp_path, load_base("embedded"))
    with pytest.raises(UserError, match="no U-Net weights"):
        FullUnetAdapter.load(tmp_path / "nothing", load_base("embedded"))


def test_base_recipes_validate():
    from condkit.train.config import load_recipe

    recipe = load_recipe(REPO / "recipes" / "base" / "unet.yaml")
    assert recipe.adapter.kind == "full_unet" and recipe.data.path == "shapes" and recipe.data.caption_dropout > 0
    vae = load_vae_recipe(REPO / "recipes" / "base" / "vae.yaml")
    assert vae.max_steps > 0
    for path in ("vae.yaml", "unet.yaml"):
        assert (REPO / "recipes" / "base" / path).read_text().startswith("# ")


@pytest.mark.parametrize(
    "module, loader, key",
    [("condkit.train.vae", "load_vae_recipe", "learning_rate: -1"), ("condkit.train.image_encoder", "load_image_encoder_recipe", "max_steps: 0")],
)
def test_stage_recipes_reject_unknown_keys_and_bad_values(tmp_path, module, loader, key):
    import importlib

    load = getattr(importlib.import_module(module), loader)
    bad = tmp_path / "stage.yaml"
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(UserError, match="max_stepz"):
        load(bad)
    bad.write_text(key + "\n")
    with pytest.raises(UserError, match=key.split(":")[0]):
        load(bad)


def test_vae_stage_writes_a_loadable_base_with_latent_scaling(tmp_path):
    recipe = dataclasses.replace(load_vae_recipe(REPO / "recipes" / "base" / "vae.yaml"), max_steps=3, batch_size=2, scale_samples=8, log_every=1)
    folder = train_vae(recipe, tmp_path / "vae")
    base = load_base(str(folder))
    scaling = base.vae.config.scaling_factor
    summary = json.loads((tmp_path / "vae" / "vae_summary.json").read_text())
    assert scaling == pytest.approx(1.0 / summary["latent_std"])
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(scaling)
    assert len((tmp_path / "vae" / "vae_log.jsonl").read_text().splitlines()) == 3


def test_image_encoder_stage_changes_only_the_image_encoder(tmp_path):
    from condkit.train.image_encoder import (
        load_image_encoder_recipe,
        train_image_encoder,
    )

    recipe = dataclasses.replace(
        load_image_encoder_recipe(REPO / "recipes" / "base" / "image_encoder.yaml"), max_steps=2, batch_size=4, eval_per_combo=1, log_every=1
    )
    folder = train_image_encoder(recipe, tmp_path / "enc")
    source = EMBEDDED_BASE_DIR
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (folder / part).read_bytes() == (source / part).read_bytes(), part
    trained = load_state_dict(folder / "image_encoder" / "model.safetensors")
    shipped = load_state_dict(source / "image_encoder" / "model.safetensors")
    assert trained.keys() == shipped.keys()
    assert any(not torch.equal(trained[k], shipped[k]) for k in trained)
    summary = json.loads((tmp_path / "enc" / "image_encoder_summary.json").read_text())
    assert set(summary["held_out_accuracy"]) == {"colour", "shape", "background"}
    assert load_base(str(folder)).image_encoder is not None

    # Installing the stage into a base swaps in the encoder and adds to the provenance.
    import shutil

    from condkit.embedded.install import install_image_encoder

    installed = tmp_path / "installed"
    shutil.copytree(source, installed)
    install_image_encoder(tmp_path / "enc", installed)
    assert (installed / "image_encoder" / "model.safetensors").read_bytes() == (folder / "image_encoder" / "model.safetensors").read_bytes()
    assert (installed / "unet" / "config.json").read_bytes() == (source / "unet" / "config.json").read_bytes()
    provenance = json.loads((installed / "provenance.json").read_text())
    before = json.loads((source / "provenance.json").read_text())
    assert provenance["image_encoder_stage"]["held_out_accuracy"] == summary["held_out_accuracy"]
    assert all(provenance[key] == value for key, value in before.items() if key != "image_encoder_stage")
    assert (installed / "TRAINING.md").is_file() and not list(tmp_path.glob(".installed*"))


@pytest.mark.parametrize("module", ["condkit.train.vae", "condkit.train.image_encoder"])
def test_stage_commands_report_bad_input_in_one_line(tmp_path, capsys, module):
    import importlib

    main = importlib.import_module(module).main
    bad = tmp_path / "stage.yaml"
    bad.write_text("max_stepz: 3\n")
    assert main([str(bad), "--output", str(tmp_path / "out")]) == 2  # default --threads 2, as conftest sets
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_stepz" in err and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError):
        main([str(bad), "--output", str(tmp_path / "out"), "--debug"])


def test_install_command_reports_a_missing_run_in_one_line(tmp_path, capsys, monkeypatch):
    from condkit.embedded import install

    monkeypatch.setattr("sys.argv", ["install", "--image-encoder", str(tmp_path / "no-run"), "--dest", str(tmp_path / "base")])
    assert install.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "no-run") in err
    assert not (tmp_path / "base").exists()


def test_vae_colour_stage_continues_the_base_vae_and_keeps_its_unet_and_scale(tmp_path):
    """The colour stage (recipes/base/vae-colours*.yaml) starts from the base's VAE, mixes flat
    scenes and photos into the batches, anchors the shapes world's latents, and leaves the U-Net
    and the latent scale exactly as they were (the U-Net was trained on them)."""
    from condkit.embedded import EMBEDDED_BASE_DIR

    pytest.importorskip("skimage")
    recipe = dataclasses.replace(
        load_vae_recipe(REPO / "recipes" / "base" / "vae-colours.yaml"), max_steps=2, batch_size=8, scale_samples=8, log_every=1
    )
    assert recipe.init_from_base and recipe.anchor_weight > 0 and recipe.photo_share > 0
    folder = train_vae(recipe, tmp_path / "vae")
    rows = [json.loads(line) for line in (tmp_path / "vae" / "vae_log.jsonl").read_text().splitlines()]
    assert rows[0]["anchor"] == 0.0 and rows[1]["anchor"] > 0  # step 0 is the base's VAE itself
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (folder / unet).read_bytes() == (EMBEDDED_BASE_DIR / unet).read_bytes()
    assert json.loads((folder / "unet" / "config.json").read_text()) == json.loads((EMBEDDED_BASE_DIR / "unet" / "config.json").read_text())
    before = json.loads((EMBEDDED_BASE_DIR / "vae" / "config.json").read_text())["scaling_factor"]
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == before


def test_installing_a_unet_continuation_replaces_only_the_unet(tmp_path, monkeypatch):
    """``--vae RUN --unet RUN`` installs the colour VAE, then the U-Net continued on its latents;
    everything else and the earlier provenance stay, and the U-Net run is recorded."""
    import shutil

    from condkit.embedded import EMBEDDED_BASE_DIR, install

    installed = tmp_path / "installed"
    shutil.copytree(EMBEDDED_BASE_DIR, installed)
    vae_run, unet_run = tmp_path / "vae_run", tmp_path / "unet_run"
    shutil.copytree(EMBEDDED_BASE_DIR / "vae", vae_run / "base" / "vae")
    (vae_run / "vae_summary.json").write_text(json.dumps({"steps": 1}))
    shutil.copytree(EMBEDDED_BASE_DIR / "unet", unet_run / "unet")
    weights = unet_run / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_state_dict(weights)
    first = sorted(state)[0]
    state[first] = state[first] + 1.0  # a U-Net that differs from the installed one
    from safetensors.torch import save_file

    save_file(state, weights)
    (unet_run / "run.json").write_text(json.dumps({"steps": 2500, "seconds": 1.0}))
    monkeypatch.setattr("sys.argv", ["install", "--vae", str(vae_run), "--unet", str(unet_run), "--dest", str(installed)])
    assert install.main() == 0
    assert (installed / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights.read_bytes()
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "image_encoder/model.safetensors", "TRAINING.md"):
        assert (installed / part).read_bytes() == (EMBEDDED_BASE_DIR / part).read_bytes(), part
    provenance = json.loads((installed / "provenance.json").read_text())
    before = json.loads((EMBEDDED_BASE_DIR / "provenance.json").read_text())
    assert provenance["unet_colour_stage"]["steps"] == 2500 and provenance["vae_colour_stage"]["steps"] == 1
    assert all(provenance[key] == value for key, value in before.items() if key not in ("unet_colour_stage", "vae_colour_stage"))
    assert not list(tmp_path.glob(".installed*"))
