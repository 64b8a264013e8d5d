"""Lookup traces: the native format, Meta's dlrm_datasets files, Criteo TSV.

Every reader is a :class:`Trace`: an iterable of :class:`TraceBatch`
``(dense, sparse, labels)`` per batch (``dense``: ``(B, num_dense)`` float32
or None; ``sparse``: :class:`~tiermem.features.SparseFeatures`; ``labels``:
``(B,)`` float32 or None), plus ``keys`` (table names) and ``rows`` (row
count per table; None where a reader cannot know it without a full pass).
Batches are produced one at a time: a trace larger than memory replays in
the memory of one batch (Meta files: of one file, see :class:`MetaTrace`).

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

Errors
------
Malformed input raises :class:`TraceFormatError` naming the file, the line
(text formats) or batch/bag (binary formats), and the reason. With
``on_error="skip"`` readers drop the bad record (a TSV line; a Meta sample
with out-of-range ids; a whole batch whose structure is broken), count it in
``skipped`` and keep the first reasons in ``skip_reasons``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from tiermem.atomicio import chmod_default
from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures

__all__ = [
    "CriteoTrace",
    "MetaTrace",
    "NativeTrace",
    "OnError",
    "Trace",
    "TraceBatch",
    "TraceFormatError",
    "TraceWriter",
    "concat_batches",
    "convert_trace",
    "open_trace",
    "rebatch",
    "slice_batch",
    "sparse_of",
    "write_trace",
]

FORMAT_NAME = "tiermem-trace"
FORMAT_VERSION = 1
_MAX_SKIP_REASONS = 20


class TraceFormatError(InvalidBatchError):
    """A trace file is malformed: names the file, the line or batch, and the reason."""


class OnError(StrEnum):
    """What a reader does with a malformed record."""

    RAISE = "raise"
    SKIP = "skip"


class TraceBatch(NamedTuple):
    """One batch of a trace; unpacks as ``dense, sparse, labels``."""

    dense: np.ndarray | None
    sparse: SparseFeatures
    labels: np.ndarray | None

    @property
    def batch_size(self) -> int:
        return self.sparse.batch_size


# -- batch surgery ---------------------------------------------------------------------

def sparse_of(batch: Any) -> SparseFeatures:
    """The sparse part of a :class:`TraceBatch`, or the batch itself if it is sparse already."""
    if isinstance(batch, SparseFeatures):
        return batch
    sp = getattr(batch, "sparse", None)
    if isinstance(sp, SparseFeatures):
        return sp
    raise InvalidBatchError(f"expected TraceBatch or SparseFeatures batches, got "
                            f"{type(batch).__name__}")


def slice_batch(batch: TraceBatch, start: int, stop: int) -> TraceBatch:
    """Samples ``[start, stop)`` of a batch (copies only those samples' ids)."""
    sf = batch.sparse
    b = sf.batch_size
    if not 0 <= start <= stop <= b:
        raise InvalidBatchError(f"sample range [{start}, {stop}) outside a batch of {b}")
    if start == 0 and stop == b:
        return batch
    vals, lens, ws = [], [], []
    for t in range(sf.num_tables):
        o = sf.offsets[t * b + start:t * b + stop + 1]
        vals.append(sf.values[o[0]:o[-1]])
        lens.append(np.diff(o))
        if sf.weights is not None:
            ws.append(sf.weights[o[0]:o[-1]])
    new = SparseFeatures.from_lengths(sf.keys, np.concatenate(vals), np.concatenate(lens),
                                      np.concatenate(ws) if ws else None)
    return TraceBatch(None if batch.dense is None else batch.dense[start:stop], new,
                      None if batch.labels is None else batch.labels[start:stop])


def concat_batches(batches: Sequence[TraceBatch]) -> TraceBatch:
    """Samples of several batches (same tables) as one batch."""
    if not batches:
        raise InvalidBatchError("no batches to concatenate")
    if len(batches) == 1:
        return batches[0]
    keys = batches[0].sparse.keys
    for x in batches[1:]:
        if x.sparse.keys != keys:
            raise InvalidBatchError(f"tables {list(x.sparse.keys)} differ from {list(keys)}")
    weighted = batches[0].sparse.weights is not None
    vals, lens, ws = [], [], []
    for t in range(len(keys)):
        for x in batches:
            sf = x.sparse
            b = sf.batch_size
            o = sf.offsets[t * b:(t + 1) * b + 1]
            vals.append(sf.values[o[0]:o[-1]])
            lens.append(np.diff(o))
            if weighted:
                if sf.weights is None:
                    raise InvalidBatchError("some batches have weights and others not")
                ws.append(sf.weights[o[0]:o[-1]])
    sf = SparseFeatures.from_lengths(keys, np.concatenate(vals), np.concatenate(lens),
                                     np.concatenate(ws) if weighted else None)

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(x, name) for x in batches]
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise InvalidBatchError(f"some batches have {name} and others not")
        return np.concatenate(parts)

    return TraceBatch(cat("dense"), sf, cat("labels"))


def rebatch(batches: Iterable[TraceBatch], batch_size: int, *,
            drop_last: bool = False) -> Iterator[TraceBatch]:
    """Re-cut a stream of batches into batches of exactly ``batch_size`` samples.

    Holds at most one output batch of pending samples; the last batch may be
    smaller unless ``drop_last``.
    """
    if batch_size < 1:
        raise ConfigError(f"Expected batch_size >= 1. Got {batch_size} instead.")
    pending: list[TraceBatch] = []
    have = 0
    for x in batches:
        b = x.batch_size
        pos = 0
        while pos < b:
            take = min(batch_size - have, b - pos)
            if take == b == batch_size and not pending:  # whole batch, exact size: no copy
                yield x
                pos = b
                break
            pending.append(slice_batch(x, pos, pos + take))
            have += take
            pos += take
            if have == batch_size:
                yield concat_batches(pending)
                pending, have = [], 0
    if pending and not drop_last:
        yield concat_batches(pending)


# -- the common interface --------------------------------------------------------------

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
        if len(self.skip_reasons) < _MAX_SKIP_REASONS:
            self.skip_reasons.append(reason)

    def metadata(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "rows": None if self.rows is None else list(self.rows),
                "num_dense": self.num_dense, "has_labels": self.has_labels}


def _on_error(v: str | OnError) -> OnError:
    try:
        return OnError(v)
    except ValueError:
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {v!r}") from None


def _paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise ConfigError("no input files given")
    for p in out:
        if not p.exists():
            raise TraceFormatError(f"{p}: no such file")
    return out


# -- native format ---------------------------------------------------------------------

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
            s, e = sparse.table_range(t)
            if e > s:
                self._max[t] = max(self._max[t], int(sparse.values[s:e].max()))
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
        save(self._tmp / "batches" / f"{i:06d}.npz", **arrays)
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
        self.on_error = _on_error(on_error)
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


# -- Meta dlrm_datasets ----------------------------------------------------------------

def _load_meta_file(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch  # only the Meta reader needs torch

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            obj = torch.load(f, weights_only=True, map_location="cpu")  # type: ignore[arg-type]
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise TraceFormatError(f"{path}: cannot read ({type(e).__name__}: {e}; truncated "
                               "or not a torch.save file?)") from None
    except Exception as e:  # unpickling / zip errors from torch.load
        raise TraceFormatError(f"{path}: not a loadable torch file ({type(e).__name__}: "
                               f"{e})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 3:
        raise TraceFormatError(f"{path}: expected a tuple (indices, offsets, lengths), got "
                               f"{type(obj).__name__}"
                               + (f" of {len(obj)}" if isinstance(obj, (tuple, list)) else ""))
    out = []
    for name, x in zip(("indices", "offsets", "lengths"), obj, strict=True):
        if not isinstance(x, torch.Tensor):
            raise TraceFormatError(f"{path}: {name} is a {type(x).__name__}, not a tensor")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TraceFormatError(f"{path}: {name} has dtype {x.dtype}, expected integers")
        out.append(x.numpy())  # a view: no copy of the file's tensors
    return out[0], out[1], out[2]


class MetaTrace(Trace):
    """Meta dlrm_datasets embedding-lookup traces (``fbgemm_t*_bs*.pt[.gz]``).

    Each file holds ``indices, offsets, lengths = torch.load(f)``: one batch
    of ``B`` samples for ``T`` tables, indices table-major then sample-major,
    ``offsets`` of length ``T*B + 1`` (table t's bags are
    ``offsets[t*B:(t+1)*B+1]``), ``lengths`` of shape ``(T, B)``.

    Parameters
    ----------
    paths : path or sequence of paths
        Files, replayed in order.
    tables : sequence of int, optional
        Table indices to keep, in this order (default: all).
    batch_size : int, optional
        Re-cut into batches of this many samples (across file boundaries;
        default: one batch per file).
    rows : sequence of int, optional
        Rows of each kept table. Ids must be below them. None: the tables'
        sizes are max id + 1, found by :attr:`rows` with a pass over all files.
    keys : sequence of str, optional
        Table names (default ``t{index}`` of the original table).
    on_error : "raise" or "skip"
        Skip: a file with broken structure is skipped whole; samples with an
        id beyond ``rows`` are dropped (counted in ``skipped``, as samples).

    Notes
    -----
    ``torch.load`` reads a whole file; batches are then views of its tensors
    (one table slice at a time), so memory is one file plus one batch.
    """

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                 tables: Sequence[int] | None = None, batch_size: int | None = None,
                 rows: Sequence[int] | None = None, keys: Sequence[str] | None = None,
                 on_error: str | OnError = OnError.RAISE, drop_last: bool = False) -> None:
        super().__init__()
        self.paths = _paths(paths)
        self.tables = None if tables is None else [int(t) for t in tables]
        if self.tables is not None and (not self.tables or min(self.tables) < 0):
            raise ConfigError(f"tables must be non-empty indices >= 0, got {self.tables}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"Expected batch_size >= 1. Got {batch_size} instead.")
        self.batch_size = batch_size
        self.on_error = _on_error(on_error)
        self.drop_last = drop_last
        self._keys_arg = None if keys is None else tuple(keys)
        self._rows_arg = None if rows is None else tuple(int(r) for r in rows)
        if self._rows_arg is not None and min(self._rows_arg, default=1) < 1:
            raise ConfigError(f"rows must be >= 1, got {list(self._rows_arg)}")
        self._scanned_rows: tuple[int, ...] | None = None
        if self.tables is not None:
            self.keys = self._keys_arg or tuple(f"t{t}" for t in self.tables)
        elif self._keys_arg is not None:
            self.keys = self._keys_arg
        else:  # the table count is in the file: peek at the first one
            self._tables_of(self.paths[0])
        self._check_lengths()

    def _tables_of(self, path: Path) -> None:
        _, _, lengths = _load_meta_file(path)
        if lengths.ndim != 2:
            raise TraceFormatError(f"{path}: lengths has shape {lengths.shape}, expected (T, B)")
        self.keys = tuple(f"t{t}" for t in range(lengths.shape[0]))

    def _check_lengths(self) -> None:
        n = len(self.keys)
        if self.tables is not None and len(self.keys) != len(self.tables):
            raise ConfigError(f"{len(self.keys)} keys for {len(self.tables)} tables")
        if self._rows_arg is not None and len(self._rows_arg) != n:
            raise ConfigError(f"rows gives {len(self._rows_arg)} counts for {n} tables")

    @property
    def rows(self) -> tuple[int, ...]:
        if self._rows_arg is not None:
            return self._rows_arg
        if self._scanned_rows is None:
            m = np.full(len(self.keys), -1, np.int64)
            for x in self._file_batches(check_rows=False):
                for t in range(len(self.keys)):
                    s, e = x.sparse.table_range(t)
                    if e > s:
                        m[t] = max(m[t], int(x.sparse.values[s:e].max()))
            self._scanned_rows = tuple(int(v) + 1 if v >= 0 else 1 for v in m)
        return self._scanned_rows

    def __len__(self) -> int:
        """One batch per file as stored; re-cut (``batch_size``) the count is unknown
        without loading every file, and ``len()`` raises TypeError as for any stream."""
        if self.batch_size is None:
            return len(self.paths)
        raise TypeError("a re-batched Meta trace has no length until its files are read")

    def _one_file(self, path: Path, check_rows: bool) -> Iterator[TraceBatch]:
        indices, offsets, lengths = _load_meta_file(path)
        if indices.ndim != 1 or offsets.ndim != 1 or lengths.ndim != 2:
            raise TraceFormatError(
                f"{path}: shapes indices {indices.shape}, offsets {offsets.shape}, lengths "
                f"{lengths.shape}; expected 1-D, 1-D (T*B+1) and (T, B)")
        T, B = lengths.shape
        if offsets.size != T * B + 1:
            raise TraceFormatError(f"{path}: offsets has {offsets.size} entries, expected "
                                   f"T*B+1 = {T * B + 1} for lengths of shape {(T, B)}")
        if offsets[0] != 0:
            raise TraceFormatError(f"{path}: offsets[0] = {offsets[0]}, expected 0")
        if offsets[-1] != indices.size:
            raise TraceFormatError(f"{path}: offsets[-1] = {offsets[-1]} but indices has "
                                   f"{indices.size} entries")
        sel = self.tables if self.tables is not None else list(range(T))
        if max(sel) >= T:
            raise TraceFormatError(f"{path}: has {T} tables; asked for table {max(sel)}")
        if self.tables is None and len(self.keys) != T:
            raise TraceFormatError(f"{path}: has {T} tables, the first file had {len(self.keys)}")
        rows = self._rows_arg if check_rows else None
        keep = np.ones(B, bool)
        # per table: offsets consistent with lengths, ids in range (one table at a time)
        for j, t in enumerate(sel):
            o = offsets[t * B:(t + 1) * B + 1]
            d = np.diff(o)
            bad = np.flatnonzero((d < 0) | (d != lengths[t]))
            if bad.size:
                b = int(bad[0])
                raise TraceFormatError(
                    f"{path}: table {t} bag {b} (offsets[{t * B + b}:{t * B + b + 2}] = "
                    f"{o[b]}, {o[b + 1]}) disagrees with lengths[{t}, {b}] = {lengths[t, b]}")
            ids = indices[o[0]:o[-1]]
            if ids.size == 0:
                continue
            lo = ids.min()
            hi_bad = None if rows is None else ids >= rows[j]
            if lo < 0 or (hi_bad is not None and hi_bad.any()):
                mask = ids < 0 if hi_bad is None else (ids < 0) | hi_bad
                pos = np.flatnonzero(mask)
                bag = np.searchsorted(o, o[0] + pos, side="right") - 1
                if self.on_error is OnError.RAISE:
                    lim = "" if rows is None else f" (table has {rows[j]} rows)"
                    raise TraceFormatError(
                        f"{path}: table {t} sample {int(bag[0])}: id {int(ids[pos[0]])} out of "
                        f"range{lim}")
                keep[bag] = False
        if not keep.all():
            n = int(B - keep.sum())
            self._skip(n, f"{path}: {n} samples with out-of-range ids dropped")
        step = self.batch_size or B
        for s in range(0, B, step):
            e = min(B, s + step)
            kidx = None if keep.all() else np.flatnonzero(keep[s:e]) + s
            vals, lens = [], []
            for t in sel:
                base = t * B
                if kidx is None:
                    o = offsets[base + s:base + e + 1]
                    vals.append(indices[o[0]:o[-1]])
                    lens.append(lengths[t, s:e])
                else:
                    starts = offsets[base + kidx]
                    ls = lengths[t, kidx]
                    # gather the kept bags' ids: positions start + 0..len-1 per bag
                    rep = np.repeat(starts - np.cumsum(ls) + ls, ls)
                    vals.append(indices[rep + np.arange(rep.size)])
                    lens.append(ls)
            if sum(len(v) for v in lens) == 0:
                continue
            sf = SparseFeatures.from_lengths(self.keys, np.concatenate(vals),
                                             np.concatenate(lens))
            yield TraceBatch(None, sf, None)

    def _file_batches(self, check_rows: bool = True) -> Iterator[TraceBatch]:
        for p in self.paths:
            try:
                yield from self._one_file(p, check_rows)
            except TraceFormatError as e:
                if self.on_error is OnError.RAISE:
                    raise
                self._skip(1, str(e))

    def __iter__(self) -> Iterator[TraceBatch]:
        if self.batch_size is None:
            return self._file_batches()
        return rebatch(self._file_batches(), self.batch_size, drop_last=self.drop_last)


# -- Criteo TSV ------------------------------------------------------------------------

CRITEO_NUM_DENSE = 13
CRITEO_NUM_SPARSE = 26
_MAX_DEC = 18
_MAX_HEX = 16

_HEX = np.full(256, 255, np.uint8)
for _c in range(10):
    _HEX[ord("0") + _c] = _c
for _c in range(6):
    _HEX[ord("a") + _c] = 10 + _c
    _HEX[ord("A") + _c] = 10 + _c


def _gather(a: np.ndarray, st: np.ndarray, j: int) -> np.ndarray:
    return a[np.minimum(st + j, a.size - 1)]


def _parse_dec(a: np.ndarray, st: np.ndarray, en: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decimal ints in fields ``a[st:en]`` -> ``(values, missing, bad)``."""
    ln = en - st
    missing = ln == 0
    neg = (ln > 0) & (_gather(a, st, 0) == ord("-"))
    s2 = st + neg
    nd = en - s2
    bad = (nd > _MAX_DEC) | (neg & (nd == 0))
    val = np.zeros(st.shape, np.int64)
    for j in range(int(min(nd.max(initial=0), _MAX_DEC))):
        live = nd > j
        d = _gather(a, s2, j).astype(np.int64) - ord("0")
        bad |= live & ((d < 0) | (d > 9))
        val = np.where(live, val * 10 + d, val)
    val = np.where(neg, -val, val)
    return val, missing, bad


def _parse_hex(a: np.ndarray, st: np.ndarray, en: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hex in fields ``a[st:en]`` -> ``(uint64 values, missing, bad)``."""
    ln = en - st
    missing = ln == 0
    bad = ln > _MAX_HEX
    val = np.zeros(st.shape, np.uint64)
    for j in range(int(min(ln.max(initial=0), _MAX_HEX))):
        live = ln > j
        d = _HEX[_gather(a, st, j)]
        bad |= live & (d == 255)
        val = np.where(live, (val << np.uint64(4)) | d.astype(np.uint64), val)
    return val, missing, bad


class CriteoTrace(Trace):
    """Criteo Kaggle / Terabyte click logs (raw TSV, optionally .gz) as a trace.

    Each line: ``label, I1..I13, C1..C26`` tab-separated (Kaggle test files:
    no label, 39 fields); empty field = missing. Categorical values (hex
    hashes) map to rows by ``int(value, 16) % rows[t]`` as the DLRM reference
    does with ``--max-ind-range``; a missing value maps to ``missing_id``
    (default 0). Dense features are ``log(1 + max(x, 0))`` (float32), missing
    = 0. Labels are float32. One id per table and sample (one-hot bags).

    Parameters
    ----------
    paths : path or sequence of paths
        TSV files (``.gz`` is decompressed on the fly), read in order.
    rows : sequence of int or str
        Rows of the 26 tables, or a preset name of
        :data:`traces.synth.TABLE_PRESETS` (``criteo_kaggle``,
        ``criteo_terabyte``, ``dlrmv2`` ...).
    batch_size : int
        Samples per batch.
    labelled : bool, optional
        Whether lines carry a label; None: detect from the first line
        (40 fields: yes, 39: no).
    tables : sequence of int, optional
        Keep only these categorical columns (0-based, C1 = 0).
    on_error : "raise" or "skip"
        Skip and count malformed lines (wrong field count, bad number or hex).
    chunk_bytes : int
        Bytes parsed at once (vectorized per chunk).
    max_samples : int, optional
        Stop after this many samples.
    """

    def __init__(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                 rows: Sequence[int] | str = "criteo_kaggle", batch_size: int = 2048,
                 labelled: bool | None = None, missing_id: int = 0,
                 tables: Sequence[int] | None = None, keys: Sequence[str] | None = None,
                 on_error: str | OnError = OnError.RAISE, chunk_bytes: int = 16 << 20,
                 max_samples: int | None = None, drop_last: bool = False) -> None:
        super().__init__()
        self.paths = _paths(paths)
        if isinstance(rows, str):
            from traces.synth import table_preset
            rows = table_preset(rows)
        all_rows = tuple(int(r) for r in rows)
        if len(all_rows) != CRITEO_NUM_SPARSE or min(all_rows) < 1:
            raise ConfigError(f"Criteo needs {CRITEO_NUM_SPARSE} table sizes >= 1, got "
                              f"{len(all_rows)}: {list(all_rows)}")
        self.tables = list(range(CRITEO_NUM_SPARSE)) if tables is None else [int(t) for t in tables]
        if not self.tables or min(self.tables) < 0 or max(self.tables) >= CRITEO_NUM_SPARSE:
            raise ConfigError(f"tables must be column indices in [0, 26), got {self.tables}")
        self._rows = tuple(all_rows[t] for t in self.tables)
        if not 0 <= missing_id < min(self._rows):
            raise ConfigError(f"missing_id {missing_id} is not a row of every table "
                              f"(smallest has {min(self._rows)} rows)")
        if batch_size < 1 or chunk_bytes < 1:
            raise ConfigError("batch_size and chunk_bytes must be >= 1")
        self.keys = tuple(keys) if keys is not None else tuple(f"C{t + 1}" for t in self.tables)
        if len(self.keys) != len(self.tables):
            raise ConfigError(f"{len(self.keys)} keys for {len(self.tables)} tables")
        self.batch_size = batch_size
        self.labelled = labelled
        self.missing_id = int(missing_id)
        self.on_error = _on_error(on_error)
        self.chunk_bytes = int(chunk_bytes)
        self.max_samples = max_samples
        self.drop_last = drop_last
        self.num_dense = CRITEO_NUM_DENSE
        self.has_labels = labelled if labelled is not None else self._detect(self.paths[0])

    @property
    def rows(self) -> tuple[int, ...]:
        return self._rows

    @staticmethod
    def _open(path: Path) -> IO[bytes]:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")

    def _detect(self, path: Path) -> bool:
        with self._open(path) as f:
            for line in f:
                if line.strip(b"\r\n"):
                    n = line.count(b"\t") + 1
                    if n == 40:
                        return True
                    if n == 39:
                        return False
                    raise TraceFormatError(f"{path} line 1: {n} tab-separated fields; a Criteo "
                                           "line has 40 (label + 13 + 26) or 39 (no label)")
        return True

    def _parse(self, path: Path, buf: bytes, first_line: int, last: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        nf = 40 if self.has_labels else 39
        a = np.frombuffer(buf, np.uint8)
        is_delim = (a == 9) | (a == 10)
        dpos = np.flatnonzero(is_delim)
        is_nl = a[dpos] == 10
        line_id = np.cumsum(is_nl) - is_nl
        n_lines = int(is_nl.sum())
        nfields = np.bincount(line_id, minlength=n_lines)
        starts = np.empty_like(dpos)
        starts[:1] = 0
        starts[1:] = dpos[:-1] + 1
        ends = dpos.copy()
        cr = is_nl & (ends > starts) & (a[np.maximum(ends - 1, 0)] == 13)
        ends[cr] -= 1  # CRLF line endings
        empty_line = (nfields == 1) & (ends[is_nl] == starts[is_nl])
        good = (nfields == nf) | empty_line
        bad_lines = np.flatnonzero(~good)
        if bad_lines.size:
            i = int(bad_lines[0])
            hint = " (truncated file?)" if last and i == n_lines - 1 else ""
            self._bad(path, first_line + i, bad_lines.size,
                      f"{nfields[i]} tab-separated fields, expected {nf}{hint}")
        good &= ~empty_line
        keep = good[line_id]
        st = starts[keep].reshape(-1, nf)
        en = ends[keep].reshape(-1, nf)
        line_no = np.flatnonzero(good) + first_line
        o = 1 if self.has_labels else 0
        bad = np.zeros(st.shape, bool)
        labels = None
        if self.has_labels:
            lab, lmiss, lbad = _parse_dec(a, st[:, 0], en[:, 0])
            bad[:, 0] = lbad | lmiss
            labels = lab.astype(np.float32)
        ints, imiss, ibad = _parse_dec(a, st[:, o:o + 13], en[:, o:o + 13])
        bad[:, o:o + 13] = ibad
        cols = [o + 13 + t for t in self.tables]
        hx, hmiss, hbad = _parse_hex(a, st[:, cols], en[:, cols])
        bad[:, cols] = hbad
        row_bad = bad.any(axis=1)
        if row_bad.any():
            r = int(np.argmax(row_bad))
            c = int(np.argmax(bad[r]))
            name = "label" if self.has_labels and c == 0 else (
                f"I{c - o + 1}" if c < o + 13 else f"C{c - o - 13 + 1}")
            text = bytes(a[st[r, c]:en[r, c]]).decode("latin-1")
            kind = "hex" if c >= o + 13 else "integer"
            self._bad(path, int(line_no[r]), int(row_bad.sum()),
                      f"field {name} = {text!r} is not a valid {kind}")
            ok = ~row_bad
            ints, imiss, hx, hmiss = ints[ok], imiss[ok], hx[ok], hmiss[ok]
            labels = None if labels is None else labels[ok]
        dense = np.log1p(np.where(imiss, 0, np.maximum(ints, 0)).astype(np.float64))
        rows = np.asarray(self._rows, np.uint64)
        ids = (hx % rows).astype(np.int64)
        ids[hmiss] = self.missing_id
        return dense.astype(np.float32), ids, labels

    def _bad(self, path: Path, line: int, count: int, reason: str) -> None:
        msg = f"{path} line {line}: {reason}"
        if self.on_error is OnError.RAISE:
            raise TraceFormatError(msg)
        self._skip(count, msg + (f" (and {count - 1} more lines in this chunk)"
                                 if count > 1 else ""))

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        for path in self.paths:
            line = 1
            rest = b""
            try:
                with self._open(path) as f:
                    while True:
                        data = f.read(self.chunk_bytes)
                        last = not data
                        buf = rest + data
                        if last:
                            if not buf:
                                break
                            if not buf.endswith(b"\n"):
                                buf += b"\n"
                            rest = b""
                        else:
                            cut = buf.rfind(b"\n") + 1
                            if cut == 0:
                                rest = buf
                                continue
                            buf, rest = buf[:cut], buf[cut:]
                        yield self._parse(path, buf, line, last)
                        line += buf.count(b"\n")
                        if last:
                            break
            except (EOFError, gzip.BadGzipFile, OSError) as e:
                raise TraceFormatError(f"{path} after line {line - 1}: cannot read "
                                       f"({type(e).__name__}: {e}; truncated file?)") from None

    def _batches(self) -> Iterator[TraceBatch]:
        T = len(self.tables)
        done = 0
        for dense, ids, labels in self._chunks():
            if self.max_samples is not None:
                left = self.max_samples - done
                if left <= 0:
                    return
                dense, ids = dense[:left], ids[:left]
                labels = None if labels is None else labels[:left]
            n = ids.shape[0]
            if n == 0:
                continue
            done += n
            sf = SparseFeatures(self.keys, np.ascontiguousarray(ids.T).reshape(-1),
                                np.arange(T * n + 1, dtype=np.int64))
            yield TraceBatch(dense, sf, labels)

    def __iter__(self) -> Iterator[TraceBatch]:
        return rebatch(self._batches(), self.batch_size, drop_last=self.drop_last)
