"""Frozen encoders: prompts to U-Net conditioning (through the model family), images to VAE latents."""

from __future__ import annotations

import torch

from condkit.families import Conditioning, family_of


def encode_conditioning(base, prompts: list[str], device: torch.device | str | None = None) -> Conditioning:
    """Encode prompts into the U-Net's conditioning, as the base's model family does it.

    Args:
        base: a :class:`condkit.base.BaseModel`.
        prompts: b prompts.
        device: where to run; default the text encoders' device.

    Returns:
        A :class:`condkit.families.Conditioning` of batch b (SD 1.x/2.x: (b, 77, d)
        hidden states and no extra U-Net arguments). Gradients flow when a text encoder
        has trainable parameters (text-encoder LoRA).
    """
    return family_of(base).encode_prompts(base, prompts, device)


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
