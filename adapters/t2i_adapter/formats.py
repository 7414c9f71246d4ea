"""T2I-Adapter files: diffusers folders (what condkit writes and what TencentARC publishes).

A folder holds ``config.json`` (``_class_name: T2IAdapter``) and
``diffusion_pytorch_model.safetensors``; ``T2IAdapter.from_pretrained`` reads it and
stock ``StableDiffusionAdapterPipeline(adapter=...)`` (SDXL: ``StableDiffusionXLAdapterPipeline``)
uses it. condkit writes
``OUT/t2i_adapter/`` with ``condkit_adapter.json`` beside the weights (its config and
the base fingerprint); any diffusers T2I-Adapter folder, or a folder holding one under
``t2i_adapter/``, is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from condkit.adapters.base import ADAPTER_CONFIG_FILE, read_adapter_config, write_adapter_description
from condkit.adapters.t2i_adapter.config import T2IAdapterConfig
from condkit.errors import UserError
from condkit.io import check_finite, save_safetensors_atomic, write_text_atomic

if TYPE_CHECKING:
    from diffusers import T2IAdapter

KIND = "t2i_adapter"
EXPORT_SUBFOLDER = "t2i_adapter"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "T2IAdapter"


def diffusers_folder(path: str | Path) -> Path | None:
    """The diffusers T2I-Adapter folder at ``path`` (itself, or its ``t2i_adapter/``), or None.

    Args:
        path: a folder (anything else gives None).
    """
    path = Path(path)
    if not path.is_dir():
        return None
    for folder in (path, path / EXPORT_SUBFOLDER):
        config_file = folder / CONFIG_NAME
        if config_file.is_file():
            try:
                class_name = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
            except (ValueError, AttributeError, UnicodeDecodeError):
                continue
            if class_name == CLASS_NAME:
                return folder
    return None


def write_diffusers_folder(model: T2IAdapter, folder: Path, config: T2IAdapterConfig, base_fingerprint: dict[str, Any] | None) -> list[Path]:
    """Write a T2I-Adapter as a diffusers folder plus ``condkit_adapter.json``, atomically per file.

    Args:
        model: the adapter.
        folder: destination folder (created).
        config: the condkit config, recorded in ``condkit_adapter.json``.
        base_fingerprint: the base it was trained on (None if unknown).
    """
    weights, config_file = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    # The metadata ModelMixin.save_pretrained writes, so any safetensors reader treats it alike.
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_safetensors_atomic(state, weights, metadata={"format": "pt"})
    write_text_atomic(config_file, model.to_json_string())
    described = write_adapter_description(folder, KIND, config, base_fingerprint)
    return [weights, config_file, described]


def read_condkit_config(path: str | Path) -> T2IAdapterConfig | None:
    """The :class:`T2IAdapterConfig` recorded beside a condkit-written T2I-Adapter, if any.

    Args:
        path: a T2I-Adapter folder.
    """
    folder = diffusers_folder(path)
    if folder is None:
        return None
    return read_adapter_config(folder / ADAPTER_CONFIG_FILE, KIND, T2IAdapterConfig)


def read_t2i_adapter(path: str | Path) -> T2IAdapter:
    """``T2IAdapter.from_pretrained`` on a local folder, in float32, errors as one-line UserErrors.

    Args:
        path: a diffusers T2I-Adapter folder, or a folder holding one under ``t2i_adapter/``.

    Raises:
        UserError: no such folder, not a T2I-Adapter, or unreadable weights.
    """
    import torch
    from diffusers import T2IAdapter

    from condkit.base import check_model_folder, load_errors

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    folder = diffusers_folder(path)
    if folder is None:
        raise UserError(f"{path}: not a diffusers T2I-Adapter folder (needs {CONFIG_NAME} with _class_name {CLASS_NAME})")
    check_model_folder(folder)  # truncated files and pickles holding code: one line naming the file
    try:
        model = T2IAdapter.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    except load_errors() as exc:
        text = str(exc).strip()
        raise UserError(f"{folder}: cannot load as a diffusers T2I-Adapter ({text.splitlines()[0] if text else type(exc).__name__})") from None
    check_finite(model.state_dict(), str(folder))
    return model


def describe(path: str | Path) -> dict[str, Any]:
    """What a T2I-Adapter folder holds: variant, channels, downscale factor.

    Args:
        path: the folder.
    """
    from condkit.base import check_model_folder

    folder = diffusers_folder(path)
    if folder is None:
        raise UserError(f"{path}: not a diffusers T2I-Adapter folder")
    check_model_folder(folder)
    cfg = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    info = {
        "format": "diffusers",
        "folder": str(folder),
        "adapter_type": cfg.get("adapter_type", "full_adapter"),
        "channels": cfg.get("channels"),
        "num_res_blocks": cfg.get("num_res_blocks"),
        "downscale_factor": cfg.get("downscale_factor"),
        "in_channels": cfg.get("in_channels"),
    }
    described = folder / ADAPTER_CONFIG_FILE
    if described.is_file():
        from condkit.adapters.base import read_adapter_description

        info["base"] = read_adapter_description(described).get("base")
    return info
