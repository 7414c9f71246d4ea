"""Generation with a base plus any attached adapters, through stock diffusers pipelines."""

from __future__ import annotations

import math
from typing import Any

from condkit.errors import UserError

# Adapter strengths (``--adapter PATH:SCALE``) outside this range are refused: the largest
# strength any kind is used with is a few units, and beyond that the output overflows.
MAX_ADAPTER_SCALE = 10.0


def check_scale(scale: float, source: str) -> float:
    """Check an adapter strength: finite and within +-:data:`MAX_ADAPTER_SCALE`.

    Args:
        scale: the strength (0 = the base's own output, 1 = as trained).
        source: what gave it (e.g. the ``--adapter`` value), for the message.

    Raises:
        UserError: NaN, infinite or out of range.
    """
    if not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
        raise UserError(
            f"{source}: adapter scale {scale!r} must be a finite number from -{MAX_ADAPTER_SCALE:g} to {MAX_ADAPTER_SCALE:g}"
        )
    return float(scale)


def build_pipeline(base, adapters: list, inputs: dict[str, Any]):
    """Build a diffusers pipeline for ``base`` with ``adapters`` attached, and its call arguments.

    Each kind says what it adds (:meth:`~condkit.adapters.base.Adapter.pipeline_components`,
    :meth:`~condkit.adapters.base.Adapter.pipeline_call_kwargs`) and how those of several
    adapters of the kind combine (``combine_pipeline_components``/``combine_pipeline_kwargs``);
    kinds are combined here in order of first appearance, a later kind's value replacing
    an earlier one's. The pipeline class follows from the components (see
    :meth:`condkit.base.BaseModel.pipeline`).

    Args:
        base: a :class:`condkit.base.BaseModel` the adapters are attached to.
        adapters: the attached adapters.
        inputs: user inputs each adapter may use (e.g. the lists a kind's
            :class:`~condkit.adapters.base.GenerateInput` declares, one entry per adapter
            of that kind in order); each adapter also gets ``index``, its position among
            attached adapters of its kind.

    Returns:
        ``(pipeline, call_kwargs)``.
    """
    by_kind: dict[type, list] = {}
    for adapter in adapters:
        by_kind.setdefault(type(adapter), []).append(adapter)
    components: dict[str, Any] = {}
    call_kwargs: dict[str, Any] = {}
    for kind_class, members in by_kind.items():
        # Each adapter gets the inputs plus its index among adapters of its kind, so the
        # second adapter of a kind takes the second value of a per-adapter input.
        parts = [adapter.pipeline_components() for adapter in members]
        if any(parts):
            components.update(kind_class.combine_pipeline_components(parts))
        kwargs = [adapter.pipeline_call_kwargs({**inputs, "index": index}) for index, adapter in enumerate(members)]
        call_kwargs.update(kind_class.combine_pipeline_kwargs(kwargs))
    return base.pipeline(**components), call_kwargs
