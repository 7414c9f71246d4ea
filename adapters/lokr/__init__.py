"""LoKr (LyCORIS Kronecker-product layers) through peft, saved as LyCORIS/kohya files.

Shares the LyCORIS machinery of :mod:`condkit.adapters.loha.lycoris` (imported from there).
"""

from condkit.adapters.lokr.adapter import LokrAdapter
from condkit.adapters.lokr.config import LokrConfig

__all__ = ["LokrAdapter", "LokrConfig"]
