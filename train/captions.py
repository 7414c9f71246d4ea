"""Per-step caption variation: shuffled tags, kept leading tags, tag dropout (kohya semantics).

A caption is read as comma-separated tags (``sks, 1girl, red hair, smiling``). With
``data.shuffle_captions`` the tags after the first ``data.keep_tokens`` are shuffled each
time the sample is drawn; with ``data.tag_dropout`` each of those tags is left out with
that probability. The kept tags (e.g. the trigger word) never move and are never
dropped. As in kohya's sd-scripts (``shuffle_caption``, ``keep_tokens``,
``caption_tag_dropout_rate``): tags are stripped, shuffled, then dropped, and joined with
``", "``; a caption is returned unchanged when no tag moved or was dropped.

Draws come from ``(seed, stream position)`` only (the loop's sample position, which
encodes the step and the sample within it), so a resumed run sees the same captions as
an uninterrupted one. Only the training images' captions vary; prior-preservation class
prompts stay as written (they describe what must be preserved).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable

SEPARATOR = ","


def enabled(data) -> bool:
    """Whether the recipe varies captions at all (``keep_tokens`` alone changes nothing).

    Args:
        data: the recipe's ``data`` section.
    """
    return bool(data.shuffle_captions or data.tag_dropout > 0)


def split_tags(caption: str) -> list[str]:
    """The caption's tags: split at commas, stripped, empty ones left out.

    Args:
        caption: the caption as written.
    """
    return [tag.strip() for tag in caption.split(SEPARATOR) if tag.strip()]


def vary_caption(caption: str, data, rng: random.Random) -> str:
    """One draw of a caption: the kept tags first, the others shuffled and/or dropped.

    Args:
        caption: the caption as written.
        data: the recipe's ``data`` section (``shuffle_captions``, ``keep_tokens``, ``tag_dropout``).
        rng: this sample's random source.
    """
    tags = split_tags(caption)
    kept, free = tags[: data.keep_tokens], tags[data.keep_tokens :]
    if data.shuffle_captions:
        rng.shuffle(free)
    if data.tag_dropout > 0:
        free = [tag for tag in free if rng.random() >= data.tag_dropout]
    varied = kept + free
    return caption if varied == tags else ", ".join(varied)


def vary_captions(captions: list[str], seeds: Iterable[int] | None, data) -> list[str]:
    """A batch's captions, each varied with its own seed (unchanged when variation is off).

    Args:
        captions: the batch's captions as written.
        seeds: one integer per caption, from the recipe seed and the sample's stream
            position; None: captions that never vary (prior-preservation class prompts).
        data: the recipe's ``data`` section.
    """
    if seeds is None or not enabled(data):
        return list(captions)
    return [vary_caption(caption, data, random.Random(seed)) for caption, seed in zip(captions, seeds)]


def can_vary(caption: str, data) -> bool:
    """Whether some draw of ``caption`` differs from it: a tag beyond the kept ones can be
    dropped, or two can swap places.

    Args:
        caption: the caption as written.
        data: the recipe's ``data`` section.
    """
    free = len(split_tags(caption)) - data.keep_tokens
    return enabled(data) and ((data.tag_dropout > 0 and free >= 1) or (data.shuffle_captions and free >= 2))


def vary_per_step(captions: Iterable[str], data) -> bool:
    """Whether any of the captions can change from step to step (then their text
    embeddings cannot be cached once).

    Args:
        captions: the training images' captions.
        data: the recipe's ``data`` section.
    """
    return any(can_vary(caption, data) for caption in set(captions))


def log_setup(captions: list[str], data, cached: bool, trains_text_encoder: bool, log: Callable[[str], Any]) -> None:
    """Say in one log line how varied captions are encoded (nothing when variation is off).

    Why per step and not a cache per variant: a caption of k free tags has k! orders and
    2^k dropout subsets, so variants are only few for captions that hardly vary; encoding
    a batch's captions costs one text-encoder forward without gradients, small beside the
    U-Net's forward and backward.

    Args:
        captions: the training images' captions.
        data: the recipe's ``data`` section.
        cached: latents are cached (``data.cache`` on, center crops).
        trains_text_encoder: a text encoder trains (captions are encoded each step anyway).
        log: prints the line (the accelerator's ``print``).
    """
    if not enabled(data):
        return
    how = f"data.shuffle_captions={data.shuffle_captions}, data.keep_tokens={data.keep_tokens}, data.tag_dropout={data.tag_dropout}"
    varying = sum(can_vary(caption, data) for caption in captions)
    if not varying:
        log(f"condkit: captions: {how} changes no caption (none has tags beyond the kept ones); text embeddings are cached as usual")
        return
    if trains_text_encoder:
        where = "encoded each step anyway (a text encoder trains)"
    elif cached:
        where = "latents stay cached, captions are encoded each step (text embeddings are not cached)"
    else:
        where = "images and captions are encoded each step (no cache)"
    log(f"condkit: captions vary per step ({how}; {varying} of {len(captions)} captions can change): {where}")
