"""The SDXL family: two CLIP text encoders, pooled text and size ids through ``added_cond_kwargs``.

An SDXL U-Net is a ``UNet2DConditionModel`` whose timestep embedding adds a
``text_time`` embedding (``addition_embed_type="text_time"``) of

* ``text_embeds`` (b, p): the pooled, projected output of ``text_encoder_2``
  (``CLIPTextModelWithProjection``; p = 1280 for SDXL 1.0), and
* ``time_ids`` (b, 6): the micro-conditioning ``(original height, original width,
  crop top, crop left, target height, target width)`` in pixels, each embedded
  sinusoidally with ``addition_time_embed_dim`` channels,

so ``projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + p``. The
cross-attention states are the penultimate hidden states of both text encoders side by
side: (b, 77, 768) from CLIP-L and (b, 77, 1280) from OpenCLIP bigG give (b, 77, 2048).
This module encodes prompts the way diffusers' ``StableDiffusionXLPipeline.encode_prompt``
does (no clip skip), so a condkit-trained adapter sees at training what it sees there.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from condkit.errors import UserError
from condkit.families import Conditioning, ModelFamily

ADDITION_EMBED_TYPE = "text_time"
# kohya LoRA key prefixes of SDXL files (sd-scripts networks/lora.py: LORA_PREFIX_TEXT_ENCODER1/2).
KOHYA_PREFIXES: Mapping[str, str] = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# Tokenizer component of each text encoder (diffusers' StableDiffusionXLPipeline names).
TOKENIZERS: Mapping[str, str] = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
# Where the U-Net's extra arguments live in Conditioning.unet_kwargs.
ADDED_COND_KWARGS = "added_cond_kwargs"
TIME_IDS = "time_ids"
TEXT_EMBEDS = "text_embeds"
SIZE_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)


class StableDiffusionXLFamily(ModelFamily):
    """SDXL base (and refiner-style bases with only ``text_encoder_2``): ``text_time`` U-Nets."""

    name: ClassVar[str] = "sdxl"
    kohya_prefixes: ClassVar[Mapping[str, str]] = KOHYA_PREFIXES
    kohya_base_model_version: ClassVar[str] = "sdxl_base_v1-0"
    pipeline_prefix: ClassVar[str] = "StableDiffusionXL"  # StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, ...

    @classmethod
    def matches_config(cls, unet_config: Mapping[str, Any]) -> bool:
        """SDXL U-Nets embed pooled text and size ids (``addition_embed_type="text_time"``)."""
        return unet_config.get("addition_embed_type") == ADDITION_EMBED_TYPE

    def text_encoders(self, base) -> dict[str, torch.nn.Module]:
        """``{"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}`` (those present)."""
        return {name: getattr(base, name) for name in TOKENIZERS if getattr(base, name, None) is not None}

    def encode_prompts(self, base, prompts: list[str], device: torch.device | str | None = None) -> Conditioning:
        """Encode as ``StableDiffusionXLPipeline.encode_prompt`` does, plus default size ids.

        Each present text encoder reads its own tokenizer's ids (padded to 77); the
        penultimate hidden states are concatenated and the last encoder with a projection
        gives the pooled embedding. ``time_ids`` say "a full, uncropped image at the
        base's native size" until :meth:`with_sample_sizes` puts each sample's in.

        Args:
            base: the base model.
            prompts: b prompts.
            device: where to run; default the first text encoder's device.

        Returns:
            ``encoder_hidden_states`` (b, 77, d1 + d2) and ``added_cond_kwargs``
            ``text_embeds`` (b, p), ``time_ids`` (b, 6).

        Raises:
            UserError: the base has no text encoder with a projection (no pooled text).
        """
        encoders = self.text_encoders(base)
        device = device or next(iter(encoders.values())).device
        hidden, pooled = [], None
        for name, encoder in encoders.items():
            tokenizer = getattr(base, TOKENIZERS[name])
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
            out = encoder(ids.input_ids.to(device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (b, p) first
                pooled = out[0]
            hidden.append(out.hidden_states[-2])  # (b, 77, d_i), penultimate layer as SDXL was trained
        if pooled is None:
            raise UserError(f"base {base.source}: an SDXL base needs text_encoder_2 with a projection (CLIPTextModelWithProjection) for the pooled text")
        states = torch.cat(hidden, dim=-1)  # (b, 77, d1 + d2); SDXL 1.0: (b, 77, 2048)
        side = base.resolution
        sizes = torch.tensor([[side, side, 0, 0, side, side]], dtype=states.dtype, device=states.device).expand(len(prompts), SIZE_IDS)
        return Conditioning(states, {ADDED_COND_KWARGS: {TEXT_EMBEDS: pooled, TIME_IDS: sizes.clone()}})

    def with_sample_sizes(self, conditioning: Conditioning, sizes: torch.Tensor) -> Conditioning:
        """Put each sample's original size, crop top-left and target size into ``time_ids``.

        Args:
            conditioning: batch b, from :meth:`encode_prompts` (possibly after caption dropout).
            sizes: (b, 6) ``(original h, original w, crop top, crop left, target h, target w)``
                in pixels, as the data layer records them.
        """
        added = dict(conditioning.unet_kwargs[ADDED_COND_KWARGS])
        old = added[TIME_IDS]
        added[TIME_IDS] = sizes.to(old.device, old.dtype).reshape(conditioning.batch_size, SIZE_IDS)  # (b, 6)
        return Conditioning(conditioning.encoder_hidden_states, {**conditioning.unet_kwargs, ADDED_COND_KWARGS: added})
