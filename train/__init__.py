"""Recipes, data and the one training loop.

* :mod:`condkit.train.config` - recipe schema (typed, frozen) and ``load_recipe``;
* :mod:`condkit.train.data` - image records, any image mode, crops and flips;
* :mod:`condkit.train.cache` - latents / text embeddings encoded once;
* :mod:`condkit.train.loop` - ``train(recipe, output_dir)``, the loop every kind uses;
* :mod:`condkit.train.checkpoint` - atomic, resumable checkpoints.
"""

from condkit.train.config import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe", "train"]


def train(*args, **kwargs):
    """Run :func:`condkit.train.loop.train` (imported lazily: it pulls in accelerate)."""
    from condkit.train.loop import train as run

    return run(*args, **kwargs)
