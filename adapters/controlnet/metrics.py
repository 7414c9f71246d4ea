"""Control fidelity: how well a generated image follows its condition map.

For edge-type conditions (canny, softedge, scribble, lines) ControlNet++ measures
controllability as the F1 score between the condition's edges and the edges the same
detector finds in the output. Pixel-exact matching punishes one-pixel shifts that no
eye can see, so, as in the BSDS boundary benchmark, an edge pixel counts as matched
when the other map has an edge within ``tolerance`` pixels (a disc-shaped dilation).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class EdgeScore:
    """Edge agreement of one (condition, output) pair.

    Attributes:
        precision: share of the output's edge pixels near a condition edge.
        recall: share of the condition's edge pixels near an output edge.
        f1: harmonic mean of the two (1.0 when both maps are empty).
    """

    precision: float
    recall: float
    f1: float


def edge_mask(image: np.ndarray, threshold: int = 127) -> np.ndarray:
    """A condition map's edges as a boolean mask (white-on-black maps, any channel).

    Args:
        image: (H, W) or (H, W, C) uint8 map.
        threshold: values above it count as edge.
    """
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.max(axis=2)  # (H, W)
    return array > threshold


def canny_edges(image: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """Canny edges of an RGB image as a boolean mask (the ``canny`` preprocessor's settings).

    Args:
        image: (H, W, 3) uint8 RGB.
        low_threshold, high_threshold: hysteresis thresholds.
    """
    return cv2.Canny(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)), low_threshold, high_threshold) > 0


def edge_f1(reference: np.ndarray, predicted: np.ndarray, tolerance: int = 2) -> EdgeScore:
    """Tolerant edge F1 between two boolean edge masks of the same size.

    Args:
        reference: (H, W) bool, the condition's edges.
        predicted: (H, W) bool, the output's edges.
        tolerance: matching radius in pixels (0 = exact pixel match).

    Raises:
        ValueError: the masks differ in size.
    """
    if reference.shape != predicted.shape:
        raise ValueError(f"edge masks differ in size: {reference.shape} vs {predicted.shape}")
    n_ref, n_pred = int(reference.sum()), int(predicted.sum())
    if n_ref == 0 and n_pred == 0:
        return EdgeScore(1.0, 1.0, 1.0)
    if n_ref == 0 or n_pred == 0:
        return EdgeScore(0.0, 0.0, 0.0)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    near_ref = cv2.dilate(reference.astype(np.uint8), kernel) > 0
    near_pred = cv2.dilate(predicted.astype(np.uint8), kernel) > 0
    precision = float((predicted & near_ref).sum()) / n_pred
    recall = float((reference & near_pred).sum()) / n_ref
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return EdgeScore(precision, recall, f1)


def condition_edge_f1(condition: np.ndarray, output: np.ndarray, tolerance: int = 2) -> EdgeScore:
    """Edge F1 of a generated image against its edge-type condition map.

    Args:
        condition: (H, W, 3) uint8 condition map, white edges on black.
        output: (H', W', 3) uint8 RGB generated image; resized to the condition's size
            (nearest) when it differs.
        tolerance: matching radius in pixels.
    """
    output = np.asarray(output, dtype=np.uint8)
    height, width = np.asarray(condition).shape[:2]
    if output.shape[:2] != (height, width):
        output = cv2.resize(output, (width, height), interpolation=cv2.INTER_NEAREST)
    return edge_f1(edge_mask(condition), canny_edges(output), tolerance)


def mean_edge_scores(scores: list[EdgeScore]) -> dict[str, float]:
    """Average precision, recall and F1 over pairs, as metric names for logging.

    Args:
        scores: one score per (condition, output) pair; must not be empty.
    """
    return {
        "edge_precision": float(np.mean([s.precision for s in scores])),
        "edge_recall": float(np.mean([s.recall for s in scores])),
        "edge_f1": float(np.mean([s.f1 for s in scores])),
    }
