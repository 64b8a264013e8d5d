"""Lookup traces: the native format, Meta's dlrm_datasets files, Criteo TSV.

Every reader is a :class:`Trace`: an iterable of :class:`TraceBatch`
``(dense, sparse, labels)`` per batch (``dense``: ``(B, num_dense)`` float32
or None; ``sparse``: :class:`~tiermem.features.SparseFeatures`; ``labels``:
``(B,)`` float32 or None), plus ``keys`` (table names) and ``rows`` (row
count per table; None where a reader cannot know it without a full pass).
Batches are produced one at a time: a trace larger than memory replays in
the memory of one batch (Meta files: of one file, see :class:`MetaTrace`).

One module per format (:mod:`~traces.formats.native`,
:mod:`~traces.formats.meta`, :mod:`~traces.formats.criteo`) over the shared
:mod:`~traces.formats.base` and :mod:`~traces.formats.batch`;
:mod:`~traces.formats.registry` lists them for :func:`sniff` and
:func:`open_source`.

Errors
------
Malformed input raises :class:`TraceFormatError` naming the file, the line
(text formats) or batch/bag (binary formats), and the reason. With
``on_error="skip"`` readers drop the bad record (a TSV line; a Meta sample
with out-of-range ids; a whole batch whose structure is broken), count it in
``skipped`` and keep the first reasons in ``skip_reasons``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tiermem._lazy import lazy_names
from traces.formats.registry import FORMATS, open_source, sniff, trace_format

if TYPE_CHECKING:
    from traces.formats.base import OnError, Trace, TraceFormat, TraceFormatError
    from traces.formats.batch import (
        TraceBatch,
        concat_batches,
        rebatch,
        slice_batch,
        sparse_of,
    )
    from traces.formats.criteo import CriteoTrace
    from traces.formats.meta import MetaTrace
    from traces.formats.native import (
        NativeTrace,
        TraceWriter,
        convert_trace,
        open_trace,
        write_trace,
    )

# loaded on first use: the registry (format names, sniff) costs no numpy or Numba
_LAZY = {
    **dict.fromkeys(["OnError", "Trace", "TraceFormat", "TraceFormatError"],
                    "traces.formats.base"),
    **dict.fromkeys(["TraceBatch", "concat_batches", "rebatch", "slice_batch", "sparse_of"],
                    "traces.formats.batch"),
    "CriteoTrace": "traces.formats.criteo",
    "MetaTrace": "traces.formats.meta",
    **dict.fromkeys(["NativeTrace", "TraceWriter", "convert_trace", "open_trace",
                     "write_trace"], "traces.formats.native"),
}

__getattr__, __dir__ = lazy_names("traces.formats", _LAZY, globals())

__all__ = [
    "FORMATS",
    "CriteoTrace",
    "MetaTrace",
    "NativeTrace",
    "OnError",
    "Trace",
    "TraceBatch",
    "TraceFormat",
    "TraceFormatError",
    "TraceWriter",
    "concat_batches",
    "convert_trace",
    "open_source",
    "open_trace",
    "rebatch",
    "slice_batch",
    "sniff",
    "sparse_of",
    "trace_format",
    "write_trace",
]
