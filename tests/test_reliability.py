"""Crash and resume, atomic saves, multi-process training, safe loading (issue 9)."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from crash import train_killed_after_checkpoint
from condkit.errors import UserError
from condkit.io import atomic_path, load_state_dict

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def lora_recipe(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        array = np.zeros((64, 64, 3), np.uint8)
        array[8 + 3 * i : 40 + 3 * i, 12:44] = (220, 40 * i, 120)
        Image.fromarray(array).save(images / f"{i}.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "# condkit train recipe.yaml\n"
        + yaml.safe_dump(
            {
                "adapter": {"kind": "lora", "rank": 4, "dropout": 0.1},
                "data": {"path": str(images), "caption": "a zq square", "flip": True, "caption_dropout": 0.2},
                "train": {"max_steps": 40, "batch_size": 2, "learning_rate": 5e-3, "checkpoint_every": 4, "keep_checkpoints": 2},
                "seed": 11,
            }
        )
    )
    return recipe


def _condkit(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "condkit", *args], env=ENV, capture_output=True, text=True, timeout=600, **kwargs)


def _lora(folder: Path) -> dict:
    return load_state_dict(folder / "pytorch_lora_weights.safetensors")


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(lora_recipe, tmp_path):
    straight = tmp_path / "straight"
    assert _condkit("train", str(lora_recipe), "--output", str(straight), "--no-progress").returncode == 0

    crashed = tmp_path / "crashed"
    train_killed_after_checkpoint(lora_recipe, crashed, step=8)
    assert not (crashed / "pytorch_lora_weights.safetensors").exists()

    resumed = _condkit("train", str(lora_recipe), "--output", str(crashed), "--resume", "latest", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _lora(straight), _lora(crashed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_failed_checkpoint_save_keeps_the_previous_one(monkeypatch, tmp_path):
    from condkit.train import checkpoint as ckpt

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    first = ckpt.save_checkpoint(tmp_path, 2, [param], optimizer, scheduler, {}, keep=3)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        ckpt.save_checkpoint(tmp_path, 4, [param], optimizer, scheduler, {}, keep=3)
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]  # no half-written folder
    assert torch.equal(load_state_dict(first / "trainable.safetensors")["param.00000"], torch.ones(3))


def test_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_full_disk_is_one_line_naming_the_file(monkeypatch, tmp_path):
    import condkit.io as io

    monkeypatch.setattr(io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(UserError) as err:
        io.write_text_atomic(tmp_path / "out.json", "{}")
    assert str(tmp_path / "out.json") in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_folder_swap_that_fails_keeps_the_previous_folder(monkeypatch, tmp_path):
    import condkit.io as io

    final = tmp_path / "controlnet"
    final.mkdir()
    (final / "weights.safetensors").write_bytes(b"old")
    real_replace = io.os.replace

    def replace(src, dst):  # moving the old folder aside works; moving the new one in fails
        if Path(src).name.startswith(".controlnet.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(UserError) as err:
        with io.atomic_folder(final) as tmp:
            (tmp / "weights.safetensors").write_bytes(b"new")
    assert str(final) in str(err.value) and "\n" not in str(err.value)
    assert (final / "weights.safetensors").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["controlnet"]


@pytest.mark.slow
def test_two_process_training_keeps_ranks_identical(lora_recipe, tmp_path):
    import json

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/two-process-cpu.yaml"),
         "--main_process_port", "29533", "-m", "condkit", "train", str(lora_recipe), "--output", str(out), "--no-progress",
         "--set", "train.max_steps=6"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    assert len(set(run["parameter_digest_per_rank"])) == 1
    assert result.stdout.count("outputs in") == 1  # only the main process reports (and writes)
    from condkit.adapters import load_adapter
    from condkit.base import load_base

    adapter = load_adapter(out, load_base("embedded"))
    assert adapter.kind == "lora"


def test_batches_are_sharded_across_ranks():
    from condkit.train.loop import _batch_positions

    rank0 = _batch_positions(5, batch_size=3, world=2, rank=0)
    rank1 = _batch_positions(5, batch_size=3, world=2, rank=1)
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == list(range(30, 36))


def test_absurd_safetensors_header_is_refused_before_reading(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes((2**60).to_bytes(8, "little") + b"{}")
    with pytest.raises(UserError, match="claims"):
        load_state_dict(path)


def test_pickle_with_code_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "weights.bin"
    torch.save({"w": torch.ones(1), "evil": Payload()}, path)
    with pytest.raises(UserError, match="weights.bin"):
        load_state_dict(path)
    assert not marker.exists()


def test_no_remote_code_anywhere():
    repo = Path(__file__).resolve().parent.parent
    for folder in ("condkit", "adapters", "train", "preprocessors"):
        for source in (repo / folder).rglob("*.py"):
            assert "trust_remote_code=True" not in source.read_text(), source
