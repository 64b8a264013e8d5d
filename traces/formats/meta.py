"""Meta's dlrm_datasets embedding-lookup traces: ``torch.save`` files of one batch each."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tiermem.errors import ConfigError
from tiermem.features import SparseFeatures
from traces.formats.base import (
    OnError,
    Trace,
    TraceFormat,
    TraceFormatError,
    input_paths,
    int_list,
    parse_on_error,
)
from traces.formats.batch import TraceBatch, rebatch

__all__ = ["FORMAT", "MetaTrace"]

SUFFIXES = (".pt", ".pt.gz", ".pth", ".pth.gz")
"""File names the format claims."""


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
        self.paths = input_paths(paths)
        self.tables = None if tables is None else [int(t) for t in tables]
        if self.tables is not None and (not self.tables or min(self.tables) < 0):
            raise ConfigError(f"tables must be non-empty indices >= 0, got {self.tables}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"Expected batch_size >= 1. Got {batch_size} instead.")
        self.batch_size = batch_size
        self.on_error = parse_on_error(on_error)
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




def _open(paths: list[Path], *, batch_size: int | None = None,
          tables: str | Sequence[int] | None = None, rows: str | Sequence[int] | None = None,
          on_error: str | OnError = OnError.RAISE) -> MetaTrace:
    return MetaTrace(paths, tables=int_list(tables, "tables"), batch_size=batch_size,
                     rows=int_list(rows, "rows"), on_error=on_error)


FORMAT = TraceFormat("meta", "Meta dlrm_datasets .pt[.gz] files",
                     lambda paths: paths[0].name.endswith(SUFFIXES), _open)
