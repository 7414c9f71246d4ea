"""Adapter kinds (LoRA, ControlNet, IP-Adapter, full U-Net) behind one contract.

Each kind is a subpackage with ``config.py`` (typed config), ``adapter.py`` (attach,
hooks, save/load) and, where needed, ``formats.py`` (conversions to and from the
formats other tools use). :mod:`condkit.adapters.registry` maps names to kinds.
"""

from condkit.adapters.base import ADAPTER_CONFIG_FILE, Adapter, AdapterConfig, adapter_unet_kwargs, merge_unet_kwargs, unet_call_kwargs
from condkit.adapters.registry import detect_kind, get_adapter_class, list_kinds, load_adapter

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "Adapter",
    "AdapterConfig",
    "detect_kind",
    "get_adapter_class",
    "list_kinds",
    "load_adapter",
    "adapter_unet_kwargs",
    "merge_unet_kwargs",
    "unet_call_kwargs",
]
