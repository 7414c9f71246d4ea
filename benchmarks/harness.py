"""Shared pieces of the benchmark suite: interleaved timing, the loop probe, result rows.

Timing rules (the machines are shared and noisy): contenders run interleaved in one
process (A, B, C, A, B, C, ...), the first repetitions are warm-up and dropped, and
only medians and ratios of medians are reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the results table.

    Attributes:
        section: the suite section (e.g. ``1. LoRA training step``).
        name: what was measured.
        value: the figure as text (a ratio ``0.81x``, a median ``12.3 ms``, ``45 MB``...).
        target: the target as text (``<= 0.85x``) or empty.
        met: True / False against the target, None when there is none.
        note: how it was measured, or the gap's cause.
    """

    section: str
    name: str
    value: str
    target: str = ""
    met: bool | None = None
    note: str = ""


def ratio_row(section: str, name: str, ratio: float, limit: float | None = None, note: str = "", at_least: bool = False) -> Row:
    """A row for a ratio, checked against ``limit`` (``<=``, or ``>=`` with ``at_least``)."""
    if limit is None:
        return Row(section, name, f"{ratio:.2f}x", note=note)
    met = ratio >= limit if at_least else ratio <= limit
    return Row(section, name, f"{ratio:.2f}x", f"{'>=' if at_least else '<='} {limit:.2f}x", met, note)


def median(values: list[float]) -> float:
    """Median of the measured repetitions."""
    return statistics.median(values)


def interleaved(contenders: dict[str, Callable[[], Any]], repetitions: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each contender ``warmup + repetitions`` times in A, B, C, A, B, C order.

    Args:
        contenders: name -> a callable doing one unit of work (one step, one image).
        repetitions: timed rounds kept.
        warmup: rounds run first and dropped.

    Returns:
        name -> the kept durations in seconds.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(warmup + repetitions):
        for name, work in contenders.items():
            start = time.perf_counter()
            work()
            synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def synchronize() -> None:
    """Wait for queued GPU work so a timer stops after it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_and_precision() -> tuple[str, str]:
    """The device the suite runs on and the loop's ``mixed_precision`` there."""
    if torch.cuda.is_available():
        return "cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "cpu", "no"


def machine_description() -> dict[str, str]:
    """CPU model, cores, library versions, device and the load average now."""
    import diffusers
    import peft

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device, precision = device_and_precision()
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(0)}), {precision} autocast, SDPA"
    else:
        device = f"cpu, float32, SDPA, torch threads {torch.get_num_threads()}"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "device": device,
        "load average (1, 5, 15 min) at start": load,
    }


class StepClock:
    """A training-loop callback (:class:`condkit.train.loop.TrainCallback`) that times each step.

    The loop calls ``on_step_end`` once per optimizer step; the time between two calls
    is one condkit step. Inside it the other contenders run one step each (so the order
    is condkit, reference, floor, condkit, ...), and their time is excluded from the next
    condkit interval.

    Args:
        make_others: builds the other contenders (name -> callable doing one step) from
            the loop's base, on the first step, after the loop's setup; or None.
        probe: the :class:`LoopProbe` holding the base and the setup/step hooks.
    """

    def __init__(self, make_others: Callable[[Any], dict[str, Callable[[], Any]]] | None, probe: LoopProbe) -> None:
        self.make_others = make_others
        self.probe = probe
        self.others: dict[str, Callable[[], Any]] | None = None
        self.times: dict[str, list[float]] = {"condkit": []}
        self.resume_at = time.perf_counter()

    def on_setup_end(self, state: Any) -> None:
        """Setup is over (the base is loaded, adapters attached, data cached): steps begin."""
        self.probe.base = state.base
        self.probe.setup_done()
        self.resume_at = time.perf_counter()

    def on_step_end(self, state: Any) -> None:
        """One condkit step ended: record it, then run the other contenders' steps."""
        synchronize()
        self.times["condkit"].append(time.perf_counter() - self.resume_at)
        self.probe.step_done(len(self.times["condkit"]))
        if self.make_others is not None:
            if self.others is None:
                self.others = self.make_others(self.probe.base)
                self.times.update({name: [] for name in self.others})
            for name, work in self.others.items():
                start = time.perf_counter()
                work()
                synchronize()
                self.times[name].append(time.perf_counter() - start)
        self.resume_at = time.perf_counter()


class LoopProbe:
    """Runs :func:`condkit.train.loop.train` and times its real steps.

    Uses the loop's public interface only: a :class:`StepClock` callback times the
    steps and captures the base the loop trains on; a prebuilt base (e.g. the
    random-weight SD 1.5 model) is handed to ``train(base=...)``.

    Args:
        make_others: optional; builds the other contenders' step callables from the base.
        prebuilt_base: optional base used instead of loading ``recipe.base``.
    """

    def __init__(self, make_others=None, prebuilt_base=None) -> None:
        self.make_others = make_others
        self.prebuilt_base = prebuilt_base
        self.base = None
        self.clock: StepClock | None = None

    def setup_done(self) -> None:
        """Hook for subclasses (memory probes reset the peak here)."""

    def step_done(self, steps: int) -> None:
        """Hook for subclasses (memory probes read the peak here)."""

    def run(self, recipe, output_dir) -> dict[str, list[float]]:
        """Train ``recipe`` into ``output_dir``; return per-step times of every contender."""
        from condkit.train.loop import train

        self.clock = StepClock(self.make_others, self)
        train(recipe, output_dir, overwrite=True, show_progress=False, callbacks=[self.clock], base=self.prebuilt_base)
        return self.clock.times


def quiet_libraries() -> None:
    """Silence progress bars and warnings that would drown the table."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def format_table(rows: list[Row]) -> str:
    """Markdown table of the rows, grouped by section in order of appearance."""
    lines = []
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines += ["", f"### {section}", "", "| measurement | value | target | met | note |", "| --- | ---: | ---: | :---: | --- |"]
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.name} | {row.value} | {row.target} | {met} | {row.note} |")
    return "\n".join(lines)
