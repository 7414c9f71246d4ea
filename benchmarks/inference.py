"""Section 4: inference overhead of each adapter against the bare base, at equal steps.

Five pipelines on copies of one base, each called with the same prompt, seed, size,
number of steps and guidance, interleaved; the figure is each adapter's median time
over the bare base's. Pipelines come from :func:`condkit.generate.build_pipeline`, as
``condkit generate`` builds them. The LoRA gets random (non-zero) B matrices so that it
really computes; fused means merged into the base weights (``LoraAdapter.fuse``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch

from harness import Row, interleaved, median, ratio_row

PROMPT = "a red circle on a blue background"
FUSED_UNWRAPPED = "LoRA, fused, peft wrappers removed"


def _randomize_lora(adapter) -> None:
    """Non-zero B matrices (a fresh LoRA's B is zero), so the layers do real work."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.01)


def _pipelines(base, size: int) -> dict[str, tuple[Any, dict[str, Any]]]:
    """name -> (pipeline, call kwargs) for the bare base and each adapter setting."""
    from PIL import Image

    from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
    from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
    from condkit.adapters.lora import LoraAdapter, LoraConfig
    from condkit.generate import build_pipeline

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    inputs = {"control_images": [picture], "ip_images": [picture]}
    out = {"bare base": build_pipeline(base, [], inputs)}
    for name in ("LoRA, fused", "LoRA, unfused", FUSED_UNWRAPPED):
        copy_ = copy.deepcopy(base)
        lora = LoraAdapter(LoraConfig(rank=4))
        lora.attach(copy_)
        _randomize_lora(lora)
        if name != "LoRA, unfused":
            lora.fuse()
        if name == FUSED_UNWRAPPED:
            # What diffusers' pipe.fuse_lora(); pipe.unload_lora_weights() leaves: the merged
            # weights in plain layers, peft's wrappers gone (and no way back to the base).
            from diffusers.utils.peft_utils import recurse_remove_peft_layers

            recurse_remove_peft_layers(copy_.unet)
            out[name] = build_pipeline(copy_, [], inputs)
            continue
        out[name] = build_pipeline(copy_, [lora], inputs)
    copy_ = copy.deepcopy(base)
    controlnet = ControlNetAdapter(ControlNetConfig())
    controlnet.attach(copy_)
    out["ControlNet"] = build_pipeline(copy_, [controlnet], inputs)
    copy_ = copy.deepcopy(base)
    ip_adapter = IPAdapter(IPAdapterConfig())
    ip_adapter.attach(copy_)
    out["IP-Adapter"] = build_pipeline(copy_, [ip_adapter], inputs)
    for pipeline, _ in out.values():
        pipeline.set_progress_bar_config(disable=True)
    return out


def _generate(pipeline, kwargs: dict[str, Any], steps: int, size: int) -> Callable[[], None]:
    def call() -> None:
        pipeline(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=7.5,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )

    return call


def run(quick: bool) -> list[Row]:
    """Section 4 on the embedded base."""
    from condkit.base import load_base

    from training_steps import QUICK_RESOLUTION

    steps, repetitions = (1, 1) if quick else (10, 4)
    base = load_base("embedded")
    base.freeze()
    size = QUICK_RESOLUTION if quick else base.resolution
    contenders = {name: _generate(pipe, kwargs, steps, size) for name, (pipe, kwargs) in _pipelines(base, size).items()}
    times = interleaved(contenders, repetitions, warmup=1)
    bare = median(times["bare base"])
    section = "4. Inference overhead against the bare base"
    note = f"embedded base, {size} px, {steps} steps, CFG 7.5, VAE decode, median of {repetitions}; bare base {bare * 1e3:.0f} ms"
    limits = {"LoRA, fused": 1.02, FUSED_UNWRAPPED: None, "LoRA, unfused": 1.10, "ControlNet": 1.10, "IP-Adapter": 1.10}
    causes = {
        "LoRA, fused": f"{note}. LoraAdapter.fuse merges the weights and takes peft's wrappers off the "
        f"{_wrapped_layers(base)} layers until unfuse (which restores the base bit-exactly)",
        FUSED_UNWRAPPED: "diffusers' fuse_lora + unload_lora_weights, for comparison: cannot be unfused or rescaled afterwards",
        "LoRA, unfused": f"rank 4 adds {_lora_flop_share(base.unet):.0%} to the FLOPs of the layers it wraps on the embedded base "
        f"(widths 32-96) vs {_lora_flop_share(_sd15_unet_on_meta()):.1%} on SD 1.5 (320-1280)",
        "ControlNet": f"the branch is a copy of the U-Net's encoder + middle block ({_branch_share(base):.0%} of its parameters), "
        "run at every step; condkit hands it to stock StableDiffusionControlNetPipeline unchanged",
        "IP-Adapter": note,
    }
    return [ratio_row(section, f"{name} / bare base", median(times[name]) / bare, limit, causes[name]) for name, limit in limits.items()]


def _wrapped_layers(base) -> int:
    """How many layers a rank-4 attention LoRA wraps on ``base``."""
    from condkit.adapters.lora.config import ATTENTION

    return sum(1 for name, module in base.unet.named_modules() if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION))


def _lora_flop_share(unet, rank: int = 4) -> float:
    """Extra multiply-adds of a rank-``rank`` LoRA on the attention projections, over theirs.

    Per token a d_in x d_out layer costs d_in * d_out; its LoRA adds rank * (d_in + d_out).
    """
    from condkit.adapters.lora.config import ATTENTION

    layers = [m for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith(ATTENTION)]
    return sum(rank * (m.in_features + m.out_features) for m in layers) / sum(m.in_features * m.out_features for m in layers)


def _sd15_unet_on_meta():
    """SD 1.5's U-Net with no storage (shapes only), to count its layers."""
    from diffusers import UNet2DConditionModel

    from scaling import SD15_UNET

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


def _branch_share(base) -> float:
    """The ControlNet branch's parameters over the U-Net's."""
    from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig

    branch = ControlNetAdapter(ControlNetConfig())
    branch.attach(base)
    share = sum(p.numel() for p in branch.trainable_parameters()) / sum(p.numel() for p in base.unet.parameters())
    branch.detach()
    return share
