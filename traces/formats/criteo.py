"""Criteo Kaggle / Terabyte click logs: TSV lines, parsed a chunk at a time (vectorized)."""

from __future__ import annotations

import gzip
import io
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
from traces.presets import table_preset

__all__ = ["CRITEO_NUM_DENSE", "CRITEO_NUM_SPARSE", "FORMAT", "CriteoTrace"]

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
        :data:`traces.presets.TABLE_PRESETS` (``criteo_kaggle``,
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
        self.paths = input_paths(paths)
        if isinstance(rows, str):
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
        self.on_error = parse_on_error(on_error)
        self.chunk_bytes = int(chunk_bytes)
        self.max_samples = max_samples
        self.drop_last = drop_last
        self.num_dense = CRITEO_NUM_DENSE
        self.has_labels = labelled if labelled is not None else self._detect(self.paths[0])

    @property
    def rows(self) -> tuple[int, ...]:
        return self._rows

    @staticmethod
    def _open(path: Path) -> io.BufferedIOBase:
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



def _open(paths: list[Path], *, batch_size: int | None = None,
          tables: str | Sequence[int] | None = None, rows: str | Sequence[int] | None = None,
          labelled: bool | None = None, missing_id: int = 0,
          on_error: str | OnError = OnError.RAISE,
          max_samples: int | None = None) -> CriteoTrace:
    return CriteoTrace(paths, rows=rows or "criteo_kaggle", batch_size=batch_size or 2048,
                       labelled=labelled, missing_id=missing_id,
                       tables=int_list(tables, "tables"), on_error=on_error,
                       max_samples=max_samples)


FORMAT = TraceFormat("criteo", "Criteo TSV (anything else)", lambda paths: True, _open)
