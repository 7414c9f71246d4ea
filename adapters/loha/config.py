"""Typed configs of the LyCORIS kinds: the options LoHa and LoKr share, and LoHa's own.

The shared keys mean what they mean for LoRA (``rank``, ``alpha``, ``target_modules``
with LoRA's presets, imported from :mod:`condkit.adapters.lora.config`), so a LoRA recipe
trains LoHa or LoKr with ``--set adapter.kind=loha``. ``conv_rank``/``conv_alpha`` are
LyCORIS's ``conv_dim``/``conv_alpha``: their own rank and alpha for kxk convolutions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from condkit.adapters.base import AdapterConfig, config_field
from condkit.adapters.lora.config import MAX_RANK, TARGET_PRESETS
from condkit.errors import UserError


def _positive_int(key: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise UserError(f"adapter.{key}: must be an integer in 1..{MAX_RANK}{' or null' if optional else ''}, got {value!r}")


def _fraction(key: str, value: Any, high_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1 if high_open else 0 <= value <= 1):
        raise UserError(f"adapter.{key}: must be in [0, 1), got {value!r}")


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UserError(f"adapter.{key}: must be true or false, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LycorisConfig(AdapterConfig):
    """Options every LyCORIS kind has (LoHa, LoKr).

    Attributes:
        rank: rank r of the low-rank factors (LyCORIS ``network_dim``).
        alpha: the update is scaled by ``alpha / rank``; None = rank (scale 1).
        conv_rank: rank of kxk convolutions (k > 1; LyCORIS ``conv_dim``); None = ``rank``.
        conv_alpha: alpha of kxk convolutions; None = ``alpha``.
        target_modules: a LoRA preset (``attention`` ... ``conv``, ``all_linear``) or module-name suffixes.
        dropout: LoRA's input dropout; LyCORIS and peft have none for these kinds, so only 0.
        rank_dropout: share of output rows of the update dropped in training (LyCORIS/peft ``rank_dropout``).
        module_dropout: probability of skipping a layer's update in a training step.
    """

    rank: int = config_field(4, "rank r of the low-rank factors (LyCORIS network_dim)", range=(1, MAX_RANK))
    alpha: float | None = config_field(None, "scaling numerator, update = alpha / rank * ... (independent of rank); a positive number, null = rank")
    conv_rank: int | None = config_field(None, f"rank of kxk convolutions, k > 1 (LyCORIS conv_dim), 1..{MAX_RANK}; null = rank")
    conv_alpha: float | None = config_field(None, "alpha of kxk convolutions (LyCORIS conv_alpha); null = alpha")
    target_modules: str | tuple[str, ...] = config_field(
        "attention", f"a preset ({' / '.join(TARGET_PRESETS)}, as for LoRA) or a list of module-name suffixes"
    )
    dropout: float = config_field(0.0, "input dropout as in LoRA; LyCORIS/peft have none for this kind, so only 0 (use rank_dropout)", range=(0.0, 0.0))
    rank_dropout: float = config_field(0.0, "share of the update's output rows dropped per training step, in [0, 1)")
    module_dropout: float = config_field(0.0, "probability of skipping a layer's update per training step, in [0, 1)")

    def __post_init__(self) -> None:
        _positive_int("rank", self.rank)
        _positive_int("conv_rank", self.conv_rank, optional=True)
        for key in ("alpha", "conv_alpha"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise UserError(f"adapter.{key}: must be a positive number, got {value!r}")
        if self.dropout != 0:
            raise UserError(f"adapter.dropout: LoHa/LoKr have no input dropout (only 0), got {self.dropout!r}; use adapter.rank_dropout")
        _fraction("rank_dropout", self.rank_dropout)
        _fraction("module_dropout", self.module_dropout)
        targets = self.target_modules
        if isinstance(targets, str):
            if targets not in TARGET_PRESETS:
                raise UserError(f"adapter.target_modules: unknown preset {targets!r}; use one of {', '.join(TARGET_PRESETS)} or a list of module names")
        elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
            object.__setattr__(self, "target_modules", tuple(targets))  # hashable, as recipes give lists
        else:
            raise UserError(f"adapter.target_modules: must be a preset name ({', '.join(TARGET_PRESETS)}) or a non-empty list of module names, got {targets!r}")

    @property
    def effective_alpha(self) -> float:
        """The alpha of linear and 1x1 layers (``alpha``, or ``rank`` when unset)."""
        return float(self.alpha) if self.alpha is not None else float(self.rank)

    @property
    def effective_conv_rank(self) -> int:
        """The rank of kxk convolutions."""
        return self.conv_rank if self.conv_rank is not None else self.rank

    @property
    def effective_conv_alpha(self) -> float:
        """The alpha of kxk convolutions (``conv_alpha``, else ``alpha``, else their rank)."""
        if self.conv_alpha is not None:
            return float(self.conv_alpha)
        return float(self.alpha) if self.alpha is not None else float(self.effective_conv_rank)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists) for ``condkit_adapter.json``."""
        data = super().to_dict()
        if isinstance(data["target_modules"], tuple):
            data["target_modules"] = list(data["target_modules"])
        return data


@dataclasses.dataclass(frozen=True)
class LohaConfig(LycorisConfig):
    """LoHa: ``dW = alpha/r * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product of two rank-r products).

    Attributes:
        use_effective_conv2d: Tucker factors for kxk convolutions (``hada_t1``/``hada_t2``;
            LyCORIS ``use_tucker``); off: the conv kernel is flattened into the input axis.
    """

    use_effective_conv2d: bool = config_field(False, "Tucker-decomposed kxk conv kernels, hada_t1/hada_t2 (LyCORIS use_tucker / use_cp)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _bool("use_effective_conv2d", self.use_effective_conv2d)
