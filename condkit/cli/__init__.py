"""The ``condkit`` command line: one module per subcommand.

Each module in this package defines ``add_parser(subparsers)``, which registers its
subcommand and sets ``run`` (a function ``args -> int``) as the parser default.
A :class:`~condkit.errors.UserError` ends in one line on stderr and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from condkit.errors import report_user_errors

# Subcommand modules, in the order --help lists them.
COMMAND_MODULES = ("train", "generate", "base", "inspect", "convert", "merge", "resize", "extract", "preprocess")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="condkit",
        description="Train, convert and run conditioning adapters (LoRA, ControlNet, IP-Adapter) for Stable Diffusion.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"condkit.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The process exit code.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # condkit never downloads weights
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not args.debug:
        quiet_optional_libraries()
    return report_user_errors(lambda: int(args.run(args) or 0), args.debug)


def quiet_optional_libraries() -> None:
    """Keep optional libraries' import-time notices off stderr, so an error stays one line.

    bitsandbytes (``condkit[bnb]``; peft imports it whenever it is installed) warns on
    every CPU import that an optional ``kernels`` package is missing, through a logger
    without handlers, which Python prints to stderr. Its errors still show; ``--debug``
    shows the warnings too.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main())
