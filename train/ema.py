"""An exponential moving average (EMA) of the trained weights (``train.ema_decay``).

diffusers' :class:`diffusers.training_utils.EMAModel` does the averaging: its decay
schedule (update ``k`` uses decay ``min(ema_decay, k / (9 + k))``, or
``min(ema_decay, 1 - k^-ema_power)`` with ``train.ema_power``; update 1 copies the
weights), its update count (``optimization_step``), ``copy_to``/``store``/``restore``
and ``state_dict``. This module wires it into the loop:

- :func:`create` builds it after the optimizer (and restores it when resuming);
- :func:`update` after every optimizer step that was taken (a skipped step does not
  update it, nor count towards its schedule);
- :func:`snapshot` gives checkpoints the average by parameter name, gathered whole under
  FSDP2, plus EMAModel's counters (``checkpoints/step-N/ema.safetensors``);
- :func:`weights_in` swaps the average into the parameters for validation and the
  export, and puts the raw weights back bit for bit.

The average is fp32 whatever the mixed precision (the trainable weights it follows are
fp32 too), lives where the parameters live (a DTensor shard per process under FSDP2) and
is the same on every process. DeepSpeed is refused: its engine may hold the module's
weights in half precision, and condkit cannot test it without GPUs.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

import torch

from condkit.errors import UserError
from condkit.train import checkpoint as ckpt
from condkit.train import distributed

RAW_FOLDER = "raw"  # OUTPUT/raw/: the raw (not averaged) weights, in the same export format
METADATA_KEY = "condkit_ema"  # ema.safetensors metadata: EMAModel.state_dict() without the tensors, as JSON


def create(cfg, engine: str, params: dict[str, torch.nn.Parameter], checkpoint: ckpt.Checkpoint | None):
    """The run's EMA of ``params``, restored from ``checkpoint`` when resuming; None when off.

    Args:
        cfg: the recipe's ``train`` section (``ema_decay``, ``ema_power``).
        engine: from :func:`condkit.train.distributed.engine_of`.
        params: the trainable parameters by name (after sharding; the average follows their layout).
        checkpoint: the checkpoint being resumed, or None.

    Raises:
        UserError: DeepSpeed, or a checkpoint without EMA weights while ``train.ema_decay``
            is on (or with them while it is off), or whose EMA weights do not fit (one line).
    """
    from diffusers.training_utils import EMAModel

    if not cfg.ema_decay:
        if checkpoint is not None and checkpoint.ema is not None:
            raise UserError(f"--resume {checkpoint.path}: it holds EMA weights ({ckpt.EMA_FILE}) but train.ema_decay is 0; "
                            "resume with the train.ema_decay it was made with, or train into a new --output")
        return None
    if engine == distributed.DEEPSPEED:
        raise UserError("train.ema_decay: not available under DeepSpeed; use DDP or FSDP2 (see README, 'Several processes and GPUs')")
    ema = EMAModel(list(params.values()), decay=cfg.ema_decay, use_ema_warmup=cfg.ema_power > 0, power=cfg.ema_power or 2 / 3)
    ema.to(dtype=torch.float32)  # the loop keeps trainable weights fp32; the average is fp32 even if they were not
    if checkpoint is not None:
        _restore(ema, checkpoint, params, cfg.ema_decay)
    return ema


def _restore(ema, checkpoint: ckpt.Checkpoint, params: dict[str, torch.nn.Parameter], decay: float) -> None:
    """Put a checkpoint's EMA weights (by name) and counters into ``ema``, laid out like ``params``."""
    if checkpoint.ema is None:
        raise UserError(f"--resume {checkpoint.path}: it holds no EMA weights ({ckpt.EMA_FILE}) but train.ema_decay = {decay}; "
                        "resume with train.ema_decay=0, or train into a new --output")
    tensors, metadata = checkpoint.ema
    file = checkpoint.path / ckpt.EMA_FILE
    missing = [name for name in params if name not in tensors]
    unknown = [name for name in tensors if name not in params]
    if missing or unknown:
        raise UserError(f"{file}: does not fit this adapter ({'no tensor for ' + repr(missing[0]) if missing else 'holds ' + repr(unknown[0])})")
    try:
        counters = json.loads(metadata[METADATA_KEY])
        shadow = []
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                raise ValueError(f"{name!r} has shape {tuple(tensors[name].shape)}, the adapter expects {tuple(param.shape)}")
            shadow.append(ckpt.laid_out_like(tensors[name].to(param.device, torch.float32), param))
        ema.load_state_dict({**counters, "shadow_params": shadow})
    except (KeyError, ValueError, TypeError) as exc:  # EMAModel.load_state_dict raises ValueError for bad counters
        raise UserError(f"{file}: damaged or not condkit's EMA state ({exc})") from None


def update(ema, params: list[torch.nn.Parameter], optimizer) -> None:
    """Move the average towards the parameters after an optimizer step (nothing when off).

    Args:
        ema: from :func:`create`, or None.
        params: the trainable parameters, in the order ``ema`` was created with.
        optimizer: the (possibly accelerate-wrapped) optimizer: an fp16 step the loss
            scaler skipped changed no weight, so it does not update the average either.
    """
    if ema is None or getattr(optimizer, "step_was_skipped", False):
        return
    ema.step(params)


def snapshot(ema, params: dict[str, torch.nn.Parameter]) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The average as full CPU tensors by parameter name, and EMAModel's counters as metadata.

    Gathering DTensor shards is a collective: under FSDP2 every process calls this.

    Args:
        ema: from :func:`create`, or None (then None).
        params: the trainable parameters by name, in the order ``ema`` was created with.
    """
    if ema is None:
        return None
    tensors = {name: ckpt.full_tensor(shadow.detach()).to("cpu").contiguous() for name, shadow in zip(params, ema.shadow_params)}
    counters = {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}
    return tensors, {METADATA_KEY: json.dumps(counters, sort_keys=True)}


@contextlib.contextmanager
def weights_in(ema, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """While open, the parameters hold the average (validation, export); after, the raw weights exactly.

    EMAModel's ``store`` copies the raw weights aside and ``restore`` copies them back:
    copies, so no rounding touches them. Nothing happens when ``ema`` is None.

    Args:
        ema: from :func:`create`, or None.
        params: the trainable parameters, in the order ``ema`` was created with.
    """
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def export(ema, params: list[torch.nn.Parameter], output_dir, save) -> Any:
    """Write the result: the average as the adapter in ``output_dir``, the raw weights in ``output_dir/raw``.

    Without an EMA, just ``save(output_dir)``.

    Args:
        ema: from :func:`create`, or None.
        params: the trainable parameters, in the order ``ema`` was created with.
        output_dir: the run's output folder.
        save: ``folder -> result`` writing the adapter there (every process calls it;
            returns the files written, or a :class:`UserError` instead of raising).

    Returns:
        What ``save`` returned for ``output_dir`` (or the raw folder's error, if that failed).
    """
    with weights_in(ema, params):
        saved = save(output_dir)
    if ema is None or isinstance(saved, UserError):
        return saved
    raw = save(output_dir / RAW_FOLDER)
    return raw if isinstance(raw, UserError) else saved
