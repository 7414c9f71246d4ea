"""``condkit preprocess KIND SRC DST``: a folder of images to a folder of condition maps."""

from __future__ import annotations

import argparse
import sys

from condkit.errors import UserError

KINDS_HELP = (
    "canny (edges, 100/200), softedge/hed (soft edges), scribble (thick strokes), mlsd/lines "
    "(straight lines), shuffle (content shuffle), tile (blurred), color/palette (colour blocks), "
    "inpaint (masked image from alpha or mask=FILE), openpose/pose (OpenPose body map)"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``preprocess`` subcommand.

    Args:
        subparsers: the top-level parser's subparsers.
    """
    parser = subparsers.add_parser(
        "preprocess",
        help="make ControlNet condition maps (canny, pose, ...) for a folder of images",
        description=(
            "Make a PNG condition map for every image under SRC (recursively) in DST, keeping "
            "relative paths and stems. Runs on all CPU cores and writes atomically. A map is "
            "skipped as up to date only when DST's manifest (.condkit-preprocess.json) says it "
            "was made from the same source files by the same KIND and options; any other map is "
            "made again. A file that fails for any reason is listed as 'failed: PATH: reason' and "
            "the rest go on (exit code 1). SRC is never modified: DST may not be SRC, a file, "
            "the folder of an image SRC, or a folder inside SRC holding images it did not make, "
            "and no map may land on a source."
        ),
        epilog=f"KIND: {KINDS_HELP}. Example: condkit preprocess canny photos/ maps/canny --opt low_threshold=50",
    )
    parser.add_argument("kind", metavar="KIND", help="preprocessor name (see below)")
    parser.add_argument("src", metavar="SRC", help="folder of images (searched recursively) or one image")
    parser.add_argument("dst", metavar="DST", help="output folder for the PNG maps")
    parser.add_argument("--force", action="store_true", help="redo maps even when they are up to date")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU core)")
    # The numbers of preprocessors.registry.MAX_RESOLUTION / MAX_MAP_PIXELS, written out so
    # that building the CLI does not import OpenCV (a test checks they agree).
    limits = "8..4096; a map or detection image may have at most 4096 x 8192 px"
    parser.add_argument(
        "--detect-resolution", type=int, default=None, help=f"short side used for detection (px, {limits})"
    )
    parser.add_argument("--image-resolution", type=int, default=None, help=f"short side of the output maps (px, {limits})")
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a preprocessor option, e.g. --opt low_threshold=50 --opt auto=true (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--rgb-png", action="store_true", help="write 3-channel PNGs even for gray maps (default: gray maps as 8-bit gray PNG)"
    )
    parser.set_defaults(run=run)


def parse_options(pairs: list[str]) -> dict[str, str]:
    """Turn ``["key=value", ...]`` into a dict.

    Args:
        pairs: the ``--opt`` values.

    Raises:
        UserError: an item without ``=``.
    """
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--opt {pair!r}: expected KEY=VALUE")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def run(args: argparse.Namespace) -> int:
    """Run the batch and print failures and a summary; 1 when any file failed."""
    from condkit.preprocessors import preprocess_folder

    options: dict[str, object] = parse_options(args.opt)
    if args.detect_resolution is not None:
        options["detect_resolution"] = args.detect_resolution
    if args.image_resolution is not None:
        options["image_resolution"] = args.image_resolution
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    summary = preprocess_folder(
        args.kind, args.src, args.dst, force=args.force, workers=args.workers, progress=not args.no_progress, rgb_png=args.rgb_png, **options
    )
    for path, reason in summary.failed:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    print(summary.line())
    return 0 if summary.ok else 1
