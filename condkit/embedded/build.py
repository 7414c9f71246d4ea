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

# Rare words for naming a new concept in few-image training ("a photo of sks dog"). In
# SD's CLIP vocabulary each is one token; here too, so a trigger takes one position like
# any shape word. They come after the special tokens: the ids of everything above (and
# the seeded embeddings the shipped U-Net was trained with) stay as they were.
TRIGGER_WORDS = ("sks", "zwx", "ohwx")
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


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

    def add_word(word: str) -> None:
        # Left-to-right merges ending in the whole word: later merges rank lower, so the
        # words added earlier tokenize exactly as before.
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            pair = f"{merged} {symbol}"
            if pair not in merges:
                merges.append(pair)
            merged += symbol
            if merged not in vocab:
                vocab.append(merged)

    for word in TOKENIZER_WORDS:
        add_word(word)
    vocab += [BOS_TOKEN, EOS_TOKEN]
    for word in TRIGGER_WORDS:
        add_word(word)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": BOS_TOKEN,
                "eos_token": EOS_TOKEN,
                "unk_token": EOS_TOKEN,
                "pad_token": EOS_TOKEN,
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


def add_trigger_embeddings(text_encoder: torch.nn.Module, vocab_size: int, seed: int) -> None:
    """Grow the text encoder's token table to ``vocab_size`` with seeded rows for TRIGGER_WORDS.

    The new rows are drawn like CLIP's own token embeddings (normal, std 0.02), from a
    generator seeded by ``seed``; existing rows are untouched, so prompts without a
    trigger word encode exactly as before.

    Args:
        text_encoder: a ``CLIPTextModel`` whose table is at most ``vocab_size`` rows.
        vocab_size: the tokenizer's vocabulary size.
        seed: seed of the new rows.
    """
    old = text_encoder.get_input_embeddings().weight
    extra = vocab_size - old.shape[0]
    if extra <= 0:
        return
    rows = torch.randn(extra, old.shape[1], generator=torch.Generator().manual_seed(seed + 1), dtype=old.dtype) * 0.02
    text_encoder.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[-extra:] = rows


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
    vocab = json.loads((out_dir / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    bos_id, eos_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(out_dir / "unet")
    AutoencoderKL(**VAE_CONFIG).save_pretrained(out_dir / "vae")
    # Built at the size the vocabulary had before TRIGGER_WORDS (eos_id + 1), so every seeded
    # draw is as it was; the trigger rows are then appended from their own seed.
    text_config = CLIPTextConfig(
        vocab_size=eos_id + 1, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id, **TEXT_ENCODER_CONFIG
    )
    text_encoder = CLIPTextModel(text_config)
    add_trigger_embeddings(text_encoder, vocab_size, seed)
    text_encoder.save_pretrained(out_dir / "text_encoder")
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
