"""``condkit preprocess``: real photos plus broken files, skips, --force, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import condkit.cli
from condkit.errors import UserError
from condkit.preprocessors import batch, preprocess_folder
from condkit.preprocessors.pose import COLORS

skimage_data = pytest.importorskip("skimage.data")


def tree_hash(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    cv2.imwrite(str(root / "astronaut.jpg"), skimage_data.astronaut()[:, :, ::-1])
    cv2.imwrite(str(root / "sub" / "coffee.png"), skimage_data.coffee()[:, :, ::-1])
    cv2.imwrite(str(root / "sub" / "camera.png"), skimage_data.camera())  # gray
    good = (root / "sub" / "coffee.png").read_bytes()
    (root / "corrupt.png").write_bytes(good[: len(good) // 3])
    (root / "fake.jpg").write_text("this is text, not a JPEG\n")
    (root / "notes.txt").write_text("not an image suffix: ignored\n")
    return root


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    # Only our subcommand: the others are written in parallel and may not exist yet.
    monkeypatch.setattr(condkit.cli, "COMMAND_MODULES", ("preprocess",))
    return condkit.cli.main(argv)


def test_cli_processes_good_files_names_bad_ones_and_leaves_src_alone(src, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "maps"
    before = tree_hash(src)
    code = run_cli(["preprocess", "canny", str(src), str(dst), "--no-progress"], monkeypatch)
    out, err = capsys.readouterr()
    assert code == 1
    assert f"failed: {src / 'corrupt.png'}" in err and f"failed: {src / 'fake.jpg'}" in err
    assert err.count("failed:") == 2
    assert "3 written, 0 up to date, 2 failed" in out
    maps = sorted(str(p.relative_to(dst)) for p in dst.rglob("*.png"))  # plus the hidden manifest
    assert maps == ["astronaut.png", "sub/camera.png", "sub/coffee.png"]
    astronaut = cv2.imread(str(dst / "astronaut.png"))
    expected = cv2.Canny(cv2.imread(str(src / "astronaut.jpg"))[:, :, ::-1], 100, 200)
    np.testing.assert_array_equal(astronaut[:, :, 0], expected)
    assert tree_hash(src) == before

    first = {p: p.stat().st_mtime_ns for p in dst.rglob("*.png")}
    code = run_cli(["preprocess", "canny", str(src), str(dst), "--no-progress"], monkeypatch)
    assert code == 1 and "0 written, 3 up to date, 2 failed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*.png")} == first

    os.utime(src / "astronaut.jpg")  # touched source: only its map is redone
    code = run_cli(["preprocess", "canny", str(src), str(dst), "--no-progress"], monkeypatch)
    assert "1 written, 2 up to date" in capsys.readouterr().out

    code = run_cli(["preprocess", "canny", str(src), str(dst), "--no-progress", "--force", "--workers", "1"], monkeypatch)
    assert "3 written, 0 up to date, 2 failed" in capsys.readouterr().out


def test_cli_options_and_errors(src, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "maps"
    argv = ["preprocess", "tile", str(src / "astronaut.jpg"), str(dst), "--image-resolution", "256", "--no-progress"]
    assert run_cli(argv + ["--opt", "pyr_up_iters=2"], monkeypatch) == 0
    assert cv2.imread(str(dst / "astronaut.png")).shape == (256, 256, 3)
    assert run_cli(["preprocess", "canny", str(src), str(dst), "--opt", "nope=1"], monkeypatch) == 2
    assert "condkit: error: canny: unknown option 'nope'" in capsys.readouterr().err
    assert run_cli(["preprocess", "canny", str(src), str(src)], monkeypatch) == 2
    assert "output folder is the source folder" in capsys.readouterr().err
    assert run_cli(["preprocess", "canny", str(tmp_path / "none"), str(dst)], monkeypatch) == 2


def test_dst_inside_src_is_not_walked(src):
    dst = src / "maps"
    first = preprocess_folder("canny", src, dst, progress=False, workers=1)
    again = preprocess_folder("canny", src, dst, progress=False, workers=1, force=True)
    assert len(first.done) == len(again.done) == 3  # its own maps are not taken as inputs


def test_same_stem_different_suffix_keeps_both(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    cv2.imwrite(str(root / "cat.png"), skimage_data.chelsea()[:, :, ::-1])
    cv2.imwrite(str(root / "cat.jpg"), skimage_data.coffee()[:, :, ::-1])
    summary = preprocess_folder("color", root, tmp_path / "out", progress=False)
    assert summary.ok and sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["cat.jpg.png", "cat.png.png"]


def test_interrupted_write_leaves_no_partial_or_temp_file(src, tmp_path, monkeypatch):
    dst = tmp_path / "maps"
    calls = {"n": 0}
    real_imencode = cv2.imencode

    def interrupted(ext, image, *args):
        calls["n"] += 1
        ok, data = real_imencode(ext, image, *args)
        raise KeyboardInterrupt("interrupted mid-write")

    monkeypatch.setattr(batch.cv2, "imencode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess_folder("canny", src / "astronaut.jpg", dst, workers=1, progress=False)
    assert calls["n"] == 1
    assert list(dst.iterdir()) == []  # neither astronaut.png nor a .tmp file

    monkeypatch.setattr(batch.cv2, "imencode", real_imencode)
    preprocess_folder("canny", src / "astronaut.jpg", dst, workers=1, progress=False)
    good = (dst / "astronaut.png").read_bytes()
    monkeypatch.setattr(batch.cv2, "imencode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess_folder("canny", src / "astronaut.jpg", dst, workers=1, progress=False, force=True)
    assert (dst / "astronaut.png").read_bytes() == good  # the old map survives
    assert sorted(p.name for p in dst.iterdir()) == [batch.MANIFEST_NAME, "astronaut.png"]  # no .tmp file


def test_pose_batch_uses_sibling_openpose_json(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    cv2.imwrite(str(root / "person.png"), np.full((128, 128, 3), 90, np.uint8))
    flat = [0.0] * 54
    flat[0:3] = (64, 30, 0.9)  # nose
    flat[3:6] = (64, 60, 0.9)  # neck
    (root / "person_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}]}))
    summary = preprocess_folder("openpose", root, tmp_path / "out", progress=False, workers=1)
    assert summary.ok and len(summary.ignored) == 1
    out = cv2.imread(str(tmp_path / "out" / "person.png"))[:, :, ::-1]
    assert tuple(out[30, 64]) == COLORS[0] and tuple(out[60, 64]) == COLORS[1]
    assert tuple(out[45, 64]) == tuple(int(c * 0.6) for c in COLORS[12])  # neck-nose limb


def test_unknown_kind_fails_before_any_work(src, tmp_path):
    with pytest.raises(UserError, match="unknown preprocessor"):
        preprocess_folder("nope", src, tmp_path / "maps")
    assert not (tmp_path / "maps").exists()


def test_benchmark_quick_prints_its_table(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_preprocess.py"
    spec = importlib.util.spec_from_file_location("bench_preprocess", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| condkit preprocess" in out and "| plain loop" in out and "canny per image" in out


def test_gray_maps_are_gray_pngs_that_read_back_as_the_rgb_map(src, tmp_path, monkeypatch):
    from PIL import Image

    from condkit.preprocessors import get_preprocessor

    image = src / "astronaut.jpg"
    expected = get_preprocessor("canny").from_file(image)  # (H, W, 3), equal channels
    assert run_cli(["preprocess", "canny", str(image), str(tmp_path / "gray"), "--no-progress"], monkeypatch) == 0
    assert run_cli(["preprocess", "canny", str(image), str(tmp_path / "rgb"), "--no-progress", "--rgb-png"], monkeypatch) == 0
    with Image.open(tmp_path / "gray" / "astronaut.png") as gray, Image.open(tmp_path / "rgb" / "astronaut.png") as rgb:
        assert (gray.mode, rgb.mode) == ("L", "RGB")
        np.testing.assert_array_equal(np.asarray(gray.convert("RGB")), expected)
        np.testing.assert_array_equal(np.asarray(rgb), expected)
    # a colour map (palette) stays RGB either way
    assert run_cli(["preprocess", "palette", str(image), str(tmp_path / "colour"), "--no-progress"], monkeypatch) == 0
    with Image.open(tmp_path / "colour" / "astronaut.png") as colour:
        assert colour.mode == "RGB"
