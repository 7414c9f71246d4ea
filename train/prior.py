"""Prior preservation (DreamBooth): class images that keep the base's idea of the class.

When ``data.prior_prompt`` is set, ``data.prior_count`` class images are taken from
``data.prior_path``; missing ones are generated from the base (before the adapter is
attached) and written there, so a later run reuses them. With several class prompts,
image ``i`` belongs to prompt ``i mod n``: the prior covers every prompt equally (a
concept's neighbours, e.g. each shape the base already draws, not just one class).
"""

from __future__ import annotations

from pathlib import Path

import torch

from condkit.io import atomic_path
from condkit.train.data import Record, list_images


def prior_records(data, base, output_dir: Path, seed: int) -> list[Record]:
    """Class-image records for prior preservation, generating missing images.

    Args:
        data: the recipe's :class:`condkit.train.config.DataConfig`.
        base: the base model, without adapters attached yet.
        output_dir: the run folder; class images go to ``output_dir/class_images`` when
            ``data.prior_path`` is empty.
        seed: recipe seed (image ``i`` is sampled with seed ``seed + i``).
    """
    folder = Path(data.prior_path) if data.prior_path else output_dir / "class_images"
    count = max(data.prior_count, 1)
    existing = list_images(folder) if folder.is_dir() else []
    prompts = list(data.prior_prompt)
    if len(existing) < count:
        pipe = base.pipeline()
        for i in range(len(existing), count):
            generator = torch.Generator().manual_seed(seed + i)
            image = pipe(prompts[i % len(prompts)], num_inference_steps=25, guidance_scale=7.5, generator=generator).images[0]
            with atomic_path(folder / f"class-{i:05d}.png") as tmp:
                image.save(tmp, format="PNG")
        existing = list_images(folder)
    return [Record(image=path, caption=prompts[i % len(prompts)]) for i, path in enumerate(existing[:count])]
