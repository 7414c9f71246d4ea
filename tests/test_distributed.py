"""Scale-out on accelerate's and torch's engines (issue 18): DDP through ``accelerator.prepare``,
FSDP2 on CPU, DeepSpeed refused without GPUs, resume across world sizes.

One chain of runs of the ControlNet recipe (the largest trainable module), tiny settings:

- ``single``: 1 process accumulating 2 micro-batches, 6 steps, checkpoints at 2 and 4;
- ``ddp``: 2 processes (DDP, 1 micro-batch each), resumed from ``single``'s step-2 checkpoint;
- ``fsdp``: 2 processes (FSDP2, the branch sharded), resumed from the same checkpoint;
- ``back``: 1 process resumed from ``fsdp``'s step-4 checkpoint.

2 processes x 1 micro-batch draw the same samples and noise as 1 process x 2, so all four
must end with the same ControlNet within float tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from condkit.io import load_state_dict

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = REPO / "recipes" / "accelerate"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
RUN = ["train.max_steps=6", "train.batch_size=1", "train.checkpoint_every=2", "train.keep_checkpoints=3",
       "train.lr_warmup_steps=0", "train.log_every=1", "train.learning_rate=1e-3", "data.shapes_count=8",
       "validation.every=0", "validation.prompts=[]"]
TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def _launch(config: str, output: Path, *overrides: str, port: int) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file recipes/accelerate/CONFIG -m condkit train controlnet-canny ...``."""
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
            "--main_process_port", str(port), "-m", "condkit", "train", "controlnet-canny", "--output", str(output),
            "--no-progress", "--resume", "latest"]
    for override in (*RUN, *overrides):
        args += ["--set", override]
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=900)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(folder / "controlnet" / "diffusion_pytorch_model.safetensors")


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOLERANCE, msg=key)


def _resumable_copy(source: Path, step: int, target: Path) -> None:
    """A fresh output folder holding only ``source``'s checkpoint at ``step`` (``--resume latest`` takes it)."""
    name = f"step-{step:08d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """1 process, 2 micro-batches per step, 6 steps (checkpoints at 2 and 4)."""
    from condkit.train import train
    from condkit.train.config import load_recipe

    out = tmp_path_factory.mktemp("single") / "run"
    train(load_recipe(REPO / "recipes" / "controlnet-canny.yaml", [*RUN, "train.gradient_accumulation_steps=2"]), out, show_progress=False)
    return out


@pytest.mark.slow
def test_ddp_and_fsdp_two_processes_match_one_process_and_resume_across_world_sizes(single, tmp_path):
    from diffusers import ControlNetModel

    from condkit.train import train
    from condkit.train.config import load_recipe

    expected = _weights(single)
    runs = {}
    for engine, config, port in (("ddp", "two-process-cpu.yaml", 29541), ("fsdp", "fsdp-two-process-cpu.yaml", 29542)):
        out = tmp_path / engine
        _resumable_copy(single, 2, out)  # written by 1 process, resumed by 2
        result = _launch(config, out, port=port)
        assert result.returncode == 0, result.stderr[-3000:]
        run = json.loads((out / "run.json").read_text())
        assert run["world_size"] == 2 and run["resumed_from_step"] == 2
        assert len(set(run["parameter_digest_per_rank"])) == 1  # both ranks hold the same weights
        _assert_close(_weights(out), expected)
        # The step-4 checkpoint (gathered whole under FSDP) equals the 1-process one.
        saved = load_state_dict(out / "checkpoints" / "step-00000004" / "trainable.safetensors")
        _assert_close(saved, load_state_dict(single / "checkpoints" / "step-00000004" / "trainable.safetensors"))
        state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
        assert state["samples_seen"] == 4 * 2 and state["world_size"] == 2
        runs[engine] = out

    # The FSDP export is a plain diffusers ControlNet that stock diffusers loads.
    config = json.loads((runs["fsdp"] / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel"
    stock = ControlNetModel.from_pretrained(runs["fsdp"] / "controlnet", local_files_only=True)
    _assert_close({k: v for k, v in stock.state_dict().items()}, expected)

    # A checkpoint written by 2 FSDP processes resumes in 1 (accumulating 2: same steps).
    back = tmp_path / "back"
    _resumable_copy(runs["fsdp"], 4, back)
    recipe = load_recipe(REPO / "recipes" / "controlnet-canny.yaml", [*RUN, "train.gradient_accumulation_steps=2"])
    train(recipe, back, resume="latest", show_progress=False)
    _assert_close(_weights(back), expected)


def test_data_stream_continues_at_the_next_sample_in_another_world_size(single):
    """A resume with another number of processes neither repeats nor skips a sample."""
    from condkit.train.loop import _batch_positions

    state = json.loads((single / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["samples_seen"] == 2 * 2 * 1 and state["world_size"] == 1  # 2 steps x 2 micro-batches x batch 1
    start = state["samples_seen"]
    two = [start + p for rank in (0, 1) for p in _batch_positions(0, 1, world=2, rank=rank)]
    one = [start + p for micro in (0, 1) for p in _batch_positions(micro, 1, world=1, rank=0)]
    assert two == one == [4, 5]


def test_deepspeed_without_gpus_is_refused_in_one_line(tmp_path):
    """What ``accelerate launch --config_file recipes/accelerate/deepspeed-zero2.yaml`` starts, on a CPU machine."""
    env = {**ENV, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "condkit", "train", "controlnet-canny", "--output", str(tmp_path / "run"), "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs GPUs" in lines[0] and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("config, engine", [("deepspeed-zero2.yaml", "DEEPSPEED"), ("fsdp.yaml", "FSDP"),
                                            ("fsdp-two-process-cpu.yaml", "FSDP"), ("two-process-cpu.yaml", "MULTI_GPU"),
                                            ("multi-gpu.yaml", "MULTI_GPU")])
def test_accelerate_configs_load(config, engine):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(ACCELERATE / config))
    assert loaded.distributed_type.name == engine and loaded.num_processes == 2
    if engine == "DEEPSPEED":
        assert loaded.deepspeed_config["zero_stage"] == 2
    if engine == "FSDP":
        assert str(loaded.fsdp_config["fsdp_version"]) == "2"
