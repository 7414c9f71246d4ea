"""The command line: help, one-line errors, base export into stock diffusers, train -> generate."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from condkit.cli import COMMAND_MODULES, main


@pytest.mark.parametrize("command", COMMAND_MODULES)
def test_every_subcommand_has_useful_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"condkit {command}" in text and len(text.splitlines()) >= 4


def test_misspelt_recipe_key_exits_nonzero_with_one_line(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("# condkit train typo.yaml\nadapter: {kind: lora}\ntrain: {learnig_rate: 0.1}\n")
    result = subprocess.run([sys.executable, "-m", "condkit", "train", str(recipe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("condkit: error:"), result.stderr
    assert "train.learnig_rate" in lines[0] and "learning_rate" in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "condkit", "--debug", "inspect", str(tmp_path / "missing.safetensors")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_inspect_rejects_a_file_that_is_not_an_adapter(tmp_path, capsys):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"hello")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("condkit: error:") and str(path) in err and "\n" not in err


def test_base_export_loads_and_generates_in_stock_diffusers(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from condkit.base import load_base

    assert main(["base", "export", str(tmp_path / "base")]) == 0
    assert main(["base", "export", str(tmp_path / "base")]) == 2  # refuses to overwrite
    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    assert stock.image_encoder is not None
    ours = load_base("embedded").pipeline()
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
    a = stock("a red circle on a blue background", generator=torch.Generator().manual_seed(1), **kwargs).images
    b = ours("a red circle on a blue background", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert a.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_train_writes_an_adapter_that_generate_uses(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        array = np.zeros((64, 64, 3), np.uint8)
        array[16:48, 16:48] = (200, 40 + 60 * i, 200)
        Image.fromarray(array).save(images / f"{i}.png")
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(
        "# condkit train lora.yaml\n"
        + yaml.safe_dump(
            {
                "adapter": {"kind": "lora", "rank": 4},
                "data": {"path": str(images), "caption": "a zq square"},
                "train": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-2},
            }
        )
    )
    assert main(["train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "outputs in" in capsys.readouterr().out
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    common = ["generate", "--prompt", "a zq square", "--steps", "3", "--seed", "5"]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert main([*common, "--adapter", str(tmp_path / "run"), "--output", str(tmp_path / "adapted")]) == 0
    assert main([*common, "--adapter", f"{tmp_path / 'run'}:0", "--output", str(tmp_path / "zero")]) == 0
    plain = np.asarray(Image.open(tmp_path / "plain" / "000005.png"))
    adapted = np.asarray(Image.open(tmp_path / "adapted" / "000005.png"))
    zero = np.asarray(Image.open(tmp_path / "zero" / "000005.png"))
    assert not np.array_equal(plain, adapted), "the trained LoRA changed nothing"
    np.testing.assert_array_equal(plain, zero)
