"""The one error type a user can cause, and how commands report it.

Everything that a user can get wrong (a path, a recipe key, a file that is not an
adapter) raises :class:`UserError` with a one-line message naming the file, key or
value. The CLI prints it as ``condkit: error: <message>`` and exits with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def report_user_errors(run: Callable[[], int], debug: bool = False) -> int:
    """Run a command; a :class:`UserError` becomes one stderr line and exit code 2.

    Args:
        run: the command's body, returning its exit code.
        debug: re-raise instead (``--debug``: show the traceback).

    Returns:
        The exit code: ``run``'s, 2 for a user error, 130 when interrupted.
    """
    try:
        return run()
    except UserError as exc:
        if debug:
            raise
        print(f"condkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("condkit: interrupted", file=sys.stderr)
        return 130
