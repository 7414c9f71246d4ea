"""Edge maps: ``canny``, ``softedge`` (HED-like, no weights) and ``scribble``.

All three draw white (or gray) edges on black, the convention of the public ControlNet
canny / softedge (HED, PiDiNet) / scribble checkpoints.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from condkit.errors import UserError
from condkit.preprocessors.registry import Preprocessor, register


@register("canny")
@dataclasses.dataclass
class Canny(Preprocessor):
    """``cv2.Canny`` on the RGB image, thresholds 100/200 as in ControlNet's training data.

    Args:
        low_threshold: hysteresis low threshold.
        high_threshold: hysteresis high threshold.
        auto: ignore the thresholds and derive them from the median gray level
            (``(1 - sigma) * median`` and ``(1 + sigma) * median``), for very dark or
            low-contrast images.
        sigma: spread around the median used by ``auto``.
    """

    low_threshold: int = 100
    high_threshold: int = 200
    auto: bool = False
    sigma: float = 0.33

    def __post_init__(self) -> None:
        if not 0 <= self.low_threshold <= self.high_threshold:
            raise UserError(
                f"canny: need 0 <= low_threshold <= high_threshold, got {self.low_threshold}/{self.high_threshold}"
            )

    def thresholds(self, rgb: np.ndarray) -> tuple[int, int]:
        """The (low, high) thresholds used for ``rgb``."""
        if not self.auto:
            return self.low_threshold, self.high_threshold
        median = float(np.median(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)))
        low = int(max(0.0, (1.0 - self.sigma) * median))
        high = int(min(255.0, (1.0 + self.sigma) * median))
        return low, max(high, low + 1)

    def process(self, rgb: np.ndarray) -> np.ndarray:
        return cv2.Canny(rgb, *self.thresholds(rgb))


def safe_step(edges: np.ndarray, steps: int = 2) -> np.ndarray:
    """Quantise a [0, 1] soft-edge map to ``steps`` levels (ControlNet v1.1's "safe" maps).

    Args:
        edges: float map in [0, 1].
        steps: number of gray levels above black.
    """
    return np.floor(edges * (steps + 1)).clip(0, steps) / steps


@register("softedge", "hed")
@dataclasses.dataclass
class SoftEdge(Preprocessor):
    """A HED-like soft edge map without network weights: multi-scale gradient magnitude.

    Gradients of the gray image are taken at ``levels`` Gaussian scales (sigma doubling
    from ``sigma``), scale-normalised and averaged, so fine texture gives faint edges
    and object outlines, present at every scale, give strong ones, as HED's fused map.

    Args:
        levels: number of scales.
        sigma: the finest scale's Gaussian sigma in pixels.
        safe: quantise to 2 gray levels, like ControlNet v1.1's ``softedge_hedsafe``.
    """

    levels: int = 3
    sigma: float = 1.0
    safe: bool = False

    def __post_init__(self) -> None:
        if self.levels < 1 or self.sigma <= 0:
            raise UserError(f"softedge: need levels >= 1 and sigma > 0, got {self.levels}/{self.sigma}")

    def process(self, rgb: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        total = np.zeros_like(gray)
        for level in range(self.levels):
            scale = self.sigma * 2**level
            blurred = cv2.GaussianBlur(gray, (0, 0), scale)
            dx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3)
            dy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3)
            # times sigma: a step edge then has the same response at every scale.
            total += cv2.magnitude(dx, dy) * scale
        total /= self.levels
        top = float(np.percentile(total, 99.5))
        edges = np.clip(total / max(top, 1e-6), 0.0, 1.0) ** 1.5  # darken texture, keep outlines
        if self.safe:
            edges = safe_step(edges)
        return (edges * 255.0).round().astype(np.uint8)


@register("scribble")
@dataclasses.dataclass
class Scribble(Preprocessor):
    """Thick binary strokes: ControlNet v1.1's XDoG scribble, then widened.

    Difference of Gaussians (sigma 0.5 and 5) on the RGB image, thresholded as in the
    v1.1 ``scribble_xdog`` annotator, then dilated so strokes look hand drawn.

    Args:
        threshold: XDoG threshold (v1.1 default 32); lower gives more strokes.
        thickness: dilation kernel size in pixels (1 keeps XDoG's own width).
    """

    threshold: int = 32
    thickness: int = 3

    def __post_init__(self) -> None:
        if self.thickness < 1:
            raise UserError(f"scribble: thickness must be >= 1, got {self.thickness}")

    def process(self, rgb: np.ndarray) -> np.ndarray:
        image = rgb.astype(np.float32)
        fine = cv2.GaussianBlur(image, (0, 0), 0.5)
        coarse = cv2.GaussianBlur(image, (0, 0), 5.0)
        # Positive where a pixel is darker than its surroundings in every channel: lines.
        dog = np.min(coarse - fine, axis=2)
        strokes = np.where(2.0 * dog > self.threshold, 255, 0).astype(np.uint8)
        if self.thickness > 1:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (self.thickness, self.thickness))
            strokes = cv2.dilate(strokes, kernel)
        return strokes

    def render(self, rgb: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
        # Resizing blurs the strokes; re-binarise so the map stays strictly 0/255.
        out = super().render(rgb, out_size)
        return np.where(out >= 128, 255, 0).astype(np.uint8)
