"""Building a ControlNet branch from a base U-Net, and checking that a branch fits a base."""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch

from condkit.adapters.controlnet.config import ControlNetConfig
from condkit.errors import UserError

if TYPE_CHECKING:
    from diffusers import ControlNetModel

    from condkit.base import BaseModel

# The U-Net parts ControlNetModel.from_unet copies into the branch.
COPIED_UNET_PARTS = ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block")


def plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights as the plain base model has them, without attached adapters.

    ``ControlNetModel.from_unet`` copies ``state_dict()`` verbatim, which fails once peft
    has wrapped layers (``to_q.base_layer.weight`` + ``lora_A``/``lora_B``) and would copy
    IP-Adapter processor weights; this strips both, so the branch is always a copy of
    the base alone (unfused LoRA layers keep the base weight in ``base_layer``).

    Args:
        module: a U-Net part, possibly carrying peft LoRA layers or IP-Adapter processors.
    """
    plain = {}
    for key, value in module.state_dict().items():
        parts = key.split(".")
        if any(part.startswith("lora_") or part == "processor" for part in parts):
            continue
        plain[".".join(part for part in parts if part != "base_layer")] = value
    return plain


def controlnet_from_unet(
    unet: torch.nn.Module, hint_channels: tuple[int, ...], config: ControlNetConfig, copy_weights: bool = True
) -> ControlNetModel:
    """Build a branch from a base U-Net, whatever adapters the U-Net already carries.

    Args:
        unet: the base ``UNet2DConditionModel`` (may carry LoRA layers / IP-Adapter).
        hint_channels: hint-encoder channels (``conditioning_embedding_out_channels``).
        config: the ControlNet config (conditioning channels and channel order).
        copy_weights: copy the base's weights (False: architecture only, e.g. on the
            meta device to get a config).

    Returns:
        A float32 ``ControlNetModel`` whose encoder and middle block equal the base's
        and whose zero convolutions and hint-encoder output are zero.
    """
    from diffusers import ControlNetModel
    from diffusers.configuration_utils import FrozenDict

    unet_config = dict(unet.config)
    if unet_config.get("encoder_hid_dim_type") == "ip_image_proj":
        # load_ip_adapter marks the U-Net's config; the branch itself sees text only
        # (the pipelines never pass image embeddings to a ControlNet).
        unet_config["encoder_hid_dim_type"] = None
    # from_unet only reads `.config` when it does not copy weights: hand it the cleaned config.
    config_view = types.SimpleNamespace(config=FrozenDict(unet_config))
    controlnet = ControlNetModel.from_unet(
        config_view,
        controlnet_conditioning_channel_order=config.conditioning_channel_order,
        conditioning_embedding_out_channels=hint_channels,
        load_weights_from_unet=False,
        conditioning_channels=config.conditioning_channels,
    )
    for part in COPIED_UNET_PARTS if copy_weights else ():
        target = getattr(controlnet, part, None)
        if isinstance(target, torch.nn.Module) and any(True for _ in target.state_dict()):
            target.load_state_dict(plain_state_dict(getattr(unet, part)), strict=True)
    return as_float32(controlnet)


def check_fits(controlnet: ControlNetModel, base: BaseModel, source: str) -> None:
    """Raise if a branch does not fit a base's U-Net and latent size.

    Args:
        controlnet: the branch.
        base: the base it is attached to.
        source: what to name in the error (a file, or the adapter name).
    """
    for key in ("block_out_channels", "cross_attention_dim", "in_channels", "layers_per_block"):
        mine, theirs = controlnet.config.get(key), base.unet.config.get(key)
        if _plain(mine) != _plain(theirs):
            raise UserError(f"{source}: ControlNet {key}={mine} does not fit the base U-Net's {key}={theirs}")
    downsampling = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
    if downsampling != base.vae_scale_factor:
        raise UserError(
            f"{source}: ControlNet hint encoder downsamples {downsampling}x but the base's VAE factor is {base.vae_scale_factor}x"
        )


def _plain(value: object) -> object:
    # Configs hold lists or tuples depending on where they came from (JSON vs code).
    return list(value) if isinstance(value, (list, tuple)) else value


def as_float32(controlnet: ControlNetModel) -> ControlNetModel:
    """The branch in float32 (it trains in full precision even when the base runs in half).

    Args:
        controlnet: a branch in any dtype; returned unchanged when already float32
            (``.to`` would log a dtype warning for nothing).
    """
    return controlnet if controlnet.dtype == torch.float32 else controlnet.to(torch.float32)
