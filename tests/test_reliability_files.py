"""Hostile adapter files, bases and generate options are one line, exit code 2 (issue 19 items 10, 11, 15).

Each case is driven through the CLI (``condkit.cli.main``) and must end in exactly one
``condkit: error:`` line naming the file, key or value, with no traceback, no output
written and the input left as it was.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from lora_utils import randomise
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
from condkit.adapters.lora import LoraAdapter, LoraConfig
from condkit.adapters.lora import formats
from condkit.adapters.lora.adapter import read_lora_file
from condkit.base import load_base
from condkit.cli import main
from condkit.errors import UserError
from condkit.io import load_state_dict

WEIGHTS = "pytorch_lora_weights.safetensors"


# ---- fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    return load_base("embedded")


@pytest.fixture(scope="module")
def lora_folder(base, tmp_path_factory):
    """A small condkit LoRA (U-Net only, rank 2) with random weights, saved."""
    attached = copy.deepcopy(base)
    adapter = LoraAdapter(LoraConfig(rank=2))
    adapter.attach(attached)
    randomise(adapter, std=0.05)
    folder = tmp_path_factory.mktemp("lora") / "lora"
    adapter.save(folder)
    return folder


@pytest.fixture(scope="module")
def kohya_file(base, lora_folder, tmp_path_factory):
    """The same LoRA as a kohya/A1111 file."""
    models = {formats.UNET: base.unet, formats.TEXT_ENCODER: base.text_encoder}
    tensors, metadata = formats.write_kohya(read_lora_file(lora_folder / WEIGHTS, models))
    path = tmp_path_factory.mktemp("kohya") / "kohya.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def ip_folder(base, tmp_path_factory):
    """A fresh base-variant IP-Adapter saved with its image encoder."""
    attached = copy.deepcopy(base)
    adapter = IPAdapter(IPAdapterConfig())
    adapter.attach(attached)
    folder = tmp_path_factory.mktemp("ip") / "ip"
    adapter.save(folder)
    return folder


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "reference.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


# ---- helpers ---------------------------------------------------------------------------
def refused(capsys, argv: list, *needles: str) -> str:
    """Run the CLI; assert exit code 2 and one error line containing every needle."""
    assert main([str(a) for a in argv]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr
    # Loaders may draw progress bars on stderr before; the error is the one last line.
    errors = [line for line in stderr.splitlines() if "condkit: error:" in line]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    err = errors[0].strip()
    assert err.startswith("condkit: error:"), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def digest(path: Path) -> str:
    """A hash of a file or of every file in a folder (inputs must stay unmodified)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    hasher = hashlib.sha256()
    for file in files:
        hasher.update(file.name.encode() + file.read_bytes())
    return hasher.hexdigest()


def lora_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(folder / WEIGHTS), "pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(folder / WEIGHTS), metadata


def raw_safetensors(path: Path, header: bytes, body: bytes = b"") -> Path:
    """A file with the given header bytes after its 8-byte length, then ``body``."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


class Payload:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def generate(output: Path, *extra) -> list:
    return ["generate", "--prompt", "a red circle", "--steps", "1", "--output", output, *extra]


# ---- item 10: NaN/inf weights and scales -----------------------------------------------
def test_lora_with_nan_weights_is_refused_by_inspect_convert_and_generate(lora_folder, tmp_path, capsys):
    tensors, metadata = lora_tensors(lora_folder)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    before = digest(path)
    refused(capsys, ["inspect", path], str(path), key, "NaN/inf")
    refused(capsys, ["convert", path, tmp_path / "out.safetensors", "--to", "kohya"], str(path), key)
    assert not (tmp_path / "out.safetensors").exists()
    refused(capsys, generate(tmp_path / "images", "--adapter", path), str(path), key)
    assert not (tmp_path / "images").exists()
    assert digest(path) == before


def test_kohya_alpha_nan_is_refused_naming_the_key(kohya_file, tmp_path, capsys):
    tensors = load_file(kohya_file)
    key = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    tensors[key] = torch.tensor(float("nan"))
    path = tmp_path / "alpha_nan.safetensors"
    save_file(tensors, str(path))
    refused(capsys, ["inspect", path], str(path), key)
    refused(capsys, ["convert", path, tmp_path / "out", "--to", "diffusers"], str(path), key)
    assert not (tmp_path / "out").exists()


def test_all_nan_ip_adapter_is_refused(ip_folder, reference_png, tmp_path, capsys):
    folder = tmp_path / "ip"
    shutil.copytree(ip_folder, folder)
    weights = folder / "ip_adapter.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, str(weights))
    refused(capsys, ["inspect", folder], str(weights), "NaN/inf")
    refused(capsys, generate(tmp_path / "images", "--adapter", folder, "--ip-image", reference_png), str(weights), "NaN/inf")
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e30", "-11"])
def test_adapter_scale_must_be_finite_and_in_range(lora_folder, tmp_path, scale, capsys):
    refused(capsys, generate(tmp_path / "images", "--adapter", f"{lora_folder}:{scale}"), f"{lora_folder}:{scale}", "from -10 to 10")
    assert not (tmp_path / "images").exists()


def test_a_non_finite_generated_image_is_not_written(lora_folder, tmp_path, capsys):
    # Finite but huge weights overflow in the U-Net: the sample is NaN, which PIL would
    # silently turn into a black PNG.
    tensors, metadata = lora_tensors(lora_folder)
    path = tmp_path / "huge.safetensors"
    save_file({k: v * 1e18 for k, v in tensors.items()}, str(path), metadata=metadata)
    refused(capsys, generate(tmp_path / "images", "--adapter", path), "000000.png", "not written", "NaN/inf")
    assert not list(tmp_path.glob("images/*.png"))


def test_load_state_dict_names_the_first_nonfinite_tensor(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}, str(path))
    with pytest.raises(UserError, match=r"w\.safetensors: tensor 'b' holds 1 NaN/inf"):
        load_state_dict(path)
    assert torch.isinf(load_state_dict(path, allow_nonfinite=True)["b"][1])


# ---- item 11: broken weight files, headers, metadata, descriptions ---------------------
@pytest.mark.parametrize("component", ["text_encoder", "image_encoder"])
@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_base_folder_with_a_damaged_component_names_the_file(exported_base, tmp_path, component, damage, capsys):
    folder = tmp_path / "base"
    shutil.copytree(exported_base, folder)
    bad = damage_component(folder / component, damage, tmp_path / "PWNED")
    refused(capsys, generate(tmp_path / "images", "--base", folder), str(bad), "truncated" if damage == "truncated" else "refused")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_ip_adapter_folder_with_a_damaged_image_encoder_names_the_file(ip_folder, reference_png, tmp_path, damage, capsys):
    folder = tmp_path / "ip"
    shutil.copytree(ip_folder, folder)
    bad = damage_component(folder / "image_encoder", damage, tmp_path / "PWNED")
    refused(capsys, generate(tmp_path / "images", "--adapter", folder, "--ip-image", reference_png), str(bad))
    assert not (tmp_path / "PWNED").exists()


def damage_component(folder: Path, damage: str, marker: Path) -> Path:
    """Truncate a component's safetensors, or replace it by a pickle holding code; return the bad file."""
    weights = folder / "model.safetensors"
    if damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return weights
    weights.unlink()
    pickled = folder / "pytorch_model.bin"
    torch.save({"weight": Payload(marker)}, pickled)
    return pickled


@pytest.mark.parametrize(
    "header, needle",
    [
        (b"[1, 2]", "is a JSON list"),
        (json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": 4}}).encode(), "data_offsets 4"),
        (json.dumps({"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}).encode(), "shape 'x'"),
        (json.dumps({"w": [0, 4]}).encode(), "'w' is a JSON list"),
        (json.dumps({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 4]}}).encode(), "needs 32 bytes"),
        (b"[" * 400_000, "nests too deeply"),
    ],
)
def test_hostile_safetensors_headers_are_one_line(tmp_path, header, needle, capsys):
    path = raw_safetensors(tmp_path / "hostile.safetensors", header, b"\0" * 4)
    refused(capsys, ["inspect", path], str(path), needle)
    refused(capsys, ["convert", path, tmp_path / "out.safetensors", "--to", "kohya"], str(path), needle)
    with pytest.raises(UserError, match=re.escape(needle)):
        load_state_dict(path)


def test_kohya_alpha_with_two_elements_is_one_line(kohya_file, tmp_path, capsys):
    tensors = load_file(kohya_file)
    key = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    tensors[key] = torch.tensor([1.0, 2.0])
    path = tmp_path / "alpha2.safetensors"
    save_file(tensors, str(path))
    refused(capsys, ["inspect", path], str(path), key, "shape (2,)")
    refused(capsys, ["convert", path, tmp_path / "out", "--to", "diffusers"], str(path), key)


@pytest.mark.parametrize(
    "field, value, needle",
    [("lora_alpha", "abc", 'unet.lora_alpha is "abc"'), ("lora_alpha", None, "unet.lora_alpha is null"), ("r", "x", 'unet.r is "x"')],
)
def test_bad_diffusers_lora_metadata_is_one_line(lora_folder, tmp_path, field, value, needle, capsys):
    tensors, metadata = lora_tensors(lora_folder)
    packed = json.loads(metadata["lora_adapter_metadata"])
    packed[f"unet.{field}"] = value
    path = tmp_path / "meta.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "lora_adapter_metadata": json.dumps(packed)})
    refused(capsys, ["inspect", path], str(path), needle)
    refused(capsys, ["convert", path, tmp_path / "out.safetensors", "--to", "kohya"], str(path), needle)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: [], "a JSON list"),
        (lambda d: {**d, "surprise": 1}, "unknown key 'surprise'"),
        (lambda d: {**d, "config": {**d["config"], "rnak": 4}}, "unknown config key 'rnak'"),
        (lambda d: {**d, "kind": 5}, "key 'kind' is 5"),
    ],
)
def test_bad_condkit_adapter_json_is_one_line(lora_folder, tmp_path, edit, needle, capsys):
    folder = tmp_path / "lora"
    shutil.copytree(lora_folder, folder)
    described = folder / "condkit_adapter.json"
    described.write_text(json.dumps(edit(json.loads(described.read_text()))))
    refused(capsys, ["inspect", folder], str(described), needle)
    refused(capsys, generate(tmp_path / "images", "--adapter", folder), str(described), needle)


# ---- item 15: inspect tells the real reason; generate refuses ignored or NaN options ---
def test_inspect_kohya_file_matching_nothing_is_an_error(tmp_path, capsys):
    path = tmp_path / "nothing.safetensors"
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4), "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)}, str(path))
    refused(capsys, ["inspect", path], str(path), "no key of this kohya file matches")


def test_inspect_gives_the_real_reason_for_unreadable_files(lora_folder, tmp_path, capsys):
    pickled = tmp_path / "payload.bin"
    torch.save({"weight": Payload(tmp_path / "PWNED")}, pickled)
    err = refused(capsys, ["inspect", pickled], str(pickled), "refused", "GLOBAL")
    assert "recognises" not in err and not (tmp_path / "PWNED").exists()

    data = (lora_folder / WEIGHTS).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])
    assert "recognises" not in refused(capsys, ["inspect", truncated], str(truncated), "truncated")

    absurd = tmp_path / "absurd.safetensors"
    absurd.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    assert "recognises" not in refused(capsys, ["inspect", absurd], str(absurd), "header claims")

    broken_pt = tmp_path / "broken.pt"
    torch.save({"w": torch.ones(4)}, broken_pt)
    broken_pt.write_bytes(broken_pt.read_bytes()[:40])
    assert "recognises" not in refused(capsys, ["inspect", broken_pt], str(broken_pt), "truncated or not a torch file")

    readable = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(readable))
    refused(capsys, ["inspect", readable], "not an adapter file condkit recognises", "foo.weight")


def test_control_image_without_a_controlnet_is_refused(lora_folder, reference_png, tmp_path, capsys):
    refused(capsys, generate(tmp_path / "a", "--control-image", reference_png), "--control-image", "no ControlNet")
    refused(capsys, generate(tmp_path / "b", "--adapter", lora_folder, "--ip-image", reference_png), "--ip-image", "no IP-Adapter")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("guidance", ["nan", "inf", "-1", "1000"])
def test_guidance_must_be_finite_and_in_range(tmp_path, guidance, capsys):
    refused(capsys, generate(tmp_path / "images", "--guidance", guidance), "--guidance", "from 0 to 100")


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_inspect_names_a_damaged_ip_adapter_image_encoder(ip_folder, tmp_path, damage, capsys):
    folder = tmp_path / "ip"
    shutil.copytree(ip_folder, folder)
    bad = damage_component(folder / "image_encoder", damage, tmp_path / "PWNED")
    refused(capsys, ["inspect", folder], str(bad))


@pytest.fixture(scope="module")
def controlnet_folder(base, tmp_path_factory):
    """A fresh ControlNet branch saved as condkit writes it (OUT/controlnet/)."""
    from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig

    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(copy.deepcopy(base))
    out = tmp_path_factory.mktemp("controlnet") / "run"
    adapter.save(out)
    return out


def test_controlnet_with_nan_weights_or_a_truncated_file_is_refused(controlnet_folder, reference_png, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(controlnet_folder, out)
    weights = out / "controlnet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    refused(capsys, generate(tmp_path / "images", "--adapter", out, "--control-image", reference_png), key, "NaN/inf")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    refused(capsys, ["inspect", out], str(weights), "truncated")
    assert not (tmp_path / "images").exists()
