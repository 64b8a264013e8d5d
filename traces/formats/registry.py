"""The trace formats, in the order :func:`sniff` asks them, and opening any of them.

A new format is a module with a :class:`~traces.formats.base.Trace` and its
:class:`~traces.formats.base.TraceFormat` entry ``FORMAT``, plus its line in
:data:`FORMATS`. The names cost no import (the ``tiermem`` command lists them
in ``--from``); a format's module loads when it is asked.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tiermem.errors import ConfigError

if TYPE_CHECKING:
    from traces.formats.base import Trace, TraceFormat

__all__ = ["FORMATS", "open_source", "sniff", "trace_format"]

FORMATS: dict[str, str] = {
    "native": "traces.formats.native",
    "meta": "traces.formats.meta",
    "criteo": "traces.formats.criteo",  # claims anything: last
}
"""Format name -> the module defining its ``FORMAT``; :func:`sniff` asks them in this order."""

Paths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def trace_format(name: str) -> TraceFormat:
    """The registry entry of format ``name``."""
    module = FORMATS.get(name)
    if module is None:
        raise ConfigError(f"unknown trace format {name!r}: expected one of {list(FORMATS)}")
    fmt: TraceFormat = importlib.import_module(module).FORMAT
    return fmt


def sniff(paths: Paths) -> str:
    """The name of the first format that claims ``paths`` (a directory is a native
    trace, ``*.pt[.gz]`` Meta files, anything else Criteo TSV)."""
    from traces.formats.base import input_paths

    found = input_paths(paths)
    return next(name for name in FORMATS if trace_format(name).claims(found))


def open_source(paths: Paths, format: str | None = None, **options: Any) -> Trace:
    """Open a trace in ``format`` (None: :func:`sniff` it) with the reader's options.

    ``options``: ``batch_size``, ``tables``, ``rows``, ``on_error``, and for
    Criteo ``labelled``, ``missing_id``, ``max_samples``; ``tables`` and
    ``rows`` may be text as the CLI has them (``"0,3,7"``, a preset name).
    An option that is None, or that the chosen format does not take, is left
    out, so one set of options serves every format; an unknown name is an
    error.
    """
    from traces.formats.base import input_paths

    known = frozenset().union(*(trace_format(n).options for n in FORMATS))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown trace option(s) {unknown}; known: {sorted(known)}")
    found = input_paths(paths)
    fmt = trace_format(format or sniff(found))
    return fmt.open(found, **{k: v for k, v in options.items()
                              if v is not None and k in fmt.options})
