"""Throughput of 1 vs 2 training processes (DDP over gloo on the CPU), before and after a change.

    python benchmarks/processes.py --tree after=. --tree before=/work/before:/work/venv-before/bin/python

Each ``--tree NAME=SOURCE[:PYTHON]`` is a condkit checkout and the Python that imports
it (default: this one). For every tree, recipe and process count, the real
``condkit train`` runs ``--steps`` steps with ``train.log_every`` steps per window;
throughput is the median of the loop's own ``steps_per_second`` windows (from its
TensorBoard log, the first window dropped as warm-up) times the global batch. One
process gets every core as torch threads, two processes share them (one thread each),
the way ``accelerate launch --config_file recipes/accelerate/two-process-cpu.yaml`` runs.
Runs go one after the other in A, B, A, B order (``--rounds``), never two at once: on a
small machine two trainings side by side slow each other down.

Why a separate script, not a section of ``run.py``: the contenders are whole
``accelerate launch`` runs of other checkouts in child processes, not callables timed in
one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# recipe name -> overrides that keep a run short and its per-process batch fixed
RECIPES = {
    "LoRA": ("lora-few-images", ["data.prior_prompt=[]", "data.prior_count=0", "train.batch_size=8", "validation.every=0", "validation.prompts=[]"]),
    "ControlNet": ("controlnet-canny", ["data.shapes_count=256", "train.batch_size=8", "validation.every=0", "validation.prompts=[]", "validation.images=[]"]),
}


def steps_per_second(log_dir: Path) -> list[float]:
    """The loop's logged ``steps_per_second`` windows, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "steps_per_second" in accumulator.Tags().get("scalars", []):
            values += [(e.step, e.value) for e in accumulator.Scalars("steps_per_second")]
    return [value for _, value in sorted(values)]


def run_once(source: Path, python: str, recipe: str, overrides: list[str], processes: int, steps: int, window: int, out: Path) -> float:
    """One training run; returns its median steps per second after the first window.

    Args:
        source: the condkit checkout (its recipes and accelerate configs are used).
        python: the interpreter that imports that checkout's condkit.
        recipe: shipped recipe name.
        overrides: ``--set`` values.
        processes: 1 (plain ``condkit train``) or 2 (``accelerate launch``, DDP on gloo).
        steps: optimizer steps to run.
        window: ``train.log_every``.
        out: the run's output folder (must not exist).
    """
    sets = [*overrides, f"train.max_steps={steps}", f"train.log_every={window}", "train.checkpoint_every=0"]
    train = ["-m", "condkit", "train", recipe, "--output", str(out), *(a for s in sets for a in ("--set", s))]
    cores = os.cpu_count() or 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, cores // processes))}
    if processes == 1:
        command = [python, *train]
    else:
        config = source / "recipes" / "accelerate" / "two-process-cpu.yaml"
        command = [python, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(processes), *train]
    subprocess.run(command, cwd=source, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    windows = steps_per_second(out / "logs")
    if len(windows) < 2:
        raise RuntimeError(f"{out}: fewer than two logged windows")
    return statistics.median(windows[1:])


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=SOURCE[:PYTHON]")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of every run, interleaved")
    args = parser.parse_args(argv)
    trees = {}
    for item in args.tree:
        name, _, rest = item.partition("=")
        source, _, python = rest.partition(":")
        trees[name] = (Path(source).resolve(), python or sys.executable)
    results: dict[tuple[str, str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for label in args.recipes:
                recipe, overrides = RECIPES[label]
                batch = int(next(o for o in overrides if o.startswith("train.batch_size=")).split("=")[1])
                for processes in (1, 2):
                    for name, (source, python) in trees.items():
                        out = Path(scratch) / f"{label}-{name}-{processes}-{round_index}"
                        rate = run_once(source, python, recipe, overrides, processes, args.steps, args.window, out)
                        results.setdefault((label, name, processes), []).append(rate * batch * processes)
                        print(f"round {round_index}: {label} {name} {processes} process(es): {rate * batch * processes:.1f} samples/s", flush=True)
    print("\n| adapter | tree | 1 process (samples/s) | 2 processes (samples/s) | 2 vs 1 |")
    print("| --- | --- | --- | --- | --- |")
    for label in args.recipes:
        for name in trees:
            one, two = (statistics.median(results[(label, name, p)]) for p in (1, 2))
            print(f"| {label} | {name} | {one:.1f} | {two:.1f} | {two / one:.2f}x |")
    names = list(trees)
    for label in args.recipes:
        for later in names[1:]:
            ratio = statistics.median(results[(label, later, 1)]) / statistics.median(results[(label, names[0], 1)])
            print(f"{label}: single-process throughput {later} / {names[0]} = {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
