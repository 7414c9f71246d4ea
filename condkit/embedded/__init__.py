"""The embedded tiny base: an SD-architecture pipeline shipped inside the package.

``base/`` beside this file is a standard diffusers folder (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
``image_encoder/``, ``feature_extractor/``). Loading it is loading any local diffusers
folder, so the code that loads it does not care what its weights are: seeded random
weights from :mod:`condkit.embedded.build`, or trained ones (see ``base/TRAINING.md``).
"""

from pathlib import Path

EMBEDDED_BASE_DIR = Path(__file__).resolve().parent / "base"
