"""An example condkit adapter kind in its own package: ``attn_bias``.

It registers through the ``condkit.adapters`` entry point in this package's
``pyproject.toml`` and uses only condkit's public plugin contract
(:mod:`condkit.adapters.base`).
"""

from condkit_example_plugin.adapter import AttnBiasAdapter, AttnBiasConfig

__all__ = ["AttnBiasAdapter", "AttnBiasConfig"]
