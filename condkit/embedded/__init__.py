"""The embedded tiny base: an SD-architecture pipeline shipped inside the package.

``base/`` beside this file is a standard diffusers folder (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
``image_encoder/``, ``feature_extractor/``). Loading it is loading any local diffusers
folder, so the code that loads it does not care what its weights are: seeded random
weights from :mod:`condkit.embedded.build`, or trained ones (see ``base/TRAINING.md``).

``base_sdxl/`` is its SDXL-architecture sibling (``base: embedded-sdxl``), a
``StableDiffusionXLPipeline`` folder: absent until it is built, trained and installed
(:mod:`condkit.embedded.build_sdxl`, ``TRAINING-sdxl.md`` beside this file).
"""

from pathlib import Path

EMBEDDED_BASE_DIR = Path(__file__).resolve().parent / "base"
EMBEDDED_SDXL_BASE_DIR = Path(__file__).resolve().parent / "base_sdxl"
SDXL_TRAINING_DOC = "condkit/embedded/TRAINING-sdxl.md"  # how base_sdxl/ is made, for messages
