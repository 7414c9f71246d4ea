"""A tiny SDXL-architecture base built from configs (random weights), for tests.

Two CLIP text encoders (``CLIPTextModel`` 32 wide, ``CLIPTextModelWithProjection`` 48
wide with a 32-d projection; different widths, as in SDXL, which diffusers' single-file
loader needs to tell them apart), a U-Net with the ``text_time`` embedding whose
cross-attention takes both encoders' states side by side (32 + 48 = 80) and whose added
embedding takes ``6 * addition_time_embed_dim + 32`` inputs, the embedded base's VAE
(4x) and tokenizer (offline) for both tokenizers, and a tiny CLIP image encoder
(``CLIPVisionModelWithProjection``, 24-d ``image_embeds``) with its feature extractor for
IP-Adapter. Saved with ``StableDiffusionXLPipeline.save_pretrained``, so it is a plain
diffusers SDXL folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from condkit.embedded import EMBEDDED_BASE_DIR

HIDDEN, HIDDEN_2 = 32, 48  # the text encoders' widths; cross_attention_dim = HIDDEN + HIDDEN_2
POOLED = 32  # text_encoder_2's projection_dim
TIME_EMBED = 8  # addition_time_embed_dim
IMAGE_EMBED = 24  # the image encoder's projection_dim (IP-Adapter's image_embeds width)
IMAGE_SIZE = 32  # the image encoder's input side


def _text_config(hidden: int, **extra):
    from transformers import CLIPTextConfig

    # Token ids of the embedded base's tokenizer (vocab 694: bos 685, eos/pad 686).
    return CLIPTextConfig(
        hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=694,
        bos_token_id=685, eos_token_id=686, pad_token_id=686, max_position_embeddings=77, hidden_act="gelu", **extra,
    )


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL diffusers folder to ``folder`` and return it.

    Args:
        folder: destination (created).
        seed: torch seed of the random weights.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=HIDDEN + HIDDEN_2,  # (b, 77, 32 + 48)
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED,  # six size ids + pooled text
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(_text_config(HIDDEN))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(HIDDEN_2, projection_dim=POOLED))
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_BASE_DIR / "tokenizer")
    vae = AutoencoderKL.from_pretrained(EMBEDDED_BASE_DIR / "vae")
    scheduler = EulerDiscreteScheduler.from_pretrained(EMBEDDED_BASE_DIR / "scheduler")
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
            patch_size=8, projection_dim=IMAGE_EMBED,
        )
    )
    feature_extractor = CLIPImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler, image_encoder=image_encoder, feature_extractor=feature_extractor,
    )
    pipe.save_pretrained(folder)
    return Path(folder)
