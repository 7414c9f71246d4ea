"""Section 3 (and the memory half of 6): peak memory of real training runs.

Method (CPU): ``tracemalloc`` does not see torch's allocations, so memory is the
process's resident set. Each configuration runs :func:`condkit.train.loop.train` in a
child process started with glibc's mmap threshold pinned at 64 KiB (freed tensors go
back to the OS at once, so the resident set follows live memory). When the loop's
setup is done (base, adapter, cache and optimizer built) the probe reads ``VmRSS`` and
resets the peak (``/proc/self/clear_refs`` = 5); after the last step it reads the
peak ``VmHWM``. Training memory = peak - after setup: activations, gradients and
optimizer state of the steps. On CUDA the same probe reads
``torch.cuda.max_memory_allocated`` instead.

Run as a child: ``python benchmarks/memory.py --child CONFIGS_JSON`` prints one JSON
line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_configs(configs: list[dict]) -> list[dict]:
    """Run each configuration's training in this process; memory and step times.

    Args:
        configs: dicts with ``kind``, ``batch``, ``resolution``, ``checkpointing``,
            ``cache`` and ``steps``.

    Returns:
        Per configuration: ``setup_mib``, ``peak_mib``, ``training_mib`` and the
        per-step ``seconds`` (after the first step).
    """
    import torch

    from harness import LoopProbe
    from training_steps import make_recipe

    cuda = torch.cuda.is_available()

    class MemoryProbe(LoopProbe):
        def setup_done(self) -> None:
            if cuda:
                torch.cuda.synchronize()
                self.setup_bytes = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                self.setup_bytes = _status_kib("VmRSS") * 1024
                Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS

        def step_done(self, steps: int) -> None:
            if cuda:
                self.peak_bytes = torch.cuda.max_memory_allocated()
            else:
                self.peak_bytes = _status_kib("VmHWM") * 1024

    results = []
    for config in configs:
        recipe = make_recipe(
            config["kind"],
            config["batch"],
            config["steps"],
            resolution=config.get("resolution", 0),
            extra_train={"gradient_checkpointing": config["checkpointing"], "log_every": 1000},
            extra_data={"cache": config["cache"]},
        )
        probe = MemoryProbe()
        with tempfile.TemporaryDirectory() as tmp:
            times = probe.run(recipe, tmp)
        results.append(
            {
                **config,
                "setup_mib": probe.setup_bytes / MIB,
                "peak_mib": probe.peak_bytes / MIB,
                "training_mib": (probe.peak_bytes - probe.setup_bytes) / MIB,
                "seconds": times["condkit"][1:],
            }
        )
    return results


def run_child(configs: list[dict], threads: int) -> list[dict]:
    """Measure ``configs`` in a fresh child process (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(configs), "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def measure(configs: list[dict], quick: bool, threads: int) -> list[dict]:
    """In a child process; with ``quick`` in this one (saves the child's start-up, figures are rougher)."""
    return measure_configs(configs) if quick else run_child(configs, threads)


def run(quick: bool, threads: int):
    """Section 3: LoRA and ControlNet, with/without checkpointing, with/without the cache."""
    from harness import Row
    from training_steps import QUICK_RESOLUTION

    batch, steps = (2, 2) if quick else (8, 3)
    resolution = QUICK_RESOLUTION if quick else 64
    configs = []
    for kind in ("lora", "controlnet"):
        for checkpointing, cache in ((False, "memory"), (True, "memory"), (False, "off")):
            configs.append({"kind": kind, "batch": batch, "resolution": resolution, "checkpointing": checkpointing, "cache": cache, "steps": steps})
    results = measure(configs, quick, threads)
    section = "3. Peak training memory"
    method = f"{resolution} px; " + ("in-process (--quick)" if quick else "child process") + ", peak RSS (VmHWM) minus RSS after setup"
    rows = []
    for kind, title in (("lora", "LoRA"), ("controlnet", "ControlNet")):
        plain, checkpointed, uncached = (r for r in results if r["kind"] == kind)
        for label, result in (("no checkpointing, cached", plain), ("gradient checkpointing, cached", checkpointed), ("no checkpointing, no cache", uncached)):
            rows.append(
                Row(section, f"{title}, batch {batch}, {label}: training memory (peak total)", f"{result['training_mib']:.0f} MB ({result['peak_mib']:.0f} MB)", note=method)
            )
        cut = 1 - checkpointed["training_mib"] / plain["training_mib"]
        rows.append(Row(section, f"{title}, batch {batch}: cut in training memory by checkpointing", f"{cut:.0%}", ">= 30%", cut >= 0.30, "1 - checkpointed / plain"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="child process of the memory benchmarks")
    parser.add_argument("--child", required=True, help="JSON list of configurations")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import quiet_libraries

    quiet_libraries()
    for result in measure_configs(json.loads(args.child)):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
