"""The LoRA adapter's typed config and its target-module presets.

``target_modules`` is either a preset name or an explicit list of module-name
suffixes (peft's matching: ``to_q`` matches every ``*.to_q``). The presets follow
the usual SD names: kohya's default network (``transformer``: every linear and 1x1
conv inside ``Transformer2DModel``) and its conv "LoCon" extension (``conv``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from condkit.adapters.base import AdapterConfig, config_field
from condkit.errors import UserError

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
PROJECTIONS = ("proj_in", "proj_out")
# ResnetBlock2D / Downsample2D / Upsample2D layers kohya's conv LoRA adds
# (3x3: conv1, conv2, down/upsampler conv; 1x1: conv_shortcut; linear: time_emb_proj).
RESNET_CONVS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv")

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION,
    "attention+ff": ATTENTION + FEED_FORWARD,
    "attention+proj": ATTENTION + PROJECTIONS,
    "transformer": ATTENTION + FEED_FORWARD + PROJECTIONS,
    "conv": ATTENTION + FEED_FORWARD + PROJECTIONS + RESNET_CONVS,
    # Resolved against the model at attach time: every torch.nn.Linear in the U-Net.
    "all_linear": (),
}
TEXT_ENCODER_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attention+mlp": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
INITS = ("default", "gaussian")
MAX_RANK = 1024


def _as_targets(key: str, value: Any, presets: dict[str, tuple[str, ...]]) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if value not in presets:
            raise UserError(f"adapter.{key}: unknown preset {value!r}; use one of {', '.join(presets)} or a list of module names")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise UserError(f"adapter.{key}: must be a preset name ({', '.join(presets)}) or a non-empty list of module names, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """Low-rank adapter settings.

    Attributes:
        rank: rank r of the U-Net LoRA layers (1..1024).
        alpha: scaling numerator; the update is ``alpha / rank * B @ A``. None = rank (scale 1).
        dropout: dropout on the LoRA branch input, in [0, 1).
        use_dora: weight-decomposed LoRA (DoRA, peft ``use_dora``).
        target_modules: a preset (``attention`` (default), ``attention+ff``, ``attention+proj``,
            ``transformer``, ``conv``, ``all_linear``) or module-name suffixes.
        init: ``default`` (peft: Kaiming-uniform A) or ``gaussian`` (normal A, std 1/r);
            B is zero in both, so the adapted model equals the base at step 0.
        train_text_encoder: also put LoRA layers on the text encoder.
        text_encoder_rank: rank there (None = ``rank``).
        text_encoder_alpha: alpha there (None = the U-Net's alpha/rank ratio times the rank).
        text_encoder_target_modules: ``attention`` (q/k/v/out_proj), ``attention+mlp`` or names.
    """

    rank: int = config_field(4, "rank r of the U-Net LoRA layers", range=(1, MAX_RANK))
    alpha: float | None = config_field(None, "scaling numerator, update = alpha / rank * B @ A (independent of rank); a positive number, null = rank")
    dropout: float = config_field(0.0, "dropout on the LoRA branch input, in [0, 1)")
    use_dora: bool = config_field(False, "weight-decomposed LoRA (DoRA, peft use_dora)")
    target_modules: str | tuple[str, ...] = config_field(
        "attention", f"a preset ({' / '.join(TARGET_PRESETS)}) or a list of module-name suffixes"
    )
    init: str = config_field("default", "LoRA A init: default (Kaiming-uniform) or gaussian (std 1/r); B is zero in both", choices=INITS)
    train_text_encoder: bool = config_field(False, "also put LoRA layers on the text encoder (rate: train.text_encoder_learning_rate)")
    text_encoder_rank: int | None = config_field(None, f"rank of the text-encoder LoRA, 1..{MAX_RANK}; null = rank")
    text_encoder_alpha: float | None = config_field(None, "alpha of the text-encoder LoRA; null = the U-Net's alpha/rank ratio times its rank")
    text_encoder_target_modules: str | tuple[str, ...] = config_field(
        "attention", f"a preset ({' / '.join(TEXT_ENCODER_PRESETS)}) or a list of module-name suffixes"
    )

    def __post_init__(self) -> None:
        for key in ("rank", "text_encoder_rank"):
            value = getattr(self, key)
            if value is None and key == "text_encoder_rank":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
                raise UserError(f"adapter.{key}: must be an integer in 1..{MAX_RANK}, got {value!r}")
        for key in ("alpha", "text_encoder_alpha"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise UserError(f"adapter.{key}: must be a positive number, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UserError(f"adapter.dropout: must be in [0, 1), got {self.dropout!r}")
        for key in ("use_dora", "train_text_encoder"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"adapter.{key}: must be true or false, got {getattr(self, key)!r}")
        if self.init not in INITS:
            raise UserError(f"adapter.init: must be one of {', '.join(INITS)}, got {self.init!r}")
        # Recipes give YAML lists; keep the frozen config hashable with tuples.
        object.__setattr__(self, "target_modules", _as_targets("target_modules", self.target_modules, TARGET_PRESETS))
        object.__setattr__(
            self,
            "text_encoder_target_modules",
            _as_targets("text_encoder_target_modules", self.text_encoder_target_modules, TEXT_ENCODER_PRESETS),
        )

    @property
    def effective_alpha(self) -> float:
        """The U-Net alpha actually used (``alpha``, or ``rank`` when unset)."""
        return float(self.alpha) if self.alpha is not None else float(self.rank)

    @property
    def effective_text_encoder_rank(self) -> int:
        """The text-encoder rank actually used."""
        return self.text_encoder_rank if self.text_encoder_rank is not None else self.rank

    @property
    def effective_text_encoder_alpha(self) -> float:
        """The text-encoder alpha actually used (same alpha/rank ratio as the U-Net by default)."""
        if self.text_encoder_alpha is not None:
            return float(self.text_encoder_alpha)
        return self.effective_alpha / self.rank * self.effective_text_encoder_rank

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists) for ``condkit_adapter.json``."""
        data = super().to_dict()
        for key in ("target_modules", "text_encoder_target_modules"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data


def resolve_targets(targets: str | tuple[str, ...], presets: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Module-name suffixes for a preset name or explicit list (``all_linear`` resolves to ``()``)."""
    return presets[targets] if isinstance(targets, str) else tuple(targets)
