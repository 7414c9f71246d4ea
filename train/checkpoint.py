"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step-00000100/`` holding the trainable
parameters (safetensors), the optimizer and LR-scheduler states (weights-only torch
files), and ``state.json`` (step, seed, a reference to the data cache). It is written
under a temporary name and renamed into place, so a crash during a save never damages
the previous checkpoint; only the newest ``keep`` are kept. The data order, noise and
dropout of every step are drawn from generators seeded by ``(seed, step)``, so the
step number is all the RNG state a resume needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from condkit.errors import UserError
from condkit.io import atomic_folder, atomic_path, load_state_dict, save_safetensors_atomic, write_json_atomic

CHECKPOINT_DIR = "checkpoints"
PREFIX = "step-"


def save_checkpoint(output_dir: Path, step: int, params: list[torch.nn.Parameter], optimizer, lr_scheduler, state: dict, keep: int) -> Path:
    """Write a checkpoint for ``step`` and prune old ones.

    Args:
        output_dir: the run's output folder.
        step: optimizer steps completed.
        params: the trainable parameters, in the adapter's stable order.
        optimizer: the optimizer (its ``state_dict`` is saved).
        lr_scheduler: the LR scheduler.
        state: extra JSON data (seed, cache path, recipe source).
        keep: how many checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    final = output_dir / CHECKPOINT_DIR / f"{PREFIX}{step:08d}"
    with atomic_folder(final) as tmp:
        save_safetensors_atomic({f"param.{i:05d}": p for i, p in enumerate(params)}, tmp / "trainable.safetensors")
        for name, obj in (("optimizer.pt", optimizer.state_dict()), ("lr_scheduler.pt", lr_scheduler.state_dict())):
            with atomic_path(tmp / name) as path:
                torch.save(obj, path)
        write_json_atomic(tmp / "state.json", {**state, "step": step})
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file())


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """Turn ``--resume latest|PATH`` into a checkpoint folder.

    Args:
        output_dir: the run's output folder.
        resume: ``latest`` or a checkpoint folder path.

    Raises:
        UserError: no checkpoint exists or the path is not one.
    """
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume latest: no checkpoint in {output_dir / CHECKPOINT_DIR}")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no state.json)")
    return path


def load_checkpoint(path: Path, params: list[torch.nn.Parameter], optimizer, lr_scheduler) -> dict:
    """Restore parameters, optimizer and scheduler from a checkpoint; return its state.

    Args:
        path: a checkpoint folder.
        params: the trainable parameters, in the same order as when saved.
        optimizer: the optimizer to restore.
        lr_scheduler: the LR scheduler to restore.

    Raises:
        UserError: the checkpoint does not match the adapter (count or shapes).
    """
    saved = load_state_dict(path / "trainable.safetensors")
    if len(saved) != len(params):
        raise UserError(f"{path}: holds {len(saved)} trainable tensors but the adapter has {len(params)} (another recipe?)")
    with torch.no_grad():
        for i, param in enumerate(params):
            value = saved[f"param.{i:05d}"]
            if value.shape != param.shape:
                raise UserError(f"{path}: tensor {i} has shape {tuple(value.shape)}, the adapter expects {tuple(param.shape)}")
            param.copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
