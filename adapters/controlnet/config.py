"""The typed ControlNet config (recipe ``adapter:`` block with ``kind: controlnet``).

The condition ("hint") encoder turns a condition map at image resolution into a
feature map at latent resolution: one 3x3 conv, then per entry after the first a
3x3 conv and a stride-2 conv, so it downsamples by ``2 ** (len(channels) - 1)``.
That factor must equal the base's VAE factor (8 for SD 1.5, 4 for the embedded base),
hence the default is derived from the base:

* 8x (SD 1.5/2.x): ``(16, 32, 96, 256)``, the original ControlNet's hint block;
* any other factor ``f``: ``(16, 32, ..., 16 * f)`` with ``log2(f) + 1`` entries,
  e.g. ``(16, 32, 64)`` for the embedded base's 4x.
"""

from __future__ import annotations

import dataclasses
import math

from condkit.adapters.base import AdapterConfig, config_field
from condkit.errors import UserError

SD_HINT_CHANNELS: tuple[int, ...] = (16, 32, 96, 256)
CHANNEL_ORDERS = ("rgb", "bgr")
FIDELITY_METRICS = ("edge_f1", "none")


def default_hint_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The hint-encoder channels for a base whose VAE downsamples by ``vae_scale_factor``.

    Args:
        vae_scale_factor: pixels per latent cell per side (a power of two).
    """
    if vae_scale_factor == 8:
        return SD_HINT_CHANNELS
    steps = int(math.log2(vae_scale_factor))
    return tuple(16 * 2**i for i in range(steps + 1))


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(AdapterConfig):
    """How a ControlNet branch is built and applied.

    Args:
        conditioning_channels: channels of the condition map (3 for RGB maps).
        conditioning_embedding_out_channels: hint-encoder channels; its length sets the
            downsampling (``2 ** (len - 1)``), which must match the base's VAE factor.
            None derives it from the base (see the module docstring).
        conditioning_channel_order: ``rgb`` or ``bgr`` (how the branch reads the map).
        conditioning_scale: strength of the residuals at inference (0 = the base alone).
        guess_mode: inference without the prompt on the branch, residuals scaled
            from 0.1 (shallow) to 1.0 (deep), as in ControlNet's guess mode.
        control_guidance_start: fraction of the sampling steps after which the branch starts.
        control_guidance_end: fraction of the sampling steps after which it stops.
        fidelity_metric: what validation measures: ``edge_f1`` (edge-type conditions:
            F1 between the condition's edges and the output's Canny edges) or ``none``.
        edge_tolerance: edge-F1 matching radius in pixels (BSDS-style tolerance).
        init_from: start from an existing ControlNet (diffusers folder or original
            ``control_*`` file) instead of copying the base U-Net.
    """

    conditioning_channels: int = config_field(3, "channels of the condition map (3 for RGB maps)", range=(1, math.inf))
    conditioning_embedding_out_channels: tuple[int, ...] | None = config_field(
        None, "hint-encoder channels; 2 ** (len - 1) must equal the base's VAE factor; null = derived from the base"
    )
    conditioning_channel_order: str = config_field("rgb", "how the branch reads the map", choices=CHANNEL_ORDERS)
    conditioning_scale: float = config_field(1.0, "strength of the residuals at inference; 0 = the base alone", range=(0.0, 10.0))
    guess_mode: bool = config_field(False, "inference without the prompt on the branch (ControlNet's guess mode)")
    control_guidance_start: float = config_field(0.0, "fraction of the sampling steps after which the branch starts (< end)", range=(0.0, 1.0))
    control_guidance_end: float = config_field(1.0, "fraction of the sampling steps after which the branch stops", range=(0.0, 1.0))
    fidelity_metric: str = config_field("edge_f1", "what validation measures: edge F1 between map and output, or nothing", choices=FIDELITY_METRICS)
    edge_tolerance: int = config_field(2, "edge-F1 matching radius in pixels", range=(0, 8))
    init_from: str | None = config_field(None, "start from an existing ControlNet (diffusers folder or control_* file) instead of copying the base U-Net")

    def __post_init__(self) -> None:
        if not isinstance(self.conditioning_channels, int) or self.conditioning_channels < 1:
            raise UserError(f"adapter.conditioning_channels={self.conditioning_channels!r}: must be an integer >= 1")
        channels = self.conditioning_embedding_out_channels
        if channels is not None:
            if isinstance(channels, int) or not all(isinstance(c, int) and c >= 1 for c in channels) or not channels:
                raise UserError(
                    f"adapter.conditioning_embedding_out_channels={channels!r}: must be a list of positive integers"
                )
            object.__setattr__(self, "conditioning_embedding_out_channels", tuple(channels))
        if self.conditioning_channel_order not in CHANNEL_ORDERS:
            raise UserError(
                f"adapter.conditioning_channel_order={self.conditioning_channel_order!r}: must be one of {', '.join(CHANNEL_ORDERS)}"
            )
        if not 0.0 <= float(self.conditioning_scale) <= 10.0:
            raise UserError(f"adapter.conditioning_scale={self.conditioning_scale!r}: must be in [0, 10]")
        if not 0.0 <= float(self.control_guidance_start) < float(self.control_guidance_end) <= 1.0:
            raise UserError(
                f"adapter.control_guidance_start={self.control_guidance_start!r}, control_guidance_end="
                f"{self.control_guidance_end!r}: need 0 <= start < end <= 1"
            )
        if self.fidelity_metric not in FIDELITY_METRICS:
            raise UserError(
                f"adapter.fidelity_metric={self.fidelity_metric!r}: must be one of {', '.join(FIDELITY_METRICS)}"
            )
        if not isinstance(self.edge_tolerance, int) or not 0 <= self.edge_tolerance <= 8:
            raise UserError(f"adapter.edge_tolerance={self.edge_tolerance!r}: must be an integer in [0, 8] pixels")

    def hint_channels(self, vae_scale_factor: int) -> tuple[int, ...]:
        """The hint-encoder channels for a base, checked against its VAE factor.

        Args:
            vae_scale_factor: the base's pixels per latent cell per side.

        Raises:
            UserError: the configured channels downsample by a different factor.
        """
        channels = self.conditioning_embedding_out_channels
        if channels is None:
            return default_hint_channels(vae_scale_factor)
        if 2 ** (len(channels) - 1) != vae_scale_factor:
            needed = int(math.log2(vae_scale_factor)) + 1
            raise UserError(
                f"adapter.conditioning_embedding_out_channels={list(channels)}: downsamples by {2 ** (len(channels) - 1)}x "
                f"but the base's VAE factor is {vae_scale_factor}x; give {needed} entries (e.g. {list(default_hint_channels(vae_scale_factor))})"
            )
        return channels
