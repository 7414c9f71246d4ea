"""Folder-to-folder preprocessing: ``condkit preprocess KIND SRC DST``.

Every image under SRC becomes a PNG map at the same relative path and stem under DST.
Work is spread over a process pool (OpenCV releases the GIL only inside each call, and
decoding/encoding is a large share of the time, so processes beat threads). A manifest
in DST records what made each map (preprocessor, options, input files' sizes and times,
the map's own size and time): a map is skipped only when all of these still match.
Every PNG is written atomically; a file that fails, for any reason, is named and the
rest go on. SRC is only read: a DST that is SRC or a file, a DST inside SRC that holds
images condkit did not make, and any map that would land on a source are refused
before any work.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from condkit.errors import UserError
from condkit.io import atomic_path, write_text_atomic
from condkit.preprocessors.registry import Preprocessor, get_preprocessor

# No PNG row filter: condition maps are mostly flat regions and sharp lines, which
# deflate compresses well as they are; the default adaptive filtering costs ~30% of the
# encode time and gives bigger files on edge maps (43 vs 27 KiB for a 512 px canny map).
PNG_PARAMS = (cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
# The record of what made each map in DST (hidden, so it is never taken as an input).
MANIFEST_NAME = ".condkit-preprocess.json"
MANIFEST_FORMAT = 1


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
            # Sorted for a stable order; DST inside SRC is not walked into (a DST above
            # SRC is no reason to skip anything).
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and here / d != dst)
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


def file_stamp(path: Path) -> list[int] | None:
    """``[mtime_ns, size]`` of a file, or None when it is missing."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_mtime_ns, stat.st_size]


def input_stamps(preprocessor: Preprocessor, source: Path) -> dict[str, list[int] | None]:
    """Stamps of every file the map of ``source`` is made from (see ``input_files``)."""
    return {str(path): file_stamp(path) for path in preprocessor.input_files(source)}


def read_manifest(dst: Path) -> dict[str, dict[str, Any]]:
    """The maps recorded in ``dst``'s manifest: relative map path -> record.

    A missing or unreadable manifest records nothing, so every map is made again.

    Args:
        dst: the output folder.
    """
    try:
        data = json.loads((dst / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("maps"), dict):
        return {}
    return {key: value for key, value in data["maps"].items() if isinstance(value, dict)}


def write_manifest(dst: Path, maps: dict[str, dict[str, Any]]) -> None:
    """Write the manifest atomically, dropping records of maps that no longer exist.

    Args:
        dst: the output folder.
        maps: relative map path -> record.
    """
    kept = {rel: record for rel, record in sorted(maps.items()) if (dst / rel).is_file()}
    text = json.dumps({"format": MANIFEST_FORMAT, "maps": kept}, separators=(",", ":")) + "\n"
    write_text_atomic(dst / MANIFEST_NAME, text)


def is_up_to_date(record: dict[str, Any] | None, made_by: dict[str, Any] | None, inputs: dict, target: Path) -> bool:
    """True when ``target`` is the map its manifest record says, made as asked now.

    Args:
        record: the manifest record of ``target`` (None: not made by condkit).
        made_by: preprocessor, options and PNG choice of this run (None: unknown).
        inputs: the stamps of the files the map is made from, now.
        target: the map file.
    """
    if record is None or made_by is None:
        return False
    stamp = file_stamp(target)
    return (
        stamp is not None
        and record.get("made_by") == made_by
        and record.get("inputs") == inputs
        and record.get("map") == stamp
    )


def check_destination(src: Path, dst: Path) -> None:
    """Refuse an output that is the source, a file, or the folder of a source image.

    Args:
        src: the resolved source folder or image.
        dst: the resolved output folder.

    Raises:
        UserError: one line naming DST and why.
    """
    if dst == src:
        what = "folder" if src.is_dir() else "image"
        raise UserError(f"{dst}: output folder is the source {what}; choose another so sources stay untouched")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: output must be a folder, but it is a file")
    if src.is_file() and dst == src.parent:
        raise UserError(f"{dst}: output folder is the folder of the source image; choose another so sources stay untouched")


def check_no_sources_in_dst(src: Path, dst: Path, maps: dict[str, dict[str, Any]], suffixes: Iterable[str]) -> None:
    """Refuse a DST inside SRC that holds images no preprocess run recorded as its maps.

    Such images are the user's sources (``data/nest/out/a.png`` for SRC ``data/nest``):
    maps of the same name would overwrite them.

    Args:
        src: the resolved source folder or image.
        dst: the resolved output folder.
        maps: the records of ``dst``'s manifest.
        suffixes: file suffixes taken as images.

    Raises:
        UserError: naming DST and one of the images.
    """
    if not src.is_dir() or src not in dst.parents or not dst.is_dir():
        return
    wanted = {s.lower() for s in suffixes}
    for folder, subdirs, names in os.walk(dst):
        here = Path(folder)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(names):
            rel = (here / name).relative_to(dst).as_posix()
            if not name.startswith(".") and Path(name).suffix.lower() in wanted and rel not in maps:
                raise UserError(
                    f"{dst}: output folder is inside SRC {src} and holds images condkit did not make "
                    f"(e.g. {rel}), which are sources; choose an output folder outside SRC"
                )


def check_no_map_on_a_source(jobs: list[tuple[Path, Path]]) -> None:
    """Refuse a run in which a map would be written over one of its sources or another map.

    Args:
        jobs: (source, map) pairs, resolved.

    Raises:
        UserError: naming the file that would be overwritten and the image(s) mapped onto it.
    """
    sources = {source.resolve() for source, _ in jobs}
    made_from: dict[Path, Path] = {}
    for source, target in jobs:
        if target.resolve() in sources:
            raise UserError(
                f"{target.resolve()}: the map of {source} would overwrite this source image; "
                "choose an output folder outside SRC"
            )
        if target in made_from:  # a.jpg + a.png get a.jpg.png, and so would a source a.jpg.png
            raise UserError(f"{target}: both {made_from[target]} and {source} would be mapped to this file; rename one")
        made_from[target] = source


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
    except UserError as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        return source, reason.removeprefix(f"{source}: ")  # the summary names the file itself
    except Exception as exc:  # any other failure of one file (cv2.error, a bug) must not stop the batch
        lines = str(exc).strip().splitlines()
        name = "cv2.error" if isinstance(exc, cv2.error) else type(exc).__name__
        reason = f"{name}: {lines[0]}" if lines else name
        return source, reason.replace(f"{source}: ", "")


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
        force: redo maps even when they are up to date.
        workers: processes; default one per CPU core; 1 runs in this process.
        suffixes: file suffixes treated as images.
        progress: show a tqdm progress bar on stderr.
        rgb_png: write 3-channel PNGs even for gray maps (see :func:`write_png`).
        **options: options of the preprocessor (e.g. ``low_threshold=50``).

    Returns:
        A :class:`Summary`; files that failed are listed in ``summary.failed``.

    Raises:
        UserError: unknown kind or option, a resolution above the limit, SRC missing,
            DST that is SRC, a file or the folder of an image SRC, DST inside SRC
            holding images that are not its maps, or a map that would overwrite a source.
    """
    start = time.perf_counter()
    made = get_preprocessor(kind, **options)  # fail fast on a bad kind or option, before any work
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    src, dst = src.resolve(), dst.resolve()
    check_destination(src, dst)
    maps = read_manifest(dst)
    check_no_sources_in_dst(src, dst, maps, suffixes)
    jobs, ignored = plan(src, dst, suffixes)
    check_no_map_on_a_source(jobs)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{dst}: cannot create the output folder ({exc.strerror or exc})") from None
    recipe = made.made_by()
    made_by = None if recipe is None else {**recipe, "rgb_png": rgb_png}
    summary = Summary(ignored=[str(p) for p in ignored])
    todo, inputs = [], {}
    for source, target in jobs:
        inputs[target] = input_stamps(made, source)  # taken before the map is made
        rel = target.relative_to(dst).as_posix()
        if not force and is_up_to_date(maps.get(rel), made_by, inputs[target], target):
            summary.skipped.append(str(target))
        else:
            todo.append((source, target))
    record = Recorder(dst, maps, made_by, inputs)
    try:
        _run_all(kind, options, rgb_png, todo, workers, progress, summary, record)
    except BaseException:
        record.save(quiet=True)  # keep what was made before the interruption
        raise
    record.save()
    summary.failed.sort()
    summary.seconds = time.perf_counter() - start
    return summary


@dataclasses.dataclass
class Recorder:
    """Adds each map made to the manifest records and saves them.

    Attributes:
        dst: the output folder.
        maps: the manifest's records (relative map path -> record), updated in place.
        made_by: what makes this run's maps (None: not recordable, nothing is recorded).
        inputs: map path -> stamps of its input files, taken before it was made.
        changed: whether the records differ from the file on disk.
    """

    dst: Path
    maps: dict[str, dict[str, Any]]
    made_by: dict[str, Any] | None
    inputs: dict[Path, dict]
    changed: bool = False

    def add(self, target: Path) -> None:
        """Record a map just written."""
        rel = target.relative_to(self.dst).as_posix()
        self.maps.pop(rel, None)
        self.changed = True
        if self.made_by is not None:
            self.maps[rel] = {"made_by": self.made_by, "inputs": self.inputs[target], "map": file_stamp(target)}

    def save(self, quiet: bool = False) -> None:
        """Write the manifest if anything changed.

        Args:
            quiet: ignore a failed write (while another error is being reported).
        """
        if not self.changed:
            return
        try:
            write_manifest(self.dst, self.maps)
        except UserError:
            if not quiet:
                raise


def _run_all(
    kind: str,
    options: dict[str, Any],
    rgb_png: bool,
    todo: list[tuple[Path, Path]],
    workers: int | None,
    progress: bool,
    summary: Summary,
    record: Recorder,
) -> None:
    """Make the maps of ``todo`` in this process or a pool; results go to ``summary``."""
    workers = min(workers or default_workers(), max(1, len(todo)))
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", desc=kind, disable=not progress or not todo)
    try:
        if workers == 1:
            _init_worker(kind, options, rgb_png)
            _collect(map(_run_one, todo), todo, summary, bar, record)
            return
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
                _collect(pool.imap_unordered(_run_one, todo, chunksize=chunk), todo, summary, bar, record)
        finally:
            cv2.setNumThreads(threads)
    finally:
        bar.close()


def _collect(results: Iterable[tuple[Path, str | None]], todo: list, summary: Summary, bar: Any, record: Recorder) -> None:
    targets = dict(todo)
    for source, error in results:
        if error is None:
            summary.done.append(str(targets[source]))
            record.add(targets[source])
        else:
            summary.failed.append((str(source), error))
        bar.update(1)
