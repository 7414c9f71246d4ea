"""ControlNet data layouts (a)-(d), their named errors, and the edge-F1 fidelity metric."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from condkit.adapters.controlnet import ControlNetAdapter
from condkit.adapters.controlnet.data import find_pair_records
from condkit.adapters.controlnet.metrics import condition_edge_f1, edge_f1
from condkit.errors import UserError
from condkit.train.config import DataConfig
from condkit.train.data import TrainingSet, collate, find_records


def square(size: int = 32, offset: int = 8) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[offset : size - offset, offset : size - offset] = (200, 40, 40)
    return image


def canny(image: np.ndarray) -> np.ndarray:
    return np.repeat(cv2.Canny(image, 100, 200)[:, :, None], 3, axis=2)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def images_and_conditions(root: Path, names=("a", "b")) -> None:
    for i, name in enumerate(names):
        image = square(offset=6 + 2 * i)
        save(root / "images" / f"{name}.png", image)
        save(root / "conditions" / f"{name}.png", canny(image))
        (root / "images" / f"{name}.txt").write_text(f"caption {name}\n")


def test_layout_a_images_and_conditions_by_stem(tmp_path):
    images_and_conditions(tmp_path)
    records = find_records(DataConfig(path=str(tmp_path)), ControlNetAdapter)
    assert [(Path(r.image).name, Path(r.condition).name, r.caption) for r in records] == [
        ("a.png", "a.png", "caption a"),
        ("b.png", "b.png", "caption b"),
    ]
    assert all(Path(r.condition).parent.name == "conditions" for r in records)
    # The lead's dataset turns them into aligned tensors: the condition is the given map.
    dataset = TrainingSet(records, 32, "center", False, 0)
    batch = collate([dataset[0], dataset[1]])
    assert batch["condition"].shape == (2, 3, 32, 32) and batch["pixel_values"].shape == (2, 3, 32, 32)
    expected = np.asarray(Image.open(records[1].condition).convert("RGB")).transpose(2, 0, 1) / 255.0
    assert np.allclose(batch["condition"][1].numpy(), expected)


def test_layout_b_metadata_jsonl_columns(tmp_path):
    images_and_conditions(tmp_path / "files")
    rows = [
        {"image": "files/images/a.png", "conditioning_image": "files/conditions/a.png", "text": "first"},
        {"file_name": "files/images/b.png", "condition_file_name": "files/conditions/b.png", "prompt": "second"},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = find_pair_records(DataConfig(path=str(tmp_path)))
    assert [(Path(r.image).name, Path(r.condition).parent.name, r.caption) for r in records] == [
        ("a.png", "conditions", "first"),
        ("b.png", "conditions", "second"),
    ]


def test_layout_c_fill50k_prompt_json(tmp_path):
    for i in range(3):
        image = square(offset=4 + 2 * i)
        save(tmp_path / "target" / f"{i}.png", image)
        save(tmp_path / "source" / f"{i}.png", canny(image))
    lines = [{"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"shape {i}"} for i in range(3)]
    (tmp_path / "prompt.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    records = find_records(DataConfig(path=str(tmp_path)), ControlNetAdapter)
    assert [(Path(r.image).parent.name, Path(r.condition).parent.name, r.caption) for r in records] == [
        ("target", "source", f"shape {i}") for i in range(3)
    ]


def test_layout_d_images_only_computes_and_caches_maps(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDKIT_CACHE_DIR", str(tmp_path / "cache"))
    save(tmp_path / "data" / "one.png", square(offset=6))
    save(tmp_path / "data" / "two.png", square(offset=10))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()}
    config = DataConfig(path=str(tmp_path / "data"), caption="a square", condition_preprocessor="canny")
    records = find_records(config, ControlNetAdapter)
    assert [r.caption for r in records] == ["a square", "a square"]
    from condkit.preprocessors import get_preprocessor

    for record in records:
        assert Path(record.condition).is_relative_to(tmp_path / "cache")
        made = np.asarray(Image.open(record.condition).convert("RGB"))
        assert np.array_equal(made, get_preprocessor("canny").from_file(record.image))
        assert made.max() == 255  # really an edge map
    # Second run: the cached files are reused, not recomputed.
    stamps = {r.condition: Path(r.condition).stat().st_mtime_ns for r in records}

    def fail(*args, **kwargs):
        raise AssertionError("preprocessor called again")

    monkeypatch.setattr("condkit.preprocessors.get_preprocessor", fail)
    again = find_records(config, ControlNetAdapter)
    assert [r.condition for r in again] == [r.condition for r in records]
    assert all(Path(c).stat().st_mtime_ns == t for c, t in stamps.items())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()} == before  # input untouched


def test_preprocessor_fills_only_missing_maps_in_layout_a(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDKIT_CACHE_DIR", str(tmp_path / "cache"))
    images_and_conditions(tmp_path / "data")
    save(tmp_path / "data" / "images" / "c.png", square(offset=3))
    records = find_pair_records(DataConfig(path=str(tmp_path / "data"), condition_preprocessor="canny"))
    assert [Path(r.condition).parent.name for r in records] == ["conditions", "conditions", "canny"]


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing_folder_map", r"images/b.png: no condition map .*conditions/b\.\* \(matched by file stem\)"),
        ("no_conditions_folder", r"has images/ but no conditions/ folder"),
        ("size_mismatch", r"conditions/a.png: condition map is 16x16 px but its image .*images/a.png is 32x32 px"),
        ("metadata_missing_file", r"conditions/gone.png: condition map for .*a.png does not exist"),
        ("metadata_no_column", r"a.png: no condition map for this image \(give one, or set data.condition_preprocessor\)"),
        ("fill50k_missing_key", r"prompt.json:1: missing key 'source'"),
        ("images_only", r"no condition maps \(use images/ \+ conditions/"),
    ],
)
def test_missing_or_mismatched_conditions_are_named(tmp_path, layout, message):
    if layout == "missing_folder_map":
        images_and_conditions(tmp_path)
        (tmp_path / "conditions" / "b.png").unlink()
    elif layout == "no_conditions_folder":
        save(tmp_path / "images" / "a.png", square())
    elif layout == "size_mismatch":
        images_and_conditions(tmp_path, names=("a",))
        save(tmp_path / "conditions" / "a.png", canny(square(size=16, offset=4)))
    elif layout.startswith("metadata"):
        images_and_conditions(tmp_path, names=("a",))
        row = {"file_name": "images/a.png", "text": "x"}
        if layout == "metadata_missing_file":
            row["condition_file_name"] = "conditions/gone.png"
        (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    elif layout == "fill50k_missing_key":
        save(tmp_path / "target" / "0.png", square())
        (tmp_path / "prompt.json").write_text(json.dumps({"target": "target/0.png", "prompt": "x"}) + "\n")
    else:
        save(tmp_path / "a.png", square())
    with pytest.raises(UserError, match=message):
        find_records(DataConfig(path=str(tmp_path)), ControlNetAdapter)


def test_edge_f1_on_known_maps():
    reference = np.zeros((20, 20), bool)
    reference[5, 2:12] = True  # a 10-px horizontal edge
    assert edge_f1(reference, reference, tolerance=0).f1 == 1.0
    shifted = np.roll(reference, 1, axis=0)  # one pixel lower
    assert edge_f1(reference, shifted, tolerance=0).f1 == 0.0
    assert edge_f1(reference, shifted, tolerance=1).f1 == 1.0  # within the tolerance radius
    assert edge_f1(reference, np.roll(reference, 3, axis=0), tolerance=2).f1 == 0.0
    half = np.zeros_like(reference)
    half[5, 2:7] = True  # finds half the edge, nothing spurious
    score = edge_f1(reference, half, tolerance=0)
    assert (score.precision, score.recall) == (1.0, 0.5) and score.f1 == pytest.approx(2 / 3)
    noisy = reference.copy()
    noisy[15, 0:10] = True  # all of it plus as much again elsewhere
    score = edge_f1(reference, noisy, tolerance=1)
    assert (score.precision, score.recall) == (0.5, 1.0)
    assert edge_f1(reference, np.zeros_like(reference)).f1 == 0.0
    assert edge_f1(np.zeros_like(reference), np.zeros_like(reference)).f1 == 1.0


def test_condition_edge_f1_scores_an_image_against_its_map():
    image = square(size=64, offset=16)
    condition = canny(image)
    assert condition_edge_f1(condition, image, tolerance=1).f1 == 1.0
    moved = np.roll(image, 10, axis=1)  # the same square 10 px to the right
    assert condition_edge_f1(condition, moved, tolerance=2).f1 < 0.6
    assert condition_edge_f1(condition, np.zeros_like(image)).f1 == 0.0
