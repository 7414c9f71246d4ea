"""EMA of the trained weights (issue 17, ``train.ema_decay``): what is exported, validated and resumed.

Tiny LoRA runs on the embedded base. A callback records the raw weights after every
step; the test computes the expected average from them on its own (float64, the
diffusers formulas written out) and compares it with what the run exported and what
validation sampled with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
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
from condkit.io import load_state_dict
from condkit.train import loop
from condkit.train.checkpoint import EMA_FILE, list_checkpoints
from condkit.train.config import recipe_from_dict
from condkit.train.ema import METADATA_KEY, RAW_FOLDER
from condkit.train.loop import TrainCallback, train

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
LORA_FILE = "pytorch_lora_weights.safetensors"
DECAY = 0.3  # low enough that the cap is reached within the run: (1 + n) / (10 + n) passes 0.3 at n = 3
STEPS = 6


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(4):
        array = np.zeros((64, 64, 3), np.uint8)
        array[8 + 3 * i : 40 + 3 * i, 12:44] = (220, 40 * i, 120)
        Image.fromarray(array).save(folder / f"{i}.png")
    return folder


def _recipe(images: Path, train_keys: dict, validation: dict | None = None):
    return recipe_from_dict(
        {
            "adapter": {"kind": "lora", "rank": 2},
            "data": {"path": str(images), "caption": "a zq square"},
            "train": {"max_steps": STEPS, "batch_size": 1, "learning_rate": 2e-2, "checkpoint_every": 3, "log_every": 1, **train_keys},
            "validation": validation or {},
            "seed": 5,
        }
    )


class Recorder(TrainCallback):
    """The raw weights after every step, whether it was skipped, and the weights validation sampled with."""

    def __init__(self) -> None:
        self.raw: list[dict[str, torch.Tensor]] = []
        self.skipped: list[bool] = []
        self.validated: dict[int, dict[str, torch.Tensor]] = {}
        self.ema_dtypes: set[torch.dtype] = set()
        self.ema_updates = -1

    def on_setup_end(self, state) -> None:
        validate = state.adapter.validate

        def recording_validate(base, validation, step):
            self.validated[step] = _copy(state.params)
            return validate(base, validation, step)

        state.adapter.validate = recording_validate

    def on_step_end(self, state) -> None:
        self.skipped.append(state.skipped > sum(self.skipped))
        self.raw.append(_copy(state.params))

    def on_train_end(self, state) -> None:
        self.ema_dtypes = {shadow.dtype for shadow in state.ema.shadow_params} if state.ema is not None else set()
        self.ema_updates = state.ema.optimization_step if state.ema is not None else -1


def _copy(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def _expected_ema(raw: list[dict[str, torch.Tensor]], skipped: list[bool], cap: float, power: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """The average after each step, from the raw weights: update n (skipped steps are none)
    uses decay 0 for n = 1, then min(cap, (1 + m) / (10 + m)), or min(cap, 1 - (1 + m)^-power), m = n - 1."""
    averages, average, n = [], None, 0
    for weights, skip in zip(raw, skipped):
        if not skip:
            n += 1
            m = n - 1
            decay = 0.0 if m == 0 else min(cap, 1 - (1 + m) ** -power if power else (1 + m) / (10 + m))
            average = {k: v.double() if average is None else decay * average[k] + (1 - decay) * v.double() for k, v in weights.items()}
        averages.append(average)
    return averages


def _file_key(param_name: str) -> str:
    """A trainable parameter's key in the exported diffusers LoRA file."""
    return param_name.replace(".default.", ".")


def _assert_matches(file_tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert sorted(file_tensors) == sorted(_file_key(k) for k in expected)
    for name, value in expected.items():
        torch.testing.assert_close(file_tensors[_file_key(name)].double(), value, rtol=1e-5, atol=atol, msg=name)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ema_run(images, tmp_path_factory):
    """6 steps with train.ema_decay, validation at steps 2 and 4 (and at the end), a checkpoint at step 3."""
    recorder = Recorder()
    out = tmp_path_factory.mktemp("ema") / "run"
    recipe = _recipe(images, {"ema_decay": DECAY}, {"prompts": ["a zq square"], "every": 2, "num_inference_steps": 2})
    train(recipe, out, show_progress=False, callbacks=[recorder])
    return out, recorder, recipe


@pytest.fixture(scope="module")
def plain_run(images, tmp_path_factory):
    """The same run without EMA and without validation."""
    recorder = Recorder()
    out = tmp_path_factory.mktemp("plain") / "run"
    train(_recipe(images, {}), out, show_progress=False, callbacks=[recorder])
    return out, recorder


def test_exported_adapter_is_the_ema_of_the_per_step_weights(ema_run):
    out, recorder, _ = ema_run
    expected = _expected_ema(recorder.raw, recorder.skipped, DECAY)[-1]
    _assert_matches(load_state_dict(out / LORA_FILE), expected)
    assert _max_difference(expected, recorder.raw[-1]) > 1e-3  # the average is not the raw weights (the check above can fail)
    assert recorder.ema_dtypes == {torch.float32} and recorder.ema_updates == STEPS


def test_raw_weights_are_exported_beside_it_loadable_the_same_way(ema_run):
    from condkit.adapters.registry import detect_kind, load_adapter
    from condkit.base import load_base

    out, recorder, _ = ema_run
    raw = load_state_dict(out / RAW_FOLDER / LORA_FILE)
    final = recorder.raw[-1]
    assert sorted(raw) == sorted(_file_key(k) for k in final)
    for name, value in final.items():
        assert torch.equal(raw[_file_key(name)], value), name
    assert detect_kind(out / RAW_FOLDER) == detect_kind(out) == "lora"
    assert sorted(p.name for p in (out / RAW_FOLDER).iterdir()) == sorted(p.name for p in out.iterdir() if p.name in {LORA_FILE, "README.md", "condkit_adapter.json"})
    base = load_base("embedded")
    assert load_adapter(out / RAW_FOLDER, base).kind == "lora"  # condkit (and diffusers' load_lora_weights) read it like the result


def test_validation_samples_with_the_ema_weights(ema_run):
    out, recorder, _ = ema_run
    averages = _expected_ema(recorder.raw, recorder.skipped, DECAY)
    assert sorted(recorder.validated) == [2, 4, STEPS]
    for step, weights in recorder.validated.items():
        for name, value in averages[step - 1].items():
            torch.testing.assert_close(weights[name].double(), value, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
        assert _max_difference(weights, recorder.raw[step - 1]) > 1e-4
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-00000002.png", "step-00000004.png", f"step-{STEPS:08d}.png"]


def test_ema_and_its_validation_swaps_leave_training_exactly_as_without(ema_run, plain_run):
    (out, recorder, _), (plain_out, plain) = ema_run, plain_run
    for step, (a, b) in enumerate(zip(recorder.raw, plain.raw), start=1):
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {step}: {name}"
    assert load_state_dict(out / RAW_FOLDER / LORA_FILE).keys() == load_state_dict(plain_out / LORA_FILE).keys()
    for key, value in load_state_dict(plain_out / LORA_FILE).items():
        assert torch.equal(load_state_dict(out / RAW_FOLDER / LORA_FILE)[key], value), key


def test_ema_off_writes_the_same_files_as_before(plain_run):
    out, plain = plain_run
    assert sorted(p.name for p in out.iterdir()) == [".condkit-train.lock", "README.md", "checkpoints", "condkit_adapter.json", "logs",
                                                     LORA_FILE, "run.json"]
    checkpoint = list_checkpoints(out)[-1]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["lr_scheduler.pt", "optimizer.pt", "state.json", "trainable.safetensors"]
    for name, value in plain.raw[-1].items():  # the adapter is the raw weights
        assert torch.equal(load_state_dict(out / LORA_FILE)[_file_key(name)], value), name
    assert plain.ema_updates == -1


def test_overwrite_without_ema_removes_an_earlier_runs_raw_weights(ema_run, images, tmp_path):
    """``--overwrite`` of an EMA run's folder by a run without EMA leaves no stale raw/ behind
    (it would pass for this run's raw weights)."""
    out = tmp_path / "run"
    shutil.copytree(ema_run[0], out, ignore=shutil.ignore_patterns(".condkit-train.lock"))
    assert (out / RAW_FOLDER / LORA_FILE).is_file()
    train(_recipe(images, {"max_steps": 2, "checkpoint_every": 0}), out, overwrite=True, show_progress=False)
    assert not (out / RAW_FOLDER).exists() and not (out / "checkpoints").exists()
    assert (out / LORA_FILE).is_file()


def test_checkpoint_holds_the_ema_and_its_update_count(ema_run):
    out, recorder, _ = ema_run
    checkpoint = out / "checkpoints" / "step-00000003"
    saved = load_state_dict(checkpoint / EMA_FILE)
    expected = _expected_ema(recorder.raw, recorder.skipped, DECAY)[2]
    assert saved.keys() == expected.keys() and all(t.dtype == torch.float32 for t in saved.values())
    for name, value in expected.items():
        torch.testing.assert_close(saved[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
    from condkit.io import read_safetensors_metadata

    counters = json.loads(read_safetensors_metadata(checkpoint / EMA_FILE)[METADATA_KEY])
    assert counters["optimization_step"] == 3 and counters["decay"] == DECAY


def test_resume_repeats_the_run_bit_for_bit_raw_and_ema(ema_run, tmp_path):
    out, _, recipe = ema_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    train(recipe, resumed, resume="latest", show_progress=False)
    for file in (LORA_FILE, f"{RAW_FOLDER}/{LORA_FILE}"):
        a, b = load_state_dict(out / file), load_state_dict(resumed / file)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{file}: {key}"


def test_resume_with_ema_switched_on_or_off_is_refused_in_one_line(ema_run, plain_run, images, tmp_path):
    (ema_out, _, ema_recipe), (plain_out, _) = ema_run, plain_run
    cases = [
        (plain_out, ema_recipe, r"train\.ema_decay 0\.0 -> 0\.3"),  # a run without EMA continued with it
        (ema_out, _recipe(images, {}), r"train\.ema_decay 0\.3 -> 0\.0"),  # and the other way round
    ]
    for number, (source, recipe, message) in enumerate(cases):
        target = tmp_path / str(number)
        shutil.copytree(source / "checkpoints" / "step-00000003", target / "checkpoints" / "step-00000003")
        with pytest.raises(UserError, match=message) as err:
            train(recipe, target, resume="latest", show_progress=False)
        assert "\n" not in str(err.value)


def test_checkpoint_older_than_the_key_resumed_with_ema_is_refused(plain_run, ema_run, tmp_path):
    (plain_out, _), (_, _, ema_recipe) = plain_run, ema_run
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    shutil.copytree(plain_out / "checkpoints" / "step-00000003", checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    state["recipe_values"] = {k: v for k, v in state["recipe_values"].items() if not k.startswith("train.ema_")}  # written before the keys existed
    (checkpoint / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"holds no EMA weights \(ema\.safetensors\) but train\.ema_decay = 0\.3") as err:
        train(ema_recipe, tmp_path / "run", resume="latest", show_progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / LORA_FILE).exists()


def test_skipped_steps_do_not_update_the_ema_warmup_power_and_bf16(images, tmp_path, monkeypatch):
    """A step skipped for a NaN loss neither moves the average nor counts in its warm-up; bf16 keeps it fp32."""
    real_loss = loop._micro_batch_loss
    monkeypatch.setattr(loop, "_micro_batch_loss", lambda state, step, micro: real_loss(state, step, micro) * (float("nan") if step == 2 else 1.0))
    recorder = Recorder()
    recipe = _recipe(images, {"ema_decay": 0.6, "ema_power": 1.0, "on_nonfinite_loss": "skip", "mixed_precision": "bf16", "checkpoint_every": 0})
    train(recipe, tmp_path / "run", show_progress=False, callbacks=[recorder])
    assert recorder.skipped == [False, False, True, False, False, False]
    assert torch.equal(recorder.raw[2][next(iter(recorder.raw[2]))], recorder.raw[1][next(iter(recorder.raw[1]))])
    expected = _expected_ema(recorder.raw, recorder.skipped, cap=0.6, power=1.0)[-1]
    _assert_matches(load_state_dict(tmp_path / "run" / LORA_FILE), expected)
    # Counting the skipped step as an update would give another average.
    wrong = _expected_ema(recorder.raw, [False] * STEPS, cap=0.6, power=1.0)[-1]
    assert _max_difference(expected, wrong) > 1e-4
    assert recorder.ema_dtypes == {torch.float32} and recorder.ema_updates == STEPS - 1


def test_recipe_keys_are_in_the_readme_table():
    from condkit.train.config import describe_schema

    readme = (REPO / "README.md").read_text()
    rows = [line for line in describe_schema().splitlines() if line.startswith(("| `train.ema_decay`", "| `train.ema_power`"))]
    assert len(rows) == 2 and all(row in readme for row in rows)


def test_bad_values_name_the_key():
    with pytest.raises(UserError, match=r"train\.ema_decay = 1\.5 is out of range"):
        recipe_from_dict({"adapter": {"kind": "lora"}, "train": {"ema_decay": 1.5}})


def test_deepspeed_is_refused_in_one_line():
    from condkit.train import ema

    cfg = recipe_from_dict({"adapter": {"kind": "lora"}, "train": {"ema_decay": 0.9}}).train
    with pytest.raises(UserError, match=r"train\.ema_decay: not available under DeepSpeed"):
        ema.create(cfg, "deepspeed", {"w": torch.nn.Parameter(torch.ones(2))}, None)
    assert ema.create(dataclasses.replace(cfg, ema_decay=0.0), "deepspeed", {"w": torch.nn.Parameter(torch.ones(2))}, None) is None


# ---- kill -9 and --resume latest, as tests/test_reliability.py does it, with EMA on ----
@pytest.fixture
def ema_recipe_file(images, tmp_path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "# condkit train recipe.yaml\n"
        + yaml.safe_dump(
            {
                "adapter": {"kind": "lora", "rank": 2, "dropout": 0.1},
                "data": {"path": str(images), "caption": "a zq square", "flip": True, "caption_dropout": 0.2},
                "train": {"max_steps": 16, "batch_size": 1, "learning_rate": 1e-2, "checkpoint_every": 4, "keep_checkpoints": 2,
                          "ema_decay": 0.5},
                "seed": 11,
            }
        )
    )
    return recipe


def _condkit(*args):
    return subprocess.run([sys.executable, "-m", "condkit", *args], env=ENV, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run_raw_and_ema(ema_recipe_file, tmp_path):
    straight = tmp_path / "straight"
    result = _condkit("train", str(ema_recipe_file), "--output", str(straight), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]

    crashed = tmp_path / "crashed"
    train_killed_after_checkpoint(ema_recipe_file, crashed, step=8, timeout=600)
    assert not (crashed / LORA_FILE).exists()
    assert (crashed / "checkpoints" / "step-00000008" / EMA_FILE).is_file()

    resumed = _condkit("train", str(ema_recipe_file), "--output", str(crashed), "--resume", "latest", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for file in (LORA_FILE, f"{RAW_FOLDER}/{LORA_FILE}"):
        a, b = load_state_dict(straight / file), load_state_dict(crashed / file)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{file}: {key}"
    assert _max_difference(load_state_dict(crashed / LORA_FILE), load_state_dict(crashed / RAW_FOLDER / LORA_FILE)) > 1e-4


# ---- DDP and FSDP2: the chain of tests/test_distributed.py, with EMA on ----
DISTRIBUTED_RUN = ["train.max_steps=4", "train.batch_size=1", "train.checkpoint_every=2", "train.lr_warmup_steps=0", "train.log_every=1",
                   "train.learning_rate=1e-3", "data.shapes_count=8", "validation.every=0", "validation.prompts=[]", "train.ema_decay=0.5"]


def _controlnet(folder: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(folder / "controlnet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_ddp_and_fsdp_keep_the_ema_like_one_process(tmp_path):
    """1 process accumulating 2 micro-batches, then 2 processes (DDP, FSDP2) resumed from its
    step-2 checkpoint: the EMA (export) and the raw weights (raw/) agree within float tolerance."""
    from condkit.train.config import load_recipe

    single = tmp_path / "single"
    train(load_recipe(REPO / "recipes" / "controlnet-canny.yaml", [*DISTRIBUTED_RUN, "train.gradient_accumulation_steps=2"]), single,
          show_progress=False)
    assert _max_difference(_controlnet(single), _controlnet(single / RAW_FOLDER)) > 1e-6
    for config, port in (("two-process-cpu.yaml", 29551), ("fsdp-two-process-cpu.yaml", 29552)):
        out = tmp_path / config
        shutil.copytree(single / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000002")
        args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" / "accelerate" / config),
                "--main_process_port", str(port), "-m", "condkit", "train", "controlnet-canny", "--output", str(out), "--no-progress",
                "--resume", "latest"]
        for override in DISTRIBUTED_RUN:
            args += ["--set", override]
        result = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        run = json.loads((out / "run.json").read_text())
        assert run["world_size"] == 2 and len(set(run["parameter_digest_per_rank"])) == 1
        for folder in (Path("."), Path(RAW_FOLDER)):
            expected, got = _controlnet(single / folder), _controlnet(out / folder)
            assert expected.keys() == got.keys()
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"{config} {folder}: {key}")
