"""Build the untrained embedded tiny SDXL base: the SD base's VAE and tokenizer, seeded new models.

Run ``python -m condkit.embedded.build_sdxl OUT_DIR`` to write the folder the SDXL U-Net
stage starts from (``recipes/base/unet-sdxl.yaml``; condkit/embedded/TRAINING-sdxl.md).
It is a plain ``StableDiffusionXLPipeline`` folder:

* ``vae/``: a file copy of the SD embedded base's VAE (64x64x3 <-> 4x16x16), whatever
  VAE that base ships at build time, so both bases draw through the same decoder;
* ``tokenizer/``, ``tokenizer_2/``: the SD embedded base's tokenizer, twice;
* ``image_encoder/``, ``feature_extractor/``: the SD embedded base's trained CLIP image
  encoder and its processor, for IP-Adapters;
* ``text_encoder/``: a CLIP-L-like ``CLIPTextModel`` (width 64, quick_gelu), and
  ``text_encoder_2/``: a wider ``CLIPTextModelWithProjection`` (width 96, gelu, 64-d
  pooled projection), as SDXL pairs CLIP-L (768) with OpenCLIP bigG (1280). Seeded random
  and frozen in training, as the SD base's text encoder is;
* ``unet/``: SDXL's U-Net layout (no attention at full latent resolution, linear
  projections, ``text_time`` added embedding) at the SD embedded U-Net's widths;
* ``scheduler/``: SDXL's default ``EulerDiscreteScheduler`` (SD's scaled-linear betas).

``model_index.json`` sets ``force_zeros_for_empty_prompt: false``: condkit's caption
dropout trains the unconditional branch on the encoded empty prompt, so classifier-free
guidance must use that, not SDXL 1.0's zeros.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from condkit.embedded import EMBEDDED_BASE_DIR
from condkit.embedded.build import BOS_TOKEN, EOS_TOKEN, IMAGE_SIZE

TEXT_WIDTH, TEXT_WIDTH_2 = 64, 96  # text_encoder, text_encoder_2; cross_attention_dim is their sum
POOLED_WIDTH = 64  # text_encoder_2's projection_dim: the pooled text_embeds (b, 64)
TIME_EMBED_WIDTH = 16  # addition_time_embed_dim: each of the six size ids, sinusoidal

TEXT_ENCODER_CONFIG = dict(
    hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu",
)
TEXT_ENCODER_2_CONFIG = dict(
    hidden_size=TEXT_WIDTH_2, intermediate_size=2 * TEXT_WIDTH_2, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=POOLED_WIDTH,
)

# sample_size is set from the VAE at build time (64 px / VAE factor).
UNET_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    # SDXL: plain ResNet blocks at full latent resolution, cross-attention below it.
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64, 96],  # the SD embedded U-Net's widths
    layers_per_block=1,
    transformer_layers_per_block=[1, 1, 1],
    # Number of heads (diffusers' legacy name). One wide head per block: CPU attention
    # kernels are 2-3x faster on wide heads (as in the SD embedded U-Net).
    attention_head_dim=[1, 1, 1],
    use_linear_projection=True,
    cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,  # (b, 77, 64 + 96) from both encoders
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_WIDTH,
    projection_class_embeddings_input_dim=6 * TIME_EMBED_WIDTH + POOLED_WIDTH,  # six size ids + pooled text
    norm_num_groups=16,
)

# SDXL 1.0's scheduler config (Euler, SD's scaled-linear schedule).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)

# Folders taken from the SD embedded base as files: its VAE and tokenizer, and its trained
# CLIP image encoder so IP-Adapters train on the SDXL base too (SDXL folders ship one the same way).
COPIED = ("vae", "tokenizer", "image_encoder", "feature_extractor")


def _text_configs(tokenizer_dir: Path):
    """Both encoders' ``CLIPTextConfig``s, with the token ids of the tokenizer in ``tokenizer_dir``."""
    from transformers import CLIPTextConfig

    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    ids = dict(vocab_size=len(vocab), bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN])
    return CLIPTextConfig(**ids, **TEXT_ENCODER_CONFIG), CLIPTextConfig(**ids, **TEXT_ENCODER_2_CONFIG)


def unet_config(vae_dir: Path) -> dict:
    """:data:`UNET_CONFIG` with ``sample_size`` = 64 px / the VAE's factor (16 for the 4x VAE).

    Args:
        vae_dir: the ``vae/`` folder the U-Net will denoise the latents of.
    """
    vae = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))
    return {**UNET_CONFIG, "sample_size": IMAGE_SIZE // 2 ** (len(vae["block_out_channels"]) - 1)}


def model_index() -> dict:
    """``model_index.json`` of the folder: a ``StableDiffusionXLPipeline`` with the SD base's image encoder."""
    import diffusers

    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "force_zeros_for_empty_prompt": False,
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_sdxl_base(out_dir: str | Path, seed: int = 0, source: str | Path = EMBEDDED_BASE_DIR) -> Path:
    """Write the untrained tiny SDXL base to ``out_dir`` (replaced atomically).

    Args:
        out_dir: destination folder.
        seed: torch seed of the text encoders' and the U-Net's random weights.
        source: the SD embedded base folder whose :data:`COPIED` folders are copied.

    Returns:
        ``out_dir``.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from condkit.errors import UserError
    from condkit.io import atomic_folder

    source, out_dir = Path(source), Path(out_dir)
    for name in COPIED:
        if not (source / name).is_dir():
            raise UserError(f"{source / name}: missing (the SD embedded base folder the SDXL base copies {name}/ from)")
    with atomic_folder(out_dir) as tmp:
        for name in COPIED:
            shutil.copytree(source / name, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(source / "tokenizer", tmp / "tokenizer_2", ignore=shutil.ignore_patterns("__pycache__"))
        config, config_2 = _text_configs(tmp / "tokenizer")
        torch.manual_seed(seed)
        CLIPTextModel(config).save_pretrained(tmp / "text_encoder")
        CLIPTextModelWithProjection(config_2).save_pretrained(tmp / "text_encoder_2")
        UNet2DConditionModel(**unet_config(tmp / "vae")).save_pretrained(tmp / "unet")
        EulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m condkit.embedded.build_sdxl OUT_DIR [--seed N] [--source SD_BASE_DIR]``.

    Args:
        argv: the arguments (default: the command line).
    """
    from condkit.errors import report_user_errors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=EMBEDDED_BASE_DIR, help="SD embedded base folder to copy vae/, tokenizer/ and image_encoder/ from")
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors")
    args = parser.parse_args(argv)

    def run() -> int:
        print(build_sdxl_base(args.out_dir, args.seed, args.source))
        return 0

    return report_user_errors(run, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
