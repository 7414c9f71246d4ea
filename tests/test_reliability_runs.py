"""Runs, saves and checkpoints under hostile conditions (issue 19, items 2, 4, 11, 12, 13, 15).

A full disk at every save path, two runs sharing an output folder, foreign or damaged
checkpoints, SIGTERM and leftover temporary files, late-validated recipe keys, file
modes. Trainings are tiny LoRA runs on the embedded base, driven through the CLI
in-process (one warm interpreter); one SIGTERM test uses a real process.
"""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from condkit.cli import main
from condkit.errors import UserError
from condkit.io import atomic_folder, atomic_path, load_state_dict, save_safetensors_atomic, write_text_atomic
from condkit.train import checkpoint as ckpt

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WEIGHTS = "pytorch_lora_weights.safetensors"
NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"


def _make_images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(3):
        array = np.zeros((64, 64, 3), np.uint8)
        array[10 + 5 * i : 40, 10:40] = (200, 50 * i, 100)
        Image.fromarray(array).save(folder / f"{i}.png")
    return folder


def _write_recipe(path: Path, images: Path, **sections) -> Path:
    """A 3-step LoRA recipe checkpointing every step; ``sections`` update its sections."""
    raw = {
        "adapter": {"kind": "lora", "rank": 4},
        "data": {"path": str(images), "caption": "a zq square"},
        "train": {"max_steps": 3, "checkpoint_every": 1, "keep_checkpoints": 2, "log_every": 1},
        "seed": 11,
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def recipe(tmp_path) -> Path:
    return _write_recipe(tmp_path / "recipe.yaml", _make_images(tmp_path / "images"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, output) of one finished run: checkpoints at steps 1 and 2, the adapter at 3."""
    root = tmp_path_factory.mktemp("finished")
    recipe = _write_recipe(root / "recipe.yaml", _make_images(root / "images"))
    assert main(["train", str(recipe), "--output", str(root / "run"), "--no-progress"]) == 0
    return recipe, root / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished run that a test may change."""
    recipe, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    return recipe, tmp_path / "run"


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``condkit ARGS`` in this process; return the exit code and stderr."""
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def _error_line(code: int, err: str) -> str:
    """The one ``condkit: error:`` line of a failed command (exit 2, no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("condkit: error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    return lines[0]


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name or ".old-" in p.name]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and "logs" not in p.parts}


# ---- item 2: a full disk at save time --------------------------------------------


def _fail_safetensors_writes(monkeypatch, fails) -> None:
    """Make safetensors' writer report a full disk for the files ``fails(path)`` picks."""
    import safetensors.torch
    from safetensors import SafetensorError

    real_save_file = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if fails(str(filename)):
            raise SafetensorError(NO_SPACE)
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_adapter_save_on_a_full_disk_checkpoints_the_weights_and_writes_no_run_json(recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _fail_safetensors_writes(monkeypatch, lambda path: WEIGHTS in path)
    line = _error_line(*_cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--set", "train.checkpoint_every=0"))
    assert str(out / WEIGHTS) in line and "No space left on device" in line
    assert str(out / "checkpoints" / "step-00000003") in line and "--resume latest" in line
    assert not (out / "run.json").exists()  # it must not claim a result that is missing
    assert _temporaries(out) == []

    monkeypatch.undo()  # room again: the resume only exports the checkpointed weights
    code, err = _cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--resume", "latest", "--set", "train.checkpoint_every=0")
    assert code == 0, err[-2000:]
    saved = load_state_dict(out / "checkpoints" / "step-00000003" / "trainable.safetensors")
    assert len(load_state_dict(out / WEIGHTS)) == len(saved)
    assert yaml.safe_load((out / "run.json").read_text())["resumed_from_step"] == 3


def test_a_disk_full_everywhere_names_the_newest_checkpoint(recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _fail_safetensors_writes(monkeypatch, lambda path: "step-00000002" not in path)  # only the step-2 checkpoint fits
    line = _error_line(*_cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--set", "train.checkpoint_every=2"))
    assert str(out / WEIGHTS) in line and "No space left on device" in line
    assert f"newest checkpoint is {out / 'checkpoints' / 'step-00000002'}" in line
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]
    assert len(ckpt.read_checkpoint(out / "checkpoints" / "step-00000002").trainable) > 0
    assert not (out / "run.json").exists() and not (out / WEIGHTS).exists()
    assert _temporaries(out) == []


@pytest.mark.parametrize("target", ["run.json", "validation"])
def test_run_json_or_validation_grid_on_a_full_disk_is_one_line_and_keeps_the_adapter(recipe, tmp_path, monkeypatch, capsys, target):
    import condkit.io as io

    real_replace = io.os.replace

    def replace(src, dst):  # the rename that would put this file in place finds no room
        if target in (Path(dst).name, Path(dst).parent.name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    out = tmp_path / "run"
    line = _error_line(*_cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--set", "train.checkpoint_every=0",
                             "--set", "validation.prompts=[a zq square]", "--set", "validation.num_inference_steps=2"))
    assert str(out / target) in line and "No space left on device" in line
    assert (out / WEIGHTS).is_file() and _temporaries(out) == []
    if target == "validation":
        assert "the adapter itself is saved" in line and (out / "run.json").is_file()


def _torch_save_on_a_full_disk(obj, handle):
    """What ``torch.save`` raises when the disk fills: a RuntimeError over the OSError."""
    try:
        handle.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def test_checkpoint_on_a_full_disk_names_the_file_and_keeps_the_previous_one(monkeypatch, tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    first = ckpt.save_checkpoint(tmp_path, 2, [param], optimizer, scheduler, {}, keep=3)
    monkeypatch.setattr(ckpt.torch, "save", _torch_save_on_a_full_disk)
    with pytest.raises(UserError) as err:
        ckpt.save_checkpoint(tmp_path, 4, [param], optimizer, scheduler, {}, keep=3)
    message = str(err.value)
    assert str(tmp_path / "checkpoints" / "step-00000004" / "optimizer.pt") in message and "No space left on device" in message
    assert f"previous checkpoint {first} is kept" in message and "\n" not in message
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs (needs root and mount; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs root and a mountable tmpfs")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_is_one_line_for_checkpoints_and_weights(tiny_tmpfs):
    small = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([small])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    first = ckpt.save_checkpoint(tiny_tmpfs, 1, [small], optimizer, scheduler, {}, keep=3)
    big = torch.nn.Parameter(torch.ones(256 * 1024))  # 1 MiB
    with pytest.raises(UserError, match="No space left on device") as err:
        ckpt.save_checkpoint(tiny_tmpfs, 2, [big], torch.optim.AdamW([big]), scheduler, {}, keep=3)
    assert "trainable.safetensors" in str(err.value) and str(first) in str(err.value)
    with pytest.raises(UserError, match="No space left on device") as err:
        save_safetensors_atomic({"w": big}, tiny_tmpfs / WEIGHTS)
    assert str(tiny_tmpfs / WEIGHTS) in str(err.value)
    assert ckpt.list_checkpoints(tiny_tmpfs) == [first]
    assert sorted(p.name for p in tiny_tmpfs.rglob("*")) == sorted(["checkpoints", first.name, *(p.name for p in first.iterdir())])


# ---- item 4: one run per output folder; resumes continue only their own run ------


def test_a_second_run_into_a_busy_output_is_refused_naming_the_holder(recipe, tmp_path, capsys):
    from condkit.train.loop import lock_output

    out = tmp_path / "run"
    with lock_output(out):  # another run holds the folder (flock: per open file, so this process counts too)
        line = _error_line(*_cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--overwrite"))
        assert "another training run" in line and f"pid {os.getpid()}" in line and str(out) in line
    assert sorted(p.name for p in out.iterdir()) == [".condkit-train.lock"]  # nothing written


def test_a_killed_runs_lock_does_not_block(tmp_path):
    from condkit.train.loop import LOCK_FILE, lock_output

    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, time; fd = os.open({str(tmp_path / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT); "
         "os.write(fd, b'pid %d on elsewhere' % os.getpid()); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid} on elsewhere"):
            with lock_output(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock_output(tmp_path):  # the kernel dropped the dead process's lock
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")


def test_overwrite_removes_the_earlier_runs_checkpoints(run_copy, capsys):
    recipe, out = run_copy
    assert ckpt.list_checkpoints(out)
    code, err = _cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--overwrite", "--set", "train.checkpoint_every=0", "--set", "train.max_steps=1")
    assert code == 0, err[-2000:]
    assert ckpt.list_checkpoints(out) == []
    line = _error_line(*_cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--resume", "latest"))
    assert "no checkpoint" in line


def test_resuming_a_checkpoint_of_other_settings_is_refused_naming_the_keys(run_copy, capsys):
    recipe, out = run_copy
    before = _snapshot(out)
    line = _error_line(*_cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--resume", "latest",
                             "--set", "seed=12", "--set", "adapter.rank=8", "--set", "train.max_steps=5"))
    assert "seed 11 -> 12" in line and "adapter.rank 4 -> 8" in line and "max_steps" not in line  # max_steps may change
    assert str(out / "checkpoints" / "step-00000002") in line
    assert _snapshot(out) == before


# ---- item 15: resume below the checkpoint's step; SIGTERM and leftover temporaries ----


def test_resuming_with_max_steps_below_the_checkpoint_is_refused(run_copy, capsys):
    recipe, out = run_copy
    before = _snapshot(out)
    line = _error_line(*_cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--resume", "latest", "--set", "train.max_steps=1"))
    assert "step 2" in line and "train.max_steps is 1" in line
    assert _snapshot(out) == before  # the old weights are not re-exported as a 1-step run


def test_sigterm_unwinds_through_an_atomic_write(tmp_path):
    from condkit.train.loop import _sigterm_stops_the_run

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        with _sigterm_stops_the_run(), atomic_path(tmp_path / "weights.safetensors") as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs before this ends
    assert stop.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is removed afterwards


@pytest.mark.slow
def test_sigterm_stops_a_real_run_without_temporary_files(recipe, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "condkit", "train", str(recipe), "--output", str(out), "--no-progress", "--set", "train.max_steps=100000"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000003").is_dir():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert _temporaries(out) == []
    assert ckpt.list_checkpoints(out)


def test_temporaries_of_a_killed_run_are_cleaned_at_the_next_start(run_copy, capsys):
    recipe, out = run_copy
    checkpoints = out / "checkpoints"
    (out / f".{WEIGHTS}.ab12cd34.tmp").write_bytes(b"half")
    (out / "validation").mkdir()
    (out / "validation" / ".step-00000002.png.k9x_2abc.tmp").write_bytes(b"half")
    (checkpoints / ".step-00000003.tmp-99999").mkdir()
    (checkpoints / ".step-00000003.tmp-99999" / "optimizer.pt").write_bytes(b"half")
    os.replace(checkpoints / "step-00000002", checkpoints / ".step-00000002.old-99999")  # killed mid-swap
    code, err = _cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--resume", "latest")
    assert code == 0, err[-2000:]
    assert _temporaries(out) == []
    assert (checkpoints / "step-00000002" / "optimizer.pt").is_file()  # the swapped-out checkpoint is back
    assert yaml.safe_load((out / "run.json").read_text())["resumed_from_step"] == 2


# ---- item 11: one line instead of a traceback ----------------------------------------


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda c: c.joinpath("optimizer.pt").write_bytes(c.joinpath("optimizer.pt").read_bytes()[:100]), "optimizer.pt"),
        (lambda c: c.joinpath("lr_scheduler.pt").unlink(), "lr_scheduler.pt"),
        (lambda c: c.joinpath("state.json").write_text("{junk"), "state.json"),
    ],
    ids=["truncated-optimizer", "missing-scheduler", "junk-state"],
)
def test_a_damaged_latest_checkpoint_offers_the_previous_good_one(run_copy, capsys, damage, named):
    recipe, out = run_copy
    latest = out / "checkpoints" / "step-00000002"
    damage(latest)
    line = _error_line(*_cli(capsys, "train", str(recipe), "--output", str(out), "--no-progress", "--resume", "latest"))
    assert str(latest / named) in line
    assert f"--resume {out / 'checkpoints' / 'step-00000001'}" in line


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("adapter: {kind: lora}\ndata: {caption: 'un caf\xe9'}\n".encode("latin-1"))
    line = _error_line(*_cli(capsys, "train", str(path), "--validate-only"))
    assert str(path) in line and "UTF-8" in line


@pytest.mark.parametrize("seed", [2**64, -1])
def test_a_seed_out_of_range_is_refused_by_validate_only(recipe, capsys, seed):
    line = _error_line(*_cli(capsys, "train", str(recipe), "--validate-only", "--set", f"seed={seed}"))
    assert "seed" in line and str(seed) in line


@pytest.fixture
def read_only_folder(tmp_path):
    """An empty folder nobody may write to (a read-only mount for root, mode 0555 otherwise)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("root cannot be kept out of a folder without a read-only mount")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_is_refused_before_any_work(recipe, read_only_folder, capsys):
    started = time.perf_counter()
    line = _error_line(*_cli(capsys, "train", str(recipe), "--output", str(read_only_folder), "--no-progress"))
    assert str(read_only_folder) in line and "cannot write" in line
    assert time.perf_counter() - started < 60  # well before encoding and training


# ---- item 12: every key checked before any work, list elements included ----------


@pytest.mark.parametrize(
    "validation, named",
    [({"prompts": ["a zq square"], "images": ["missing.png"]}, "validation.images[0] = 'missing.png'"), ({"prompts": [1, 2]}, "validation.prompts[0]")],
    ids=["missing-image", "number-prompts"],
)
def test_bad_validation_entries_fail_before_any_work(tmp_path, capsys, validation, named):
    recipe = _write_recipe(tmp_path / "recipe.yaml", tmp_path / "images-not-needed", validation=validation)
    line = _error_line(*_cli(capsys, "train", str(recipe), "--validate-only"))
    assert named in line
    line = _error_line(*_cli(capsys, "train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress"))
    assert named in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [("frozen_adapters", "[5]"), ("data.prior_prompt", "[1, a dog]")])
def test_list_entries_that_are_not_text_are_named(recipe, capsys, key, value):
    line = _error_line(*_cli(capsys, "train", str(recipe), "--validate-only", "--set", f"{key}={value}"))
    assert f"{key}[0] must be text" in line


# ---- item 13: written files respect the umask ---------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "run.json", "{}")
        save_safetensors_atomic({"w": torch.ones(2)}, tmp_path / WEIGHTS)
        with atomic_folder(tmp_path / "unet") as folder:
            save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([param])
        checkpoint = ckpt.save_checkpoint(tmp_path, 1, [param], optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), {}, keep=1)
    finally:
        os.umask(previous)
    written = [tmp_path / "run.json", tmp_path / WEIGHTS, tmp_path / "unet" / "model.safetensors", *checkpoint.iterdir()]
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written} == {str(p.relative_to(tmp_path)): oct(mode) for p in written}
