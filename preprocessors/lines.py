"""Straight lines for the ``mlsd`` ControlNet: white 1-px segments on black.

M-LSD itself is a network; OpenCV's line segment detector (LSD) finds the same kind of
long straight segments without weights. Probabilistic Hough is the fallback method.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from condkit.errors import UserError
from condkit.preprocessors.registry import Preprocessor, register


def detect_segments(gray: np.ndarray, method: str = "lsd", min_length: float = 20.0) -> np.ndarray:
    """Find straight segments in a gray image.

    Args:
        gray: ``(H, W) uint8``.
        method: ``"lsd"`` (``cv2.createLineSegmentDetector``) or ``"hough"``
            (``cv2.HoughLinesP`` on Canny edges).
        min_length: drop segments shorter than this many pixels.

    Returns:
        ``(N, 4) float32`` rows ``x1, y1, x2, y2``.
    """
    if method == "lsd":
        found = cv2.createLineSegmentDetector(cv2.LSD_REFINE_STD).detect(gray)[0]
    elif method == "hough":
        edges = cv2.Canny(gray, 50, 150)
        found = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold=40, minLineLength=min_length, maxLineGap=4)
    else:
        raise UserError(f"mlsd: unknown method {method!r}; use 'lsd' or 'hough'")
    if found is None:
        return np.zeros((0, 4), np.float32)
    segments = found.reshape(-1, 4).astype(np.float32)
    lengths = np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1])
    return segments[lengths >= min_length]


def draw_segments(height: int, width: int, segments: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Draw segments white on a black ``(H, W) uint8`` canvas (the M-LSD map convention).

    Args:
        height: canvas height.
        width: canvas width.
        segments: ``(N, 4)`` rows ``x1, y1, x2, y2`` in pixels.
        thickness: line width in pixels (the annotator draws 1).
    """
    canvas = np.zeros((height, width), np.uint8)
    for x1, y1, x2, y2 in np.round(segments).astype(int):
        cv2.line(canvas, (int(x1), int(y1)), (int(x2), int(y2)), 255, thickness)
    return canvas


@register("mlsd", "lines")
@dataclasses.dataclass
class MLSD(Preprocessor):
    """M-LSD-like straight line map.

    Args:
        method: ``"lsd"`` or ``"hough"``.
        min_length: shortest kept segment as a fraction of the work image's short side
            (0.04 is about M-LSD's 20 px at 512 px).
        thickness: drawn line width in pixels.
    """

    method: str = "lsd"
    min_length: float = 0.04
    thickness: int = 1

    def __post_init__(self) -> None:
        if self.method not in ("lsd", "hough"):
            raise UserError(f"mlsd: unknown method {self.method!r}; use 'lsd' or 'hough'")

    def process(self, rgb: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        min_px = self.min_length * min(gray.shape)
        segments = detect_segments(gray, self.method, min_px)
        return draw_segments(*gray.shape, segments, self.thickness)
