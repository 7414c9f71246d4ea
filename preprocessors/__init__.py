"""Condition-map preprocessors for ControlNet / T2I-Adapter, OpenCV only, fully offline.

    from condkit.preprocessors import get_preprocessor, preprocess_folder
    edges = get_preprocessor("canny")(image)          # (H, W, 3) uint8
    summary = preprocess_folder("canny", "photos/", "maps/")

Names follow the ControlNet family each map feeds: ``canny``, ``softedge`` (``hed``),
``scribble``, ``mlsd`` (``lines``), ``shuffle``, ``tile``, ``color`` (``palette``),
``inpaint`` and ``openpose`` (``pose``).
"""

from condkit.preprocessors.batch import Summary, preprocess_folder
from condkit.preprocessors.registry import Preprocessor, get_preprocessor, list_preprocessors, register
from condkit.preprocessors.simple import inpaint_condition

__all__ = [
    "Preprocessor",
    "Summary",
    "get_preprocessor",
    "inpaint_condition",
    "list_preprocessors",
    "preprocess_folder",
    "register",
]
