"""``condkit preprocess`` under hostile and clumsy use (issue 19 items 1, 5, 7, 9, 11, 16).

Sources are never written over, "up to date" means "made from these inputs by this
preprocessor with these options", sizes are bounded, and one bad file never stops a
batch.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

import condkit.cli
from condkit.errors import UserError
from condkit.preprocessors import get_preprocessor, preprocess_folder
from condkit.preprocessors.batch import MANIFEST_NAME
from condkit.preprocessors.pose import read_openpose_json
from condkit.preprocessors.registry import MAX_RESOLUTION


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file under ``root`` (to prove nothing changed)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def photo(path: Path, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
    """Write a small noisy photo with some structure (so canny and softedge differ)."""
    rng = np.random.default_rng(seed)
    image = (rng.random((*size, 3)) * 60).astype(np.uint8)
    image[size[0] // 4 : size[0] // 2, size[1] // 4 : 3 * size[1] // 4] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    # Only our subcommand, in this process: fast, and an uncaught exception fails the test.
    monkeypatch.setattr(condkit.cli, "COMMAND_MODULES", ("preprocess",))
    code = condkit.cli.main(["preprocess", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    """stderr is exactly one ``condkit: error:`` line containing every fragment."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("condkit: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --- item 1: SRC is only read -------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_single_image_into_its_own_folder_is_refused(tmp_path, monkeypatch, capsys, force):
    single = tmp_path / "data" / "single"
    photo(single / "photo.png")
    before = snapshot(tmp_path / "data")
    code, out, err = run_cli(["canny", str(single / "photo.png"), str(single)] + ["--force"] * force, monkeypatch, capsys)
    assert code == 2 and "up to date" not in out
    assert_one_line_error(err, str(single))
    assert snapshot(tmp_path / "data") == before


@pytest.mark.parametrize("force", [False, True])
def test_dst_inside_src_holding_source_images_is_refused(tmp_path, monkeypatch, capsys, force):
    nest = tmp_path / "data" / "nest"
    photo(nest / "a.png", seed=1)
    photo(nest / "out" / "a.png", seed=2)  # the user's own image, not a map
    before = snapshot(tmp_path / "data")
    code, out, err = run_cli(["canny", str(nest), str(nest / "out")] + ["--force"] * force, monkeypatch, capsys)
    assert code == 2 and "up to date" not in out
    assert_one_line_error(err, str(nest / "out"), "a.png")
    assert snapshot(tmp_path / "data") == before

    # Without the user's image there, DST inside SRC works, and its maps are not sources.
    (nest / "out" / "a.png").unlink()
    code, out, _ = run_cli(["canny", str(nest), str(nest / "out")], monkeypatch, capsys)
    assert code == 0 and out.startswith("1 written, 0 up to date")
    code, out, _ = run_cli(["canny", str(nest), str(nest / "out")], monkeypatch, capsys)
    assert code == 0 and out.startswith("0 written, 1 up to date")


def test_a_map_that_would_land_on_a_source_is_refused(tmp_path, monkeypatch, capsys):
    # SRC = root/nest, DST = root: the map of nest/nest/a.png is root/nest/a.png, a source.
    root = tmp_path / "root"
    photo(root / "nest" / "a.png", seed=1)
    photo(root / "nest" / "nest" / "a.png", seed=2)
    before = snapshot(root)
    for extra in ([], ["--force"]):
        code, out, err = run_cli(["canny", str(root / "nest"), str(root), *extra], monkeypatch, capsys)
        assert code == 2 and "up to date" not in out
        assert_one_line_error(err, str(root / "nest" / "a.png"))
    assert snapshot(root) == before


def test_two_sources_with_one_map_name_are_refused(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    for name in ("a.jpg", "a.png", "a.jpg.png"):  # a.jpg -> a.jpg.png (stem clash), a.jpg.png -> a.jpg.png
        photo(src / name)
    code, _, err = run_cli(["canny", str(src), str(tmp_path / "maps")], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "a.jpg.png", str(src / "a.jpg"))
    assert not (tmp_path / "maps").exists()


def test_dst_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    # issue 19 item 11: a traceback (NotADirectoryError) before.
    source = photo(tmp_path / "photo.png")
    other = photo(tmp_path / "other.png", seed=3)
    before = snapshot(tmp_path)
    for dst in (source, other):
        code, _, err = run_cli(["canny", str(source), str(dst), "--force"], monkeypatch, capsys)
        assert code == 2
        assert_one_line_error(err, str(dst))
    code, _, err = run_cli(["canny", str(tmp_path), str(other)], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, str(other), "is a file")
    assert snapshot(tmp_path) == before


# --- item 5: "up to date" considers what made each map ------------------------------


def test_maps_are_redone_when_the_kind_or_options_change(tmp_path, monkeypatch, capsys):
    src, dst = tmp_path / "src", tmp_path / "maps"
    for i in range(3):
        photo(src / f"{i}.png", seed=i)

    def run(*argv: str) -> str:
        code, out, err = run_cli([*argv[:1], str(src), str(dst), *argv[1:], "--workers", "1"], monkeypatch, capsys)
        assert code == 0, err
        return out

    def maps_equal(kind: str, **options) -> bool:
        made = get_preprocessor(kind, **options)
        return all(
            np.array_equal(cv2.imread(str(dst / f"{i}.png"))[:, :, ::-1], made.from_file(src / f"{i}.png")) for i in range(3)
        )

    assert run("canny").startswith("3 written, 0 up to date")
    assert run("canny").startswith("0 written, 3 up to date")
    assert run("softedge").startswith("3 written, 0 up to date") and maps_equal("softedge")
    assert run("hed").startswith("0 written, 3 up to date")  # an alias is the same preprocessor
    assert run("canny", "--opt", "low_threshold=20", "--opt", "high_threshold=40").startswith("3 written")
    assert maps_equal("canny", low_threshold=20, high_threshold=40)
    assert run("canny", "--opt", "high_threshold=40", "--opt", "low_threshold=20").startswith("0 written, 3 up to date")
    assert run("canny").startswith("3 written") and maps_equal("canny")
    assert run("canny", "--image-resolution", "32").startswith("3 written")
    assert run("canny", "--image-resolution", "32", "--rgb-png").startswith("3 written")

    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    entry = manifest["maps"]["0.png"]
    assert entry["made_by"]["kind"] == "canny"
    assert entry["made_by"]["options"]["image_resolution"] == 32 and entry["made_by"]["rgb_png"] is True

    # A map replaced behind condkit's back is not "up to date" either.
    photo(dst / "1.png", seed=9)
    assert run("canny", "--image-resolution", "32", "--rgb-png").startswith("1 written, 2 up to date")
    # A damaged manifest records nothing: every map is made again, no traceback.
    (dst / MANIFEST_NAME).write_text("[[[not json")
    assert run("canny", "--image-resolution", "32", "--rgb-png").startswith("3 written, 0 up to date")
    assert run("canny", "--image-resolution", "32", "--rgb-png").startswith("0 written, 3 up to date")


def test_a_changed_sibling_keypoint_file_redoes_the_pose_map(tmp_path, monkeypatch, capsys):
    src, dst = tmp_path / "src", tmp_path / "maps"
    photo(src / "person.png")
    flat = [0.0] * 54
    flat[0:6] = (32, 20, 0.9, 32, 40, 0.9)
    keypoints = src / "person_keypoints.json"
    keypoints.write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}]}))
    assert run_cli(["openpose", str(src), str(dst)], monkeypatch, capsys)[1].startswith("1 written")
    assert run_cli(["openpose", str(src), str(dst)], monkeypatch, capsys)[1].startswith("0 written, 1 up to date")
    flat[0:3] = (10, 10, 0.9)
    keypoints.write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}]}))
    assert run_cli(["openpose", str(src), str(dst)], monkeypatch, capsys)[1].startswith("1 written")


# --- item 7: bounded output sizes ----------------------------------------------------


@pytest.mark.parametrize("flag", ["--image-resolution", "--detect-resolution"])
def test_resolution_above_the_limit_is_refused_before_any_work(tmp_path, monkeypatch, capsys, flag):
    source = photo(tmp_path / "src" / "a.png")
    code, _, err = run_cli(["canny", str(source), str(tmp_path / "maps"), flag, "16000"], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "16000", str(MAX_RESOLUTION))
    assert not (tmp_path / "maps").exists()


def test_help_states_the_size_limits(monkeypatch, capsys):
    from condkit.preprocessors.registry import MAX_MAP_PIXELS

    monkeypatch.setattr(condkit.cli, "COMMAND_MODULES", ("preprocess",))
    with pytest.raises(SystemExit):
        condkit.cli.main(["preprocess", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"8..{MAX_RESOLUTION}" in text and MAX_MAP_PIXELS == 4096 * 8192 and "4096 x 8192 px" in text


def test_a_map_of_too_many_pixels_fails_for_its_file_only(tmp_path, monkeypatch, capsys):
    # A 8 x 2048 strip at a short side of 2048 would be 2048 x 524288 px (3 GB as RGB).
    src = tmp_path / "src"
    photo(src / "strip.png", size=(8, 2048))
    photo(src / "ok.png")
    code, out, err = run_cli(["canny", str(src), str(tmp_path / "maps"), "--image-resolution", "2048", "--workers", "1"], monkeypatch, capsys)
    assert code == 1 and out.startswith("1 written, 0 up to date, 1 failed")
    assert f"failed: {src / 'strip.png'}: " in err and "524288 x 2048" in err and "Traceback" not in err
    assert not (tmp_path / "maps" / "strip.png").exists()


# --- item 9: one bad file never stops the batch --------------------------------------


HOSTILE_KEYPOINTS = {
    "zero_canvas": {"canvas_width": 0, "canvas_height": 0, "people": [{"pose_keypoints_2d": [1e300, 1e300, 1.0] * 18}]},
    "huge": {"people": [{"pose_keypoints_2d": [1e300, 5.0, 1.0] * 18}]},
    "nan": {"people": [{"pose_keypoints_2d": [float("nan"), 5.0, 1.0] * 18}]},
    "text": {"canvas_width": "wide", "people": [{"pose_keypoints_2d": [5.0, 5.0, 1.0] * 18}]},
    "strings": {"people": [{"pose_keypoints_2d": ["x", 5.0, 1.0] * 18}]},
    "not_list": {"people": 5},
}


@pytest.mark.parametrize("name", sorted(HOSTILE_KEYPOINTS))
def test_hostile_keypoint_file_is_one_line_naming_it(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(HOSTILE_KEYPOINTS[name]))
    with pytest.raises(UserError, match=f"^{path}: "):
        get_preprocessor("openpose", keypoints=str(path))(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(UserError, match=f"^{path}: "):
        read_openpose_json(path, 64, 64)


def test_hostile_keypoint_files_do_not_abort_the_batch(tmp_path, monkeypatch, capsys):
    src, dst = tmp_path / "src", tmp_path / "maps"
    flat = [0.0] * 54
    flat[0:6] = (32, 20, 0.9, 32, 40, 0.9)
    for i in range(8):
        photo(src / f"good{i}.png", seed=i)
        (src / f"good{i}_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}]}))
    for name, data in HOSTILE_KEYPOINTS.items():
        photo(src / f"bad_{name}.png")
        (src / f"bad_{name}_keypoints.json").write_text(json.dumps(data))
    code, out, err = run_cli(["openpose", str(src), str(dst), "--workers", "2"], monkeypatch, capsys)
    assert code == 1, err
    assert out.startswith(f"8 written, 0 up to date, {len(HOSTILE_KEYPOINTS)} failed")
    for name in HOSTILE_KEYPOINTS:
        assert f"failed: {src / f'bad_{name}.png'}: " in err
    assert err.count("failed: ") == len(HOSTILE_KEYPOINTS) and "Traceback" not in err
    assert sorted(p.name for p in dst.glob("*.png")) == [f"good{i}.png" for i in range(8)]


def test_an_unexpected_error_in_one_file_is_a_failed_line(tmp_path, monkeypatch, capsys):
    from condkit.preprocessors.edges import Canny

    real = Canny.process

    def flaky(self, rgb):
        if rgb.shape[0] == 48:
            raise ZeroDivisionError("a bug in one file")
        return real(self, rgb)

    monkeypatch.setattr(Canny, "process", flaky)
    src = tmp_path / "src"
    photo(src / "a.png")
    photo(src / "b.png", size=(48, 64))
    photo(src / "c.png")
    code, out, err = run_cli(["canny", str(src), str(tmp_path / "maps"), "--workers", "1"], monkeypatch, capsys)
    assert code == 1 and out.startswith("2 written, 0 up to date, 1 failed")
    assert f"failed: {src / 'b.png'}: ZeroDivisionError: a bug in one file" in err


# --- item 16: the pose extra ---------------------------------------------------------


def test_mediapipe_failing_at_creation_is_the_friendly_error(tmp_path, monkeypatch, capsys):
    # What protobuf 7 does to mediapipe 0.10.21: the import works, creating the detector fails.
    def broken_pose(**kwargs):
        raise AttributeError("'google._upb._message.FieldDescriptor' object has no attribute 'label'")

    fake = types.ModuleType("mediapipe")
    fake.solutions = types.SimpleNamespace(pose=types.SimpleNamespace(Pose=broken_pose))
    monkeypatch.setitem(sys.modules, "mediapipe", fake)
    with pytest.raises(UserError, match=r"AttributeError.*condkit\[pose\].*protobuf"):
        get_preprocessor("openpose", detector="mediapipe")(np.zeros((64, 64, 3), np.uint8))

    source = photo(tmp_path / "src" / "a.png")
    code, _, err = run_cli(["openpose", str(source), str(tmp_path / "maps"), "--opt", "detector=mediapipe"], monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"failed: {source}: openpose: MediaPipe") and "condkit[pose]" in err
