"""Fused vs unfused AdamW: the optimizer step alone and a training step, side by side.

    python benchmarks/optimizers.py --repetitions 20 --threads 1

``train.optimizer: adamw`` builds ``torch.optim.AdamW(fused=True)`` where the device has
the kernel (:mod:`condkit.train.optim`); ``unfused`` is torch's default AdamW (on the
CPU a Python loop over the parameters, ``_single_tensor_adamw``). Contenders run
interleaved in one process (fused, unfused, fused, ...), warm-up rounds dropped,
medians and their ratio reported (the rules of :mod:`harness`). Parameter sets:

* LoRA: the loop's rank-4 LoRA on the embedded base's U-Net (its real shapes);
* full U-Net: every parameter of the embedded base's U-Net (``full_unet``'s set);
* the same shapes' training step: noise, U-Net forward/backward on cached-style
  latents and text embeddings, clipping, optimizer step (what the loop's step does
  besides data lookup, which is under 1 % of it).

Why a separate script, not a section of ``run.py``: it compares two settings of one
key, not condkit against other loops; its figures are in BENCHMARKS.md ("Fused AdamW").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import interleaved, median, quiet_libraries  # noqa: E402


def _optimizers(params: list[torch.nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    """The loop's adamw (fused here) and torch's default AdamW over the same parameters."""
    from condkit.train.optim import build_optimizer

    fused = build_optimizer("adamw", [{"params": params, "lr": 1e-4}], 1e-4, 0.01)
    assert fused.param_groups[0]["fused"], "no fused AdamW kernel on this device"
    return {"fused": fused, "unfused": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)}


def optimizer_step_contenders(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], None]]:
    """One optimizer step per call, gradients fixed (random), for each optimizer.

    Each contender has its own copy of the parameters, so neither changes the other's.
    """
    contenders = {}
    generator = torch.Generator().manual_seed(0)
    for name in ("fused", "unfused"):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for copy in copies:
            copy.grad = torch.randn(copy.shape, generator=generator) * 1e-3
        optimizer = _optimizers(copies)[name]
        contenders[name] = optimizer.step
    return contenders


def training_step_contenders(base, params: list[torch.nn.Parameter], batch: int, resolution: int) -> dict[str, Callable[[], None]]:
    """One training step per call (noise, U-Net forward/backward, clipping, step), per optimizer.

    Both step the same parameters of ``base`` (timing only: what they learn does not matter).
    """
    generator = torch.Generator().manual_seed(0)
    size = resolution // base.vae_scale_factor
    latents = torch.randn(batch, base.unet.config.in_channels, size, size, generator=generator)  # (b, 4, h/f, w/f)
    text = base.family.encode_prompts(base, ["a red square"] * batch).encoder_hidden_states.detach()  # (b, 77, d)
    scheduler = base.noise_scheduler()

    def step(optimizer: torch.optim.Optimizer) -> None:
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        prediction = base.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample
        F.mse_loss(prediction, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {name: (lambda optimizer=optimizer: step(optimizer)) for name, optimizer in _optimizers(params).items()}


def parameter_sets() -> dict[str, tuple]:
    """name -> (base, trainable parameters): the loop's LoRA, and a whole U-Net."""
    from condkit.adapters import get_adapter_class
    from condkit.base import load_base

    lora_base = load_base("embedded")
    lora_cls = get_adapter_class("lora")
    adapter = lora_cls(lora_cls.config_class(), name="default")  # the recipe default: rank 4 on attention
    adapter.attach(lora_base)
    unet_base = load_base("embedded")
    unet_base.unet.requires_grad_(True)
    return {"LoRA": (lora_base, adapter.trainable_parameters()), "full U-Net": (unet_base, list(unet_base.unet.parameters()))}


def measure(repetitions: int, warmup: int, batch: int, resolution: int) -> list[dict]:
    """Every row: name, fused and unfused medians (ms), their ratio."""
    rows = []
    for label, (base, params) in parameter_sets().items():
        count = sum(p.numel() for p in params)
        what = f"{label} ({len(params)} tensors, {count / 1e6:.2f} M parameters)"
        for kind, contenders in (
            ("optimizer step", optimizer_step_contenders(params)),
            (f"training step, batch {batch}, {resolution} px", training_step_contenders(base, params, batch, resolution)),
        ):
            times = interleaved(contenders, repetitions, warmup)
            fused, unfused = median(times["fused"]) * 1e3, median(times["unfused"]) * 1e3
            rows.append({"name": f"{what}: {kind}", "fused_ms": fused, "unfused_ms": unfused, "ratio": fused / unfused})
    return rows


def format_rows(rows: list[dict], repetitions: int) -> str:
    """The markdown table of :func:`measure`'s rows."""
    lines = [f"| measurement (median of {repetitions}) | fused | unfused | fused / unfused |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['fused_ms']:.1f} ms | {r['unfused_ms']:.1f} ms | {r['ratio']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Measure and print the table (returned too)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 repetitions, 1 warm-up, batch 1 at 32 px: only checks that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.warmup, args.batch, args.resolution = 2, 1, 1, 32
    torch.set_num_threads(args.threads)
    quiet_libraries()
    table = format_rows(measure(args.repetitions, args.warmup, args.batch, args.resolution), args.repetitions)
    print(table)
    return table


if __name__ == "__main__":
    main()
