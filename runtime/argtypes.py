"""argparse value types shared by every ``tiermem`` subcommand."""

from __future__ import annotations

import argparse

__all__ = ["nonneg_int", "port", "positive_int", "threads"]


def _int(s: str, lo: int, what: str, hi: int | None = None) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def positive_int(s: str) -> int:
    """An integer >= 1."""
    return _int(s, 1, "a positive integer")


def nonneg_int(s: str) -> int:
    """An integer >= 0."""
    return _int(s, 0, "an integer >= 0")


def port(s: str) -> int:
    """A TCP port, 0..65535 (0: the system picks a free one)."""
    return _int(s, 0, "a port number 0..65535", hi=65535)


def threads(s: str) -> int | str:
    """``auto`` (the cores other processes leave idle, per batch) or an integer >= 1."""
    if s.strip().lower() == "auto":
        return "auto"
    return _int(s, 1, "'auto' or a positive integer")
