"""OpenPose maps: exact colours at joints and limbs from a known JSON; detectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from condkit.errors import UserError
from condkit.preprocessors import get_preprocessor
from condkit.preprocessors.pose import (
    BODY25_TO_COCO18,
    COLORS,
    LIMBS,
    heatmaps_to_keypoints,
    mediapipe_to_coco18,
)

# A front-facing person on a 512 x 512 image, pixels (x, y), OpenPose COCO-18 order.
JOINTS = [
    (256, 80), (256, 150), (200, 150), (170, 230), (150, 310), (312, 150), (342, 230), (362, 310),
    (225, 300), (215, 390), (205, 480), (287, 300), (297, 390), (307, 480),
    (240, 65), (272, 65), (220, 75), (292, 75),
]  # fmt: skip


def write_json(path, joints, size=18, extra=None):
    flat = []
    if size == 25:  # BODY_25: COCO points at their BODY_25 slots, mid-hip and feet filled in
        points = [(0.0, 0.0, 0.0)] * 25
        for coco, body25 in enumerate(BODY25_TO_COCO18):
            points[body25] = (*joints[coco], 0.9)
        points[8] = (256, 300, 0.9)
        for foot in range(19, 25):
            points[foot] = (100 + foot, 500, 0.9)
    else:
        points = [(x, y, 0.0 if (x, y) == (0, 0) else 0.9) for x, y in joints]
    for point in points:
        flat.extend(point)
    data = {"version": 1.3, "people": [{"pose_keypoints_2d": flat}], **(extra or {})}
    path.write_text(json.dumps(data))
    return path


def assert_pose_drawn(out, joints, scale=1.0):
    for index, (x, y) in enumerate(joints):
        assert tuple(out[int(y * scale), int(x * scale)]) == COLORS[index], f"keypoint {index}"
    for limb, (start, end) in enumerate(LIMBS):
        mx = int((joints[start][0] + joints[end][0]) * scale / 2)
        my = int((joints[start][1] + joints[end][1]) * scale / 2)
        expected = tuple(int(c * 0.6) for c in COLORS[limb])
        assert tuple(out[my, mx]) == expected, f"limb {limb} {start}-{end}"
    assert (out[:20, :20] == 0).all() and (out[-20:, -20:] == 0).all()


@pytest.mark.parametrize("size", [18, 25])
def test_json_pose_has_the_right_colours_at_joints_and_limbs(tmp_path, size):
    path = write_json(tmp_path / "pose.json", JOINTS, size=size)
    out = get_preprocessor("openpose", keypoints=str(path))(np.zeros((512, 512, 3), np.uint8))
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    assert_pose_drawn(out, JOINTS)
    # Exactly the 18 colours, at 60 % for limbs, and black: nothing else is drawn.
    allowed = {(0, 0, 0)} | set(COLORS) | {tuple(int(c * 0.6) for c in color) for color in COLORS}
    assert set(map(tuple, np.unique(out.reshape(-1, 3), axis=0))) <= allowed


def test_json_pose_scales_to_the_output_resolution(tmp_path):
    path = write_json(tmp_path / "pose.json", JOINTS)
    out = get_preprocessor("pose", keypoints=str(path), image_resolution=1024)(np.zeros((512, 512, 3), np.uint8))
    assert out.shape == (1024, 1024, 3)
    assert_pose_drawn(out, JOINTS, scale=2.0)


def test_json_canvas_size_and_missing_points(tmp_path):
    joints = list(JOINTS)
    joints[4] = (0, 0)  # right wrist missing (confidence 0)
    halved = [(x / 2, y / 2) for x, y in joints]
    path = write_json(tmp_path / "pose.json", halved, extra={"canvas_width": 256, "canvas_height": 256})
    out = get_preprocessor("openpose", keypoints=str(path))(np.zeros((512, 512, 3), np.uint8))
    assert tuple(out[310, 150]) == (0, 0, 0)  # no wrist disc
    assert tuple(out[270, 160]) == (0, 0, 0)  # no forearm (limb 3-4)
    assert tuple(out[230, 170]) == COLORS[3]  # the elbow is still there


def test_bad_json_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        get_preprocessor("openpose", keypoints=str(bad))(np.zeros((64, 64, 3), np.uint8))
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"people": [{"pose_keypoints_2d": [1, 2, 3]}]}))
    with pytest.raises(UserError, match="expected 54"):
        get_preprocessor("openpose", keypoints=str(short))(np.zeros((64, 64, 3), np.uint8))


def test_mediapipe_landmarks_map_to_coco18():
    marks = np.zeros((33, 3))
    marks[:, 2] = 1.0
    marks[11, :2] = (0.6, 0.3)  # MediaPipe's left shoulder (image right for a front view)
    marks[12, :2] = (0.4, 0.3)
    marks[16, :2] = (0.2, 0.6)  # right wrist
    points = mediapipe_to_coco18(marks)
    np.testing.assert_allclose(points[1], (0.5, 0.3, 1.0))  # neck = shoulders' mean
    np.testing.assert_allclose(points[2, :2], (0.4, 0.3))
    np.testing.assert_allclose(points[5, :2], (0.6, 0.3))
    np.testing.assert_allclose(points[4, :2], (0.2, 0.6))


def test_heatmaps_decode_to_peaks():
    heatmaps = np.zeros((19, 46, 46), np.float32)
    for index in range(18):
        heatmaps[index, 2 * index + 1, 40 - index] = 0.5 + index / 100
    points = heatmaps_to_keypoints(heatmaps)
    np.testing.assert_allclose(points[5], ((40 - 5 + 0.5) / 46, (11 + 0.5) / 46, 0.55), rtol=1e-6)
    with pytest.raises(UserError, match="expected"):
        heatmaps_to_keypoints(np.zeros((5, 8, 8), np.float32))


def test_onnx_model_errors_are_clear(tmp_path):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(UserError, match="pose model file not found"):
        get_preprocessor("openpose", model=str(tmp_path / "missing.onnx"))(image)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(UserError, match="garbage.onnx: not an ONNX model"):
        get_preprocessor("openpose", detector="onnx", model=str(garbage))(image)
    with pytest.raises(UserError, match="needs model"):
        get_preprocessor("openpose", detector="onnx")


def test_mediapipe_missing_gives_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mediapipe(name, *args, **kwargs):
        if name == "mediapipe":
            raise ImportError("No module named 'mediapipe'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mediapipe)
    with pytest.raises(UserError, match=r"condkit\[pose\]"):
        get_preprocessor("openpose")(np.zeros((64, 64, 3), np.uint8))


def test_mediapipe_detects_the_astronaut():
    pytest.importorskip("mediapipe")
    skimage_data = pytest.importorskip("skimage.data")
    image = skimage_data.astronaut()
    pose = get_preprocessor("openpose", detector="mediapipe")
    people = pose.detect(image)
    assert len(people) == 1
    body = people[0]
    # Her face is in the upper middle; her left shoulder is on the image's right.
    assert 0.3 < body[0, 0] < 0.6 and body[0, 1] < 0.4
    assert body[5, 0] > body[1, 0] > body[2, 0]
    out = pose(image)
    nose = (int(body[0, 1] * 512), int(body[0, 0] * 512))
    assert tuple(out[nose]) == COLORS[0]
