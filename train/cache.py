"""Encode the dataset once with the frozen VAE, text encoder and adapter encoders.

When nothing upstream trains, a training step then costs only the U-Net (and the
adapter): latents come from the cache as a (mean, std) pair and are sampled with the
step's generator, exactly as an uncached step would sample them. With ``flip``,
both orientations are encoded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from condkit.train.encode import encode_prompts, latent_distribution


@dataclasses.dataclass
class EncodedSet:
    """The cached encodings of a dataset.

    Attributes:
        latent_mean, latent_std: (variants, n, c, h, w); variant 1 is the flipped image.
        caption_index: (n,) index of each sample's caption into ``text_embeds``.
        text_embeds: (u, 77, d) embeddings of the unique captions, or None when the
            text encoder trains (then captions are encoded every step).
        captions: the n captions.
        extras: adapter encodings, name -> (variants, n, ...).
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    caption_index: torch.Tensor
    text_embeds: torch.Tensor | None
    captions: list[str]
    extras: dict[str, torch.Tensor]

    def batch(self, indices: list[int], flips: list[bool]) -> dict:
        """Gather a batch: latent distribution, text embeddings (if cached), extras.

        Args:
            indices: sample indices.
            flips: per sample, whether to use the flipped variant.
        """
        variant = torch.tensor([1 if f and self.latent_mean.shape[0] > 1 else 0 for f in flips])
        index = torch.tensor(indices)
        out = {
            "latent_mean": self.latent_mean[variant, index],  # (b, c, h, w)
            "latent_std": self.latent_std[variant, index],
            "caption": [self.captions[i] for i in indices],
            "extras": {k: v[variant, index] for k, v in self.extras.items()},
        }
        if self.text_embeds is not None:
            out["text_embeds"] = self.text_embeds[self.caption_index[index]]  # (b, 77, d)
        return out

    def save(self, path: str | Path) -> None:
        """Write the cache as safetensors (atomically), for ``data.cache: disk``."""
        from condkit.io import save_safetensors_atomic, write_json_atomic

        tensors = {"latent_mean": self.latent_mean, "latent_std": self.latent_std, "caption_index": self.caption_index}
        if self.text_embeds is not None:
            tensors["text_embeds"] = self.text_embeds
        tensors.update({f"extras.{k}": v for k, v in self.extras.items()})
        save_safetensors_atomic(tensors, path)
        write_json_atomic(Path(path).with_suffix(".json"), {"captions": self.captions})

    @classmethod
    def load(cls, path: str | Path) -> EncodedSet:
        """Read a cache written by :meth:`save`."""
        import json

        from condkit.io import load_state_dict

        tensors = load_state_dict(path)
        captions = json.loads(Path(path).with_suffix(".json").read_text())["captions"]
        return cls(
            latent_mean=tensors["latent_mean"],
            latent_std=tensors["latent_std"],
            caption_index=tensors["caption_index"],
            text_embeds=tensors.get("text_embeds"),
            captions=captions,
            extras={k[len("extras.") :]: v for k, v in tensors.items() if k.startswith("extras.")},
        )


@torch.no_grad()
def encode_dataset(dataset, base, adapters, *, with_text: bool, flip: bool, batch_size: int = 16, progress=None) -> EncodedSet:
    """Encode every sample of ``dataset`` once.

    Args:
        dataset: a :class:`condkit.train.data.TrainingSet` with center crops.
        base: the frozen base.
        adapters: all attached adapters; each one's ``encode_extras`` is cached too.
        with_text: also cache text embeddings (False when the text encoder trains).
        flip: encode the flipped variant as well.
        batch_size: encoding batch size.
        progress: optional callable(done, total) for a progress display.
    """
    from condkit.train.data import collate

    variants = (False, True) if flip else (False,)
    means, stds, extras = [], [], {}
    total = len(dataset) * len(variants)
    for variant in variants:
        variant_means, variant_stds, variant_extras = [], [], {}
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset.item(i, flip=variant) for i in range(start, min(start + batch_size, len(dataset)))])
            mean, std = latent_distribution(base, batch["pixel_values"])
            variant_means.append(mean.float().cpu())
            variant_stds.append(std.float().cpu())
            for adapter in adapters:
                for name, value in adapter.encode_extras(batch, base).items():
                    variant_extras.setdefault(name, []).append(value.float().cpu())
            if progress:
                progress(len(variant_means) * batch_size, total)
        means.append(torch.cat(variant_means))
        stds.append(torch.cat(variant_stds))
        for name, parts in variant_extras.items():
            extras.setdefault(name, []).append(torch.cat(parts))
    captions = [record.caption for record in dataset.records]
    unique = sorted(set(captions))
    lookup = {caption: i for i, caption in enumerate(unique)}
    text_embeds = None
    if with_text:
        text_embeds = torch.cat([encode_prompts(base, unique[i : i + 64]).float().cpu() for i in range(0, len(unique), 64)])
    return EncodedSet(
        latent_mean=torch.stack(means),
        latent_std=torch.stack(stds),
        caption_index=torch.tensor([lookup[c] for c in captions], dtype=torch.long),
        text_embeds=text_embeds,
        captions=captions,
        extras={k: torch.stack(v) for k, v in extras.items()},
    )
