"""The trace formats, in the order :func:`sniff` asks them, and opening any of them.

A new format is a module with a :class:`~traces.formats.base.Trace` and a
:class:`~traces.formats.base.TraceFormat` entry, plus its line in
:data:`FORMATS`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tiermem.errors import ConfigError
from traces.formats.base import Trace, TraceFormat, input_paths
from traces.formats.criteo import FORMAT as CRITEO
from traces.formats.meta import FORMAT as META
from traces.formats.native import FORMAT as NATIVE

__all__ = ["FORMATS", "open_source", "sniff"]

FORMATS: dict[str, TraceFormat] = {f.name: f for f in (
    NATIVE,
    META,
    CRITEO,  # claims anything: last
)}
"""Name -> format; :func:`sniff` asks them in this order."""

_OPTIONS = frozenset().union(*(f.options for f in FORMATS.values()))

Paths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def sniff(paths: Paths) -> str:
    """The name of the first format that claims ``paths`` (a directory is a native
    trace, ``*.pt[.gz]`` Meta files, anything else Criteo TSV)."""
    found = input_paths(paths)
    return next(name for name, f in FORMATS.items() if f.claims(found))


def open_source(paths: Paths, format: str | None = None, **options: Any) -> Trace:
    """Open a trace in ``format`` (None: :func:`sniff` it) with the reader's options.

    ``options``: ``batch_size``, ``tables``, ``rows``, ``on_error``, and for
    Criteo ``labelled``, ``missing_id``, ``max_samples``; ``tables`` and
    ``rows`` may be text as the CLI has them (``"0,3,7"``, a preset name).
    An option that is None, or that the chosen format does not take, is left
    out, so one set of options serves every format; an unknown name is an
    error.
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ConfigError(f"unknown trace option(s) {unknown}; known: {sorted(_OPTIONS)}")
    found = input_paths(paths)
    name = format or sniff(found)
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ConfigError(f"unknown trace format {name!r}: expected one of {list(FORMATS)}")
    return fmt.open(found, **{k: v for k, v in options.items()
                              if v is not None and k in fmt.options})
