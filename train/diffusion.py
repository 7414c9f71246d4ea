"""Where a training step samples timesteps and how it weights the loss per sample.

The defaults of :meth:`condkit.adapters.Adapter.sample_timesteps` and
:meth:`condkit.adapters.Adapter.loss_weights` live here, with the alternatives a kind
may pick instead (T2I-Adapter trains with :func:`cubic_timesteps`).
"""

from __future__ import annotations

import torch


def uniform_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Timesteps drawn uniformly from ``[0, num_train_timesteps)`` (DDPM training).

    Args:
        batch_size: b.
        num_train_timesteps: T of the noise schedule (1000 for SD).
        generator: the step's CPU generator (a resumed run draws the same values).

    Returns:
        (b,) int64 on the CPU.
    """
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)


def cubic_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Timesteps ``t = (1 - u^3) T`` for uniform ``u``: most samples land at high noise.

    The schedule of diffusers' ``train_t2i_adapter_sdxl.py``: a structure-giving adapter
    matters most early in sampling, where the image's layout forms.

    Args:
        batch_size: b.
        num_train_timesteps: T of the noise schedule.
        generator: the step's CPU generator.

    Returns:
        (b,) int64 on the CPU, within ``[0, T)``.
    """
    u = torch.rand((batch_size,), generator=generator)
    return ((1 - u**3) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def min_snr_weights(timesteps: torch.Tensor, noise_scheduler, snr_gamma: float) -> torch.Tensor | None:
    """Min-SNR-gamma loss weights (Hang et al. 2023), or None when ``snr_gamma`` is 0.

    Args:
        timesteps: (b,) the step's timesteps.
        noise_scheduler: the DDPM scheduler the noise was added with.
        snr_gamma: the recipe's ``train.snr_gamma`` (0: every sample weighs 1).

    Returns:
        (b,) float weights: ``min(SNR, gamma) / SNR`` for epsilon prediction,
        ``min(SNR, gamma) / (SNR + 1)`` for v-prediction.
    """
    if not snr_gamma:
        return None
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()  # (b,)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr, max=snr_gamma) / (snr + 1)
    return torch.clamp(snr, max=snr_gamma) / snr
