"""LoRA: low-rank adapters through peft, saved in the diffusers format, kohya/A1111 import and export.

``LoraAdapter`` attaches (``unet.add_adapter``), trains, scales, fuses and saves;
:mod:`condkit.adapters.lora.formats` converts between the diffusers and kohya layouts.
"""

from condkit.adapters.lora.adapter import LoraAdapter
from condkit.adapters.lora.config import TARGET_PRESETS, TEXT_ENCODER_PRESETS, LoraConfig

__all__ = ["LoraAdapter", "LoraConfig", "TARGET_PRESETS", "TEXT_ENCODER_PRESETS"]
