"""Typed, frozen configuration of an IP-Adapter (the ``adapter:`` section of its recipe)."""

from __future__ import annotations

import dataclasses
import math

from condkit.adapters.base import AdapterConfig, config_field as _field
from condkit.errors import UserError

VARIANTS = ("base", "plus")
# diffusers' load_ip_adapter rebuilds a base-variant projection with exactly 4 tokens
# (loaders/unet.py: num_image_text_embeds = 4), so any other count would not load there.
BASE_NUM_TOKENS = 4
PLUS_DEFAULT_NUM_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class IPAdapterConfig(AdapterConfig):
    """How an IP-Adapter is built, scaled and trained.

    Attributes:
        variant: ``base`` (``ImageProjection`` of the encoder's ``image_embeds`` into
            ``num_tokens`` tokens: Linear + LayerNorm) or ``plus``
            (``IPAdapterPlusImageProjection`` resampler on the encoder's penultimate
            hidden states).
        num_tokens: image context tokens; 0 = the variant's default (4 base, 16 plus).
            The base variant must use 4, the only count diffusers' loader reads.
        scale: global strength of the image branch (0 = the base's own output).
        layer_scales: per-block scales in the form of diffusers' ``set_ip_adapter_scale``
            (e.g. ``{"up": {"block_0": [0.0, 1.0, 0.0]}}``); blocks it does not name get
            0. Multiplied by ``scale``. Empty = every cross-attention layer at ``scale``.
        image_encoder: local ``CLIPVisionModelWithProjection`` folder; empty = the
            base's ``image_encoder``.
        drop_image, drop_text, drop_both: per-sample probabilities, during training, of
            dropping only the reference image, only the caption, or both (for
            classifier-free guidance on either condition). They replace the recipe's
            ``data.caption_dropout``.
    """

    variant: str = _field("base", "base (Linear + LayerNorm on image_embeds) or plus (resampler on hidden states)", choices=VARIANTS)
    num_tokens: int = _field(0, "image context tokens; 0 = 4 for base, 16 for plus", range=(0, 256))
    scale: float = _field(1.0, "strength of the image branch; 0 = the base's own output", range=(0.0, 10.0))
    layer_scales: dict = _field({}, "per-block scales as in diffusers' set_ip_adapter_scale, e.g. {up: {block_0: [0, 1, 0]}}")
    image_encoder: str = _field("", "local CLIPVisionModelWithProjection folder; empty = the base's image_encoder")
    drop_image: float = _field(0.05, "share of training samples with only the reference image dropped", range=(0.0, 1.0))
    drop_text: float = _field(0.05, "share of training samples with only the caption dropped", range=(0.0, 1.0))
    drop_both: float = _field(0.05, "share of training samples with image and caption dropped", range=(0.0, 1.0))

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"adapter.variant = {self.variant!r} is not one of: {', '.join(VARIANTS)}")
        if not isinstance(self.num_tokens, int) or not 0 <= self.num_tokens <= 256:
            raise UserError(f"adapter.num_tokens = {self.num_tokens!r} is out of range [0, 256]")
        if self.variant == "base" and self.num_tokens not in (0, BASE_NUM_TOKENS):
            raise UserError(
                f"adapter.num_tokens = {self.num_tokens}: the base variant uses {BASE_NUM_TOKENS} tokens "
                "(diffusers' load_ip_adapter reads no other count); use variant: plus for more"
            )
        if not math.isfinite(float(self.scale)) or not 0.0 <= float(self.scale) <= 10.0:
            raise UserError(f"adapter.scale = {self.scale!r} is out of range [0, 10]")
        if not isinstance(self.layer_scales, dict):
            raise UserError(f"adapter.layer_scales must be a mapping like {{up: {{block_0: [0, 1, 0]}}}}, got {self.layer_scales!r}")
        unknown = set(self.layer_scales) - {"down", "mid", "up"}
        if unknown:
            raise UserError(f"adapter.layer_scales: unknown part {sorted(unknown)[0]!r}; valid parts: down, mid, up")
        for key in ("drop_image", "drop_text", "drop_both"):
            value = getattr(self, key)
            if not 0.0 <= float(value) <= 1.0:
                raise UserError(f"adapter.{key} = {value!r} is out of range [0, 1]")
        total = self.drop_image + self.drop_text + self.drop_both
        if total > 1.0:
            raise UserError(f"adapter.drop_image + drop_text + drop_both = {total:g}: must be at most 1")

    @property
    def tokens(self) -> int:
        """The number of image context tokens, with the variant's default resolved."""
        if self.num_tokens:
            return self.num_tokens
        return BASE_NUM_TOKENS if self.variant == "base" else PLUS_DEFAULT_NUM_TOKENS
