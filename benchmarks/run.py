"""condkit's performance suite: one command, one process, ratios and medians.

    python benchmarks/run.py                      # the full suite (< 10 minutes on 2 cores)
    python benchmarks/run.py --quick              # tiny settings: checks that it runs
    python benchmarks/run.py --out BENCHMARKS.md  # write the markdown report there

Sections: 1-2 training steps against the standard scripts and the floor, 3 peak
training memory, 4 inference overhead, 5 adapter load time and preprocessing, 6 scaling
and the SD 1.5 architecture; on request (``--sections sdxl``) 9 the LoRA and ControlNet
steps on the SDXL architecture. Every figure is a ratio or median of interleaved
repetitions in one process (memory: in a child process); targets are checked and
listed at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("training", "memory", "inference", "loading", "scaling", "sdxl")

METHOD = """\
How to read this: every time is a median of repetitions run interleaved in one
process (A, B, C, A, B, C, ...) after warm-up, and every figure that matters is a
ratio of two such medians, so the machine's load (shared with other jobs) cancels
out as far as possible. The condkit step is a real step of `condkit.train.loop.train`
(timed between the loop's per-step progress updates, with the other contenders run in
between). Memory is measured in a child process: peak resident set (VmHWM) minus the
resident set once the loop's setup is done, with glibc's mmap threshold pinned at
64 KiB so freed tensors leave the resident set; on CUDA, `torch.cuda.max_memory_allocated`."""

PROFILE = """\
## Profile and what was changed

cProfile of 9 condkit LoRA steps (embedded base, batch 8, 64 px, before any change):
the U-Net backward is 55 % of a step and its forward 43 %; the optimizer step 2.4 %
(of which torch's per-parameter Python loop `_single_tensor_adam` is most: AdamW's
default on CPU); cache lookup, noise, condition dropout, loss, clipping and logging
together stay under 1 %. Nothing is re-encoded per step (latents, text and image
embeddings come from the cache). The one candidate: building the loop's AdamW with
`fused=True`. Measured with the optimizer alone (median of 10): LoRA's 112 tensors
37 -> 1 ms per step, ControlNet's 168 tensors 61 -> 19 ms; in the loop (10 interleaved
steps, batch 8): LoRA condkit / floor 1.02x -> 0.97x, condkit / reference 0.79x -> 0.78x.
It was tried and reverted then (test_reliability's kill -9 resume test failed; that
commit's own test passes on torch 2.13, see "Fused vs unfused AdamW"). Since issue 17 the
loop's `adamw` is fused where the device has the kernel, and the kill -9 test passes with
it. The floor uses the loop's own optimizer.

Fused LoRA inference: the profile of a fused pipeline showed peft's wrapper call on every
wrapped layer (the merged layer computes `base_layer(x)` and nothing else). `LoraAdapter.fuse`
now puts the merged base layer in the wrapper's place and keeps the wrapper aside until
unfuse (which still restores the base bit-exactly): fused / bare base 1.06x -> 1.00x."""


def build_report(rows, machine: dict[str, str], command: str, seconds: float) -> str:
    """The markdown report: machine, method, the tables, and the targets summary."""
    from harness import format_table

    lines = ["# condkit benchmarks", "", f"Command: `{command}` (took {seconds / 60:.1f} min)", "", "| machine | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += ["", METHOD, "", PROFILE, "", "## Results", format_table(rows), "", "## Targets", ""]
    targeted = [row for row in rows if row.met is not None]
    met = sum(row.met for row in targeted)
    lines.append(f"{met} of {len(targeted)} targets met.")
    lines += [""] + [f"- not met: {row.section} / {row.name}: {row.value} (target {row.target}). {row.note}" for row in targeted if not row.met]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check that the suite runs")
    parser.add_argument("--out", default="", help="write the markdown report to this file (default: print it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a loaded machine more threads wait on each other)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)} (default all)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from harness import machine_description, quiet_libraries

    quiet_libraries()
    machine = machine_description()
    started = time.perf_counter()
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    rows = []
    for name in SECTIONS:
        if name not in chosen:
            continue
        section_start = time.perf_counter()
        module = __import__({"training": "training_steps"}.get(name, name))
        rows += module.run(args.quick, args.threads) if name in ("memory", "scaling") else module.run(args.quick)
        print(f"benchmarks: {name} done in {time.perf_counter() - section_start:.0f} s", file=sys.stderr, flush=True)
    sections = "" if chosen == list(SECTIONS) else f" --sections {','.join(chosen)}"
    command = "python benchmarks/run.py" + (" --quick" if args.quick else "") + sections + (f" --out {args.out}" if args.out else "")
    report = build_report(rows, machine, command, time.perf_counter() - started)
    if args.out:
        from condkit.io import write_text_atomic

        write_text_atomic(Path(args.out), report)
        print(f"benchmarks: wrote {args.out}", file=sys.stderr)
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
