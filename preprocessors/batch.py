"""Folder-to-folder preprocessing: ``condkit preprocess KIND SRC DST``.

Every image under SRC becomes a PNG map at the same relative path and stem under DST.
Work is spread over a process pool (OpenCV releases the GIL only inside each call, and
decoding/encoding is a large share of the time, so processes beat threads). Maps that
exist and are newer than their source are skipped; every PNG is written atomically;
files that cannot be decoded are collected and named, never fatal; SRC is only read.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from condkit.errors import UserError
from condkit.io import atomic_path
from condkit.preprocessors.registry import Preprocessor, get_preprocessor

# No PNG row filter: condition maps are mostly flat regions and sharp lines, which
# deflate compresses well as they are; the default adaptive filtering costs ~30% of the
# encode time and gives bigger files on edge maps (43 vs 27 KiB for a 512 px canny map).
PNG_PARAMS = (cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


@dataclasses.dataclass
class Summary:
    """What a :func:`preprocess_folder` run did.

    Attributes:
        done: relative paths of the maps written.
        skipped: relative paths whose map was already up to date.
        failed: (source path, reason) for every file that could not be processed.
        ignored: files under SRC without an image suffix (not read).
        seconds: wall time of the run.
    """

    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no file failed."""
        return not self.failed

    def line(self) -> str:
        """One-line summary for the command line."""
        rate = len(self.done) / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"{len(self.done)} written, {len(self.skipped)} up to date, {len(self.failed)} failed"
            f" in {self.seconds:.1f} s ({rate:.1f} images/s)"
        )
        if self.ignored:
            text += f"; {len(self.ignored)} non-image files ignored"
        return text


def write_png(final: str | os.PathLike, rgb: np.ndarray, rgb_png: bool = False) -> None:
    """Encode a map as PNG and write it atomically.

    A map whose three channels are equal (edges, lines, scribbles, masks) is stored as
    an 8-bit grayscale PNG: a third of the bytes to compress, and every loader that
    converts to RGB (PIL ``.convert("RGB")``, diffusers ``load_image``, ``cv2.imread``)
    reads back exactly the 3-channel map. Encoding happens inside
    :func:`~condkit.io.atomic_path`, so an interruption at any point leaves neither a
    partial file under ``final`` nor a temporary file.

    Args:
        final: destination ``.png``.
        rgb: ``(H, W, 3) uint8``.
        rgb_png: always write a 3-channel PNG (for tools that read PNGs without converting).
    """
    gray = rgb[:, :, 0]
    if not rgb_png and np.array_equal(gray, rgb[:, :, 1]) and np.array_equal(gray, rgb[:, :, 2]):
        pixels = gray
    else:
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    with atomic_path(final, durable=False) as tmp:  # maps are cheap to remake; skip fsync
        ok, encoded = cv2.imencode(".png", pixels, PNG_PARAMS)
        if not ok:
            raise OSError(f"{final}: PNG encoding failed")
        tmp.write_bytes(encoded.tobytes())


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def plan(src: Path, dst: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Pair every image under ``src`` with its map path under ``dst``.

    Args:
        src: a folder (walked recursively, hidden files and DST itself skipped) or one file.
        dst: the output folder.
        suffixes: file suffixes taken as images (case-insensitive).

    Returns:
        ``(jobs, ignored)``: (source, map) pairs in a stable order, and non-image files.
        Two sources with the same stem in one folder (``a.jpg``, ``a.png``) keep their
        suffix in the map name (``a.jpg.png``) so neither overwrites the other.
    """
    wanted = {s.lower() for s in suffixes}
    if src.is_file():
        files, root = [src], src.parent
    else:
        root = src
        files = []
        for folder, subdirs, names in os.walk(src):
            here = Path(folder)
            # Sorted for a stable order; DST inside SRC is not walked into.
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and not _inside(here / d, dst))
            files.extend(here / n for n in sorted(names) if not n.startswith("."))
    images = [f for f in files if f.suffix.lower() in wanted]
    ignored = [f for f in files if f.suffix.lower() not in wanted]
    stems: dict[Path, int] = {}
    for image in images:
        key = image.relative_to(root).with_suffix("")
        stems[key] = stems.get(key, 0) + 1
    jobs = []
    for image in images:
        rel = image.relative_to(root)
        name = rel.with_suffix(".png") if stems[rel.with_suffix("")] == 1 else rel.with_name(rel.name + ".png")
        jobs.append((image, dst / name))
    return jobs, ignored


def is_up_to_date(source: Path, target: Path) -> bool:
    """True when ``target`` exists and is at least as new as ``source``."""
    try:
        return target.stat().st_mtime_ns >= source.stat().st_mtime_ns
    except FileNotFoundError:
        return False


# The worker's preprocessor and PNG choice, set once per process by _init_worker (not
# shared state: each pool process has its own copy).
_worker: Preprocessor | None = None
_worker_rgb_png = False


def _init_worker(kind: str, options: dict[str, Any], rgb_png: bool = False) -> None:
    global _worker, _worker_rgb_png
    _worker = get_preprocessor(kind, **options)
    _worker_rgb_png = rgb_png


def _run_one(job: tuple[Path, Path]) -> tuple[Path, str | None]:
    source, target = job
    try:
        assert _worker is not None
        write_png(target, _worker.from_file(source), _worker_rgb_png)
        return source, None
    except (UserError, OSError, ValueError, cv2.error) as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        return source, reason.removeprefix(f"{source}: ")  # the summary names the file itself


def default_workers() -> int:
    """Worker processes used by default: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def preprocess_folder(
    kind: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    force: bool = False,
    workers: int | None = None,
    suffixes: Iterable[str] = IMAGE_SUFFIXES,
    progress: bool = True,
    rgb_png: bool = False,
    **options: Any,
) -> Summary:
    """Make a PNG condition map for every image under ``src`` in ``dst``.

    Args:
        kind: preprocessor name (see :func:`~condkit.preprocessors.list_preprocessors`).
        src: folder of images (recursive) or a single image; never modified.
        dst: output folder; relative paths and stems are kept, suffix becomes ``.png``.
        force: redo maps even when they are newer than their source.
        workers: processes; default one per CPU core; 1 runs in this process.
        suffixes: file suffixes treated as images.
        progress: show a tqdm progress bar on stderr.
        rgb_png: write 3-channel PNGs even for gray maps (see :func:`write_png`).
        **options: options of the preprocessor (e.g. ``low_threshold=50``).

    Returns:
        A :class:`Summary`; files that failed are listed in ``summary.failed``.

    Raises:
        UserError: unknown kind or option, SRC missing, or DST equal to SRC.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    get_preprocessor(kind, **options)  # fail fast on a bad kind or option, before any work
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if src.is_dir() and src.resolve() == dst.resolve():
        raise UserError(f"{dst}: output folder is the source folder; choose another so sources stay untouched")
    jobs, ignored = plan(src.resolve(), dst.resolve(), suffixes)
    summary = Summary(ignored=[str(p) for p in ignored])
    todo = []
    for source, target in jobs:
        if not force and is_up_to_date(source, target):
            summary.skipped.append(str(target))
        else:
            todo.append((source, target))
    workers = min(workers or default_workers(), max(1, len(todo)))
    results: Iterable[tuple[Path, str | None]]
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", desc=kind, disable=not progress or not todo)
    if workers == 1:
        _init_worker(kind, options, rgb_png)
        results = map(_run_one, todo)
        _collect(results, todo, summary, bar)
    else:
        # fork where available: workers start in milliseconds and inherit the imports.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        context = multiprocessing.get_context(method)
        # Small chunks: the last one decides how long the other workers sit idle at the end.
        chunk = max(1, min(8, len(todo) // (workers * 32)))
        # One OpenCV thread per worker, as the pool already uses every core. It is set in
        # the parent around the fork: cv2.setNumThreads inside a forked child can hang on
        # the parent's inherited thread pool.
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            with context.Pool(workers, initializer=_init_worker, initargs=(kind, options, rgb_png)) as pool:
                _collect(pool.imap_unordered(_run_one, todo, chunksize=chunk), todo, summary, bar)
        finally:
            cv2.setNumThreads(threads)
    bar.close()
    summary.failed.sort()
    summary.seconds = time.perf_counter() - start
    return summary


def _collect(results: Iterable[tuple[Path, str | None]], todo: list, summary: Summary, bar: Any) -> None:
    targets = dict(todo)
    for source, error in results:
        if error is None:
            summary.done.append(str(targets[source]))
        else:
            summary.failed.append((str(source), error))
        bar.update(1)
