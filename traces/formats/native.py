"""The native trace format: a directory of npz batches and a ``trace.json``.

Native format (version 1)
-------------------------
A directory::

    TRACE/
      trace.json              metadata, written last
      batches/000000.npz      one uncompressed (or deflated) npz per batch
      batches/000001.npz
      ...

``trace.json``::

    {"format": "tiermem-trace", "version": 1,
     "keys": ["t0", "t1", ...],            table names, in batch order
     "rows": [1000, 5000, ...],            rows per table (declared, or max id + 1)
     "num_batches": N, "num_samples": S, "num_lookups": L,
     "batch_sizes": [B0, B1, ...],         samples per batch
     "num_dense": D,                       0 = no dense features
     "has_labels": bool, "has_weights": bool,
     "attrs": {...}}                       free-form provenance (source, generator config)

``batches/%06d.npz`` (batch ``i``, ``B`` samples, ``T`` tables), KeyedJaggedTensor
layout, i.e. per table CSR concatenated table-major::

    values   int64 (nnz,)      ids of table 0 for samples 0..B-1, then table 1, ...
    offsets  int64 (T*B+1,)    bag b of table t is values[offsets[t*B+b]:offsets[t*B+b+1]]
    weights  float32 (nnz,)    optional, per-lookup weights
    dense    float32 (B, D)    optional
    labels   float32 (B,)      optional

Table ``t`` alone is ``values[offsets[t*B]:offsets[(t+1)*B]]`` with offsets
``offsets[t*B:(t+1)*B+1] - offsets[t*B]``. A trace is written into
the hidden ``.TRACE.tmp-PID-*`` and renamed into place by
:meth:`TraceWriter.close`, so a crashed write never leaves a directory that
looks complete; the next write of the same trace removes it once PID is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tiermem.atomicio import chmod_default
from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures
from traces.formats.base import (
    OnError,
    Trace,
    TraceFormat,
    TraceFormatError,
    parse_on_error,
)
from traces.formats.batch import TraceBatch, rebatch

__all__ = ["FORMAT", "FORMAT_NAME", "FORMAT_VERSION", "NativeTrace", "TraceWriter",
           "convert_trace", "open_trace", "write_trace"]

FORMAT_NAME = "tiermem-trace"
FORMAT_VERSION = 1


class TraceWriter:
    """Write a native trace batch by batch; atomic (temp directory + rename).

    Parameters
    ----------
    path : path
        The trace directory to create.
    keys : sequence of str
        Table names.
    rows : sequence of int, optional
        Declared rows per table: ids are checked against them. None: the
        metadata records max id + 1 per table, observed while writing.
    num_dense : int
        Dense features per sample (0: batches carry no dense features).
    overwrite : bool
        Replace an existing trace at ``path``.
    compress : bool
        Deflate the npz files (smaller, slower).
    attrs : dict, optional
        Free-form JSON-able provenance stored in ``trace.json``.

    Use as a context manager; an exception inside the block discards the
    partial trace.
    """

    def __init__(self, path: str | os.PathLike[str], keys: Sequence[str],
                 rows: Sequence[int] | None = None, *, num_dense: int = 0,
                 overwrite: bool = False, compress: bool = False,
                 attrs: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.keys = tuple(keys)
        if not self.keys or len(set(self.keys)) != len(self.keys):
            raise ConfigError(f"keys must be non-empty and distinct, got {list(self.keys)}")
        if rows is not None:
            rows = [int(r) for r in rows]
            if len(rows) != len(self.keys) or min(rows) < 1:
                raise ConfigError(f"rows must give one count >= 1 per table, got {rows}")
        self._declared = rows
        self._max = np.full(len(self.keys), -1, np.int64)
        if num_dense < 0:
            raise ConfigError(f"Expected num_dense >= 0. Got {num_dense} instead.")
        self.num_dense = int(num_dense)
        self.overwrite = overwrite
        self.compress = compress
        self.attrs = dict(attrs or {})
        if self.path.exists() and not overwrite:
            raise ConfigError(f"{self.path} exists "
                              "(pass overwrite=True / --overwrite to replace it)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from tiermem.format import clean_stale_temps

        clean_stale_temps(self.path)  # what interrupted writes of this trace left
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-",
                                          dir=self.path.parent))
        chmod_default(self._tmp, directory=True)  # mkdtemp's 0700 would outlive the rename
        (self._tmp / "batches").mkdir()
        self._sizes: list[int] = []
        self._lookups = 0
        self._labels: bool | None = None
        self._weights: bool | None = None
        self._closed = False

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, sparse: SparseFeatures | TraceBatch, dense: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> None:
        """Add one batch (a TraceBatch, or its parts)."""
        if self._closed:
            raise ConfigError("the writer is closed")
        if isinstance(sparse, TraceBatch):
            dense, sparse, labels = sparse
        i = len(self._sizes)
        if sparse.keys != self.keys:
            raise InvalidBatchError(f"batch {i}: tables {list(sparse.keys)}, expected "
                                    f"{list(self.keys)}")
        b = sparse.batch_size
        if self._declared is not None:
            try:
                sparse.validate_ids(self._declared)
            except InvalidBatchError as e:
                raise TraceFormatError(f"{self.path} batch {i}: {e}") from None
        arrays: dict[str, np.ndarray] = {"values": sparse.values, "offsets": sparse.offsets}
        for t in range(len(self.keys)):
            s, end = sparse.table_range(t)
            if end > s:
                self._max[t] = max(self._max[t], int(sparse.values[s:end].max()))
        if sparse.values.size and sparse.values.min() < 0:
            raise TraceFormatError(f"{self.path} batch {i}: negative id")
        for name, arr, flag in (("weights", sparse.weights, "_weights"),
                                ("labels", labels, "_labels")):
            have = arr is not None
            if getattr(self, flag) is None:
                setattr(self, flag, have)
            elif getattr(self, flag) != have:
                raise InvalidBatchError(f"batch {i}: {name} present in some batches only")
        if sparse.weights is not None:
            arrays["weights"] = sparse.weights
        if self.num_dense:
            if dense is None:
                raise InvalidBatchError(f"batch {i}: no dense features, expected {self.num_dense}")
            d = np.asarray(dense, np.float32)
            if d.shape != (b, self.num_dense):
                raise InvalidBatchError(f"batch {i}: dense has shape {d.shape}, expected "
                                        f"{(b, self.num_dense)}")
            arrays["dense"] = d
        if labels is not None:
            lab = np.asarray(labels, np.float32).reshape(-1)
            if lab.size != b:
                raise InvalidBatchError(f"batch {i}: {lab.size} labels for {b} samples")
            arrays["labels"] = lab
        save = np.savez_compressed if self.compress else np.savez
        # (no key is savez's allow_pickle: mypy cannot tell from the dict's type)
        save(self._tmp / "batches" / f"{i:06d}.npz", **arrays)  # type: ignore[arg-type]
        self._sizes.append(b)
        self._lookups += int(sparse.values.size)

    def close(self) -> Path:
        """Write ``trace.json`` and move the trace into place."""
        if self._closed:
            return self.path
        rows = self._declared if self._declared is not None else [
            int(m) + 1 if m >= 0 else 1 for m in self._max]
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "keys": list(self.keys),
                "rows": rows, "num_batches": len(self._sizes),
                "num_samples": int(sum(self._sizes)), "num_lookups": self._lookups,
                "batch_sizes": self._sizes, "num_dense": self.num_dense,
                "has_labels": bool(self._labels), "has_weights": bool(self._weights),
                "attrs": self.attrs}
        with open(self._tmp / "trace.json", "w") as f:
            json.dump(meta, f, indent=1)
        if self.path.exists():
            if not self.overwrite:
                self.abort()
                raise ConfigError(f"{self.path} appeared while writing")
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-{os.getpid()}-",
                                        dir=self.path.parent))
            os.replace(self.path, old / "x")
            os.replace(self._tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Discard the partial trace."""
        if not self._closed:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._closed = True


def write_trace(path: str | os.PathLike[str], batches: Iterable[TraceBatch | SparseFeatures], *,
                keys: Sequence[str] | None = None, rows: Sequence[int] | None = None,
                num_dense: int | None = None, overwrite: bool = False, compress: bool = False,
                attrs: dict[str, Any] | None = None, progress: bool = False,
                total: int | None = None) -> Path:
    """Write ``batches`` as a native trace; ``keys``/``num_dense`` default to the first batch's.

    ``progress``: a tqdm bar on stderr (``total`` batches, when known).
    """
    from tqdm.auto import tqdm

    writer: TraceWriter | None = None
    bar = tqdm(total=total, desc="write trace", unit="batch", disable=not progress,
               leave=False)
    try:
        for x in batches:
            tb = x if isinstance(x, TraceBatch) else TraceBatch(None, x, None)
            if writer is None:
                nd = num_dense if num_dense is not None else (
                    0 if tb.dense is None else int(np.shape(tb.dense)[1]))
                writer = TraceWriter(path, keys or tb.sparse.keys, rows, num_dense=nd,
                                     overwrite=overwrite, compress=compress, attrs=attrs)
            writer.append(tb)
            bar.update(1)
        bar.close()
        if writer is None:
            if keys is None:
                raise ConfigError("no batches to write and no keys given")
            writer = TraceWriter(path, keys, rows, num_dense=num_dense or 0,
                                 overwrite=overwrite, compress=compress, attrs=attrs)
        return writer.close()
    except BaseException:
        bar.close()
        if writer is not None:
            writer.abort()
        raise


class NativeTrace(Trace):
    """Read a native trace directory, one batch file at a time.

    Parameters
    ----------
    path : path
        The trace directory.
    batch_size : int, optional
        Re-cut into batches of this many samples (default: as stored).
    tables : sequence of str, optional
        Keep only these tables, in this order.
    validate : bool
        Check every batch's offsets and ids against the recorded rows.
    on_error : "raise" or "skip"
        Skip (and count) broken batches instead of raising.
    """

    def __init__(self, path: str | os.PathLike[str], *, batch_size: int | None = None,
                 tables: Sequence[str] | None = None, validate: bool = True,
                 on_error: str | OnError = OnError.RAISE, drop_last: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        meta_path = self.path / "trace.json"
        if not meta_path.is_file():
            raise TraceFormatError(f"{self.path}: not a tiermem trace (no trace.json; an "
                                   "interrupted write leaves only a hidden .NAME.tmp-* directory)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise TraceFormatError(f"{meta_path}: unreadable metadata ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise TraceFormatError(f"{meta_path}: format is not {FORMAT_NAME!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise TraceFormatError(f"{meta_path}: version {meta.get('version')!r} is not "
                                   f"supported (this reader knows {FORMAT_VERSION})")
        try:
            self.stored_keys = tuple(str(k) for k in meta["keys"])
            self._rows_all = tuple(int(r) for r in meta["rows"])
            self.batch_sizes = [int(b) for b in meta["batch_sizes"]]
            self.num_dense = int(meta["num_dense"])
            self.has_labels = bool(meta["has_labels"])
            self.has_weights = bool(meta.get("has_weights", False))
            self.attrs = dict(meta.get("attrs", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise TraceFormatError(f"{meta_path}: missing or bad field ({e!r})") from None
        if len(self._rows_all) != len(self.stored_keys):
            raise TraceFormatError(f"{meta_path}: {len(self._rows_all)} rows for "
                                   f"{len(self.stored_keys)} keys")
        if tables is not None:
            bad = [k for k in tables if k not in self.stored_keys]
            if bad:
                raise ConfigError(f"trace {self.path} has no tables {bad}; it has "
                                  f"{list(self.stored_keys)}")
        self.keys = tuple(tables) if tables is not None else self.stored_keys
        self.batch_size = batch_size
        self.validate = validate
        self.on_error = parse_on_error(on_error)
        self.drop_last = drop_last

    @property
    def rows(self) -> tuple[int, ...]:
        return tuple(self._rows_all[self.stored_keys.index(k)] for k in self.keys)

    @property
    def num_batches(self) -> int:
        """Stored batches (before any re-batching)."""
        return len(self.batch_sizes)

    def __len__(self) -> int:
        if self.batch_size is None:
            return self.num_batches
        n = sum(self.batch_sizes)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def read_batch(self, i: int) -> TraceBatch:
        """Stored batch ``i`` (all checks applied; raises on error)."""
        f = self.path / "batches" / f"{i:06d}.npz"
        where = f"{f} (batch {i})"
        try:
            with np.load(f, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise TraceFormatError(f"{where}: missing batch file (truncated trace?)") from None
        except Exception as e:  # zipfile / pickle / value errors of a damaged file
            raise TraceFormatError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
        for need in ("values", "offsets"):
            if need not in data:
                raise TraceFormatError(f"{where}: no {need!r} array")
        try:
            sf = SparseFeatures(self.stored_keys, data["values"], data["offsets"],
                                data.get("weights"))
        except InvalidBatchError as e:
            raise TraceFormatError(f"{where}: {e}") from None
        if sf.batch_size != self.batch_sizes[i]:
            raise TraceFormatError(f"{where}: {sf.batch_size} samples, metadata says "
                                   f"{self.batch_sizes[i]}")
        if self.validate:
            try:
                sf.validate_ids(self._rows_all)
            except InvalidBatchError as e:
                raise TraceFormatError(f"{where}: {e}") from None
        dense = data.get("dense")
        if self.num_dense and (dense is None or dense.shape != (sf.batch_size, self.num_dense)):
            raise TraceFormatError(f"{where}: dense features missing or of the wrong shape")
        labels = data.get("labels")
        if self.has_labels and (labels is None or labels.shape != (sf.batch_size,)):
            raise TraceFormatError(f"{where}: labels missing or of the wrong shape")
        if self.keys != self.stored_keys:
            sf = sf.select(self.keys)
        return TraceBatch(dense if self.num_dense else None, sf,
                          labels if self.has_labels else None)

    def _stored(self) -> Iterator[TraceBatch]:
        for i in range(self.num_batches):
            try:
                yield self.read_batch(i)
            except TraceFormatError as e:
                if self.on_error is OnError.RAISE:
                    raise
                self._skip(1, str(e))

    def __iter__(self) -> Iterator[TraceBatch]:
        if self.batch_size is None:
            return self._stored()
        return rebatch(self._stored(), self.batch_size, drop_last=self.drop_last)


def open_trace(path: str | os.PathLike[str], **kwargs: Any) -> NativeTrace:
    """Open a native trace (see :class:`NativeTrace` for the options)."""
    return NativeTrace(path, **kwargs)


def convert_trace(source: Trace, out: str | os.PathLike[str], *, overwrite: bool = False,
                  compress: bool = False, attrs: dict[str, Any] | None = None,
                  progress: bool = False) -> Path:
    """Stream any :class:`Trace` into a native trace at ``out`` (``progress``: a bar)."""
    a = {"source": type(source).__name__, **(attrs or {})}
    try:
        total: int | None = len(source)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return write_trace(out, iter(source), keys=source.keys, rows=source.rows,
                       num_dense=source.num_dense, overwrite=overwrite, compress=compress,
                       attrs=a, progress=progress, total=total)



def _open(paths: list[Path], *, batch_size: int | None = None,
          tables: str | Sequence[str] | None = None,
          on_error: str | OnError = OnError.RAISE) -> NativeTrace:
    if len(paths) != 1:
        raise ConfigError("a native trace is one directory")
    if isinstance(tables, str):
        tables = tables.split(",")
    return NativeTrace(paths[0], batch_size=batch_size, tables=tables, on_error=on_error)


FORMAT = TraceFormat("native", "a tiermem trace directory", lambda paths: paths[0].is_dir(),
                     _open)
