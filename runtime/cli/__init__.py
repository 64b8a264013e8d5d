"""The ``tiermem`` command (see :mod:`runtime.cli.app`)."""

from runtime.cli.app import main

__all__ = ["main"]
