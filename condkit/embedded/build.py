"""Build the embedded tiny base from its architecture configs, with seeded random weights.

Run ``python -m condkit.embedded.build OUT_DIR`` to write a fresh random base; the
shipped ``base/`` folder is either that or its trained successor. Sizes are chosen so
that one 25-step sample with classifier-free guidance takes well under a second on two
CPU cores: 64x64 images, a VAE with 4x downsampling (latents (4, 16, 16)), a two-level
U-Net, and a 2-layer CLIP text encoder and image encoder of width 64.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

IMAGE_SIZE = 64

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    # 3 blocks -> 2 downsamples -> 4x smaller latents. Narrow full-resolution blocks keep
    # a VAE training step cheap on CPU (flat-colour shapes need little capacity).
    block_out_channels=[16, 32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    scaling_factor=1.0,  # set from the latent std after VAE training
)

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64, 96],
    layers_per_block=1,
    cross_attention_dim=64,
    # diffusers' legacy name: this is the number of heads. One head (of width 32/64)
    # instead of 8 heads of width 4/8: same parameter shapes, but CPU attention kernels
    # are 2-3x faster on wide heads, for training and sampling alike.
    attention_head_dim=1,
    norm_num_groups=16,
)

TEXT_ENCODER_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=64,
    hidden_act="quick_gelu",
)

IMAGE_ENCODER_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=8,
    projection_dim=64,
    hidden_act="quick_gelu",
)

# SD 1.x noise schedule; DDIM samples well in 25 steps.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

# Words that get their own token; anything else falls back to characters.
TOKENIZER_WORDS = (
    "a an the of on in with and or photo picture image drawing shape background "
    "circle square triangle red green blue yellow white black purple orange pink "
    "cyan magenta gray grey brown small big large left right top bottom center "
    "striped dotted checkered pattern style object"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level BPE alphabet (the same table transformers' CLIPTokenizer uses),
    # so that every byte is a base token and no word is ever out of vocabulary.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer(out_dir: Path) -> int:
    """Write a small CLIP BPE tokenizer (vocab.json, merges.txt, configs) to ``out_dir``.

    Args:
        out_dir: the ``tokenizer/`` folder to create.

    Returns:
        The vocabulary size.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in TOKENIZER_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            pair = f"{merged} {symbol}"
            if pair not in merges:
                merges.append(pair)
            merged += symbol
            if merged not in vocab:
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            },
            indent=2,
        )
    )
    return len(vocab)


def _feature_extractor_config() -> dict:
    # CLIP's normalisation at the tiny encoder's own resolution.
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "resample": 3,
    }


def build_random_base(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the embedded base architecture with seeded random weights as a diffusers folder.

    Args:
        out_dir: destination folder (created; existing files are overwritten).
        seed: torch seed for the random initialisation.

    Returns:
        The folder path.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    out_dir = Path(out_dir)
    vocab_size = write_tokenizer(out_dir / "tokenizer")
    eos_id = vocab_size - 1
    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(out_dir / "unet")
    AutoencoderKL(**VAE_CONFIG).save_pretrained(out_dir / "vae")
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=eos_id - 1, eos_token_id=eos_id, pad_token_id=eos_id, **TEXT_ENCODER_CONFIG
    )
    CLIPTextModel(text_config).save_pretrained(out_dir / "text_encoder")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).save_pretrained(out_dir / "image_encoder")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(out_dir / "scheduler")
    (out_dir / "feature_extractor").mkdir(parents=True, exist_ok=True)
    (out_dir / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(_feature_extractor_config(), indent=2))
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return out_dir


def main() -> None:
    """``python -m condkit.embedded.build OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_random_base(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
