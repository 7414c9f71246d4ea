"""IP-Adapter: condition generation on a reference image (train, import, export).

See :mod:`condkit.adapters.ip_adapter.adapter` for how it attaches and
:mod:`condkit.adapters.ip_adapter.formats` for the file formats.
"""

from condkit.adapters.ip_adapter.adapter import IPAdapter
from condkit.adapters.ip_adapter.config import IPAdapterConfig

__all__ = ["IPAdapter", "IPAdapterConfig"]
