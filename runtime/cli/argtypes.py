"""argparse value types shared by every ``tiermem`` subcommand."""

from __future__ import annotations

import argparse
import math

__all__ = ["byte_size", "fraction", "nonneg_float", "nonneg_int", "port", "positive_float",
           "positive_int", "threads"]


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


def _float(s: str, what: str, ok: object) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if not ok(v) or not math.isfinite(v):  # type: ignore[operator]
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return v


def positive_float(s: str) -> float:
    """A finite number > 0."""
    return _float(s, "a number > 0", lambda v: v > 0)


def nonneg_float(s: str) -> float:
    """A finite number >= 0."""
    return _float(s, "a number >= 0", lambda v: v >= 0)


def fraction(s: str) -> float:
    """A number in [0, 1]."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1], got {v}")
    return v


def byte_size(s: str) -> int:
    """Bytes: ``1048576``, ``256MiB``, ``2GB``."""
    from tiermem.config import parse_bytes
    from tiermem.errors import ConfigError

    try:
        return parse_bytes(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
