"""The one error type a user can cause.

Everything that a user can get wrong (a path, a recipe key, a file that is not an
adapter) raises :class:`UserError` with a one-line message naming the file, key or
value. The CLI prints it as ``condkit: error: <message>`` and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
