"""The input options of the verbs that read a trace (``--from``, ``--batch-size``,
``--tables``, ...), the trace they open, and ``--table-map``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.cli.argtypes import positive_int
from tiermem.errors import ConfigError

__all__ = ["RenamedTrace", "add_source_options", "open_source", "open_trace", "table_map"]


def open_source(args: argparse.Namespace, paths: Sequence[str]) -> Any:
    """The trace in ``paths``, read as the input options say (the format sniffed unless
    ``--from`` names it: :func:`traces.formats.open_source`)."""
    from traces.formats import open_source as open_trace_source

    labelled = None if args.labelled == "auto" else args.labelled == "yes"
    return open_trace_source(paths, args.source, batch_size=args.batch_size,
                             tables=args.tables, rows=args.rows, on_error=args.on_error,
                             labelled=labelled, missing_id=args.missing_id,
                             max_samples=args.max_samples)


def open_trace(args: argparse.Namespace) -> Any:
    """The trace of ``--trace`` (one path or several), which must exist."""
    paths = [args.trace] if isinstance(args.trace, str) else list(args.trace)
    for p in paths:
        if not Path(p).exists():
            raise ConfigError(f"trace {p} does not exist")
    return open_source(args, paths)


def add_source_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    from traces.formats.registry import FORMATS  # names only: no numpy, no Numba

    g.add_argument("--from", dest="source", choices=list(FORMATS), default=None,
                   help="input format (default: a directory is native, *.pt[.gz] is Meta "
                        "dlrm_datasets, anything else Criteo TSV)")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="re-cut into batches of this many samples (Criteo default 2048; "
                        "native/Meta default: as stored)")
    g.add_argument("--tables", default=None,
                   help="tables to keep: Meta/Criteo 0-based indices '0,3,7'; native names")
    g.add_argument("--rows", default=None,
                   help="table rows: Meta 'r0,r1,...' for the kept tables (default max id + 1); "
                        "Criteo a preset (criteo_kaggle [default], criteo_terabyte, dlrmv2, "
                        "criteo_terabyte_40m, criteo_terabyte_10m) or 26 counts")
    g.add_argument("--labelled", choices=["auto", "yes", "no"], default="auto",
                   help="Criteo: lines start with a label (train) or not (Kaggle test)")
    g.add_argument("--missing-id", type=int, default=0,
                   help="Criteo: row for a missing categorical value (default 0)")
    g.add_argument("--max-samples", type=positive_int, default=None,
                   help="Criteo: stop after this many samples")
    g.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="malformed records: stop with an error (default) or skip and count")


def table_map(s: str | None) -> dict[str, str] | None:
    """``--table-map TRACE=STORE,...`` as a dict (None when not given)."""
    if not s:
        return None
    out = {}
    for item in s.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ConfigError(f"bad --table-map entry {item!r}: expected trace_name=store_name")
        a, b = item.split("=", 1)
        out[a.strip()] = b.strip()
    return out


class RenamedTrace:
    """A trace whose table names go through ``--table-map`` (``tune`` on a store's names)."""

    def __init__(self, trace: Any, table_map: dict[str, str]) -> None:
        self.trace = trace
        keys = tuple(trace.keys)
        bad = [k for k in table_map if k not in keys]
        if bad:
            raise ConfigError(f"--table-map names trace table(s) {bad[:8]} that the trace "
                              f"lacks; trace tables: {list(keys)[:16]}")
        self.map = table_map
        self.keys = tuple(table_map.get(k, k) for k in keys)
        if len(set(self.keys)) != len(self.keys):
            raise ConfigError(f"--table-map sends two trace tables to one table: {self.keys}")

    @property
    def rows(self) -> Any:
        return self.trace.rows

    def __len__(self) -> int:
        return len(self.trace)

    def __iter__(self) -> Any:
        from tiermem.features import SparseFeatures
        from traces.formats import TraceBatch

        for b in self.trace:
            d, sf, lab = b if isinstance(b, TraceBatch) else (None, b, None)
            yield TraceBatch(d, SparseFeatures(self.keys, sf.values, sf.offsets, sf.weights)
                             if sf.keys != self.keys else sf, lab)
