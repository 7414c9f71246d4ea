"""Encode the dataset once with the frozen VAE, text encoder and adapter encoders.

When nothing upstream trains, a training step then costs only the U-Net (and the
adapter): latents come from the cache as a (mean, std) pair and are sampled with the
step's generator, exactly as an uncached step would sample them. With ``flip``,
both orientations are encoded.

A disk cache (``data.cache: disk``) carries a key: a digest of everything the encodings
depend on (see :func:`cache_key`). :func:`load_or_encode` reuses a cache only when its
key matches the run's and encodes afresh otherwise, so a changed image, caption, base,
resolution, flip or preprocessor never trains on stale latents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condkit.families import Conditioning, family_of
from condkit.train.encode import encode_conditioning, latent_distribution


# safetensors header keys of a disk cache
KEY_METADATA = "condkit_cache_key"
CAPTIONS_METADATA = "condkit_captions"
# Prefix of the prompt-conditioning tensors in a disk cache (text.encoder_hidden_states, ...).
CONDITIONING_PREFIX = "text."
# Joins a name and a sample index in a disk cache whose samples differ in shape (latent_mean#17).
PER_SAMPLE = "#"
# Bumped when what an encoding means changes (the image loader, the key's contents).
CACHE_FORMAT = 4  # 3: prompt conditioning stored as the model family's named tensors; 4: image sizes


@dataclasses.dataclass
class EncodedSet:
    """The cached encodings of a dataset.

    With aspect-ratio buckets (``data.aspect_buckets``) samples differ in shape: then each
    per-sample tensor that does (latents, image-shaped extras) is a list of n tensors
    (variants, ...) instead of one (variants, n, ...).

    Attributes:
        latent_mean, latent_std: (variants, n, c, h, w); variant 1 is the flipped image.
        caption_index: (n,) index of each sample's caption into ``conditioning``.
        conditioning: the unique captions' prompt conditioning as the model family's
            named tensors (:meth:`condkit.families.Conditioning.tensors`, each (u, ...);
            SD: ``encoder_hidden_states`` (u, 77, d)), or None when a text encoder
            trains (then captions are encoded every step).
        captions: the n captions.
        extras: adapter encodings, name -> (variants, n, ...).
        sizes: (variants, n, 6) each sample's image sizes (``condkit.train.data.SIZES``).
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    caption_index: torch.Tensor
    conditioning: dict[str, torch.Tensor] | None
    captions: list[str]
    extras: dict[str, torch.Tensor]
    sizes: torch.Tensor

    def batch(self, indices: list[int], flips: list[bool]) -> dict:
        """Gather a batch: latent distribution, prompt conditioning (if cached), extras.

        Args:
            indices: sample indices.
            flips: per sample, whether to use the flipped variant.
        """
        variant = torch.tensor([1 if f and self.sizes.shape[0] > 1 else 0 for f in flips])  # sizes: (variants, n, 6) always
        index = torch.tensor(indices)
        out = {
            "latent_mean": _take(self.latent_mean, variant, index),  # (b, c, h, w)
            "latent_std": _take(self.latent_std, variant, index),
            "caption": [self.captions[i] for i in indices],
            "extras": {k: _take(v, variant, index) for k, v in self.extras.items()},
            "sizes": self.sizes[variant, index],  # (b, 6)
        }
        if self.conditioning is not None:
            out["conditioning"] = Conditioning.from_tensors(self.conditioning).take(self.caption_index[index])  # batch b
        return out

    def save(self, path: str | Path, key: str = "") -> None:
        """Write the cache as safetensors (atomically), for ``data.cache: disk``.

        The key and the captions are stored in the safetensors header, so tensors, key
        and captions are replaced together in one atomic write; the ``.json`` beside it
        repeats them for people reading the folder.

        Args:
            path: the ``.safetensors`` file.
            key: the :func:`cache_key` digest of what was encoded.
        """
        from condkit.io import save_safetensors_atomic, write_json_atomic

        tensors = {"caption_index": self.caption_index, "sizes": self.sizes, **_per_sample_keys("latent_mean", self.latent_mean),
                   **_per_sample_keys("latent_std", self.latent_std)}
        if self.conditioning is not None:
            tensors.update({CONDITIONING_PREFIX + k: v for k, v in self.conditioning.items()})
        for k, v in self.extras.items():
            tensors.update(_per_sample_keys(f"extras.{k}", v))
        metadata = {KEY_METADATA: key, CAPTIONS_METADATA: json.dumps(self.captions)}
        save_safetensors_atomic(tensors, path, metadata=metadata)
        write_json_atomic(Path(path).with_suffix(".json"), {"key": key, "captions": self.captions})

    @classmethod
    def load(cls, path: str | Path) -> EncodedSet:
        """Read a cache written by :meth:`save`."""
        from condkit.io import load_state_dict, read_safetensors_metadata

        tensors = _joined_per_sample(load_state_dict(path))
        captions = json.loads(read_safetensors_metadata(path)[CAPTIONS_METADATA])
        return cls(
            latent_mean=tensors["latent_mean"],
            latent_std=tensors["latent_std"],
            caption_index=tensors["caption_index"],
            conditioning={k[len(CONDITIONING_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CONDITIONING_PREFIX)} or None,
            captions=captions,
            extras={k[len("extras.") :]: v for k, v in tensors.items() if k.startswith("extras.")},
            sizes=tensors["sizes"],
        )


@torch.no_grad()
def encode_dataset(dataset, base, adapters, *, with_text: bool, flip: bool, batch_size: int = 16, progress=None) -> EncodedSet:
    """Encode every sample of ``dataset`` once.

    Args:
        dataset: a :class:`condkit.train.data.TrainingSet` with center crops.
        base: the frozen base.
        adapters: all attached adapters; each one's ``encode_extras`` is cached too.
        with_text: also cache the prompt conditioning (False when a text encoder trains).
        flip: encode the flipped variant as well.
        batch_size: encoding batch size.
        progress: optional callable(done, total) for a progress display.
    """
    from condkit.train.data import SIZES, collate
    from condkit.train.masks import cacheable_mask

    variants = (False, True) if flip else (False,)
    n, done = len(dataset), 0
    rows: dict[str, list[list]] = {}  # name -> per variant, per sample: that sample's tensor
    for number, variant in enumerate(variants):
        for chunk in _encoding_chunks(dataset, batch_size):
            batch = collate([dataset.item(i, flip=variant) for i in chunk])
            mean, std = latent_distribution(base, batch["pixel_values"])
            values = {"latent_mean": mean.float().cpu(), "latent_std": std.float().cpu(), "sizes": batch[SIZES]}
            for adapter in adapters:
                values.update({f"extras.{name}": value.float().cpu() for name, value in adapter.encode_extras(batch, base).items()})
            values.update({f"extras.{name}": value.cpu() for name, value in cacheable_mask(batch, mean).items()})  # train.masked_loss
            for name, value in values.items():
                slots = rows.setdefault(name, [[None] * n for _ in variants])[number]
                for index, row in zip(chunk, value):
                    slots[index] = row
            done += len(chunk)
            if progress:
                progress(done, n * len(variants))
    packed = {name: _packed(per_variant) for name, per_variant in rows.items()}
    captions = [record.caption for record in dataset.records]
    unique = sorted(set(captions))
    lookup = {caption: i for i, caption in enumerate(unique)}
    conditioning = None
    if with_text:
        parts = [encode_conditioning(base, unique[i : i + 64]).to("cpu", torch.float32) for i in range(0, len(unique), 64)]
        conditioning = Conditioning.cat(parts).tensors()
    return EncodedSet(
        latent_mean=packed["latent_mean"],
        latent_std=packed["latent_std"],
        caption_index=torch.tensor([lookup[c] for c in captions], dtype=torch.long),
        conditioning=conditioning,
        captions=captions,
        extras={k[len("extras.") :]: v for k, v in packed.items() if k.startswith("extras.")},
        sizes=packed["sizes"],
    )


def _encoding_chunks(dataset, batch_size: int) -> list[list[int]]:
    """Sample indices encoded together: consecutive ones, or, with aspect-ratio buckets,
    ones of the same bucket (a batch's images must have one shape)."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return [list(range(start, min(start + batch_size, len(dataset)))) for start in range(0, len(dataset), batch_size)]
    groups: dict[tuple[int, int], list[int]] = {}
    for index, target in enumerate(targets):
        groups.setdefault(target, []).append(index)
    return [group[start : start + batch_size] for group in groups.values() for start in range(0, len(group), batch_size)]


def _packed(per_variant: list[list[torch.Tensor]]) -> torch.Tensor | list[torch.Tensor]:
    """Per-variant lists of per-sample tensors as one (variants, n, ...) tensor when every
    sample's has one shape, else as a list of n (variants, ...) tensors (bucketed shapes)."""
    if len({tuple(row.shape) for rows in per_variant for row in rows}) == 1:
        return torch.stack([_stacked_in_source_format(rows) for rows in per_variant])
    return [torch.stack([rows[index] for rows in per_variant]) for index in range(len(per_variant[0]))]


def _stacked_in_source_format(rows: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)`` in the memory format of the batch the rows were cut from.

    The VAE's latents come out channels_last; the uncached path feeds them to the U-Net so,
    and its kernels round differently on a contiguous copy, so a cached run would drift from
    an uncached one by ~1e-6 (``torch.stack`` alone makes the result contiguous).
    """
    stacked = torch.stack(rows)
    first = rows[0].unsqueeze(0)
    if stacked.ndim == 4 and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
        stacked = stacked.contiguous(memory_format=torch.channels_last)
    return stacked


def _take(values: torch.Tensor | list[torch.Tensor], variant: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[variant, index]`` -> (b, ...), of a (variants, n, ...) tensor or a per-sample list of (variants, ...) tensors."""
    if isinstance(values, torch.Tensor):
        return values[variant, index]
    return torch.stack([values[i][v] for v, i in zip(variant.tolist(), index.tolist())])


def _per_sample_keys(name: str, value: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The safetensors entries of one cached value: ``name``, or ``name#i`` per sample when it is a list."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    return {f"{name}{PER_SAMPLE}{i}": row for i, row in enumerate(value)}


def _joined_per_sample(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """A disk cache's entries with the ``name#i`` ones joined back into per-sample lists (inverse of :func:`_per_sample_keys`)."""
    joined: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, separator, number = key.rpartition(PER_SAMPLE)
        if separator:
            rows.setdefault(name, {})[int(number)] = tensor
        else:
            joined[key] = tensor
    joined.update({name: [found[i] for i in range(len(found))] for name, found in rows.items()})
    return joined


def _file_identity(path: Path) -> list:
    """``[absolute path, size, mtime_ns]`` of a file (an edit or a swap changes it)."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _source_identity(source: Any) -> Any:
    """What identifies one image of a record: a file's identity, or an array's digest."""
    if source is None:
        return None
    if isinstance(source, np.ndarray):
        return [list(source.shape), hashlib.sha256(np.ascontiguousarray(source).tobytes()).hexdigest()]
    return _file_identity(Path(source))


def _weights_digest(modules: list) -> str:
    """SHA-256 of the parameters and buffers of ``modules`` (any dtype or device), read only."""
    digest = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _encoders_identity(base, adapters, with_text: bool) -> dict:
    """What the cached tensors pass through: the base's fingerprint and the weights of the
    VAE, the text encoder (with any frozen LoRA inside it) and the image encoders."""
    image_encoders = [base.image_encoder, *(getattr(a, "image_encoder", None) for a in adapters)]
    return {
        "fingerprint": base.fingerprint(),
        "vae": _weights_digest([base.vae]),
        "text_encoder": _weights_digest(list(family_of(base).text_encoders(base).values())) if with_text else None,
        "image_encoders": _weights_digest(image_encoders),
    }


def _adapter_identity(adapter) -> dict:
    """An adapter's kind, name and config (its weights count through the encoders they change)."""
    config = adapter.config.to_dict() if hasattr(adapter.config, "to_dict") else repr(adapter.config)
    return {"kind": type(adapter).__name__, "name": adapter.name, "config": config}


def cache_key(dataset, base, adapters, *, with_text: bool, flip: bool) -> str:
    """A digest of everything an :class:`EncodedSet` of ``dataset`` depends on.

    Covers each record's files (path, size, modification time; in-memory images by
    content) including its per-sample inputs, captions and input preprocessors; the training size and crop; flip;
    whether text is cached; the base's fingerprint and the weights of the encoders the
    cache passes through (VAE, text encoder with any frozen LoRA in it, image encoders);
    the adapters' kinds and configs.

    Args:
        dataset: a :class:`condkit.train.data.TrainingSet`.
        base: the base model.
        adapters: all attached adapters.
        with_text: text embeddings are cached.
        flip: flipped variants are cached.
    """
    description = {
        "format": CACHE_FORMAT,
        "records": [
            [
                _source_identity(r.image),
                r.caption,
                {name: _source_identity(source) for name, source in sorted(r.inputs.items())},
                dict(sorted(r.preprocessors.items())),
            ]
            for r in dataset.records
        ],
        "size": dataset.size,
        **({"buckets": dataset.targets} if getattr(dataset, "targets", None) is not None else {}),
        "crop": dataset.crop,
        "flip": flip,
        "with_text": with_text,
        "encoders": _encoders_identity(base, adapters, with_text),
        "adapters": [_adapter_identity(a) for a in adapters],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def stored_key(path: Path) -> str | None:
    """The key a disk cache was written with, or None (missing, unreadable, or written before keys)."""
    from condkit.errors import UserError
    from condkit.io import read_safetensors_metadata

    try:
        return read_safetensors_metadata(path).get(KEY_METADATA) or None
    except (OSError, UserError):  # a damaged cache is simply rebuilt
        return None


def load_or_encode(dataset, base, adapters, path: Path, *, with_text: bool, flip: bool, disk: bool, write: bool) -> EncodedSet:
    """The dataset's encodings: from the disk cache when its key matches, else encoded now.

    Args:
        dataset: a :class:`condkit.train.data.TrainingSet` with center crops.
        base: the frozen base.
        adapters: all attached adapters.
        path: the ``.safetensors`` disk cache.
        with_text: cache text embeddings too.
        flip: cache flipped variants too.
        disk: ``data.cache: disk`` (else encode in memory only).
        write: this process writes the cache (the main process).
    """
    key = cache_key(dataset, base, adapters, with_text=with_text, flip=flip) if disk else ""
    if disk and path.is_file() and stored_key(path) == key:
        return EncodedSet.load(path)
    encoded = encode_dataset(dataset, base, adapters, with_text=with_text, flip=flip)
    if disk and write:
        encoded.save(path, key)
    return encoded
