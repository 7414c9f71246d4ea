"""LoHa (LyCORIS Hadamard-product low-rank layers) through peft, saved as LyCORIS/kohya files.

:mod:`condkit.adapters.loha.lycoris` holds what LoHa and LoKr share (the LoKr kind imports
it from here): peft layers on the base and the LyCORIS file layout.
"""

from condkit.adapters.loha.adapter import LohaAdapter
from condkit.adapters.loha.config import LohaConfig, LycorisConfig

__all__ = ["LohaAdapter", "LohaConfig", "LycorisConfig"]
