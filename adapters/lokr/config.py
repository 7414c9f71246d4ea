"""The LoKr adapter's typed config: the LyCORIS options shared with LoHa, plus LoKr's own."""

from __future__ import annotations

import dataclasses

from condkit.adapters.base import config_field
from condkit.adapters.loha.config import LycorisConfig
from condkit.errors import UserError

INITS = ("default", "lycoris")
MAX_FACTOR = 1_000_000


@dataclasses.dataclass(frozen=True)
class LokrConfig(LycorisConfig):
    """LoKr: ``dW = alpha/r * kron(w1, w2)``, w1 the small factor, w2 the large one (rank r when factored).

    Each weight's dimensions are split in two (``decompose_factor``: -1 = as close to the
    square root as possible); w2 is factored into ``lokr_w2_a @ lokr_w2_b`` of rank r when r is
    below half its size, else kept full; w1 is full unless ``decompose_both``. When both end
    up full (small layers, or a large rank), alpha is ignored and the scale is 1, as LyCORIS does.

    Attributes:
        decompose_factor: LyCORIS ``factor``; -1 = balanced, else the size of w1's dimensions.
        decompose_both: also factor w1 into ``lokr_w1_a @ lokr_w1_b`` (rank r).
        use_effective_conv2d: Tucker-factored kxk conv kernels in w2 (``lokr_t2``; LyCORIS ``use_tucker``).
        rank_dropout_scale: rescale the rows kept by rank dropout (by 1 / their share).
        init: which factor starts at zero: ``default`` (peft: w1) or ``lycoris`` (w2, as LyCORIS); dW = 0 in both.
    """

    decompose_factor: int = config_field(-1, "LyCORIS factor: size of w1's dimensions; -1 = balanced (near the square root)", range=(-1, MAX_FACTOR))
    decompose_both: bool = config_field(False, "also factor the small Kronecker factor w1 (lokr_w1_a/lokr_w1_b)")
    use_effective_conv2d: bool = config_field(False, "Tucker-factored kxk conv kernels in w2, lokr_t2 (LyCORIS use_tucker)")
    rank_dropout_scale: bool = config_field(False, "rescale the rows kept by rank_dropout by 1 / their share")
    init: str = config_field("default", "which factor starts at zero: default (w1, peft) or lycoris (w2); the update is 0 in both", choices=INITS)

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.decompose_factor
        if isinstance(value, bool) or not isinstance(value, int) or value == 0 or not -1 <= value <= MAX_FACTOR:
            raise UserError(f"adapter.decompose_factor: must be -1 or an integer in 1..{MAX_FACTOR}, got {value!r}")
        for key in ("decompose_both", "use_effective_conv2d", "rank_dropout_scale"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"adapter.{key}: must be true or false, got {getattr(self, key)!r}")
        if self.init not in INITS:
            raise UserError(f"adapter.init: must be one of {', '.join(INITS)}, got {self.init!r}")
