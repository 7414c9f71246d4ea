"""diffusers SD models -> the original single-file checkpoint layout (A1111, ComfyUI).

diffusers ships only the other direction (``diffusers.loaders.single_file_utils``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``), so this module builds the inverse: the fixed renames are
taken from diffusers' own ``DIFFUSERS_TO_LDM_MAPPING`` (which is keyed diffusers -> LDM),
the block numbering and the per-block renames are the inverse of what those converters
compute. Every result is checked by running diffusers' converters on it
(:func:`check_round_trip`): each diffusers key must come back with the very same tensor,
so ``from_single_file`` reads exactly the weights that were written.

Layout (SD 1.x): ``model.diffusion_model.*`` (U-Net: ``input_blocks``, ``middle_block``,
``output_blocks``), ``first_stage_model.*`` (VAE: ``encoder.down.{i}.block.{j}``, decoder
levels counted from the bottom, mid attention as 1x1 convs),
``cond_stage_model.transformer.text_model.*`` (CLIP text encoder). SDXL reuses the U-Net
and VAE renames and adds its two text encoders in :mod:`condkit.original_layout_sdxl`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from condkit.errors import UserError

UNET_PREFIX = "model.diffusion_model."  # diffusers' LDM_UNET_KEY
VAE_PREFIX = "first_stage_model."  # diffusers' LDM_VAE_KEYS[0]
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."  # diffusers' LDM_CLIP_PREFIX_TO_REMOVE[0]
# Inverse of the string replacements in diffusers' update_unet_resnet_ldm_to_diffusers.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# Inverse of update_vae_resnet_ldm_to_diffusers / update_vae_attentions_ldm_to_diffusers.
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# diffusers module prefix -> (original module prefix, renames of the first name part after it)
ModuleMap = dict[str, tuple[str, Mapping[str, str]]]


def _ldm_mapping() -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return DIFFUSERS_TO_LDM_MAPPING


def unet_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a ``UNet2DConditionModel`` state dict to ``model.diffusion_model.*``.

    Args:
        state_dict: ``unet.state_dict()`` (tensors are shared, not copied).
        config: ``unet.config`` (``block_out_channels``, ``layers_per_block``, ``up_block_types``).

    Raises:
        UserError: a per-level ``layers_per_block`` or a key with no original name.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise UserError(f"U-Net layers_per_block={layers!r}: the original layout needs one number for every level")
    levels = len(config["block_out_channels"])
    mapping = _ldm_mapping()["unet"]
    fixed = dict(mapping["layers"])
    if config.get("addition_embed_type") == "text_time":
        fixed.update(mapping["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        fixed.update(mapping["class_embed_type"])
    modules: ModuleMap = {
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET),
    }
    for i in range(levels):
        first = 1 + i * (layers + 1)  # input_blocks.0 is conv_in; then (layers + 1) blocks per level
        for j in range(layers):
            modules[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{first + j}.0", UNET_RESNET)
            modules[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{first + j}.1", {})
        modules[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{first + layers}.0.op", {})
    for i, block_type in enumerate(config["up_block_types"]):
        first = i * (layers + 1)
        for j in range(layers + 1):
            modules[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{first + j}.0", UNET_RESNET)
            modules[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{first + j}.1", {})
        slot = 2 if "CrossAttn" in block_type else 1  # the upsampler follows the attention, if any
        modules[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{first + layers}.{slot}.conv", {})
    return _rename(state_dict, fixed, modules, UNET_PREFIX, "U-Net")


def vae_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename an ``AutoencoderKL`` state dict to ``first_stage_model.*``.

    The mid-block attention's Linear weights (c, c) become 1x1 conv weights (c, c, 1, 1),
    as the original ``AttnBlock`` holds them.

    Args:
        state_dict: ``vae.state_dict()``.
        config: ``vae.config`` (``block_out_channels``, ``layers_per_block``).
    """
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    modules: ModuleMap = {}
    for part in ("encoder", "decoder"):
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
        for j in range(2):
            modules[f"{part}.mid_block.resnets.{j}"] = (f"{part}.mid.block_{j + 1}", VAE_RESNET)
    for i in range(levels):
        for j in range(layers):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
        level = levels - 1 - i  # the original decoder counts levels from the bottom
        for j in range(layers + 1):
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", VAE_RESNET)
        modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    renamed = _rename(state_dict, _ldm_mapping()["vae"], modules, VAE_PREFIX, "VAE")
    for key, value in renamed.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            renamed[key] = value.reshape(*value.shape, 1, 1)  # (c, c) -> (c, c, 1, 1)
    return renamed


def text_encoder_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str = TEXT_ENCODER_PREFIX) -> dict[str, torch.Tensor]:
    """Rename a ``CLIPTextModel`` state dict to ``{prefix}text_model.*``.

    transformers 5 drops ``text_model.`` from the keys; the original layout keeps it. The
    ``position_ids`` buffer SD 1.x and SDXL files carry is added (1, positions).

    Args:
        state_dict: ``text_encoder.state_dict()``.
        prefix: ``cond_stage_model.transformer.`` (SD 1.x), ``conditioner.embedders.0.transformer.`` (SDXL).
    """
    out = {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in state_dict.items()}
    positions = out[f"{prefix}text_model.embeddings.position_embedding.weight"].shape[0]
    out.setdefault(f"{prefix}text_model.embeddings.position_ids", torch.arange(positions).unsqueeze(0))
    return out


def pipeline_to_original(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The single-file state dict of an SD 1.x/2.x base (U-Net, VAE, CLIP text encoder), checked.

    Args:
        unet: a ``UNet2DConditionModel``.
        vae: an ``AutoencoderKL``.
        text_encoder: a ``CLIPTextModel``.

    Raises:
        UserError: a module has no original-layout name, or diffusers would not read a
            tensor back to the same key (see :func:`check_round_trip`).
    """
    state = unet_to_original(unet.state_dict(), unet.config)
    state.update(vae_to_original(vae.state_dict(), vae.config))
    state.update(text_encoder_to_original(text_encoder.state_dict()))
    check_round_trip(state, {"U-Net": (unet.state_dict(), unet.config), "VAE": (vae.state_dict(), vae.config),
                             "text encoder": (text_encoder.state_dict(), None)})
    return state


def check_round_trip(original: Mapping[str, torch.Tensor], models: Mapping[str, tuple[Mapping[str, torch.Tensor], Any]]) -> None:
    """Run diffusers' single-file converters on ``original``; every diffusers key must come back unchanged.

    Args:
        original: the original-layout state dict.
        models: ``U-Net`` / ``VAE`` / ``text encoder`` / ``text encoder 2`` -> (diffusers state
            dict, config); for ``text encoder 2`` (SDXL's OpenCLIP, read from
            ``conditioner.embedders.1.model.``) the "config" is the model itself, which
            diffusers' ``convert_open_clip_checkpoint`` takes.

    Raises:
        UserError: naming the first key that is missing or differs after the round trip.
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    converters = {
        "U-Net": lambda config: convert_ldm_unet_checkpoint(dict(original), config),
        "VAE": lambda config: convert_ldm_vae_checkpoint(dict(original), config),
        "text encoder": lambda config: convert_ldm_clip_checkpoint(dict(original)),
        # the prefix create_diffusers_clip_model_from_ldm passes for an SDXL base's OpenCLIP
        "text encoder 2": lambda model: convert_open_clip_checkpoint(model, dict(original), prefix="conditioner.embedders.1.model."),
    }
    for what, (state, config) in models.items():
        back = converters[what](config)
        if what == "text encoder":
            back = {k.removeprefix("text_model."): v for k, v in back.items()}
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        for key, tensor in state.items():
            if key not in back or back[key].shape != tensor.shape or not torch.equal(back[key], tensor):
                raise UserError(f"{what} key {key!r}: diffusers' single-file loader would not read it back from the original layout")


def _rename(state_dict: Mapping[str, torch.Tensor], fixed: Mapping[str, str], modules: ModuleMap, prefix: str, what: str) -> dict:
    """Rename each key: a whole-key entry of ``fixed``, else its longest module prefix in ``modules``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = fixed.get(key) or _rename_key(key, modules)
        if new is None:
            raise UserError(f"{what} key {key!r} has no name in the original single-file layout")
        out[prefix + new] = value
    return out


def _rename_key(key: str, modules: ModuleMap) -> str | None:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest module path first
        module = ".".join(parts[:cut])
        if module in modules:
            original, renames = modules[module]
            rest = ".".join(parts[cut:])
            for old, new in renames.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{original}.{rest}"
    return None
