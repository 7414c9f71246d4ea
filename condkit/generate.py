"""Generation with a base plus any attached adapters, through stock diffusers pipelines."""

from __future__ import annotations

import math
from typing import Any

from condkit.errors import UserError

# Pipeline arguments that take one value per ControlNet (or per IP-Adapter) when several
# are attached; a single adapter passes its value unwrapped, as diffusers expects.
PER_ADAPTER_KEYS = ("image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")
CONCATENATED_KEYS = ("ip_adapter_image", "ip_adapter_image_embeds")
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

    LoRA and IP-Adapter live on the U-Net already; ControlNets become the pipeline's
    ``controlnet`` (a ``MultiControlNetModel`` when several are attached).

    Args:
        base: a :class:`condkit.base.BaseModel` the adapters are attached to.
        adapters: the attached adapters.
        inputs: user inputs each adapter may use (``control_images``, ``ip_images``: lists,
            one entry per adapter of that kind in order); each adapter also gets ``index``,
            its position among attached adapters of its kind.

    Returns:
        ``(pipeline, call_kwargs)``.
    """
    components: dict[str, Any] = {}
    controlnets: list = []
    per_adapter: dict[str, list] = {}
    call_kwargs: dict[str, Any] = {}
    seen_per_kind: dict[str, int] = {}
    for adapter in adapters:
        # Each adapter gets the inputs plus its index among adapters of its kind, so the
        # second ControlNet takes the second control image.
        index = seen_per_kind.get(adapter.kind, 0)
        seen_per_kind[adapter.kind] = index + 1
        parts = dict(adapter.pipeline_components())
        if "controlnet" in parts:
            controlnets.append(parts.pop("controlnet"))
        components.update(parts)
        for key, value in adapter.pipeline_call_kwargs({**inputs, "index": index}).items():
            if key in PER_ADAPTER_KEYS:
                per_adapter.setdefault(key, []).append(value)
            elif key in CONCATENATED_KEYS:
                call_kwargs.setdefault(key, []).extend(value if isinstance(value, list) else [value])
            elif key == "guess_mode":  # one flag for the pipeline: on if any ControlNet asks for it
                call_kwargs[key] = bool(call_kwargs.get(key)) or bool(value)
            else:
                call_kwargs[key] = value
    if controlnets:
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        components["controlnet"] = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
    for key, values in per_adapter.items():
        call_kwargs[key] = values[0] if len(controlnets) <= 1 else values
    return base.pipeline(**components), call_kwargs
