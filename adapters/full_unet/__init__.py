"""Full U-Net fine-tuning as an adapter kind: every U-Net weight trains.

Used to train the embedded base itself (``recipes/base/unet.yaml``) through the same
loop as the real adapters; the result is a plain diffusers ``unet/`` folder.
"""

from condkit.adapters.full_unet.adapter import FullUnetAdapter
from condkit.adapters.full_unet.config import FullUnetConfig

__all__ = ["FullUnetAdapter", "FullUnetConfig"]
