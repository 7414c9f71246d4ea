"""Section 6: how step time and memory grow, and the training-step figures on an SD 1.5 U-Net.

* Scaling: LoRA training runs of the real loop at growing batch size and resolution on
  the embedded base, in the memory child process (see :mod:`memory`): median step
  time, time per sample relative to batch 1, and training memory.
* SD 1.5: the LoRA step of section 1 (condkit / reference / floor, interleaved) on a
  model with SD 1.5's architecture built from its published configs with random
  weights (nothing is downloaded): ``UNet2DConditionModel`` (block_out_channels
  320/640/1280/1280, cross_attention_dim 768, attention_head_dim 8), the SD VAE
  (128/256/512/512, 8x downsampling) and a CLIP ViT-L/14 text encoder (12 layers,
  width 768), at batch 1 and reduced resolution to fit the time budget.
"""

from __future__ import annotations

import torch

from harness import Row, median

SECTION = "6. Scaling"
SD15_SECTION = "6. SD 1.5 architecture (random weights, published config)"

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def sd15_base(narrow: bool = False):
    """A :class:`condkit.base.BaseModel` with SD 1.5's architecture and random weights.

    Args:
        narrow: divide every width by 10 (same blocks and depth), for the quick run.

    The tokenizer and scheduler are the embedded base's (same CLIP tokenizer layout
    and the same scaled-linear DDPM schedule as SD 1.5).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from condkit.base import BaseModel, load_base

    unet_config, vae_config, text_config = dict(SD15_UNET), dict(SD15_VAE), dict(CLIP_L_TEXT)
    if narrow:
        unet_config.update(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, attention_head_dim=2, norm_num_groups=16)
        vae_config.update(block_out_channels=(16, 32, 64, 64), norm_num_groups=16)
        text_config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
    torch.manual_seed(0)
    embedded = load_base("embedded")
    base = BaseModel(
        source="sd15-random",
        unet=UNet2DConditionModel(**unet_config),
        vae=AutoencoderKL(**vae_config),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        tokenizer=embedded.tokenizer,
        scheduler=embedded.scheduler,
    )
    base.freeze()
    return base


def scaling_rows(quick: bool, threads: int) -> list[Row]:
    """Step time and memory of LoRA training as batch and resolution grow (embedded base)."""
    from memory import measure
    from training_steps import QUICK_RESOLUTION

    low = QUICK_RESOLUTION if quick else 64
    shapes = [(1, low), (2, low), (1, 2 * low)] if quick else [(1, low), (4, low), (16, low), (4, 2 * low)]
    steps = 2 if quick else 4
    configs = [{"kind": "lora", "batch": b, "resolution": r, "checkpointing": False, "cache": "memory", "steps": steps} for b, r in shapes]
    results = measure(configs, quick, threads)
    per_sample_1 = median(results[0]["seconds"]) / results[0]["batch"]
    rows = []
    for result in results:
        step = median(result["seconds"])
        per_sample = step / result["batch"] / per_sample_1
        rows.append(
            Row(
                SECTION,
                f"LoRA, embedded base, batch {result['batch']}, {result['resolution']} px",
                f"{step * 1e3:.0f} ms/step, {per_sample:.2f}x per sample, {result['training_mib']:.0f} MB",
                note=f"median step of the loop; time per sample relative to batch 1 at {low} px; training memory as in section 3",
            )
        )
    return rows


def sd15_rows(quick: bool) -> list[Row]:
    """Section 1's LoRA step ratios on the SD 1.5 architecture."""
    from training_steps import make_recipe, measure_kind, step_rows

    resolution, warmup, repetitions = (64, 1, 1) if quick else (128, 1, 2)
    base = sd15_base(narrow=quick)
    recipe = make_recipe("lora", 1, warmup + repetitions, resolution=resolution)
    times = measure_kind(recipe, warmup, prebuilt_base=base)
    what = "SD 1.5 widths / 10 (quick run)" if quick else "SD 1.5 U-Net (860 M parameters), SD VAE, CLIP-L text encoder"
    label = f"LoRA, {what}, batch 1, {resolution} px"
    return step_rows(SD15_SECTION, label, times, "lora", 0.85, 1.10)


def run(quick: bool, threads: int) -> list[Row]:
    """Section 6."""
    return scaling_rows(quick, threads) + sd15_rows(quick)
