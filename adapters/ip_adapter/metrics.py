"""How much of a reference image an IP-Adapter output keeps.

Two measures, both in [0, 1]-ish and higher = closer:

* ``encoder_similarity``: cosine similarity of reference and output in the image
  encoder's ``image_embeds`` space (what the adapter is conditioned on);
* ``colour_similarity``: intersection of coarse RGB histograms (4 bins per channel, 64
  cells), a layout-free colour statistic: 1 when both images use the same colours in
  the same proportions. The shapes world's six colours fall in six distinct cells.

``mean_colour_distance`` (Euclidean distance of mean RGB in [0, 1], lower = closer) is
reported beside them.
"""

from __future__ import annotations

import numpy as np
import torch

from condkit.adapters.ip_adapter.adapter import encode_images, images_to_uint8

HISTOGRAM_BINS = 4


def colour_histogram(image: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Normalised joint RGB histogram.

    Args:
        image: (H, W, 3) uint8 RGB.
        bins: bins per channel.

    Returns:
        (bins**3,) float64 summing to 1.
    """
    cells = (image.reshape(-1, 3).astype(np.int64) * bins) // 256  # (H*W, 3) in [0, bins)
    index = (cells[:, 0] * bins + cells[:, 1]) * bins + cells[:, 2]
    counts = np.bincount(index, minlength=bins**3).astype(np.float64)
    return counts / counts.sum()


def colour_similarity(a: np.ndarray, b: np.ndarray, bins: int = HISTOGRAM_BINS) -> float:
    """Histogram intersection of two images' colours (1 = same colour proportions).

    Args:
        a, b: (H, W, 3) uint8 RGB images (sizes may differ).
        bins: bins per channel.
    """
    return float(np.minimum(colour_histogram(a, bins), colour_histogram(b, bins)).sum())


def mean_colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of the two images' mean RGB colour, channels in [0, 1].

    Args:
        a, b: (H, W, 3) uint8 RGB images.
    """
    mean_a = a.reshape(-1, 3).mean(axis=0) / 255.0
    mean_b = b.reshape(-1, 3).mean(axis=0) / 255.0
    return float(np.linalg.norm(mean_a - mean_b))


def encoder_similarities(references, outputs, image_encoder, feature_extractor) -> list[float]:
    """Cosine similarity of each (reference, output) pair in ``image_embeds`` space.

    Args:
        references, outputs: equally long lists of PIL images (or a (b, 3, H, W) [0, 1] tensor each).
        image_encoder: a ``CLIPVisionModelWithProjection``.
        feature_extractor: its ``CLIPImageProcessor``.
    """
    ref = encode_images(references, image_encoder, feature_extractor, hidden_states=False)  # (n, d)
    out = encode_images(outputs, image_encoder, feature_extractor, hidden_states=False)  # (n, d)
    return torch.nn.functional.cosine_similarity(ref.float(), out.float(), dim=-1).tolist()


def similarity_report(references, outputs, image_encoder, feature_extractor) -> dict[str, float]:
    """Mean encoder similarity, colour similarity and mean-colour distance over pairs.

    Args:
        references, outputs: equally long lists of PIL images.
        image_encoder, feature_extractor: the IP-Adapter's CLIP image encoder and processor.
    """
    if len(references) != len(outputs) or not references:
        raise ValueError(f"need equally many references and outputs, got {len(references)} and {len(outputs)}")
    ref_arrays, out_arrays = images_to_uint8(references), images_to_uint8(outputs)
    return {
        "encoder_similarity": float(np.mean(encoder_similarities(references, outputs, image_encoder, feature_extractor))),
        "colour_similarity": float(np.mean([colour_similarity(r, o) for r, o in zip(ref_arrays, out_arrays)])),
        "mean_colour_distance": float(np.mean([mean_colour_distance(r, o) for r, o in zip(ref_arrays, out_arrays)])),
    }


@torch.no_grad()
def sample_with_references(
    adapter, base, references, prompt: str, num_inference_steps: int, guidance_scale: float, seed: int
) -> list:
    """One sample per reference image through the stock pipeline, each from ``seed``.

    Args:
        adapter: an attached :class:`~condkit.adapters.ip_adapter.IPAdapter`.
        base: the base it is attached to.
        references: PIL images.
        prompt: the text prompt for every sample.
        num_inference_steps, guidance_scale: sampling settings.
        seed: each sample starts from ``torch.manual_seed(seed)`` noise.

    Returns:
        PIL images, one per reference.
    """
    pipe = base.pipeline(**adapter.pipeline_components())
    samples = []
    for reference in references:
        result = pipe(
            prompt,
            ip_adapter_image=reference,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=base.resolution,
            width=base.resolution,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        samples.append(result.images[0])
    return samples


@torch.no_grad()
def reference_dependence(
    adapter, base, images: list[np.ndarray], references: list[np.ndarray], prompt: str, seed: int, repeats: int = 1
) -> dict[str, float]:
    """Denoising loss with each image's own reference against another image's reference.

    A trained adapter predicts the noise better when the reference shows what the image
    shows: ``wrong_over_right`` well above 1. Compare with a freshly initialised adapter,
    whose random projection already makes the output depend on the reference somewhat.

    Args:
        adapter: an attached :class:`~condkit.adapters.ip_adapter.IPAdapter`.
        base: the base it is attached to.
        images: (H, W, 3) uint8 RGB targets at the base's resolution.
        references: one (H, W, 3) uint8 reference per target; "wrong" pairs target ``i``
            with reference ``i - 1``, so consecutive references should differ.
        prompt: the caption of every target (vague, so the reference has to carry it).
        seed: noise and timestep seed, identical for both pairings.
        repeats: noise and timestep draws per target (the figure is noisy with one).

    Returns:
        ``loss_right_reference``, ``loss_wrong_reference`` (means over targets and
        draws) and ``wrong_over_right``.
    """
    from condkit.adapters import unet_call_kwargs
    from condkit.train.encode import encode_conditioning, latent_distribution

    pixels = torch.stack([torch.from_numpy(np.asarray(i)).permute(2, 0, 1).float() / 127.5 - 1 for i in images])  # (n, 3, H, W)
    reference_pixels = torch.stack([torch.from_numpy(np.asarray(r)).permute(2, 0, 1).float() / 255 for r in references])  # (n, 3, H, W) [0, 1]
    generator = torch.Generator().manual_seed(seed)
    scheduler = base.noise_scheduler()
    latents, _ = latent_distribution(base, pixels)  # (n, 4, h, w): the posterior mean, no sampling noise
    latents = latents.repeat(repeats, 1, 1, 1)  # (repeats * n, 4, h, w)
    # The family's whole conditioning: (repeats * n, 77, d) hidden states, plus SDXL's pooled text and time_ids.
    conditioning = encode_conditioning(base, [prompt] * len(latents))
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    extras = adapter.encode_extras({"reference": reference_pixels}, base)
    losses = {}
    for name, shift in (("right", 0), ("wrong", 1)):
        paired = {key: value.roll(shift, dims=0).repeat(repeats, *([1] * (value.ndim - 1))) for key, value in extras.items()}
        kwargs = unet_call_kwargs([adapter], noisy, timesteps, conditioning, paired)
        prediction = base.unet(noisy, timesteps, conditioning.encoder_hidden_states, **kwargs).sample
        losses[f"loss_{name}_reference"] = float(torch.mean((prediction - target) ** 2))
    losses["wrong_over_right"] = losses["loss_wrong_reference"] / losses["loss_right_reference"]
    return losses
