"""The full-U-Net kind's typed config."""

from __future__ import annotations

import dataclasses

from condkit.adapters.base import AdapterConfig, config_field
from condkit.errors import UserError


@dataclasses.dataclass(frozen=True)
class FullUnetConfig(AdapterConfig):
    """Full fine-tuning settings.

    Attributes:
        shapes_metrics: during validation, also score the samples with the shapes-world
            classifier (colour / background / shape accuracy) when every validation
            prompt is a shapes-world caption.
    """

    shapes_metrics: bool = config_field(True, "score validation samples with the shapes-world classifier when every prompt is a shapes-world caption")

    def __post_init__(self) -> None:
        if not isinstance(self.shapes_metrics, bool):
            raise UserError(f"adapter.shapes_metrics: must be true or false, got {self.shapes_metrics!r}")
