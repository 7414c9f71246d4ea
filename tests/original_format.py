"""Write diffusers models in the original (CompVis LDM / lllyasviel ControlNet) key layout.

Test helper, not part of the package: we have no real SD or ControlNet checkpoints offline,
so tests make original-format files from tiny diffusers models and check that condkit
(and stock diffusers' single-file loaders) read them back exactly.

Layout facts follow diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``
and what ``diffusers.loaders.single_file_utils`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_controlnet_checkpoint``) expects. diffusers ships only the original -> diffusers
direction as a library function, hence this module. The maps here are built from the model
config, so they hold for any number of levels and any integer ``layers_per_block``
(tiny base: 3 levels x 1 layer; SD 1.5: 4 levels x 2 layers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
CONTROLNET_PREFIX = "control_model."

# Sub-module names inside one ResBlock: diffusers -> original.
UNET_RESNET_RENAMES = MappingProxyType(
    {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1",
        "conv_shortcut": "skip_connection",
    }
)
VAE_RESNET_RENAMES = MappingProxyType({"conv_shortcut": "nin_shortcut"})
# The VAE mid-block self-attention: diffusers Linear layers -> original 1x1 convs.
VAE_ATTENTION_RENAMES = MappingProxyType(
    {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
)
# Modules copied with their inner names unchanged (transformer blocks, plain convs).
SAME_NAMES: Mapping[str, str] = MappingProxyType({})

# (original prefix, renames applied to the part of the key after the prefix)
ModuleMap = dict[str, tuple[str, Mapping[str, str]]]


def unet_to_original(unet_state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> dict:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to the original LDM layout.

    Args:
        unet_state_dict: ``unet.state_dict()``.
        unet_config: ``unet.config`` (needs ``block_out_channels``, ``layers_per_block``,
            ``up_block_types``).

    Returns:
        ``{"model.diffusion_model.input_blocks.1.0.in_layers.0.weight": tensor, ...}``;
        tensors are shared with the input, not copied.

    Raises:
        ValueError: a key has no place in the original layout (e.g. class embeddings).
        TypeError: ``layers_per_block`` is a per-level list (the original layout has one int).
    """
    modules = _unet_body_map(unet_config)
    modules.update(_unet_up_map(unet_config))
    modules["conv_norm_out"] = ("out.0", SAME_NAMES)
    modules["conv_out"] = ("out.2", SAME_NAMES)
    return _rename_state_dict(unet_state_dict, modules, UNET_PREFIX)


def controlnet_to_original(
    controlnet_state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = CONTROLNET_PREFIX
) -> dict:
    """Rename a diffusers ``ControlNetModel`` state dict to the original ControlNet (cldm) layout.

    Args:
        controlnet_state_dict: ``controlnet.state_dict()``.
        config: ``controlnet.config`` (needs ``block_out_channels``, ``layers_per_block``,
            ``conditioning_embedding_out_channels``).
        prefix: put before every key. ``"control_model."`` is the cldm checkpoint layout
            (and the key diffusers' single-file type detection looks for); ``""`` gives the
            bare layout of standalone files such as thibaud/controlnet-sd21. diffusers'
            ``convert_controlnet_checkpoint`` reads both.

    Returns:
        ``{"control_model.input_blocks.0.0.weight": ..., "control_model.zero_convs.0.0.weight": ...,
        "control_model.input_hint_block.0.weight": ..., "control_model.middle_block_out.0.weight": ...}``.

    Raises:
        ValueError: the conditioning embedding is not the 4-level one of the original
            (``input_hint_block`` is a fixed 15-layer Sequential there), or a key has no
            place in the original layout.
    """
    modules = _unet_body_map(config)
    # conv_in plus levels x (layers + 1) blocks, less the missing last downsampler: one zero conv each.
    num_input_blocks = len(config["block_out_channels"]) * (config["layers_per_block"] + 1)
    for i in range(num_input_blocks):
        modules[f"controlnet_down_blocks.{i}"] = (f"zero_convs.{i}.0", SAME_NAMES)
    modules["controlnet_mid_block"] = ("middle_block_out.0", SAME_NAMES)
    modules.update(_hint_block_map(config["conditioning_embedding_out_channels"]))
    return _rename_state_dict(controlnet_state_dict, modules, prefix)


def vae_to_original(vae_state_dict: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any]) -> dict:
    """Rename a diffusers ``AutoencoderKL`` state dict to the original LDM layout.

    The mid-block attention's Linear weights (c, c) become 1x1 conv weights (c, c, 1, 1),
    as the original ``AttnBlock`` stores them.

    Args:
        vae_state_dict: ``vae.state_dict()``.
        vae_config: ``vae.config`` (needs ``block_out_channels``, ``layers_per_block``).

    Returns:
        ``{"first_stage_model.encoder.down.0.block.0.norm1.weight": ..., ...}``.

    Raises:
        ValueError: a key has no place in the original layout.
    """
    levels = len(vae_config["block_out_channels"])
    layers = vae_config["layers_per_block"]
    modules: ModuleMap = {"quant_conv": ("quant_conv", SAME_NAMES), "post_quant_conv": ("post_quant_conv", SAME_NAMES)}
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_in"] = (f"{part}.conv_in", SAME_NAMES)
        modules[f"{part}.conv_out"] = (f"{part}.conv_out", SAME_NAMES)
        modules[f"{part}.conv_norm_out"] = (f"{part}.norm_out", SAME_NAMES)
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION_RENAMES)
        for j in range(2):
            modules[f"{part}.mid_block.resnets.{j}"] = (f"{part}.mid.block_{j + 1}", VAE_RESNET_RENAMES)
    for i in range(levels):
        modules.update(_vae_level(f"encoder.down_blocks.{i}", f"encoder.down.{i}", layers, "down"))
        # The original decoder counts its levels from the bottom (up.0 is the full-resolution one).
        modules.update(_vae_level(f"decoder.up_blocks.{i}", f"decoder.up.{levels - 1 - i}", layers + 1, "up"))
    renamed = _rename_state_dict(vae_state_dict, modules, VAE_PREFIX)
    for key, value in renamed.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            renamed[key] = value.reshape(*value.shape, 1, 1)  # (c, c) -> (c, c, 1, 1)
    return renamed


def text_encoder_to_original(text_encoder_state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Rename a transformers ``CLIPTextModel`` state dict to the SD 1.x original layout.

    transformers >= 5.6 drops the ``text_model.`` level from ``CLIPTextModel`` keys; the
    original files keep it (``cond_stage_model.transformer.text_model.encoder...``). The
    ``position_ids`` buffer that SD 1.x files carry (transformers 4.x saved it) is added,
    so the written file has every key a real one has.

    Args:
        text_encoder_state_dict: ``text_encoder.state_dict()``, with or without ``text_model.``.

    Returns:
        ``{"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": ..., ...}``.
    """
    out = {}
    for key, value in text_encoder_state_dict.items():
        out[f"{TEXT_ENCODER_PREFIX}text_model.{key.removeprefix('text_model.')}"] = value
    position_key = f"{TEXT_ENCODER_PREFIX}text_model.embeddings.position_embedding.weight"
    num_positions = out[position_key].shape[0]
    out.setdefault(
        f"{TEXT_ENCODER_PREFIX}text_model.embeddings.position_ids", torch.arange(num_positions).unsqueeze(0)
    )  # (1, 77)
    return out


def pipeline_to_original(diffusers_folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The original single-file state dict of a diffusers SD folder.

    Holds the U-Net, VAE and text encoder weights plus the DDPM schedule buffers
    (``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev``) that real SD checkpoints also
    carry and loaders must ignore.

    Args:
        diffusers_folder: a ``StableDiffusionPipeline`` folder with ``unet/``, ``vae/``,
            ``text_encoder/`` and ``scheduler/``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(diffusers_folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    state_dict = unet_to_original(unet.state_dict(), unet.config)
    state_dict.update(vae_to_original(vae.state_dict(), vae.config))
    state_dict.update(text_encoder_to_original(text_encoder.state_dict()))
    state_dict.update(_schedule_buffers(folder / "scheduler" / "scheduler_config.json"))
    return state_dict


def write_original_checkpoint(diffusers_folder: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write a diffusers SD folder as one original-format checkpoint file.

    Args:
        diffusers_folder: a ``StableDiffusionPipeline`` folder (see :func:`pipeline_to_original`).
        out_path: ``*.safetensors`` (flat tensors) or ``*.ckpt`` (``torch.save`` of
            ``{"state_dict": ..., "global_step": 0}``, the Lightning layout of the
            original release).

    Returns:
        ``out_path``.
    """
    return save_original(pipeline_to_original(diffusers_folder), out_path)


def save_original(state_dict: Mapping[str, torch.Tensor], out_path: str | os.PathLike) -> Path:
    """Save an original-layout state dict as ``.safetensors``/``.ckpt``/``.pth``.

    Args:
        state_dict: flat name -> tensor (e.g. from :func:`controlnet_to_original`).
        out_path: ``.safetensors`` is written flat; ``.ckpt`` as ``{"state_dict": ...,
            "global_step": 0}``; ``.pth`` as the flat dict (how ControlNet 1.1 ships).
    """
    from condkit.io import atomic_path, save_safetensors_atomic

    out_path = Path(out_path)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    if out_path.suffix == ".safetensors":
        save_safetensors_atomic(tensors, out_path)
    elif out_path.suffix in (".ckpt", ".pth"):
        obj = {"state_dict": tensors, "global_step": 0} if out_path.suffix == ".ckpt" else tensors
        with atomic_path(out_path) as tmp:
            torch.save(obj, tmp)
    else:
        raise ValueError(f"{out_path}: use .safetensors, .ckpt or .pth")
    return out_path


def _unet_body_map(config: Mapping[str, Any]) -> ModuleMap:
    """Time embedding, conv_in, down blocks and mid block: shared by the U-Net and ControlNet."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        # The original layout (and diffusers' converter) numbers blocks as levels x (layers + 1).
        raise TypeError(f"layers_per_block={layers!r}: the original layout needs one int for every level")
    levels = len(config["block_out_channels"])
    modules: ModuleMap = {
        "time_embedding.linear_1": ("time_embed.0", SAME_NAMES),
        "time_embedding.linear_2": ("time_embed.2", SAME_NAMES),
        "conv_in": ("input_blocks.0.0", SAME_NAMES),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET_RENAMES),
        "mid_block.attentions.0": ("middle_block.1", SAME_NAMES),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET_RENAMES),
    }
    for i in range(levels):
        # input_blocks.0 is conv_in; each level then has `layers` (resnet[, attention]) blocks and,
        # except the last level, one downsampler block.
        first = 1 + i * (layers + 1)
        modules.update(_resnet_attention_pairs(f"down_blocks.{i}", "input_blocks", first, layers))
        if i < levels - 1:
            modules[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{first + layers}.0.op", SAME_NAMES)
    return modules


def _unet_up_map(config: Mapping[str, Any]) -> ModuleMap:
    """Up blocks: ``layers + 1`` blocks per level; the upsampler sits after the attention if any."""
    layers = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    modules: ModuleMap = {}
    for i, block_type in enumerate(config["up_block_types"]):
        first = i * (layers + 1)
        modules.update(_resnet_attention_pairs(f"up_blocks.{i}", "output_blocks", first, layers + 1))
        if i < levels - 1:
            slot = 2 if "CrossAttn" in block_type else 1
            modules[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{first + layers}.{slot}.conv", SAME_NAMES)
    return modules


def _resnet_attention_pairs(diffusers_block: str, original_blocks: str, first: int, count: int) -> ModuleMap:
    """Layer j of a diffusers block is original block ``first + j``: ``.0`` its resnet, ``.1`` its attention."""
    modules: ModuleMap = {}
    for j in range(count):
        modules[f"{diffusers_block}.resnets.{j}"] = (f"{original_blocks}.{first + j}.0", UNET_RESNET_RENAMES)
        modules[f"{diffusers_block}.attentions.{j}"] = (f"{original_blocks}.{first + j}.1", SAME_NAMES)
    return modules


def _vae_level(diffusers_block: str, original_level: str, num_resnets: int, direction: str) -> ModuleMap:
    """One VAE level: its resnets (``block.j``) and its resampler (``downsample``/``upsample``)."""
    modules: ModuleMap = {}
    for j in range(num_resnets):
        modules[f"{diffusers_block}.resnets.{j}"] = (f"{original_level}.block.{j}", VAE_RESNET_RENAMES)
    modules[f"{diffusers_block}.{direction}samplers.0.conv"] = (f"{original_level}.{direction}sample.conv", SAME_NAMES)
    return modules


def _hint_block_map(embedding_channels) -> ModuleMap:
    """ControlNet conditioning embedding -> ``input_hint_block`` (conv, SiLU, conv, SiLU, ...)."""
    if len(embedding_channels) != 4:
        raise ValueError(
            f"conditioning_embedding_out_channels={list(embedding_channels)}: the original input_hint_block "
            "has 4 levels (16, 32, 96, 256); diffusers' converter expects its last conv at index 14"
        )
    num_blocks = 2 * (len(embedding_channels) - 1)  # two convs per level step
    modules: ModuleMap = {"controlnet_cond_embedding.conv_in": ("input_hint_block.0", SAME_NAMES)}
    for k in range(num_blocks):
        modules[f"controlnet_cond_embedding.blocks.{k}"] = (f"input_hint_block.{2 * (k + 1)}", SAME_NAMES)
    modules["controlnet_cond_embedding.conv_out"] = (f"input_hint_block.{2 * (num_blocks + 1)}", SAME_NAMES)
    return modules


def _rename_state_dict(state_dict: Mapping[str, torch.Tensor], modules: ModuleMap, prefix: str) -> dict:
    """Rename every key by its longest matching module prefix; fail on keys nothing maps."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        new_key = _rename_key(key, modules)
        if new_key is None:
            unmapped.append(key)
        else:
            out[prefix + new_key] = value
    if unmapped:
        raise ValueError(f"{len(unmapped)} keys have no original-format name, e.g. {unmapped[:3]}")
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
                    rest = new + rest[len(old) :]
                    break
            return f"{original}.{rest}"
    return None


def _schedule_buffers(scheduler_config_path: Path) -> dict[str, torch.Tensor]:
    """The DDPM schedule buffers an original LDM checkpoint stores beside the weights."""
    from diffusers import DDPMScheduler

    config = json.loads(scheduler_config_path.read_text())
    scheduler = DDPMScheduler.from_config(config)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # (num_train_timesteps,)
    return {
        "betas": scheduler.betas.to(torch.float32),
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1]]),
    }
