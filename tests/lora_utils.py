"""Shared helpers of the LoRA tests: fixed inputs, seeded random LoRA weights, stock pipelines."""

from __future__ import annotations

import torch

PROMPT = "a red circle on a blue background"


def unet_output(base) -> torch.Tensor:
    """The U-Net's output on a fixed input: (1, 4, 16, 16)."""
    generator = torch.Generator().manual_seed(123)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return base.unet(latents, torch.tensor([400]), text).sample


def text_output(base) -> torch.Tensor:
    """The text encoder's hidden states for a fixed prompt: (1, 77, d)."""
    ids = base.tokenizer(PROMPT, padding="max_length", max_length=base.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return base.text_encoder(ids)[0]


def randomise(adapter, std: float = 0.05, seed: int = 0) -> None:
    """Give the adapter's LoRA parameters seeded random values (as if trained)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std + (1.0 if param.ndim == 1 else 0.0))


def sample(pipe, prompt: str = PROMPT, steps: int = 2):
    """Two-step sample as a float array (1, 64, 64, 3), fixed seed."""
    return pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np").images


def stock_pipeline(folder):
    """A plain diffusers pipeline of the exported embedded base (no condkit involved)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
