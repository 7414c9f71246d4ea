"""The SD 1.x/2.x family: one CLIP text encoder, cross-attention on its last hidden states."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from condkit.families import Conditioning, ModelFamily

# kohya LoRA key prefixes of SD 1.x/2.x files, by component (lora_unet_down_blocks_0_..., lora_te_text_model_...).
KOHYA_PREFIXES: Mapping[str, str] = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


class StableDiffusionFamily(ModelFamily):
    """SD 1.x and 2.x (and the embedded base): U-Nets without ``addition_embed_type``."""

    name: ClassVar[str] = "sd"
    kohya_prefixes: ClassVar[Mapping[str, str]] = KOHYA_PREFIXES
    kohya_base_model_version: ClassVar[str] = "sd_v1"
    pipeline_prefix: ClassVar[str] = "StableDiffusion"  # StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, ...

    @classmethod
    def matches_config(cls, unet_config: Mapping[str, Any]) -> bool:
        """SD 1.x/2.x U-Nets add nothing to the timestep embedding (SDXL adds ``text_time``)."""
        return unet_config.get("addition_embed_type") is None

    def text_encoders(self, base) -> dict[str, torch.nn.Module]:
        """``{"text_encoder": CLIPTextModel}``."""
        return {"text_encoder": base.text_encoder}

    def encode_prompts(self, base, prompts: list[str], device: torch.device | str | None = None) -> Conditioning:
        """Tokenize to the tokenizer's length (77), pad, and take the last hidden states.

        Args:
            base: the base model.
            prompts: b prompts.
            device: where to run; default the text encoder's device.

        Returns:
            ``encoder_hidden_states`` (b, 77, d), no extra U-Net arguments.
        """
        device = device or base.text_encoder.device
        tokens = base.tokenizer(
            list(prompts), padding="max_length", max_length=base.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return Conditioning(base.text_encoder(tokens.input_ids.to(device))[0])  # (b, 77, d)
