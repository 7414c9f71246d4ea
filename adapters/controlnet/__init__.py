"""ControlNet: a trainable copy of the base U-Net's encoder, steered by a condition map.

    from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(base)               # branch = ControlNetModel.from_unet(base.unet), zero-initialised
    adapter.save("out")                # out/controlnet/: ControlNetModel.from_pretrained loads it

Modules: ``config`` (typed options), ``branch`` (building the branch from a U-Net that
may carry LoRA/IP-Adapter), ``adapter`` (the plugin), ``formats`` (diffusers folders,
original ``control_*`` files), ``data`` (image/condition pair layouts), ``metrics``
(edge F1), ``generate`` (one or several ControlNets in the stock pipeline).
"""

from condkit.adapters.controlnet.adapter import ControlNetAdapter
from condkit.adapters.controlnet.config import ControlNetConfig

__all__ = ["ControlNetAdapter", "ControlNetConfig"]
