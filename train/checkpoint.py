"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step-00000100/`` holding the trainable
parameters (safetensors, by parameter name), the optimizer and LR-scheduler states
(weights-only torch files; the optimizer's per-parameter state is keyed by the same
names), and ``state.json`` (step, seed, the recipe's values, the base's fingerprint,
``samples_seen``), and with ``train.ema_decay`` the EMA weights (``ema.safetensors``,
by the same names). Parameters sharded over processes (FSDP2) are gathered whole, so a
checkpoint does not depend on how many processes wrote it. It is written under a
temporary name and renamed into place, so a crash or a full disk during a save never
damages the previous checkpoint; only the newest ``keep`` are kept. The data order,
noise and dropout of every step are drawn from generators seeded by ``(seed, step)``,
so the step number (with ``samples_seen``, where the data stream stands) is all the
RNG state a resume needs. Because everything is stored by name, an adapter that lists
its parameters in another order after a restart still resumes exactly, and a checkpoint
of another adapter is refused naming the first parameter that does not match.

A checkpoint is read whole before anything is restored (:func:`read_checkpoint`): a
damaged file is named in one line that offers the newest checkpoint that still reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from condkit.errors import UserError
from condkit.io import atomic_folder, load_state_dict, read_safetensors_metadata, write_failure_reason

# Trainable parameters: a name -> parameter mapping, or a list (named param.00000, ... by position).
Parameters = dict[str, torch.nn.Parameter] | list[torch.nn.Parameter]

CHECKPOINT_DIR = "checkpoints"
PREFIX = "step-"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "lr_scheduler.pt"
# train.ema_decay: the EMA weights by parameter name, EMAModel's counters in the metadata (see condkit.train.ema).
EMA_FILE = "ema.safetensors"

POSITIONAL_PREFIX = "param."
# Marks an optimizer state whose per-parameter entries are keyed by parameter name.
NAMED_OPTIMIZER_STATE = "condkit_parameter_names"

# Recipe keys a resume may change: they do not alter the steps already taken (how long
# to train, how often to save/log/validate, how data is loaded).
# train.gradient_accumulation_steps may change with the number of processes: the data
# stream continues at the next unseen sample (see condkit.train.loop), and with
# processes x accumulation unchanged the steps that follow are the same.
RESUME_MAY_CHANGE = ("train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                     "train.on_nonfinite_loss", "train.gradient_accumulation_steps", "data.num_workers", "data.cache",
                     "validation.")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read into memory, not yet restored into a model."""

    path: Path
    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    lr_scheduler: dict
    ema: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None  # (tensors, metadata) of EMA_FILE, if it has one

    @property
    def step(self) -> int:
        """Optimizer steps completed when it was saved."""
        return self.state["step"]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A run's trainable state as full CPU tensors, ready to write (see :func:`take_snapshot`)."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict
    lr_scheduler: dict
    ema: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None  # EMA weights by name and metadata (train.ema_decay)


def take_snapshot(params: Parameters, optimizer, lr_scheduler, ema: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None) -> Snapshot:
    """Copy the trainable parameters and the optimizer and scheduler states to the CPU, by name.

    Sharded parameters (FSDP2 DTensors) and their optimizer states are gathered whole,
    so a checkpoint does not depend on the number of processes that wrote it; gathering
    is a collective, so under FSDP every process calls this (the main one writes).

    Args:
        params: the trainable parameters by name (a list is named by position).
        optimizer: the (unwrapped) optimizer.
        lr_scheduler: the LR scheduler.
        ema: the EMA weights (full CPU tensors by parameter name) and their metadata, when
            ``train.ema_decay`` is on (see :func:`condkit.train.ema.snapshot`).
    """
    named = _named(params)
    tensors = {name: full_tensor(p.detach()).to("cpu").contiguous() for name, p in named.items()}
    optimizer_state = _optimizer_state_by_name(optimizer, named)
    optimizer_state["state"] = {
        name: {key: full_tensor(value).to("cpu") if torch.is_tensor(value) else value for key, value in entry.items()}
        for name, entry in optimizer_state["state"].items()
    }
    return Snapshot(tensors, optimizer_state, lr_scheduler.state_dict(), ema)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor shard is gathered from every process, others are as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def save_checkpoint(output_dir: Path, step: int, params: Parameters, optimizer, lr_scheduler, state: dict, keep: int) -> Path:
    """Write a checkpoint for ``step`` and prune old ones (one process; see :func:`write_checkpoint`).

    Args:
        output_dir: the run's output folder.
        step: optimizer steps completed.
        params: the trainable parameters by name (a list is named by position).
        optimizer: the optimizer (its ``state_dict`` is saved).
        lr_scheduler: the LR scheduler.
        state: extra JSON data (seed, recipe values, base fingerprint).
        keep: how many checkpoints to keep.

    Returns:
        The checkpoint folder.

    Raises:
        UserError: as :func:`write_checkpoint`.
    """
    return write_checkpoint(output_dir, step, take_snapshot(params, optimizer, lr_scheduler), state, keep)


def write_checkpoint(output_dir: Path, step: int, snapshot: Snapshot, state: dict, keep: int) -> Path:
    """Write a checkpoint for ``step`` from a snapshot and prune old ones.

    Args:
        output_dir: the run's output folder.
        step: optimizer steps completed.
        snapshot: from :func:`take_snapshot`.
        state: extra JSON data (seed, recipe values, base fingerprint).
        keep: how many checkpoints to keep.

    Returns:
        The checkpoint folder.

    Raises:
        UserError: a file could not be written (named, e.g. a full disk); the previous
            checkpoints are untouched and the message names the newest one.
    """
    from safetensors.torch import save_file

    final = output_dir / CHECKPOINT_DIR / f"{PREFIX}{step:08d}"
    writers: dict[str, Callable[[Path], None]] = {
        TRAINABLE_FILE: lambda path: save_file(snapshot.trainable, str(path)),
        OPTIMIZER_FILE: lambda path: _torch_save(snapshot.optimizer, path),
        SCHEDULER_FILE: lambda path: _torch_save(snapshot.lr_scheduler, path),
        STATE_FILE: lambda path: path.write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n"),
    }
    if snapshot.ema is not None:
        writers[EMA_FILE] = lambda path: save_file(snapshot.ema[0], str(path), metadata=snapshot.ema[1])
    try:
        with atomic_folder(final) as tmp:
            for name, write in writers.items():
                _write_file(tmp / name, final / name, write)
    except UserError as exc:
        previous = list_checkpoints(output_dir)
        kept = f"the previous checkpoint {previous[-1]} is kept" if previous else "no earlier checkpoint exists"
        raise UserError(f"checkpoint at step {step} not saved: {exc}; {kept}") from None
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _torch_save(obj: object, path: Path) -> None:
    # Through a Python file object, so a failed write surfaces as an OSError (torch's own
    # writer reports a full disk as "unexpected pos").
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def _write_file(path: Path, final: Path, write: Callable[[Path], None]) -> None:
    """Write and fsync one file of a checkpoint folder under construction.

    Args:
        path: where to write (inside the temporary folder).
        final: where the file will end up, for messages.
        write: the writer, called with ``path``.
    """
    try:
        write(path)
        with open(path, "rb+") as handle:  # on disk before the folder is swapped in
            os.fsync(handle.fileno())
    except Exception as exc:
        reason = write_failure_reason(exc)
        if reason is None:
            raise
        raise UserError(f"{final}: cannot write ({reason})") from None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file())


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
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})")
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    """Read every file of a checkpoint; a damaged one is named with a good alternative.

    Args:
        path: a checkpoint folder.

    Raises:
        UserError: a file is missing or unreadable (one line naming it and offering the
            newest other checkpoint of the run that reads whole).
    """
    try:
        return _read_checkpoint_files(path)
    except UserError as exc:
        alternative = _newest_readable_checkpoint(path.parent, before=path)
        offer = f"; the previous good checkpoint is {alternative}: resume with --resume {alternative}" if alternative else ""
        raise UserError(f"cannot resume from {path}: {exc}{offer}") from None


def _read_checkpoint_files(path: Path) -> Checkpoint:
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{state_path}: unreadable ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(state, dict) or isinstance(state.get("step"), bool) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise UserError(f"{state_path}: not a condkit checkpoint state (no whole-number 'step')")
    trainable = load_state_dict(path / TRAINABLE_FILE)
    pickled = {}
    for name in (OPTIMIZER_FILE, SCHEDULER_FILE):
        file = path / name
        if not file.is_file():
            raise UserError(f"{file}: missing")
        try:
            pickled[name] = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated or foreign files
            first_sentence = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
            raise UserError(f"{file}: damaged ({first_sentence})") from None
        if not isinstance(pickled[name], dict):
            raise UserError(f"{file}: damaged (not a state dict)")
    ema = None
    if (path / EMA_FILE).exists():
        ema = (load_state_dict(path / EMA_FILE), read_safetensors_metadata(path / EMA_FILE))
    return Checkpoint(path, state, trainable, pickled[OPTIMIZER_FILE], pickled[SCHEDULER_FILE], ema)


def _newest_readable_checkpoint(root: Path, before: Path) -> Path | None:
    """The newest checkpoint in ``root`` older than ``before`` that reads whole, if any."""
    if not root.is_dir():
        return None
    candidates = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name < before.name)
    for candidate in reversed(candidates):
        try:
            _read_checkpoint_files(candidate)
        except UserError:
            continue
        return candidate
    return None


def check_resumable(checkpoint: Checkpoint, recipe_values: dict[str, Any], max_steps: int) -> None:
    """Refuse a checkpoint made by another recipe, seed or base, or past ``max_steps``.

    Args:
        checkpoint: the checkpoint read by :func:`read_checkpoint`.
        recipe_values: this run's recipe as flat ``key -> value`` (see
            :func:`condkit.train.config.recipe_values`), plus ``base_fingerprint``.
        max_steps: this run's ``train.max_steps``.

    Raises:
        UserError: one line naming the differing keys (saved -> now), or the steps.
    """
    saved = checkpoint.state.get("recipe_values")
    if not isinstance(saved, dict):  # written before recipes were recorded: the seed is all there is
        saved = {"seed": checkpoint.state.get("seed", recipe_values.get("seed"))}
    now = json.loads(json.dumps(recipe_values, default=str))  # the form state.json holds
    differing = [
        key for key in sorted(set(saved) | set(now))
        if key in saved and not key.startswith(RESUME_MAY_CHANGE) and saved.get(key) != now.get(key)
    ]
    if differing:
        changes = ", ".join(f"{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in differing)
        raise UserError(
            f"--resume {checkpoint.path}: the checkpoint was made with different settings ({changes}); "
            "resume with the same recipe, or train into a new --output"
        )
    if checkpoint.step > max_steps:
        raise UserError(
            f"--resume {checkpoint.path}: the checkpoint is at step {checkpoint.step} but train.max_steps is {max_steps}; "
            f"set train.max_steps to {checkpoint.step} or more"
        )


def restore_checkpoint(checkpoint: Checkpoint, params: Parameters, optimizer, lr_scheduler) -> None:
    """Put a read checkpoint's parameters, optimizer and scheduler states in place.

    Parameters and optimizer state are matched by name, so their order does not matter.
    A checkpoint written before names were stored (``param.00000``, ...) is matched by
    position, as it was saved.

    Args:
        checkpoint: from :func:`read_checkpoint`.
        params: the trainable parameters by name (a list is named by position).
        optimizer: the optimizer to restore.
        lr_scheduler: the LR scheduler to restore.

    Raises:
        UserError: the checkpoint does not match the adapter (naming the first parameter
            missing on either side, or whose shape differs).
    """
    path, saved = checkpoint.path, checkpoint.trainable
    named = _named(params)
    if _is_positional(saved) and not _is_positional(named):  # an older checkpoint: by position
        named = _named(list(named.values()))
    file = path / TRAINABLE_FILE
    missing = [name for name in named if name not in saved]
    if missing:
        raise UserError(f"{file}: no tensor for the trainable parameter {missing[0]!r} "
                        f"({len(missing)} of {len(named)} missing; a checkpoint of another adapter or recipe?)")
    unknown = [name for name in saved if name not in named]
    if unknown:
        raise UserError(f"{file}: holds {unknown[0]!r}, which this adapter does not train ({len(unknown)} such tensors; another recipe?)")
    for name, param in named.items():
        if saved[name].shape != param.shape:
            raise UserError(f"{file}: {name!r} has shape {tuple(saved[name].shape)}, the adapter expects {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(laid_out_like(saved[name], param))
    try:
        by_index = _optimizer_state_by_index(checkpoint.optimizer, optimizer, named, file.with_name(OPTIMIZER_FILE))
        optimizer.load_state_dict(_optimizer_state_laid_out(by_index, optimizer))
        lr_scheduler.load_state_dict(checkpoint.lr_scheduler)
    except (KeyError, ValueError, TypeError) as exc:  # torch's reasons for a state of another optimizer
        raise UserError(f"{path}: optimizer or scheduler state does not fit this run ({exc})") from None


def laid_out_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved full tensor laid out as ``param``: this process's shard of it when ``param`` is a DTensor.

    Every process holds the whole checkpoint, so each takes its own shard without
    communication; a checkpoint therefore resumes on any number of processes.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or tuple(tensor.shape) != tuple(param.shape):
        return tensor
    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def _optimizer_state_laid_out(state: dict, optimizer) -> dict:
    """An index-keyed optimizer state whose per-parameter tensors are laid out as the parameters are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    laid_out = {
        index: {key: laid_out_like(value, params[index]) if torch.is_tensor(value) and index < len(params) else value
                for key, value in entry.items()}
        for index, entry in state["state"].items()
    }
    return {**state, "state": laid_out}


def _named(params: Parameters) -> dict[str, torch.nn.Parameter]:
    """Parameters by name; a list is named ``param.00000``, ... by position."""
    if isinstance(params, dict):
        return dict(params)
    return {f"{POSITIONAL_PREFIX}{i:05d}": p for i, p in enumerate(params)}


def _is_positional(tensors: dict) -> bool:
    """Whether every name is a positional ``param.NNNNN`` one."""
    return all(name.startswith(POSITIONAL_PREFIX) and name[len(POSITIONAL_PREFIX) :].isdigit() for name in tensors)


def _optimizer_names(optimizer, named: dict[str, torch.nn.Parameter]) -> list[list[str]]:
    """The names of each optimizer group's parameters, in the optimizer's order.

    Raises:
        ValueError: the optimizer holds a parameter that is not among ``named``.
    """
    name_of = {id(p): name for name, p in named.items()}
    groups = []
    for number, group in enumerate(optimizer.param_groups):
        unnamed = [i for i, p in enumerate(group["params"]) if id(p) not in name_of]
        if unnamed:
            raise ValueError(f"optimizer group {number} holds parameter {unnamed[0]}, which is not among the trainable parameters")
        groups.append([name_of[id(p)] for p in group["params"]])
    return groups


def _optimizer_state_by_name(optimizer, named: dict[str, torch.nn.Parameter]) -> dict:
    """The optimizer's ``state_dict`` with parameter names in place of torch's position indices."""
    state = optimizer.state_dict()
    order = [name for group in _optimizer_names(optimizer, named) for name in group]  # torch's index -> name
    return {
        "state": {order[index]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [order[index] for index in group["params"]]} for group in state["param_groups"]],
        NAMED_OPTIMIZER_STATE: True,
    }


def _optimizer_state_by_index(saved: dict, optimizer, named: dict[str, torch.nn.Parameter], file: Path) -> dict:
    """A saved optimizer state in the positions of ``optimizer``'s parameters now.

    Each current group takes the saved group holding the same names (its hyperparameters
    and per-parameter state); torch then pairs saved and current parameters by position,
    which are now the same parameters.

    Raises:
        UserError: a current group has no saved group with the same parameters (naming one).
    """
    if not saved.get(NAMED_OPTIMIZER_STATE):
        return saved  # written before names were stored: positional, as saved
    current = _optimizer_names(optimizer, named)
    index = {name: i for i, name in enumerate(name for group in current for name in group)}
    saved_by_names = {frozenset(group["params"]): group for group in saved["param_groups"]}
    groups = []
    for names in current:
        match = saved_by_names.get(frozenset(names))
        if match is None:
            stray = next((n for n in names if not any(n in g["params"] for g in saved["param_groups"])), names[0] if names else "?")
            raise UserError(f"{file}: no optimizer state for the parameter group holding {stray!r} (another recipe?)")
        groups.append({**match, "params": [index[name] for name in names]})
    unknown = [name for name in saved["state"] if name not in index]
    if unknown:
        raise UserError(f"{file}: optimizer state for {unknown[0]!r}, which this adapter does not train")
    return {"state": {index[name]: value for name, value in saved["state"].items()}, "param_groups": groups}


def load_checkpoint(path: Path, params: Parameters, optimizer, lr_scheduler) -> dict:
    """Read a checkpoint and restore it; return its state (``step``, ``seed``, ...).

    Args:
        path: a checkpoint folder.
        params: the trainable parameters by name (a list is named by position).
        optimizer: the optimizer to restore.
        lr_scheduler: the LR scheduler to restore.
    """
    checkpoint = read_checkpoint(path)
    restore_checkpoint(checkpoint, params, optimizer, lr_scheduler)
    return checkpoint.state
