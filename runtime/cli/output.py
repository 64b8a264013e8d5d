"""``--quiet``/``--no-progress`` and what they switch off: progress bars and status lines."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_progress_options", "note", "show_progress"]


def add_progress_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--quiet`` (and the older ``--no-progress``): no progress bar, no notes on stderr."""
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bar and no status lines on stderr (a progress bar is "
                        "only ever drawn when stderr is a terminal)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def show_progress(args: argparse.Namespace) -> bool:
    """A progress bar only on a terminal: a pipe or a log file gets no bar characters."""
    if getattr(args, "quiet", False) or getattr(args, "no_progress", False):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def note(args: argparse.Namespace, msg: str) -> None:
    """A status line on stderr, unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)
