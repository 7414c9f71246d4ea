"""The benchmark suite runs with one command and reports every section and row.

Benchmarks are not timed tests: nothing here checks a duration, only that
``benchmarks/run.py --quick`` completes and that its report has the machine
description, every section, every row with its target, and the targets summary.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

EXPECTED_ROWS = {
    "1. LoRA training step": [
        ("LoRA, embedded base, batch 1, 32 px: condkit / diffusers train_dreambooth_lora.py", "<= 0.85x"),
        ("LoRA, embedded base, batch 1, 32 px: condkit / floor (U-Net fwd+bwd alone)", "<= 1.10x"),
    ],
    "2. ControlNet and IP-Adapter training steps": [
        ("ControlNet, embedded base, batch 1, 32 px: condkit / diffusers train_controlnet.py", "<= 0.85x"),
        ("ControlNet, embedded base, batch 1, 32 px: condkit / floor (U-Net fwd+bwd alone)", "<= 1.10x"),
        ("IP-Adapter, embedded base, batch 1, 32 px: condkit / IP-Adapter tutorial_train.py", "<= 0.85x"),
        ("IP-Adapter, embedded base, batch 1, 32 px: condkit / floor (U-Net fwd+bwd alone)", "<= 1.10x"),
    ],
    "3. Peak training memory": [
        ("LoRA, batch 2, no checkpointing, cached: training memory (peak total)", ""),
        ("LoRA, batch 2, gradient checkpointing, cached: training memory (peak total)", ""),
        ("LoRA, batch 2, no checkpointing, no cache: training memory (peak total)", ""),
        ("LoRA, batch 2: cut in training memory by checkpointing", ">= 30%"),
        ("ControlNet, batch 2, no checkpointing, cached: training memory (peak total)", ""),
        ("ControlNet, batch 2, gradient checkpointing, cached: training memory (peak total)", ""),
        ("ControlNet, batch 2, no checkpointing, no cache: training memory (peak total)", ""),
        ("ControlNet, batch 2: cut in training memory by checkpointing", ">= 30%"),
    ],
    "4. Inference overhead against the bare base": [
        ("LoRA, fused / bare base", "<= 1.02x"),
        ("LoRA, fused, peft wrappers removed / bare base", ""),
        ("LoRA, unfused / bare base", "<= 1.10x"),
        ("ControlNet / bare base", "<= 1.10x"),
        ("IP-Adapter / bare base", "<= 1.10x"),
    ],
    "5. Adapter load time and preprocessing": [
        ("load LoRA (diffusers file): condkit / stock diffusers", ""),
        ("load LoRA (kohya file): condkit / stock diffusers", ""),
        ("load ControlNet: condkit / stock diffusers", ""),
        ("load IP-Adapter: condkit / stock diffusers", ""),
        ("preprocessing, plain loop (1 process: imread, Canny, imwrite)", ""),
        ("preprocessing, condkit preprocess canny", ""),
    ],
    "9. SDXL architecture (random weights, published config)": [
        ("LoRA, SDXL widths / 10, 1 transformer layer per block (quick run), batch 1, 64 px: condkit / diffusers train_dreambooth_lora_sdxl.py", "<= 1.00x"),
        ("LoRA, SDXL widths / 10, 1 transformer layer per block (quick run), batch 1, 64 px: condkit / floor (U-Net fwd+bwd alone)", "<= 1.10x"),
        ("ControlNet, SDXL widths / 10, 1 transformer layer per block (quick run), batch 1, 64 px: condkit / diffusers train_controlnet_sdxl.py", "<= 1.00x"),
        ("ControlNet, SDXL widths / 10, 1 transformer layer per block (quick run), batch 1, 64 px: condkit / floor (U-Net fwd+bwd alone)", "<= 1.10x"),
    ],
    "6. Scaling": [
        ("LoRA, embedded base, batch 1, 32 px", ""),
        ("LoRA, embedded base, batch 2, 32 px", ""),
        ("LoRA, embedded base, batch 1, 64 px", ""),
    ],
    "6. SD 1.5 architecture (random weights, published config)": [
        ("LoRA, SD 1.5 widths / 10 (quick run), batch 1, 64 px: condkit / diffusers train_dreambooth_lora.py", "<= 0.85x"),
        ("LoRA, SD 1.5 widths / 10 (quick run), batch 1, 64 px: condkit / floor (U-Net fwd+bwd alone)", "<= 1.10x"),
    ],
}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text()


def _section_rows(report: str, section: str) -> dict[str, list[str]]:
    """measurement -> its table cells, for the table under ``### section``."""
    body = report.split(f"### {section}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("measurement", "---"):
            rows[cells[0]] = cells
    return rows


def test_report_has_machine_description(quick_report):
    for key in ("CPU", "cores", "torch", "diffusers", "device", "load average (1, 5, 15 min) at start"):
        assert re.search(rf"^\| {re.escape(key)} \| .+ \|$", quick_report, re.M), key
    assert "Command: `python benchmarks/run.py --quick" in quick_report


@pytest.mark.parametrize("section", list(EXPECTED_ROWS))
def test_report_has_every_row_with_target(quick_report, section):
    assert f"### {section}\n" in quick_report
    rows = _section_rows(quick_report, section)
    for name, target in EXPECTED_ROWS[section]:
        found = [cells for measurement, cells in rows.items() if measurement.startswith(name)]
        assert found, f"{section}: no row {name!r} in {list(rows)}"
        cells = found[0]
        assert cells[1] and cells[1] not in ("failed", "fails"), cells
        assert cells[2] == target, cells
        if target:
            assert cells[3] in ("yes", "**no**"), cells  # every targeted row says whether it is met
            if target.endswith("x"):
                assert re.fullmatch(r"\d+\.\d\dx", cells[1]), cells  # a ratio, not an absolute time


def test_targets_summary_counts_the_targeted_rows(quick_report):
    targeted = sum(len([t for _, t in rows if t]) for rows in EXPECTED_ROWS.values())
    match = re.search(r"^(\d+) of (\d+) targets met\.$", quick_report, re.M)
    assert match and int(match.group(2)) == targeted
    unmet = int(match.group(2)) - int(match.group(1))
    assert len(re.findall(r"^- not met: ", quick_report, re.M)) == unmet


def test_interleaved_runs_contenders_in_rounds_and_drops_warmup():
    from harness import interleaved

    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repetitions=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert [len(v) for v in times.values()] == [2, 2]


def test_ratio_row_checks_the_target_both_ways():
    from harness import ratio_row

    assert ratio_row("s", "n", 0.84, 0.85).met is True
    assert ratio_row("s", "n", 0.86, 0.85).met is False
    assert ratio_row("s", "n", 0.31, 0.30, at_least=True).met is True
    assert ratio_row("s", "n", 0.29, 0.30, at_least=True).met is False
    assert ratio_row("s", "n", 1.5).met is None
