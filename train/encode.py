"""Frozen encoders: prompts to text embeddings, images to VAE latents."""

from __future__ import annotations

import torch


def encode_prompts(base, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Encode prompts with the base's tokenizer and text encoder.

    Args:
        base: a :class:`condkit.base.BaseModel`.
        prompts: b prompts.
        device: where to run; default the text encoder's device.

    Returns:
        (b, 77, d) last hidden states, as SD's U-Net consumes them. Gradients flow when
        the text encoder has trainable parameters (text-encoder LoRA).
    """
    device = device or base.text_encoder.device
    tokens = base.tokenizer(
        list(prompts), padding="max_length", max_length=base.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return base.text_encoder(tokens.input_ids.to(device))[0]  # (b, 77, d)


def latent_distribution(base, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode images to the VAE's latent distribution, already scaled for the U-Net.

    Args:
        base: the base model.
        pixel_values: (b, 3, H, W) in [-1, 1].

    Returns:
        (mean, std), each (b, c, H/f, W/f) in U-Net latent units (scaling factor and
        shift applied), so a latent sample is ``mean + std * randn``.
    """
    vae = base.vae
    dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = vae.config.get("shift_factor") or 0.0
    return (dist.mean - shift) * scale, dist.std * scale


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw a latent sample from a cached distribution with a reproducible generator.

    Args:
        mean: (b, c, h, w).
        std: (b, c, h, w).
        generator: CPU generator of this step.
    """
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
    return mean + std * eps
