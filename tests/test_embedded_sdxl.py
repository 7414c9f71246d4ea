"""The embedded SDXL base: build, U-Net recipe, install, ``embedded-sdxl``, and adapters on it.

The folder ``python -m condkit.embedded.build_sdxl`` writes (untrained) is a plain
``StableDiffusionXLPipeline`` folder that condkit loads as the SDXL family; the U-Net
recipe trains on it (two steps here) and the install step turns build + run into the
package's ``base_sdxl/`` (a temporary destination here). Without an installed
``base_sdxl/``, ``base: embedded-sdxl`` is one line pointing at the training notes. The
installed base's prompt following is tested in tests/test_embedded_base_quality.py; here the
shipped recipes train LoRA, ControlNet and IP-Adapter on it and stock SDXL pipelines load them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from condkit.base import EMBEDDED_SDXL, export_embedded, load_base
from condkit.embedded import EMBEDDED_BASE_DIR, SDXL_TRAINING_DOC
from condkit.errors import UserError

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The untrained embedded SDXL base folder, as ``python -m condkit.embedded.build_sdxl`` writes it."""
    from condkit.embedded.build_sdxl import main

    folder = tmp_path_factory.mktemp("sdxl-build") / "base"
    assert main([str(folder)]) == 0
    return folder


@pytest.fixture
def no_installed_sdxl(tmp_path, monkeypatch):
    """The package as shipped before the SDXL base is trained: no ``base_sdxl/``."""
    monkeypatch.setattr("condkit.base.EMBEDDED_SDXL_BASE_DIR", tmp_path / "no_base_sdxl")


def _sample(pipe, steps: int = 2) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, generator=generator, output_type="np").images


def test_built_folder_loads_in_stock_sdxl_pipeline_and_as_the_sdxl_family(built):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    from condkit.train.shapes_metrics import sample_and_score

    stock = StableDiffusionXLPipeline.from_pretrained(built, local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    assert type(stock.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(stock.image_encoder).__name__ == "CLIPVisionModelWithProjection"  # for IP-Adapters
    assert stock.unet.config.addition_embed_type == "text_time" and not stock.config.force_zeros_for_empty_prompt
    assert _sample(stock).shape == (1, 64, 64, 3)  # native size: sample_size 16 x VAE factor 4
    # What benchmarks/embedded_base_quality.py does with the folder: the class model_index.json names.
    assert type(DiffusionPipeline.from_pretrained(built, local_files_only=True)) is StableDiffusionXLPipeline
    scores, images, _ = sample_and_score(stock, [("red", "circle", "blue")], [0], num_inference_steps=2)
    assert images[0].size == (64, 64) and set(scores) >= {"colour_accuracy", "background_accuracy", "shape_accuracy"}

    base = load_base(built)
    assert base.family.name == "sdxl" and base.resolution == 64
    assert list(base.family.text_encoders(base)) == ["text_encoder", "text_encoder_2"]
    conditioning = base.family.encode_prompts(base, [PROMPT])
    assert conditioning.encoder_hidden_states.shape == (1, 77, base.unet.config.cross_attention_dim)  # (1, 77, 64 + 96)
    # condkit's pipeline keeps the folder's force_zeros_for_empty_prompt=False, so it draws as stock does.
    assert (_sample(base.pipeline()) == _sample(stock)).all()
    size = sum(p.stat().st_size for p in built.rglob("*") if p.is_file())
    assert size < 20e6, size  # untrained folder about 16 MB (U-Net 11.5 MB, VAE 2.7 MB)


def test_vae_tokenizers_and_image_encoder_are_the_sd_base_files(built):
    pairs = ("vae", "vae"), ("tokenizer", "tokenizer"), ("tokenizer_2", "tokenizer"), ("image_encoder", "image_encoder"), ("feature_extractor", "feature_extractor")
    for sub, source in pairs:
        files = sorted(p.name for p in (EMBEDDED_BASE_DIR / source).iterdir() if p.is_file())
        assert sorted(p.name for p in (built / sub).iterdir()) == files, sub
        for name in files:
            assert (built / sub / name).read_bytes() == (EMBEDDED_BASE_DIR / source / name).read_bytes(), f"{sub}/{name}"


def test_two_step_unet_run_installs_as_the_embedded_sdxl_base(built, tmp_path, monkeypatch, capsys):
    from condkit.cli import main
    from condkit.embedded import install
    from condkit.io import load_state_dict

    recipe = REPO / "recipes" / "base" / "unet-sdxl.yaml"
    shrink = [f"base={built}", "data.shapes_count=8", "train.max_steps=2", "train.batch_size=2", "train.lr_warmup_steps=0",
              "train.checkpoint_every=0", "validation.every=0", "validation.prompts=[a red circle on a blue background]",
              "validation.num_inference_steps=2"]
    args = ["train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"]
    assert main(args + [item for override in shrink for item in ("--set", override)]) == 0
    weights = "unet/diffusion_pytorch_model.safetensors"
    trained, untrained = load_state_dict(tmp_path / "run" / weights), load_state_dict(built / weights)
    assert trained.keys() == untrained.keys() and any(not torch.equal(trained[k], untrained[k]) for k in trained)

    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps({"held_out": {"colour_accuracy": 0.5}}))
    dest = tmp_path / "base_sdxl"
    argv = ["install", "--sdxl", str(built), str(tmp_path / "run"), "--quality", str(quality), "--dest", str(dest)]
    monkeypatch.setattr("sys.argv", argv)
    assert install.main() == 0
    assert (dest / weights).read_bytes() == (tmp_path / "run" / weights).read_bytes()
    assert (dest / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (EMBEDDED_BASE_DIR / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    provenance = json.loads((dest / "provenance.json").read_text())
    assert provenance["unet_stage"]["recipe"].endswith("recipes/base/unet-sdxl.yaml") and provenance["unet_stage"]["steps"] == 2
    assert "vae/diffusion_pytorch_model.safetensors" in provenance["build"]["sha256"] and provenance["quality"]["held_out"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".base_sdxl")]  # atomic: no temporary left

    # Installed as the package's base_sdxl/, ``embedded-sdxl`` loads, exports and describes it.
    monkeypatch.setattr("condkit.base.EMBEDDED_SDXL_BASE_DIR", dest)
    base = load_base(EMBEDDED_SDXL)
    assert base.source == EMBEDDED_SDXL and base.family.name == "sdxl"
    assert _sample(base.pipeline()).shape == (1, 64, 64, 3)
    assert main(["base", "export", str(tmp_path / "exported"), "--base", EMBEDDED_SDXL]) == 0
    assert (tmp_path / "exported" / weights).read_bytes() == (dest / weights).read_bytes()
    capsys.readouterr()
    assert main(["base", "info", EMBEDDED_SDXL]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "sdxl"


def test_install_refuses_a_unet_of_another_architecture(built, tmp_path):
    import shutil

    from condkit.embedded.install import install_sdxl

    run = tmp_path / "run"
    shutil.copytree(built / "unet", run / "unet")
    (run / "run.json").write_text("{}")
    config = json.loads((run / "unet" / "config.json").read_text())
    (run / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 64, 128]}))
    with pytest.raises(UserError, match="not the architecture of"):
        install_sdxl(built, run, dest=tmp_path / "dest")
    with pytest.raises(UserError, match=r"no-run/unet/config\.json: missing"):
        install_sdxl(built, tmp_path / "no-run", dest=tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.usefixtures("no_installed_sdxl")
def test_embedded_sdxl_before_it_is_trained_is_one_line_naming_the_notes(tmp_path, capsys):
    from condkit.cli import main

    for call in (lambda: load_base(EMBEDDED_SDXL), lambda: export_embedded(tmp_path / "out", name=EMBEDDED_SDXL)):
        with pytest.raises(UserError) as err:
            call()
        message = str(err.value)
        assert "not trained yet" in message and SDXL_TRAINING_DOC in message and "Commands" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes" / "base" / "unet-sdxl.yaml").read_text().replace("base: runs/base_sdxl_untrained", "base: embedded-sdxl"))
    for argv in (["base", "export", str(tmp_path / "out"), "--base", EMBEDDED_SDXL], ["base", "info", EMBEDDED_SDXL],
                 ["train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not trained yet" in err and "Traceback" not in err, argv
    with pytest.raises(UserError, match="embedded base 'embedded-xl': unknown"):
        export_embedded(tmp_path / "out", name="embedded-xl")
    # The SD embedded base is unaffected.
    assert load_base("embedded").family.name == "sd"


def test_sdxl_training_notes_give_the_commands_this_package_has():
    notes = (REPO / SDXL_TRAINING_DOC).read_text()
    assert "## Commands" in notes
    for command in ("python -m condkit.embedded.build_sdxl", "condkit train recipes/base/unet-sdxl.yaml",
                    "benchmarks/embedded_base_quality.py", "python -m condkit.embedded.install --sdxl"):
        assert command in notes, command


def test_shipped_recipes_train_on_embedded_sdxl_and_stock_sdxl_pipelines_load_the_results(tmp_path):
    """LoRA, ControlNet and IP-Adapter, two steps each with ``--set base=embedded-sdxl``: the three
    exports together in stock ``StableDiffusionXLControlNetPipeline`` (from ``condkit base export
    --base embedded-sdxl``) draw what ``condkit generate`` draws."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from condkit.adapters.controlnet.generate import shapes_conditions
    from condkit.cli import main

    short = ["base=embedded-sdxl", "train.max_steps=2", "train.batch_size=2", "train.lr_warmup_steps=0", "validation.every=0",
             "validation.num_inference_steps=2"]
    extra = {"lora-few-images": ["data.prior_count=2"], "controlnet-canny": ["data.shapes_count=8"], "ip-adapter": ["data.shapes_count=8"]}
    for recipe, more in extra.items():
        argv = ["train", recipe, "--output", str(tmp_path / recipe), "--no-progress"]
        assert main(argv + [item for override in short + more for item in ("--set", override)]) == 0, recipe
    Image.fromarray(shapes_conditions([("red", "circle", "blue")], 64)[0]).save(tmp_path / "map.png")
    Image.new("RGB", (64, 64), (40, 200, 40)).save(tmp_path / "ref.png")
    prompt = "a red sks on a blue background"
    assert main([
        "generate", "--base", EMBEDDED_SDXL, "--adapter", str(tmp_path / "lora-few-images"), "--adapter", str(tmp_path / "controlnet-canny"),
        "--adapter", str(tmp_path / "ip-adapter"), "--control-image", str(tmp_path / "map.png"), "--ip-image", str(tmp_path / "ref.png"),
        "--prompt", prompt, "--steps", "3", "--guidance", "5", "--seed", "3", "--output", str(tmp_path / "out"),
    ]) == 0
    ours = np.asarray(Image.open(tmp_path / "out" / "000003.png"))

    assert main(["base", "export", str(tmp_path / "base"), "--base", EMBEDDED_SDXL]) == 0
    branch = ControlNetModel.from_pretrained(tmp_path / "controlnet-canny" / "controlnet", local_files_only=True)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tmp_path / "base", controlnet=branch, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora-few-images")
    pipe.load_ip_adapter(str(tmp_path / "ip-adapter"), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder="image_encoder")
    call = dict(image=Image.open(tmp_path / "map.png").convert("RGB"), ip_adapter_image=Image.open(tmp_path / "ref.png").convert("RGB"),
                num_inference_steps=3, guidance_scale=5.0, height=64, width=64)
    theirs = np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(3), **call).images[0])
    np.testing.assert_array_equal(ours, theirs)


def test_installed_sdxl_base_draws_through_the_sd_bases_colour_vae():
    """Issue 21: the SDXL base uses a VAE of the same quality: it is the SD base's file, byte for byte."""
    from condkit.embedded import EMBEDDED_SDXL_BASE_DIR

    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (EMBEDDED_SDXL_BASE_DIR / "vae" / name).read_bytes() == (EMBEDDED_BASE_DIR / "vae" / name).read_bytes(), name
