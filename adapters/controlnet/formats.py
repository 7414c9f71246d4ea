"""ControlNet file formats: diffusers folders and original single-file ``control_*`` checkpoints.

* **diffusers folder** (what condkit writes, ``OUT/controlnet/``): ``config.json`` +
  ``diffusion_pytorch_model.safetensors``; ``ControlNetModel.from_pretrained`` reads it.
* **original single file** (lllyasviel's ``control_v11p_sd15_canny.pth`` and the
  ``control_*.safetensors`` A1111/ComfyUI use): LDM key names (``input_blocks``,
  ``zero_convs``, ``input_hint_block``, ``middle_block_out``), optionally under a
  ``control_model.`` prefix, weights only. Read through diffusers'
  ``ControlNetModel.from_single_file`` with a config made locally from the base (no
  download); written by :func:`to_original_state_dict`, the inverse of diffusers'
  ``convert_controlnet_checkpoint``.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from condkit.adapters.base import ADAPTER_CONFIG_FILE, read_adapter_config, read_adapter_description, write_adapter_description
from condkit.adapters.controlnet.branch import as_float32, controlnet_from_unet
from condkit.adapters.controlnet.config import ControlNetConfig
from condkit.errors import UserError
from condkit.io import (
    check_finite,
    check_safetensors_header,
    load_state_dict,
    save_safetensors_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from diffusers import ControlNetModel

    from condkit.base import BaseModel

KIND = "controlnet"
EXPORT_SUBFOLDER = "controlnet"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
ORIGINAL_PREFIX = "control_model."
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# diffusers <-> LDM names inside a resnet block.
RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
# The original hint block ends with its zero conv at index 14 and diffusers' converter
# expects exactly that, i.e. four hint channels (8x downsampling).
ORIGINAL_HINT_OUT_INDEX = 14


# ---- diffusers folders ---------------------------------------------------------------
def write_diffusers_folder(
    controlnet: ControlNetModel, folder: Path, config: ControlNetConfig, base_fingerprint: dict[str, Any] | None
) -> list[Path]:
    """Write a ControlNet as a diffusers folder plus ``condkit_adapter.json``, atomically per file.

    Args:
        controlnet: the branch.
        folder: destination folder (created).
        config: the condkit config, recorded in ``condkit_adapter.json``.
        base_fingerprint: the base it was trained on (None if unknown).
    """
    weights, config_file, described = folder / WEIGHTS_NAME, folder / CONFIG_NAME, folder / ADAPTER_CONFIG_FILE
    # Same metadata as ModelMixin.save_pretrained, so any safetensors reader treats it alike.
    save_safetensors_atomic(controlnet.state_dict(), weights, metadata={"format": "pt"})
    write_text_atomic(config_file, controlnet.to_json_string())
    write_adapter_description(folder, KIND, config, base_fingerprint)
    return [weights, config_file, described]


def diffusers_folder(path: str | Path) -> Path | None:
    """The diffusers ControlNet folder at ``path`` (itself, or its ``controlnet/``), or None.

    Args:
        path: a folder.
    """
    path = Path(path)
    for folder in (path, path / EXPORT_SUBFOLDER):
        config_file = folder / CONFIG_NAME
        if config_file.is_file():
            try:
                class_name = json.loads(config_file.read_text()).get("_class_name")
            except (ValueError, AttributeError):
                continue
            if class_name == "ControlNetModel":
                return folder
    return None


def read_condkit_config(path: str | Path) -> ControlNetConfig | None:
    """The :class:`ControlNetConfig` recorded beside a condkit-written ControlNet, if any.

    Args:
        path: a ControlNet folder or file.
    """
    folder = diffusers_folder(path) if Path(path).is_dir() else Path(path).parent
    described = folder / ADAPTER_CONFIG_FILE if folder is not None else None
    if described is None:
        return None
    return read_adapter_config(described, KIND, ControlNetConfig)


def load_diffusers_folder(folder: Path) -> ControlNetModel:
    """``ControlNetModel.from_pretrained`` on a local folder, errors as one-line UserErrors.

    Args:
        folder: a diffusers ControlNet folder.
    """
    from diffusers import ControlNetModel

    from condkit.base import check_model_folder, load_errors

    check_model_folder(folder)  # truncated files and pickles holding code: one line naming the file
    try:
        controlnet = ControlNetModel.from_pretrained(folder, local_files_only=True)
    except load_errors() as exc:
        raise UserError(f"{folder}: cannot load as a diffusers ControlNet ({_first_line(exc)})") from None
    check_finite(controlnet.state_dict(), str(folder))
    return as_float32(controlnet)


# ---- original single files ---------------------------------------------------------
def to_original_state_dict(controlnet: ControlNetModel, prefix: str = ORIGINAL_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet's weights under the original (LDM) key names.

    The inverse of diffusers' ``convert_controlnet_checkpoint``: ``down_blocks.b.resnets.l``
    -> ``input_blocks.(1 + b * (layers + 1) + l).0`` with LDM resnet names, attentions
    -> ``.1``, downsamplers -> ``.0.op``, ``controlnet_down_blocks.i`` -> ``zero_convs.i.0``,
    ``controlnet_mid_block`` -> ``middle_block_out.0``, the hint encoder -> ``input_hint_block``.

    Args:
        controlnet: the branch (SD-style: no class or addition embeddings).
        prefix: key prefix; ``control_model.`` as in lllyasviel's files.

    Raises:
        UserError: the branch has parts the original format has no names for.
    """
    layers = controlnet.config.layers_per_block
    hint_blocks = len(controlnet.controlnet_cond_embedding.blocks)
    original = {}
    for key, value in controlnet.state_dict().items():
        original[prefix + _original_key(key, layers, hint_blocks)] = value
    return original


def _original_key(key: str, layers: int, hint_blocks: int) -> str:
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "controlnet_cond_embedding.conv_in": "input_hint_block.0",
        "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * (hint_blocks + 1)}",
        "controlnet_mid_block": "middle_block_out.0",
    }
    module, _, leaf = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{leaf}"
    match = re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(\w+)", key)
    if match:
        return f"input_hint_block.{2 * (int(match[1]) + 1)}.{match[2]}"
    match = re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(\w+)", key)
    if match:
        return f"zero_convs.{match[1]}.0.{match[2]}"
    match = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if match:
        block, part, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        first = 1 + block * (layers + 1)
        if part == "resnets":
            return f"input_blocks.{first + index}.0.{_original_resnet_names(rest)}"
        if part == "attentions":
            return f"input_blocks.{first + index}.1.{rest}"
        return f"input_blocks.{first + layers}.0.op.{rest.removeprefix('conv.')}"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if match:
        part, index, rest = match[1], int(match[2]), match[3]
        if part == "resnets":
            return f"middle_block.{2 * index}.{_original_resnet_names(rest)}"
        return f"middle_block.{2 * index + 1}.{rest}"
    raise UserError(f"ControlNet weight {key!r} has no name in the original ControlNet format")


def _original_resnet_names(rest: str) -> str:
    module, _, leaf = rest.rpartition(".")
    return f"{dict(RESNET_RENAMES).get(module, module)}.{leaf}"


def write_original_file(controlnet: ControlNetModel, path: str | Path) -> Path:
    """Write a ControlNet as an original-format ``control_*.safetensors`` (A1111, ComfyUI).

    Args:
        controlnet: the branch (8x hint encoder, as the original format requires).
        path: destination ``.safetensors`` file.
    """
    if len(controlnet.config.conditioning_embedding_out_channels) != 4:
        raise UserError(
            f"{path}: the original ControlNet format needs the SD 8x hint encoder (4 conditioning_embedding_out_channels), "
            f"this one has {list(controlnet.config.conditioning_embedding_out_channels)}"
        )
    save_safetensors_atomic(to_original_state_dict(controlnet), path, metadata={"format": "pt"})
    return Path(path)


def original_hint_channels(state_dict: dict[str, torch.Tensor], source: Path) -> tuple[int, tuple[int, ...]]:
    """Conditioning channels and hint-encoder channels of an original checkpoint.

    The hint block is conv 0, then pairs (3x3 conv, stride-2 conv) at 2, 4, ..., then
    the zero conv; the stride-2 convs (4, 8, 12) give the channel steps.

    Args:
        state_dict: the checkpoint without the ``control_model.`` prefix.
        source: the file, for error messages.
    """
    indices = sorted(
        int(m[1]) for key in state_dict if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", key))
    )
    if not indices or indices[0] != 0:
        raise UserError(f"{source}: not an original ControlNet checkpoint (no input_hint_block.0.weight)")
    if indices[-1] != ORIGINAL_HINT_OUT_INDEX:
        raise UserError(
            f"{source}: hint block ends at input_hint_block.{indices[-1]}; diffusers' single-file loader supports only "
            f"the SD 8x hint block ending at input_hint_block.{ORIGINAL_HINT_OUT_INDEX}"
        )
    first = state_dict["input_hint_block.0.weight"]  # (c0, conditioning_channels, 3, 3)
    steps = [state_dict[f"input_hint_block.{i}.weight"].shape[0] for i in indices[1:-1] if i % 4 == 0]
    return int(first.shape[1]), (int(first.shape[0]), *(int(s) for s in steps))


def strip_original_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ControlNet part of an original checkpoint, without the ``control_model.`` prefix.

    Args:
        state_dict: a checkpoint with or without the prefix (full cldm checkpoints also
            hold the SD model; only ``control_model.*`` is kept then).
    """
    if any(key.startswith(ORIGINAL_PREFIX) for key in state_dict):
        return {k[len(ORIGINAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX)}
    return dict(state_dict)


def load_original_file(path: Path, base: BaseModel, config: ControlNetConfig) -> ControlNetModel:
    """Read an original ``control_*`` checkpoint through ``ControlNetModel.from_single_file``.

    The config diffusers needs is made locally from the base U-Net plus the hint
    channels found in the file, so nothing is downloaded.

    Args:
        path: ``.safetensors`` or a weights-only ``.pth``/``.ckpt``.
        base: the base the ControlNet is for (its U-Net gives the architecture).
        config: condkit options (channel order).
    """
    from diffusers import ControlNetModel

    state_dict = strip_original_prefix(load_state_dict(path))
    conditioning_channels, hint_channels = original_hint_channels(state_dict, path)
    options = ControlNetConfig(**{**config.to_dict(), "conditioning_channels": conditioning_channels})
    with torch.device("meta"):
        # Architecture only: the config for from_single_file, no memory for weights.
        skeleton = controlnet_from_unet(base.unet, hint_channels, options, copy_weights=False)
    with tempfile.TemporaryDirectory(prefix="condkit-controlnet-config-") as config_dir:
        skeleton.save_config(config_dir)
        try:
            controlnet = ControlNetModel.from_single_file(
                {ORIGINAL_PREFIX + k: v for k, v in state_dict.items()}, config=config_dir, local_files_only=True
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"{path}: cannot load as an original ControlNet for this base ({_first_line(exc)})") from None
    return as_float32(controlnet)


# ---- dispatch ------------------------------------------------------------------------
def detect_format(path: str | Path) -> str | None:
    """``diffusers`` (folder), ``original`` (single file) or None if not a ControlNet.

    Safetensors files are recognised by their keys (header only); pickles by their
    name (``control*``), since telling otherwise means loading them.

    Args:
        path: a file or folder.
    """
    path = Path(path)
    if path.is_dir():
        return "diffusers" if diffusers_folder(path) is not None else None
    if path.suffix == ".safetensors" and path.is_file():
        try:
            keys = set(check_safetensors_header(path))
        except (UserError, OSError):
            return None
        hints = {"input_hint_block.0.weight", ORIGINAL_PREFIX + "input_hint_block.0.weight"}
        return "original" if keys & hints else None
    if path.suffix in PICKLE_SUFFIXES and path.is_file() and path.name.lower().startswith("control"):
        return "original"
    return None


def read_controlnet(path: str | Path, base: BaseModel, config: ControlNetConfig) -> ControlNetModel:
    """Read a ControlNet from a diffusers folder (or condkit output) or an original file.

    Args:
        path: the folder or file.
        base: the base it is for (gives the config for single files).
        config: condkit options.

    Raises:
        UserError: missing path or not a ControlNet.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        folder = diffusers_folder(path)
        if folder is None:
            raise UserError(f"{path}: no ControlNet here (needs config.json with _class_name ControlNetModel, or controlnet/)")
        return load_diffusers_folder(folder)
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise UserError(f"{path}: a ControlNet file must be .safetensors, .pth, .pt, .ckpt or .bin")
    return load_original_file(path, base, config)


def describe(path: str | Path) -> dict[str, Any]:
    """What a ControlNet file or folder holds (format, conditioning, architecture).

    Args:
        path: the folder or file.
    """
    path = Path(path)
    found = detect_format(path)
    if found is None:
        raise UserError(f"{path}: not a ControlNet folder or file")
    if found == "diffusers":
        from condkit.base import check_model_folder

        folder = diffusers_folder(path)
        check_model_folder(folder)  # inspect reads no tensors, but must not call a broken file fine
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        info = {
            "format": "diffusers",
            "folder": str(folder),
            "conditioning_channels": cfg.get("conditioning_channels"),
            "conditioning_embedding_out_channels": cfg.get("conditioning_embedding_out_channels"),
            "block_out_channels": cfg.get("block_out_channels"),
            "cross_attention_dim": cfg.get("cross_attention_dim"),
        }
        described = folder / ADAPTER_CONFIG_FILE
        if described.is_file():
            info["trained_on"] = read_adapter_description(described).get("base")
        return info
    state_dict = strip_original_prefix(load_state_dict(path))
    conditioning_channels, hint_channels = original_hint_channels(state_dict, path)
    return {
        "format": "original",
        "file": str(path),
        "conditioning_channels": conditioning_channels,
        "conditioning_embedding_out_channels": list(hint_channels),
        "cross_attention_dim": int(state_dict["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
        if "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in state_dict
        else None,
        "tensors": len(state_dict),
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
