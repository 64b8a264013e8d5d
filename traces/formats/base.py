"""What every trace reader is: a :class:`Trace`, its errors, and its registry entry.

A format module defines a :class:`Trace` subclass and its :class:`TraceFormat`
``FORMAT`` (how to recognise its files, how to open them);
:mod:`traces.formats.registry` lists the formats.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from tiermem.errors import ConfigError, InvalidBatchError
from traces.formats.batch import TraceBatch

__all__ = ["MAX_SKIP_REASONS", "OnError", "Trace", "TraceFormat", "TraceFormatError",
           "input_paths", "int_list", "parse_on_error"]

MAX_SKIP_REASONS = 20
"""Reasons of ``on_error="skip"`` drops a reader keeps (the count goes on)."""


class TraceFormatError(InvalidBatchError):
    """A trace file is malformed: names the file, the line or batch, and the reason."""


class OnError(StrEnum):
    """What a reader does with a malformed record."""

    RAISE = "raise"
    SKIP = "skip"



class Trace(ABC):
    """A stream of :class:`TraceBatch` with table metadata.

    Attributes
    ----------
    keys : tuple of str
        Table names, in the order of every batch's ``sparse.keys``.
    num_dense : int
        Dense features per sample (0: none).
    skipped : int
        Records dropped so far under ``on_error="skip"``.
    skip_reasons : list of str
        The first reasons for those drops.
    """

    keys: tuple[str, ...]
    num_dense: int = 0
    has_labels: bool = False

    def __init__(self) -> None:
        self.skipped = 0
        self.skip_reasons: list[str] = []

    @property
    @abstractmethod
    def rows(self) -> tuple[int, ...] | None:
        """Rows per table, or None when unknown without a full pass."""

    @abstractmethod
    def __iter__(self) -> Iterator[TraceBatch]:
        """Yield the batches, in order."""

    def _skip(self, n: int, reason: str) -> None:
        self.skipped += n
        if len(self.skip_reasons) < MAX_SKIP_REASONS:
            self.skip_reasons.append(reason)

    def metadata(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "rows": None if self.rows is None else list(self.rows),
                "num_dense": self.num_dense, "has_labels": self.has_labels}



@dataclass(frozen=True)
class TraceFormat:
    """One input format: which files it claims and how to open them.

    A format module's ``FORMAT``, named in :data:`traces.formats.registry.FORMATS`;
    ``sniff`` asks the formats in that order, and ``open_source`` passes a
    format the options its ``open`` takes as keyword-only parameters.
    """

    name: str
    """What ``format=`` (the CLI's ``--from``) calls it."""
    summary: str
    """A few words for help texts."""
    claims: Callable[[list[Path]], bool]
    """Whether these existing paths look like this format."""
    open: Callable[..., Trace]
    """``open(paths, **options)`` -> the trace."""

    @property
    def options(self) -> frozenset[str]:
        """The keyword options ``open`` takes."""
        return frozenset(p.name for p in inspect.signature(self.open).parameters.values()
                         if p.kind is p.KEYWORD_ONLY)


def parse_on_error(v: str | OnError) -> OnError:
    """``on_error`` of a reader, checked."""
    try:
        return OnError(v)
    except ValueError:
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {v!r}") from None


def input_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """One path or several, as a non-empty list of paths that exist."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise ConfigError("no input files given")
    for p in out:
        if not p.exists():
            raise TraceFormatError(f"{p}: no such file")
    return out



def int_list(v: str | Sequence[int] | None, what: str) -> list[int] | None:
    """Integers given as text (``"0,3,7"``, as the CLI has them) or as a sequence."""
    if v is None or not isinstance(v, str):
        return None if v is None else [int(x) for x in v]
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {v!r}") from None
