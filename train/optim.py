"""The training loop's optimizer: ``train.optimizer`` over the adapter's parameter groups.

:func:`make_optimizer` is the one call the loop makes. It takes the adapter's groups
(the U-Net's rate and each text encoder's, ``Adapter.parameter_groups``), splits off the
LoRA B matrices at ``train.lora_plus_ratio`` times their group's rate (LoRA+), and
builds the optimizer:

- ``adamw``: ``torch.optim.AdamW``, with torch's fused kernel whenever every parameter
  is a floating tensor on a device that has one (CPU, CUDA, MPS, XPU in torch >= 2.4;
  ``transformers``' Trainer defaults to the fused kernel too). The fused kernel applies
  the same update in one pass over all tensors instead of a Python loop per parameter.
  It keeps ``step`` as a float32 tensor on the parameters' device; checkpoints restore
  it there (torch's ``load_state_dict`` does, by the saved group's ``fused`` flag), so a
  resumed run repeats an uninterrupted one bit for bit. A checkpoint keeps the flags it
  was written with: a run started unfused resumes unfused.
- ``adamw8bit``: bitsandbytes' 8-bit AdamW (``condkit[bnb]``): both moments of a tensor of
  4096 elements or more kept in 8 bits (uint8, a float32 scale per 256-element block),
  smaller tensors' in 32 (bitsandbytes' ``min_8bit_size``). On the CPU it needs
  bitsandbytes >= 0.50, the first release with CPU optimizer kernels; older ones are
  refused in one line. Checkpoints hold the 8-bit state as it is (bitsandbytes'
  ``state_dict`` nests it per parameter, kept by name like any other state), so a
  resumed run repeats an uninterrupted one bit for bit.
- ``prodigy``: ``prodigyopt.Prodigy`` (``condkit[prodigy]``), which estimates the step
  size itself; ``train.learning_rate`` multiplies its estimate, so use 1.0. Built with
  the settings its authors recommend for diffusion models (bias correction and the
  warm-up safeguard on). It needs one rate for every group.
- ``adafactor``: ``transformers.optimization.Adafactor`` at the fixed
  ``train.learning_rate`` (``relative_step``, ``scale_parameter`` and ``warmup_init``
  off, as kohya and diffusers users run it): second moments of a 2-D weight kept as a
  row and a column vector.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

import torch

from condkit.errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
# Where the LoRA "B" (up) matrices are in parameter names: peft's lora_B, kohya's lora_up.
LORA_B_MARKERS = (".lora_B.", ".lora_up.")
# The first bitsandbytes with CPU optimizer kernels (32-bit and 8-bit blockwise).
MIN_BNB_ON_CPU = "0.50"


def make_optimizer(recipe, adapter, params: dict[str, torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The recipe's optimizer over the adapter's parameter groups, with LoRA+ applied.

    Args:
        recipe: the validated recipe (``train.optimizer``, rates, ``train.lora_plus_ratio``;
            ``adapter.kind`` for messages).
        adapter: the attached adapter being trained (its ``parameter_groups``).
        params: the trainable parameters by name (the loop's; LoRA+ finds B matrices by name).

    Raises:
        UserError: LoRA+ on an adapter without LoRA B matrices, prodigy with several rates,
            or a missing optional package (naming the pip extra).
    """
    cfg = recipe.train
    groups = adapter.parameter_groups(cfg.learning_rate, cfg.text_encoder_rates())
    groups = lora_plus_groups(groups, params, cfg.lora_plus_ratio, recipe.adapter.kind)
    return build_optimizer(cfg.optimizer, groups, cfg.learning_rate, cfg.weight_decay)


def lora_plus_groups(groups: list[dict[str, Any]], params: dict[str, torch.nn.Parameter], ratio: float, kind: str) -> list[dict[str, Any]]:
    """Split each group's LoRA B matrices into a group of their own at ``ratio`` x its rate (LoRA+).

    LoRA+ (Hayou et al. 2024): B starts at zero and is the factor whose updates move the
    output, so it learns ``ratio`` times faster than A. Text-encoder groups keep their own
    rates; their B matrices get ratio x theirs.

    Args:
        groups: optimizer parameter groups (``params``, ``lr``, maybe ``name``).
        params: the trainable parameters by name.
        ratio: ``train.lora_plus_ratio``; 0 leaves the groups as they are.
        kind: the adapter kind, for the message.

    Raises:
        UserError: ``ratio`` is set and no parameter is a LoRA B matrix (LoHa, LoKr,
            ControlNet, ...: LoRA+ is LoRA-only).
    """
    if not ratio:
        return groups
    name_of = {id(p): name for name, p in params.items()}
    is_b = {id(p) for p in params.values() if any(marker in f".{name_of[id(p)]}" for marker in LORA_B_MARKERS)}
    if not is_b:
        raise UserError(f"train.lora_plus_ratio = {ratio:g}: adapter.kind = {kind!r} has no LoRA B (lora_B / lora_up) matrices; LoRA+ is for LoRA only, set it to 0")
    split = []
    for group in groups:
        a = [p for p in group["params"] if id(p) not in is_b]
        b = [p for p in group["params"] if id(p) in is_b]
        if a:
            split.append({**group, "params": a})
        if b:
            name = {"name": f"{group['name']}_lora_plus"} if "name" in group else {}
            split.append({**group, "params": b, "lr": group["lr"] * ratio, **name})
    return split


def build_optimizer(kind: str, groups: list[dict[str, Any]], learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """One of :data:`OPTIMIZERS` over ``groups`` (each group's ``lr`` wins over ``learning_rate``).

    Args:
        kind: ``train.optimizer``.
        groups: optimizer parameter groups.
        learning_rate: the default rate (``train.learning_rate``).
        weight_decay: ``train.weight_decay`` (decoupled, AdamW-style, for every kind).

    Raises:
        UserError: an optional package is missing, or prodigy gets several rates.
    """
    if kind == "adamw":
        return _adamw(groups, learning_rate, weight_decay)
    if kind == "adamw8bit":
        return _adamw8bit(groups, learning_rate, weight_decay)
    if kind == "prodigy":
        return _prodigy(groups, learning_rate, weight_decay)
    if kind == "adafactor":
        optimization = _import("transformers.optimization", "adafactor", "pip install transformers: a condkit dependency")
        return optimization.Adafactor(
            groups, lr=learning_rate, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=weight_decay
        )
    raise UserError(f"train.optimizer = {kind!r} is not one of: {', '.join(OPTIMIZERS)}")


def _adamw(groups: list[dict[str, Any]], learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW, fused where every parameter's device and dtype have the fused kernel."""
    # torch checks this only at the first step (and then raises), by this same list.
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    fused = all(p.device.type in devices and torch.is_floating_point(p) for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)


def _adamw8bit(groups: list[dict[str, Any]], learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit; refused in one line for CPU parameters before bitsandbytes 0.50."""
    from packaging.version import Version

    bnb = _import("bitsandbytes", "adamw8bit", "pip install 'condkit[bnb]'")
    on_cpu = any(p.device.type == "cpu" for group in groups for p in group["params"])
    # Before 0.50 bitsandbytes has no CPU optimizer kernels: the first step would fail deep inside it.
    if on_cpu and Version(bnb.__version__) < Version(MIN_BNB_ON_CPU):
        raise UserError(
            f"train.optimizer = 'adamw8bit' on the CPU needs bitsandbytes >= {MIN_BNB_ON_CPU}, this is {bnb.__version__}: "
            "pip install -U bitsandbytes, or use adamw"
        )
    return bnb.optim.AdamW8bit(groups, lr=learning_rate, weight_decay=weight_decay)


def _prodigy(groups: list[dict[str, Any]], learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """prodigyopt's Prodigy with its authors' diffusion settings; one rate for all groups."""
    rates = sorted({group.get("lr", learning_rate) for group in groups})
    if len(rates) > 1:  # prodigyopt raises at the first step otherwise (one d estimate for all groups)
        raise UserError(
            f"train.optimizer = 'prodigy' needs one learning rate for every parameter group, got {', '.join(f'{r:g}' for r in rates)}: "
            "set train.lora_plus_ratio and the text-encoder learning rates to 0"
        )
    if rates and rates[0] < 0.1:
        warnings.warn(
            f"train.optimizer = 'prodigy': train.learning_rate = {rates[0]:g} multiplies prodigy's own step-size estimate; 1.0 is the recommended value",
            stacklevel=3,
        )
    prodigyopt = _import("prodigyopt", "prodigy", "pip install 'condkit[prodigy]'")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" on every process
        return prodigyopt.Prodigy(
            groups, lr=learning_rate, weight_decay=weight_decay, decouple=True, use_bias_correction=True, safeguard_warmup=True
        )


def _import(module: str, kind: str, install: str):
    """Import an optimizer's package, or stop in one line saying how to install it (the pip extra)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"train.optimizer = {kind!r} needs {module.split('.')[0]} ({install})") from None
