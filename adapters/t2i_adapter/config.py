"""The typed T2I-Adapter config (recipe ``adapter:`` block with ``kind: t2i_adapter``).

diffusers' :class:`~diffusers.T2IAdapter` pixel-unshuffles the condition map by
``downscale_factor`` (to latent resolution when it equals the base's VAE factor) and
then gives one feature map per entry of ``channels``, each half the size of the last:

* ``full_adapter``: ``len(channels)`` features; they must match the base U-Net's down
  blocks, so ``channels`` defaults to its ``block_out_channels`` (SD 1.5: 320, 640,
  1280, 1280; the embedded base: 32, 64, 96);
* ``light_adapter``: ``len(channels) + 1`` features, the last repeating the last
  channel count, so ``channels`` defaults to ``block_out_channels[:-1]`` and fits only
  U-Nets whose last two blocks have equal widths (SD 1.5 does, the embedded base not);
* ``full_adapter_xl`` (diffusers' ``FullAdapterXL``, SDXL's): ``len(channels)`` features
  where only the third halves the size. An SDXL U-Net's first down block is a plain one,
  whose feature enters after its downsampler, at half the latents' size, and its second
  adds its feature before downsampling; so ``downscale_factor`` defaults to twice the VAE
  factor and ``channels`` to ``block_out_channels`` plus the middle block's (the last
  again) when there are three blocks: SDXL 1.0 gets 320@64, 640@64, 1280@32, 1280@32 from
  a 1024 px map, as diffusers' ``train_t2i_adapter_sdxl.py`` builds it.

``adapter_type: auto`` (the default) picks ``full_adapter_xl`` for U-Nets of SDXL's layout
(a plain first down block followed by others) and ``full_adapter`` otherwise.
"""

from __future__ import annotations

import dataclasses
import math

from condkit.adapters.base import AdapterConfig, config_field
from condkit.errors import UserError

AUTO = "auto"
XL_ADAPTER = "full_adapter_xl"
ADAPTER_TYPES = (AUTO, "full_adapter", XL_ADAPTER, "light_adapter")
TIMESTEP_SAMPLINGS = ("cubic", "uniform")
FIDELITY_METRICS = ("edge_f1", "none")


@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig(AdapterConfig):
    """How a T2I-Adapter is built, trained and applied.

    Args:
        adapter_type: diffusers' ``adapter_type``: ``full_adapter``, ``full_adapter_xl`` or
            ``light_adapter``; ``auto`` = the one the base U-Net's layout takes
            (:meth:`resolved_type`).
        channels: feature channels per stage; None derives them from the base U-Net
            (see the module docstring).
        num_res_blocks: residual blocks per stage.
        downscale_factor: the pixel-unshuffle factor; None = the base's VAE factor, so
            the first feature map has the latents' size.
        conditioning_channels: channels of the condition map (3 for RGB maps).
        conditioning_scale: strength of the features (``adapter_conditioning_scale``;
            0 = the base alone).
        timestep_sampling: ``cubic`` (T2I-Adapter's: ``t = (1 - u^3) T``, mostly early,
            noisy steps where the layout forms) or ``uniform``.
        fidelity_metric: what validation measures: ``edge_f1`` or ``none``.
        edge_tolerance: edge-F1 matching radius in pixels.
        init_from: start from an existing T2I-Adapter (diffusers folder).
    """

    adapter_type: str = config_field(
        AUTO, "diffusers' adapter_type: the full, SDXL (full_adapter_xl) or light adapter; auto = full_adapter_xl on SDXL U-Nets, else full_adapter",
        choices=ADAPTER_TYPES,
    )
    channels: tuple[int, ...] | None = config_field(None, "feature channels per stage; null = from the base U-Net's block_out_channels")
    num_res_blocks: int = config_field(2, "residual blocks per stage", range=(1, 8))
    downscale_factor: int | None = config_field(None, "pixel-unshuffle factor of the map; null = the base's VAE factor")
    conditioning_channels: int = config_field(3, "channels of the condition map (3 for RGB maps)", range=(1, math.inf))
    conditioning_scale: float = config_field(1.0, "strength of the features at inference; 0 = the base alone", range=(0.0, 10.0))
    timestep_sampling: str = config_field("cubic", "training timesteps: cubic (mostly early, noisy steps; T2I-Adapter's) or uniform", choices=TIMESTEP_SAMPLINGS)
    fidelity_metric: str = config_field("edge_f1", "what validation measures: edge F1 between map and output, or nothing", choices=FIDELITY_METRICS)
    edge_tolerance: int = config_field(2, "edge-F1 matching radius in pixels", range=(0, 8))
    init_from: str | None = config_field(None, "start from an existing T2I-Adapter (diffusers folder) instead of a fresh one")

    def __post_init__(self) -> None:
        if self.adapter_type not in ADAPTER_TYPES:
            raise UserError(f"adapter.adapter_type={self.adapter_type!r}: must be one of {', '.join(ADAPTER_TYPES)}")
        if self.channels is not None:
            if isinstance(self.channels, (int, str)) or not self.channels or not all(isinstance(c, int) and c >= 1 for c in self.channels):
                raise UserError(f"adapter.channels={self.channels!r}: must be a list of positive integers or null")
            object.__setattr__(self, "channels", tuple(self.channels))
        if not isinstance(self.num_res_blocks, int) or not 1 <= self.num_res_blocks <= 8:
            raise UserError(f"adapter.num_res_blocks={self.num_res_blocks!r}: must be an integer in [1, 8]")
        factor = self.downscale_factor
        if factor is not None and (not isinstance(factor, int) or factor < 1 or factor & (factor - 1)):
            raise UserError(f"adapter.downscale_factor={factor!r}: must be a power of two (1, 2, 4, 8, ...) or null")
        if not isinstance(self.conditioning_channels, int) or self.conditioning_channels < 1:
            raise UserError(f"adapter.conditioning_channels={self.conditioning_channels!r}: must be an integer >= 1")
        if not 0.0 <= float(self.conditioning_scale) <= 10.0:
            raise UserError(f"adapter.conditioning_scale={self.conditioning_scale!r}: must be in [0, 10]")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise UserError(f"adapter.timestep_sampling={self.timestep_sampling!r}: must be one of {', '.join(TIMESTEP_SAMPLINGS)}")
        if self.fidelity_metric not in FIDELITY_METRICS:
            raise UserError(f"adapter.fidelity_metric={self.fidelity_metric!r}: must be one of {', '.join(FIDELITY_METRICS)}")
        if not isinstance(self.edge_tolerance, int) or not 0 <= self.edge_tolerance <= 8:
            raise UserError(f"adapter.edge_tolerance={self.edge_tolerance!r}: must be an integer in [0, 8] pixels")

    def resolved_type(self, down_block_types: tuple[str, ...]) -> str:
        """The diffusers ``adapter_type`` for a U-Net: ``adapter_type``, or for ``auto`` its layout's.

        Args:
            down_block_types: the base U-Net's ``down_block_types``.

        Returns:
            ``full_adapter_xl`` when the first down block is a plain one followed by others
            (SDXL's: its feature enters after the downsampler, which only the XL layout
            gives), else ``full_adapter`` (SD 1.x/2.x: cross-attention first).
        """
        if self.adapter_type != AUTO:
            return self.adapter_type
        plain_first = len(down_block_types) > 1 and "CrossAttn" not in down_block_types[0]
        return XL_ADAPTER if plain_first else "full_adapter"

    def model_config(self, block_out_channels: tuple[int, ...], vae_scale_factor: int, down_block_types: tuple[str, ...] = ()) -> dict:
        """The ``T2IAdapter(**config)`` arguments for a base.

        Args:
            block_out_channels: the base U-Net's ``block_out_channels``.
            vae_scale_factor: the base's pixels per latent cell per side.
            down_block_types: the base U-Net's ``down_block_types`` (for ``auto``; empty
                = not SDXL's layout).
        """
        adapter_type = self.resolved_type(tuple(down_block_types))
        channels, factor = self.channels, self.downscale_factor
        if adapter_type == XL_ADAPTER:
            # SDXL: features at half the latents' size; a fourth stage feeds the middle block,
            # which only a three-block U-Net's fourth XL stage (same size as the third) fits.
            channels = channels or tuple(block_out_channels) + (tuple(block_out_channels[-1:]) if len(block_out_channels) == 3 else ())
            factor = factor or 2 * vae_scale_factor
        elif channels is None:
            channels = tuple(block_out_channels) if adapter_type == "full_adapter" else tuple(block_out_channels[:-1])
        return {
            "in_channels": self.conditioning_channels,
            "channels": list(channels),
            "num_res_blocks": self.num_res_blocks,
            "downscale_factor": factor or vae_scale_factor,
            "adapter_type": adapter_type,
        }
