"""T2I-Adapter: a small encoder of a condition map whose features join the U-Net's down blocks.

    from condkit.adapters.t2i_adapter import T2IAdapterConfig, T2IAdapterKind
    adapter = T2IAdapterKind(T2IAdapterConfig())
    adapter.attach(base)               # diffusers' T2IAdapter, channels = the base U-Net's blocks
    adapter.save("out")                # out/t2i_adapter/: T2IAdapter.from_pretrained loads it

Unlike ControlNet the adapter sees neither the noisy latents nor the timestep, so a
generation runs it once and reuses its features at every sampling step (diffusers'
``StableDiffusionAdapterPipeline`` does exactly that).

Modules: ``config`` (typed options, channel/downscale derivation from the base),
``adapter`` (the plugin), ``formats`` (diffusers folders), ``generate`` (one or several
T2I-Adapters through the stock pipeline, validation).
"""

from condkit.adapters.t2i_adapter.adapter import T2IAdapterKind
from condkit.adapters.t2i_adapter.config import T2IAdapterConfig

__all__ = ["T2IAdapterConfig", "T2IAdapterKind"]
