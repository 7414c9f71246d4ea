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
