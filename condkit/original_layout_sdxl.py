"""diffusers SDXL models -> the original SDXL single-file checkpoint layout (A1111, ComfyUI).

The U-Net and VAE use the same renames as SD 1.x (:mod:`condkit.original_layout`; an SDXL
U-Net is a ``UNet2DConditionModel`` whose ``add_embedding`` becomes ``label_emb`` and whose
transformer depth per block lives below the renamed block prefixes). What SDXL adds are
its two text encoders under ``conditioner.embedders``:

* ``conditioner.embedders.0.transformer.text_model.*``: CLIP-L (``text_encoder``), in the
  Hugging Face layout, as read by diffusers' ``convert_ldm_clip_checkpoint``;
* ``conditioner.embedders.1.model.*``: OpenCLIP bigG (``text_encoder_2``) in the OpenCLIP
  layout, as read by ``convert_open_clip_checkpoint``: ``transformer.resblocks.N.*`` with
  q/k/v fused into ``attn.in_proj_weight/bias``, ``ln_final``, ``positional_embedding``,
  ``token_embedding`` and ``text_projection`` stored transposed ((width, projection), as
  OpenCLIP multiplies ``x @ text_projection``).

The renames are taken from diffusers' ``DIFFUSERS_TO_LDM_MAPPING["openclip"]`` (keyed
diffusers -> LDM); every write is checked by running diffusers' converters on it
(:func:`condkit.original_layout.check_round_trip`).

A separate module (not :mod:`condkit.original_layout`) keeps both files small; the SDXL
family's own module (:mod:`condkit.families.sdxl`) stays about conditioning and imports no
single-file code.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from condkit.errors import UserError
from condkit.original_layout import check_round_trip, text_encoder_to_original, unet_to_original, vae_to_original

TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."  # diffusers' LDM_CLIP_PREFIX_TO_REMOVE[1]
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."  # the prefix diffusers gives convert_open_clip_checkpoint for SDXL
LAYERS = "text_model.encoder.layers."
QKV = ("q_proj", "k_proj", "v_proj")  # the order of in_proj_weight's row blocks


def _openclip_mapping() -> Mapping[str, Mapping[str, str]]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return DIFFUSERS_TO_LDM_MAPPING["openclip"]


def open_clip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str = TEXT_ENCODER_2_PREFIX) -> dict[str, torch.Tensor]:
    """Rename a ``CLIPTextModelWithProjection`` state dict to the OpenCLIP layout under ``prefix``.

    Args:
        state_dict: ``text_encoder_2.state_dict()`` (``text_model.*`` and ``text_projection.weight``).
        prefix: the checkpoint prefix of the OpenCLIP model.

    Raises:
        UserError: a key with no OpenCLIP name, or an attention layer missing one of q/k/v.
    """
    mapping = _openclip_mapping()
    fixed, renames = mapping["layers"], mapping["transformer"]
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # "resblocks.N.attn.in_proj_weight" -> {"q_proj": ...}
    for key, value in state_dict.items():
        if key in fixed:
            out[prefix + fixed[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        if not key.startswith(LAYERS):
            raise UserError(f"text encoder 2 key {key!r} has no name in the OpenCLIP single-file layout")
        new = key
        for diffusers_part, ldm_part in renames.items():  # the converter's replacements, run forwards
            new = new.replace(diffusers_part, ldm_part)
        module, _, param = new.rpartition(".")  # e.g. resblocks.0.attn.q_proj, weight
        parent, _, leaf = module.rpartition(".")
        if leaf in QKV:
            fused.setdefault(f"{parent}.in_proj_{param}", {})[leaf] = value
        else:
            out[f"{prefix}transformer.{new}"] = value
    for name, parts in fused.items():
        if set(parts) != set(QKV):
            raise UserError(f"text encoder 2 {name}: needs q_proj, k_proj and v_proj, has {', '.join(sorted(parts))}")
        out[f"{prefix}transformer.{name}"] = torch.cat([parts[p] for p in QKV], dim=0)  # (3 * width[, width])
    return out


def sdxl_pipeline_to_original(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """The single-file state dict of an SDXL base (U-Net, VAE, CLIP-L, OpenCLIP bigG), checked.

    Args:
        unet: a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``.
        vae: an ``AutoencoderKL``.
        text_encoder: a ``CLIPTextModel`` (CLIP-L).
        text_encoder_2: a ``CLIPTextModelWithProjection`` (OpenCLIP bigG).

    Raises:
        UserError: a module has no original-layout name, or diffusers would not read a
            tensor back to the same key (see :func:`condkit.original_layout.check_round_trip`).
    """
    state = unet_to_original(unet.state_dict(), unet.config)
    state.update(vae_to_original(vae.state_dict(), vae.config))
    state.update(text_encoder_to_original(text_encoder.state_dict(), prefix=TEXT_ENCODER_PREFIX))
    state.update(open_clip_to_original(text_encoder_2.state_dict()))
    check_round_trip(state, {
        "U-Net": (unet.state_dict(), unet.config), "VAE": (vae.state_dict(), vae.config),
        "text encoder": (text_encoder.state_dict(), None), "text encoder 2": (text_encoder_2.state_dict(), text_encoder_2),
    })
    return state
