"""condkit: conditioning adapters (LoRA, ControlNet, IP-Adapter) for Stable Diffusion.

Import map: :mod:`condkit.base` (base models), :mod:`condkit.adapters` (adapter kinds
and their registry), :mod:`condkit.preprocessors` (condition maps),
:mod:`condkit.train` (recipes, data and the one training loop), :mod:`condkit.cli`.
"""

__version__ = "0.1.0"

from condkit.attach import Attachment, attach  # noqa: E402  (condkit.attach(pipe, "x.safetensors", scale=0.8))
