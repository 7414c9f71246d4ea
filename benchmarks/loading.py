"""Section 5: adapter load time against stock diffusers, and preprocessing throughput.

Load times: a LoRA saved by condkit (diffusers format) and the same LoRA as a
kohya/A1111 file, loaded by ``LoraAdapter.load`` and by stock diffusers'
``pipe.load_lora_weights`` (each followed by its unload, so every repetition starts
from the bare base), interleaved; ControlNet and IP-Adapter loads are timed likewise
against ``ControlNetModel.from_pretrained`` and ``pipe.load_ip_adapter``.

Preprocessing throughput is ``benchmarks/bench_preprocess.py`` (the preprocessors'
own benchmark), run as it is and its table quoted.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from harness import Row, interleaved, median, ratio_row

SECTION = "5. Adapter load time and preprocessing"


def _saved_adapters(base, folder: Path) -> dict[str, Path]:
    """Train-free adapters saved by condkit: LoRA (diffusers + kohya), ControlNet, IP-Adapter."""
    from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
    from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
    from condkit.adapters.lora import LoraAdapter, LoraConfig
    from condkit.adapters.lora import formats
    from condkit.io import save_safetensors_atomic

    paths = {}
    for name, adapter in (("lora", LoraAdapter(LoraConfig(rank=4))), ("controlnet", ControlNetAdapter(ControlNetConfig())), ("ip_adapter", IPAdapter(IPAdapterConfig()))):
        target = copy.deepcopy(base)
        adapter.attach(target)
        adapter.save(folder / name)
        paths[name] = folder / name
        if name == "lora":
            tensors, metadata = formats.write_kohya(adapter.lora_weights())
            save_safetensors_atomic(tensors, folder / "kohya.safetensors", metadata=metadata)
            paths["kohya"] = folder / "kohya.safetensors"
    return paths


def _load_contenders(base, paths: dict[str, Path]) -> dict[str, Callable[[], Any]]:
    """name -> one load (and unload) of each file by condkit and by stock diffusers."""
    from diffusers import ControlNetModel

    from condkit.adapters.controlnet import ControlNetAdapter
    from condkit.adapters.ip_adapter import IPAdapter
    from condkit.adapters.lora import LoraAdapter

    pipe = base.pipeline()

    def condkit_load(cls, path):
        def call():
            cls.load(path, base).detach()

        return call

    def stock_lora(path):
        def call():
            pipe.load_lora_weights(str(path))
            pipe.unload_lora_weights()

        return call

    def stock_ip():
        pipe.load_ip_adapter(str(paths["ip_adapter"]), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
        pipe.unload_ip_adapter()

    return {
        "condkit LoRA (diffusers file)": condkit_load(LoraAdapter, paths["lora"]),
        "diffusers LoRA (diffusers file)": stock_lora(paths["lora"]),
        "condkit LoRA (kohya file)": condkit_load(LoraAdapter, paths["kohya"]),
        "diffusers LoRA (kohya file)": stock_lora(paths["kohya"]),
        "condkit ControlNet": condkit_load(ControlNetAdapter, paths["controlnet"]),
        "diffusers ControlNet": lambda: ControlNetModel.from_pretrained(str(paths["controlnet"] / "controlnet")),
        "condkit IP-Adapter": condkit_load(IPAdapter, paths["ip_adapter"]),
        "diffusers IP-Adapter": stock_ip,
    }


def _working(contenders: dict[str, Callable[[], Any]]) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """The contenders that run here, and the first error line of those that do not."""
    working, failed = {}, {}
    for name, call in contenders.items():
        try:
            call()
            working[name] = call
        except Exception as exc:  # a stock loader that rejects the file is reported, not fatal
            failed[name] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return working, failed


def load_rows(quick: bool) -> list[Row]:
    """Load-time ratios condkit / stock diffusers for each file kind."""
    from condkit.base import load_base

    repetitions = 1 if quick else 7
    base = load_base("embedded")
    base.freeze()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _saved_adapters(base, Path(tmp))
        contenders, failed = _working(_load_contenders(base, paths))
        times = interleaved(contenders, repetitions, warmup=1)
    for what in ("LoRA (diffusers file)", "LoRA (kohya file)", "ControlNet", "IP-Adapter"):
        ours, stock = f"condkit {what}", f"diffusers {what}"
        if ours not in times:
            rows.append(Row(SECTION, f"load {what}: condkit", "fails", note=failed[ours]))
        elif stock not in times:
            rows.append(Row(SECTION, f"load {what}: condkit", f"{median(times[ours]) * 1e3:.0f} ms", note=f"stock diffusers cannot load it: {failed[stock]}"))
        else:
            note = f"median of {repetitions}: condkit {median(times[ours]) * 1e3:.0f} ms, diffusers {median(times[stock]) * 1e3:.0f} ms (embedded base)"
            rows.append(ratio_row(SECTION, f"load {what}: condkit / stock diffusers", median(times[ours]) / median(times[stock]), None, note))
    return rows


def preprocess_rows(quick: bool) -> list[Row]:
    """Run ``bench_preprocess.py`` and turn its table into rows."""
    script = Path(__file__).resolve().parent / "bench_preprocess.py"
    command = [sys.executable, str(script)] + (["--quick"] if quick else ["--images", "120", "--repeats", "2"])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return [Row(SECTION, "preprocessing throughput (bench_preprocess.py)", "failed", note=(done.stderr.strip().splitlines() or ["?"])[-1])]
    rows = []
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1] and cells[1][0].isdigit():
            rows.append(Row(SECTION, f"preprocessing, {cells[0]}", f"{cells[1]} images/s", note=f"{cells[2]} vs the plain loop; {' '.join(command[1:]).replace(str(script.parent) + '/', 'benchmarks/')}"))
        elif line.startswith("canny per image"):
            rows.append(Row(SECTION, "preprocessing, canny per 512 px image", line.split(":", 1)[1].strip()))
    return rows


def run(quick: bool) -> list[Row]:
    """Section 5."""
    return load_rows(quick) + preprocess_rows(quick)
