"""Aspect-ratio buckets (``data.aspect_buckets``): train on images at their own shape.

Instead of centre-cropping every image to a square, a set of bucket shapes of about
the same area (``data.resolution`` squared) is made, with sides that are multiples of
the bucket step (``data.bucket_step``, itself a multiple of the VAE factor) between half
and twice the resolution (aspect ratios up to 4:1). Each image goes to the bucket whose
aspect ratio is nearest its own; the data layer resizes it to cover the bucket and
crops what is left over (a few pixels). Every batch then comes from one bucket, so its
latents stack.

The data stream stays the loop's: position ``p`` (samples of all processes so far) is
batch ``p // batch_size`` of the stream, and an epoch's batches are drawn from
``(seed, epoch)`` alone (each bucket's images shuffled, cut into batches of
``batch_size``, the last one of a bucket possibly smaller, then the batches shuffled), so
every image is seen once per epoch, every process's micro-batch is one bucket's, and a
resumed run draws the same batches as an uninterrupted one.

Prior preservation (``data.prior_prompt``) puts each step's class batch after its
instance batch, so the two must have one latent shape. Every class image (generated
square from the base, or read from ``data.prior_path``) is therefore put in every bucket
the training images use, resized and cropped to it like a training image (kohya crops its
regularisation images to their bucket the same way), and a step's class batch is drawn
from the class images of its instance batch's bucket, as many as the instance batch has.
"""

from __future__ import annotations

import collections
import functools
import math
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np

from condkit.errors import UserError

Bucket = tuple[int, int]  # (height, width) in pixels
DEFAULT_STEP = 64  # kohya's bucket_reso_steps for SD at 512 px


def bucket_step(resolution: int, vae_factor: int, step: int = 0) -> int:
    """The bucket step in pixels: ``data.bucket_step``, or the default for ``resolution``.

    The default is 64 px, or an eighth of the resolution when that is smaller (8 px on a
    64 px base), rounded down to a multiple of the VAE factor.

    Args:
        resolution: the target side (the buckets' area is its square).
        vae_factor: the VAE's downsampling factor (latent sides must be whole).
        step: ``data.bucket_step``; 0 = the default.

    Raises:
        UserError: ``step`` is not a multiple of the VAE factor.
    """
    if step:
        if step % vae_factor:
            raise UserError(f"data.bucket_step = {step} must be a multiple of the VAE factor {vae_factor}")
        return step
    return max(vae_factor, min(DEFAULT_STEP, resolution // 8) // vae_factor * vae_factor)


def make_buckets(resolution: int, step: int) -> list[Bucket]:
    """Every bucket shape of area at most ``resolution`` squared, sides multiples of ``step``.

    Each width from half to twice the resolution gets the tallest height that keeps the
    area (as kohya's ``make_buckets``); both orientations are kept.

    Args:
        resolution: the target side in pixels.
        step: the bucket step in pixels.

    Returns:
        ``(height, width)`` shapes, from the tallest to the widest.
    """
    area = resolution * resolution
    lowest = max(step, resolution // 2 // step * step)
    highest = max(lowest, 2 * resolution // step * step)
    found: set[Bucket] = set()
    for width in range(lowest, highest + 1, step):
        height = min(highest, area // width // step * step)
        if height >= lowest:
            found.update({(height, width), (width, height)})
    return sorted(found, key=lambda bucket: (bucket[1] / bucket[0], -bucket[0] * bucket[1]))


def nearest_bucket(height: int, width: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (on a log scale, so 2:1 and
    1:2 are equally far from 1:1); of equally near ones, the larger.

    Args:
        height, width: the image's size in pixels.
        buckets: from :func:`make_buckets`.
    """
    ratio = math.log(width / height)
    return min(buckets, key=lambda bucket: (round(abs(math.log(bucket[1] / bucket[0]) - ratio), 12), -bucket[0] * bucket[1]))


def image_size(source: Any) -> tuple[int, int]:
    """``(height, width)`` of a record's image as the data layer loads it, from the file's
    header only (decoding every image once more just to learn its size would be slow).

    Args:
        source: a file path, a PIL image or an (H, W, 3) array.
    """
    if isinstance(source, np.ndarray):
        return int(source.shape[0]), int(source.shape[1])
    if hasattr(source, "size") and not isinstance(source, (str, Path)):  # a PIL image
        return int(source.size[1]), int(source.size[0])
    from condkit.preprocessors.image import oriented_size

    width, height = oriented_size(source)
    return height, width


def assign_buckets(records: list, data, resolution: int, vae_factor: int, say: Callable[[str], None] = print) -> tuple[Bucket, ...]:
    """Each record's bucket, for ``data.aspect_buckets``; says which buckets are used.

    Args:
        records: from :func:`condkit.train.data.find_records`.
        data: the recipe's :class:`condkit.train.config.DataConfig`.
        resolution: the target side in pixels (``data.resolution`` or the base's).
        vae_factor: the base's VAE factor.
        say: where the one line naming the buckets goes (the main process's print).

    Raises:
        UserError: a bad ``data.bucket_step``.
    """
    buckets = make_buckets(resolution, bucket_step(resolution, vae_factor, data.bucket_step))
    sizes: dict[Any, tuple[int, int]] = {}  # repeats list one image several times: read its header once
    targets = []
    for record in records:
        key = id(record.image) if isinstance(record.image, np.ndarray) else record.image
        if key not in sizes:
            sizes[key] = image_size(record.image)
        targets.append(nearest_bucket(*sizes[key], buckets))
    say(f"condkit: {describe(targets)}")
    return tuple(targets)


def spread_class_records(records: list, targets: tuple[Bucket, ...], say: Callable[[str], None] = print) -> tuple[list, tuple[Bucket, ...]]:
    """Prior preservation with buckets: every class image once in every bucket the training images use.

    The copies are bucket-major (all class images in the first bucket, then all in the
    next, ...), so class image ``j`` in a bucket is sample ``bucket_members(...)[j]``.

    Args:
        records: the class-image records (:func:`condkit.train.prior.prior_records`).
        targets: each training image's bucket (:func:`assign_buckets`).
        say: where the one line naming the class images' buckets goes.

    Returns:
        ``(records, targets)`` of the class set: ``len(records) * buckets used`` samples each.
    """
    used = sorted(set(targets), key=lambda bucket: bucket[1] / bucket[0])  # widest last, as describe() breaks ties
    shapes = ", ".join(f"{w}x{h}" for h, w in used)
    say(f"condkit: class images: each of the {len(records)} is resized and cropped to every bucket of the training images (width x height: {shapes})")
    return [record for _ in used for record in records], tuple(bucket for bucket in used for _ in records)


def bucket_members(targets: tuple[Bucket, ...], bucket: Bucket) -> list[int]:
    """The sample indices in ``bucket``, in order (a class set's class image ``j`` there is the ``j``-th).

    Args:
        targets: each sample's bucket.
        bucket: the bucket.
    """
    return [index for index, target in enumerate(targets) if target == bucket]


def describe(targets: list[Bucket] | tuple[Bucket, ...]) -> str:
    """One line naming the buckets used, the fullest first: ``buckets (width x height): 64x64 (12 images), 72x56 (5)``.

    Args:
        targets: each sample's bucket.
    """
    counts = collections.Counter(targets).most_common()
    counts.sort(key=lambda item: (-item[1], item[0][1] / item[0][0]))
    parts = [f"{w}x{h} ({n} image{'s' if n != 1 else ''})" if i == 0 else f"{w}x{h} ({n})" for i, ((h, w), n) in enumerate(counts)]
    return "buckets (width x height): " + ", ".join(parts)


@functools.lru_cache(maxsize=4)
def epoch_batches(targets: tuple[Bucket, ...], batch_size: int, seed: int, epoch: int) -> tuple[tuple[int, ...], ...]:
    """The batches of one epoch: sample indices, each batch from one bucket, every sample once.

    Args:
        targets: each sample's bucket.
        batch_size: samples per batch (a bucket's last batch may hold fewer).
        seed: the dataset's seed.
        epoch: the epoch.
    """
    rng = random.Random(f"condkit-buckets:{seed}:{epoch}")  # a str seed is hashed stably (not per process)
    members: dict[Bucket, list[int]] = {}
    for index, bucket in enumerate(targets):
        members.setdefault(bucket, []).append(index)
    batches = []
    for bucket in sorted(members):
        indices = members[bucket]
        rng.shuffle(indices)
        batches += [tuple(indices[start : start + batch_size]) for start in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return tuple(batches)


def batch_at(targets: tuple[Bucket, ...], batch_size: int, seed: int, number: int) -> tuple[list[int], list[int]]:
    """Batch ``number`` of the endless stream of epochs: its sample indices and their epoch.

    Args:
        targets: each sample's bucket.
        batch_size: samples per batch.
        seed: the dataset's seed.
        number: the batch's place in the stream (data-stream position // batch_size).

    Returns:
        ``(indices, epochs)``, one epoch per index (all the same), as the loop's batches take them.
    """
    per_epoch = sum(math.ceil(n / batch_size) for n in collections.Counter(targets).values())
    epoch = number // per_epoch
    indices = list(epoch_batches(targets, batch_size, seed, epoch)[number % per_epoch])
    return indices, [epoch] * len(indices)
