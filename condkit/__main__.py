"""``python -m condkit`` runs the CLI."""

from condkit.cli import entry_point

entry_point()
