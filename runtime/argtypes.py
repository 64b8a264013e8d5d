"""argparse value types shared by every ``tiermem`` subcommand."""

from __future__ import annotations

import argparse

__all__ = ["nonneg_int", "positive_int"]


def _int(s: str, lo: int, what: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def positive_int(s: str) -> int:
    """An integer >= 1."""
    return _int(s, 1, "a positive integer")


def nonneg_int(s: str) -> int:
    """An integer >= 0."""
    return _int(s, 0, "an integer >= 0")
