"""The on-disk store: a zarr v3 group, one uncompressed row-major array per table.

Layout (readable by plain ``zarr.open``)::

    store.zarr/
      zarr.json                      group; attributes["tiermem"] = {format, version,
                                     tables: [{name, rows, dim, dtype, chunk_rows}]}
      tables/<name>/weight           (rows, dim) float32 | float16 | int8,
                                     chunks (chunk_rows, dim), no compression
      tables/<name>/qparams          (rows, 2) float32 (scale, bias), int8 tables only
      tables/<name>/weight_sums      (n_chunks, blocks) uint64: a checksum per 4 KiB block of
      tables/<name>/qparams_sums     each chunk file (version 2; see tiermem/integrity.py)
      tables/<name>/weight_rowsums   (rows, 1) uint32: a checksum per row, chunked like the
      tables/<name>/qparams_rowsums  data; attributes["tiermem"]["file_sums"]: each chunk
                                     file's own tmh64 (version 3)

Each chunk file holds ``chunk_rows`` raw little-endian rows, so row ``r`` of a
table sits in chunk ``r // chunk_rows`` at byte ``(r % chunk_rows) * row_bytes``:
the SSD tier reads rows with ``pread`` at computed offsets.

Creation streams blocks of rows into a temporary folder beside the target and
renames it into place at the end; the ``tiermem`` attribute is written last.
An interrupted creation therefore never leaves a valid store at the target;
its hidden temporary folder (``.NAME.tmp-PID-*``) is removed by the next
write to the same target once process PID is gone.
Opening checks the metadata and the size of every chunk file, so a truncated
or foreign file is an error at open, never a SIGBUS or garbage later.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from tiermem.chunkio import os_reason, pread_exact
from tiermem.config import ConfigDict
from tiermem.errors import ConfigError, StoreError, StoreFormatError
from tiermem.integrity import BLOCK_BYTES, blocks_per_chunk, chunk_sums, file_sum, row_sums
from tiermem.integrity import SCHEME as CHECKSUM_SCHEME
from tiermem.quantize import RowDtype, encode_rows

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "StoreInfo",
    "StoreWriter",
    "TableInfo",
    "TableSpec",
    "create_store",
    "create_store_from_arrays",
    "create_random_store",
    "open_store",
]

FORMAT_NAME = "tiermem-store"
FORMAT_VERSION = 3
#: versions this tiermem opens: 1 has no checksums (served "unverified"), 2 block checksums
#: only (the SSD tier then reads and checks whole blocks), 3 adds a checksum per row
READ_VERSIONS = (1, 2, 3)
#: target bytes per chunk file; large enough that a table has few files.
CHUNK_BYTES = 64 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class TableSpec(ConfigDict):
    """Shape and storage type of one embedding table."""

    name: str
    rows: int
    dim: int
    dtype: RowDtype = RowDtype.FLOAT32

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ConfigError(
                f"table name {self.name!r} is invalid: use 1-128 letters, digits, '_', '.', '-'"
                " (not starting with '.' or '-')"
            )
        for fld in ("rows", "dim"):
            v = getattr(self, fld)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"table {self.name!r}: {fld} must be a positive integer, "
                                  f"got {v!r}")
            object.__setattr__(self, fld, int(v))
        object.__setattr__(self, "dtype", RowDtype.parse(self.dtype))

    @property
    def row_bytes(self) -> int:
        return self.dtype.row_bytes(self.dim)

    @property
    def nbytes(self) -> int:
        """Bytes of the table on disk (weights and, for int8, qparams)."""
        extra = 8 * self.rows if self.dtype.quantized else 0
        return self.rows * self.row_bytes + extra

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TableSpec:
        """The spec in a table's entry of a store's metadata, which holds more (chunk_rows,
        checksums): only the spec's own keys are read."""
        if not isinstance(d, Mapping):
            return super().from_dict(d)  # names the type
        return super().from_dict({k: d[k] for k in ("name", "rows", "dim", "dtype") if k in d})


@dataclass(frozen=True)
class TableInfo:
    """A table of an opened store: its spec and where its chunk files are."""

    spec: TableSpec
    chunk_rows: int
    weight_dir: Path
    qparams_dir: Path | None
    row_offset: int = 0
    """Row 0 of this table is row ``row_offset`` of the array on disk: a window
    (a shard's row range) over a larger stored table; 0 for a whole table."""
    weight_sums_dir: Path | None = None
    """The block checksums of the weights (None: a version-1 store, unverified)."""
    qparams_sums_dir: Path | None = None
    weight_rowsums_dir: Path | None = None
    """The row checksums of the weights (None: a version-1 or -2 store)."""
    qparams_rowsums_dir: Path | None = None

    @property
    def row_checked(self) -> bool:
        """Whether every row (and qparams row) has its own checksum (version 3)."""
        return self.weight_rowsums_dir is not None and (
            self.qparams_dir is None or self.qparams_rowsums_dir is not None)

    def rowsum_file_sums(self, what: str) -> list[str]:
        """The checksums of the row-checksum chunk files ("weights" or "qparams")."""
        d = self.weight_rowsums_dir if what == "weights" else self.qparams_rowsums_dir
        assert d is not None
        sums = _get(_get(_load_json(d / "zarr.json", f"table {self.name!r} row checksums")
                         .get("attributes"), "tiermem"), "file_sums")
        return [str(x) for x in sums] if isinstance(sums, list) else []

    @property
    def verified(self) -> bool:
        """Whether every chunk file of the table has block checksums."""
        return self.weight_sums_dir is not None and (
            self.qparams_dir is None or self.qparams_sums_dir is not None)

    @functools.cached_property
    def weight_sums(self) -> np.ndarray | None:
        """``(n_chunks, blocks)`` checksums of the weight chunk files (loaded once)."""
        from tiermem.integrity import blocks_per_chunk, load_sums

        if self.weight_sums_dir is None:
            return None
        return load_sums(self.weight_sums_dir, self.n_chunks,
                         blocks_per_chunk(self.chunk_rows * self.spec.row_bytes), self.first_chunk)

    @functools.cached_property
    def qparams_sums(self) -> np.ndarray | None:
        from tiermem.integrity import blocks_per_chunk, load_sums

        if self.qparams_sums_dir is None:
            return None
        return load_sums(self.qparams_sums_dir, self.n_chunks,
                         blocks_per_chunk(self.chunk_rows * 8), self.first_chunk)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def n_chunks(self) -> int:
        """Chunk files up to the window's last row (all of them for a whole table)."""
        return -(-(self.row_offset + self.spec.rows) // self.chunk_rows)

    @property
    def first_chunk(self) -> int:
        """The chunk file holding the window's first row (0 for a whole table)."""
        return self.row_offset // self.chunk_rows

    def weight_chunk(self, i: int) -> Path:
        return self.weight_dir / "c" / str(i) / "0"

    def qparams_chunk(self, i: int) -> Path:
        assert self.qparams_dir is not None
        return self.qparams_dir / "c" / str(i) / "0"


@dataclass(frozen=True)
class StoreInfo:
    """A validated store on disk (metadata only; tiers read the rows)."""

    path: Path
    tables: tuple[TableInfo, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def specs(self) -> list[TableSpec]:
        return [t.spec for t in self.tables]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tables]

    @property
    def nbytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tables)

    @property
    def verified(self) -> bool:
        """Whether every block of the store has a checksum (False: a version-1 store)."""
        return all(t.verified for t in self.tables)

    def table(self, name: str) -> TableInfo:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"store {self.path} has no table {name!r}; tables: {self.names}")

    def view(self, windows: Sequence[tuple[str, str, int, int]]) -> StoreInfo:
        """A store of row windows over this one: ``(new name, table, start, stop)`` each.

        A window is a table of ``stop - start`` rows whose row ``i`` is row
        ``start + i`` of ``table``; every tier serves it from the same files,
        nothing is copied. This is how a shard holds its part of a plan.
        """
        out = []
        seen: set[str] = set()
        for new_name, name, start, stop in windows:
            t = self.table(name)
            if t.row_offset:
                raise StoreError(f"table {name!r} is already a window; view the whole store")
            if not (0 <= start < stop <= t.spec.rows):
                raise StoreError(f"window [{start}, {stop}) of table {name!r} is outside its "
                                 f"{t.spec.rows} rows")
            if new_name in seen:
                raise StoreError(f"window name {new_name!r} is used twice")
            seen.add(new_name)
            spec = TableSpec(new_name, stop - start, t.spec.dim, t.spec.dtype)
            out.append(dataclasses.replace(t, spec=spec, row_offset=start))
        return StoreInfo(self.path, tuple(out), self.attrs, self.version)

    def read_table(self, name: str, rows: slice | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
        """Read a row range of a table into memory (weights, qparams)."""
        t = self.table(name)
        start, stop, _ = (rows or slice(None)).indices(t.spec.rows)
        w = np.empty((max(stop - start, 0), t.spec.dim), t.spec.dtype.numpy)
        q = np.empty((w.shape[0], 2), np.float32) if t.spec.dtype.quantized else None
        read_rows_into(t, start, stop, w, q)
        return w, q


def default_chunk_rows(spec: TableSpec) -> int:
    return max(1, min(spec.rows, CHUNK_BYTES // max(spec.row_bytes, 1)))


# ---------------------------------------------------------------------------
# writing


def _array_meta(shape: tuple[int, int], chunk_rows: int, dtype: npt.DTypeLike) -> dict[str, Any]:
    """zarr v3 array metadata for an uncompressed, row-chunked little-endian array."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, shape[1]]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0 if np.dtype(dtype).kind == "f" else 0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": {},
        "dimension_names": ["row", "col"],
        "storage_transformers": [],
    }


def _sums_meta(rows: int, chunk_rows: int, row_bytes: int) -> dict[str, Any]:
    """The checksum array of a data array: one row of block sums per chunk file."""
    n_chunks = -(-rows // chunk_rows)
    return _array_meta((n_chunks, blocks_per_chunk(chunk_rows * row_bytes)), 1, np.dtype(np.uint64))


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StoreWriter:
    """Streams rows into a new store; use :func:`create_store`.

    Rows are given as float blocks in row order per table (any block size);
    the writer encodes them to the table's dtype and fills chunk files
    sequentially, so memory stays at one chunk per table. ``commit()``
    checks every table is complete, writes the group metadata and renames
    the temporary folder into place.
    """

    def __init__(self, path: str | os.PathLike[str], specs: Sequence[TableSpec], *,
                 overwrite: bool = False, attrs: Mapping[str, Any] | None = None,
                 chunk_rows: int | None = None) -> None:
        self.path = Path(path)
        specs = list(specs)
        if not specs:
            raise ConfigError("a store needs at least one table")
        names = [s.name for s in specs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"duplicate table names: {sorted(dup)}")
        if self.path.exists() and not overwrite:
            raise StoreError(f"{self.path} already exists (pass overwrite=True / --overwrite)")
        if chunk_rows is not None and chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.specs = specs
        self.overwrite = overwrite
        self.attrs = dict(attrs or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.path)
        self.tmp = temp_path(self.path)
        self.tmp.mkdir()
        self._chunk_rows = {s.name: chunk_rows or default_chunk_rows(s) for s in specs}
        self._written = dict.fromkeys(names, 0)
        self._pending: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {
            n: [] for n in names}
        self._pending_rows = dict.fromkeys(names, 0)
        self._chunk_index = dict.fromkeys(names, 0)
        self._spec = {s.name: s for s in specs}
        self._done = False
        _write_json(self.tmp / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                             "attributes": {}})
        _write_json(self.tmp / "tables" / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                                         "attributes": {}})
        for s in specs:
            cr = self._chunk_rows[s.name]
            base = self.tmp / "tables" / s.name
            _write_json(base / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                             "attributes": {}})
            _write_json(base / "weight" / "zarr.json",
                        _array_meta((s.rows, s.dim), cr, s.dtype.numpy))
            if s.dtype.quantized:
                _write_json(base / "qparams" / "zarr.json",
                            _array_meta((s.rows, 2), cr, np.float32))
            for arr, rb in (("weight", s.row_bytes), ("qparams", 8)):
                if arr == "qparams" and not s.dtype.quantized:
                    continue
                _write_json(base / f"{arr}_sums" / "zarr.json", _sums_meta(s.rows, cr, rb))
        self._file_sums: dict[tuple[str, str], list[str]] = {}

    # context manager: abort on error, commit on success
    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def rows_written(self, name: str) -> int:
        return self._written[name] + self._pending_rows[name]

    def write(self, name: str, block: np.ndarray, qparams: np.ndarray | None = None) -> None:
        """Append the next rows of table ``name``.

        ``block`` is float (encoded to the table dtype), or, for an int8 table,
        already-quantized int8 rows with their ``qparams``.
        """
        if self._done:
            raise StoreError("writer already committed or aborted")
        if name not in self._spec:
            raise ConfigError(f"unknown table {name!r}; tables: {list(self._spec)}")
        s = self._spec[name]
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != s.dim:
            raise ConfigError(f"table {name!r}: block must have shape (n, {s.dim}), "
                              f"got {block.shape}")
        if self.rows_written(name) + block.shape[0] > s.rows:
            raise ConfigError(
                f"table {name!r}: writing {block.shape[0]} rows after {self.rows_written(name)}"
                f" exceeds its {s.rows} rows"
            )
        qp: np.ndarray | None
        if qparams is not None:
            if not s.dtype.quantized or block.dtype != np.int8:
                raise ConfigError(f"table {name!r}: qparams only go with int8 blocks of an "
                                  "int8 table")
            q, qp = block, np.ascontiguousarray(qparams, dtype=np.float32)
            if qp.shape != (block.shape[0], 2):
                raise ConfigError(f"table {name!r}: qparams must have shape ({block.shape[0]}, 2)")
            if not np.isfinite(qp).all():
                bad = int(np.flatnonzero(~np.isfinite(qp).all(axis=1))[0])
                raise ConfigError(f"table {name!r}: row {self.rows_written(name) + bad} has "
                                  "NaN or infinite qparams")
        else:
            if block.dtype.kind not in "fiu":
                raise ConfigError(f"table {name!r}: rows must be numeric, got dtype {block.dtype}")
            if block.dtype.kind == "f" and not np.isfinite(block).all():
                bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise ConfigError(f"table {name!r}: row {self.rows_written(name) + bad} holds "
                                  "NaN or infinity (a store holds finite rows only)")
            if s.dtype is RowDtype.FLOAT16 and block.size and np.abs(block).max() > 65504:
                raise ConfigError(f"table {name!r}: values beyond +-65504 do not fit float16 "
                                  f"(max |x| = {float(np.abs(block).max()):g})")
            q, qp = encode_rows(block, s.dtype)
        self._pending[name].append((q, qp))
        self._pending_rows[name] += block.shape[0]
        self._flush(name, final=False)

    def _flush(self, name: str, *, final: bool) -> None:
        s = self._spec[name]
        cr = self._chunk_rows[name]
        while self._pending_rows[name] >= cr or (final and self._pending_rows[name] > 0):
            take = min(cr, self._pending_rows[name])
            ws: list[np.ndarray] = []
            qs: list[np.ndarray | None] = []
            need = take
            while need:
                w, q = self._pending[name][0]
                if w.shape[0] <= need:
                    self._pending[name].pop(0)
                    ws.append(w)
                    qs.append(q)
                    need -= w.shape[0]
                else:
                    ws.append(w[:need])
                    qs.append(None if q is None else q[:need])
                    self._pending[name][0] = (w[need:], None if q is None else q[need:])
                    need = 0
            w = np.concatenate(ws) if len(ws) > 1 else ws[0]
            if take < cr:  # last chunk: zarr stores edge chunks at full size
                w = np.concatenate([w, np.zeros((cr - take, s.dim), w.dtype)])
            i = self._chunk_index[name]
            base = self.tmp / "tables" / name
            self._write_chunk(base / "weight" / "c" / str(i) / "0", w)
            self._write_chunk(base / "weight_sums" / "c" / str(i) / "0", chunk_sums(w)[None])
            self._write_row_sums(name, "weight", i, w, s.row_bytes)
            if s.dtype.quantized:
                qparts = cast("list[np.ndarray]", qs)  # an int8 table's blocks all hold qparams
                q = np.concatenate(qparts) if len(qparts) > 1 else qparts[0]
                if take < cr:
                    q = np.concatenate([q, np.zeros((cr - take, 2), np.float32)])
                self._write_chunk(base / "qparams" / "c" / str(i) / "0", q)
                self._write_chunk(base / "qparams_sums" / "c" / str(i) / "0",
                                  chunk_sums(q)[None])
                self._write_row_sums(name, "qparams", i, q, 8)
            self._chunk_index[name] = i + 1
            self._written[name] += take
            self._pending_rows[name] -= take

    def _write_row_sums(self, name: str, arr: str, i: int, data: np.ndarray, rb: int) -> None:
        """Chunk ``i``'s row checksums, and their file's own checksum (kept for commit)."""
        rs = row_sums(data, rb)
        self._write_chunk(self.tmp / "tables" / name / f"{arr}_rowsums" / "c" / str(i) / "0",
                          rs[:, None])
        self._file_sums.setdefault((name, arr), []).append(file_sum(rs))

    @staticmethod
    def _write_chunk(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.ascontiguousarray(arr)
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        with open(path, "wb") as f:
            f.write(data.data.cast("B"))

    def commit(self) -> StoreInfo:
        """Finish: check completeness, write metadata, fsync, rename into place."""
        if self._done:
            raise StoreError("writer already committed or aborted")
        for name in self._spec:
            self._flush(name, final=True)
        short = {n: (self._written[n], self._spec[n].rows) for n in self._spec
                 if self._written[n] != self._spec[n].rows}
        if short:
            self.abort()
            desc = ", ".join(f"{n}: {w} of {r} rows" for n, (w, r) in short.items())
            raise StoreError(f"store incomplete, not created: {desc}")
        for (name, arr), fsums in self._file_sums.items():
            s = self._spec[name]
            m = _array_meta((s.rows, 1), self._chunk_rows[name], np.dtype(np.uint32))
            m["attributes"] = {"tiermem": {"file_sums": fsums}}
            _write_json(self.tmp / "tables" / name / f"{arr}_rowsums" / "zarr.json", m)
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "checksum": {"scheme": CHECKSUM_SCHEME, "block_bytes": BLOCK_BYTES},
            "tables": [{**s.to_dict(), "chunk_rows": self._chunk_rows[s.name]} for s in self.specs],
            "attrs": self.attrs,
        }
        _fsync_tree(self.tmp)
        _write_json(self.tmp / "zarr.json",
                    {"zarr_format": 3, "node_type": "group", "attributes": {"tiermem": meta}})
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        self._done = True
        return open_store(self.path)

    def abort(self) -> None:
        """Drop the temporary folder; the target is untouched."""
        self._done = True
        shutil.rmtree(self.tmp, ignore_errors=True)


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``target`` for a write in progress, named after this process."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process (or a pid we cannot judge): keep
    return True


def clean_stale_temps(target: Path) -> list[Path]:
    """Remove what interrupted writes of ``target`` left (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``)
    whose process is gone; a live writer's folder is kept. Returns the removed paths."""
    removed: list[Path] = []
    pat = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-[A-Za-z0-9_]+$")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for e in entries:
        m = pat.match(e.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        p = Path(e.path)
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for fn in files:
            fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def create_store(path: str | os.PathLike[str], specs: Sequence[TableSpec], *,
                 overwrite: bool = False, attrs: Mapping[str, Any] | None = None,
                 chunk_rows: int | None = None) -> StoreWriter:
    """Start a new store; write rows with ``.write`` and finish with ``.commit()``.

    Use it as a context manager: it commits on success and removes the
    temporary folder on error.
    """
    return StoreWriter(path, specs, overwrite=overwrite, attrs=attrs, chunk_rows=chunk_rows)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled,
                leave=False)


def create_store_from_arrays(path: str | os.PathLike[str], tables: Mapping[str, Any], *,
                             dtype: RowDtype | str = RowDtype.FLOAT32, overwrite: bool = False,
                             block_rows: int = 65536, progress: bool = False,
                             attrs: Mapping[str, Any] | None = None,
                             chunk_rows: int | None = None) -> StoreInfo:
    """Create a store from 2-D arrays (numpy, torch tensors, memmaps), streamed in blocks.

    Arrays are read ``block_rows`` rows at a time, so an ``np.memmap`` or an
    mmap-loaded torch tensor is never loaded whole.
    """
    rd = RowDtype.parse(dtype)
    specs = []
    for name, arr in tables.items():
        shape = tuple(arr.shape)
        if len(shape) != 2:
            raise ConfigError(f"table {name!r}: expected a 2-D array, got shape {shape}")
        specs.append(TableSpec(name, shape[0], shape[1], rd))
    total = sum(s.rows * s.dim * 4 for s in specs)
    with create_store(path, specs, overwrite=overwrite, attrs=attrs, chunk_rows=chunk_rows) as w, \
            _progress(total, "create-store", progress) as bar:
        for s in specs:
            arr = tables[s.name]
            for start in range(0, s.rows, block_rows):
                block = arr[start:start + block_rows]
                if hasattr(block, "detach"):
                    block = block.detach().float().numpy()
                block = np.asarray(block, dtype=np.float32)
                w.write(s.name, block)
                bar.update(block.nbytes)
    return open_store(path)


def create_random_store(path: str | os.PathLike[str], specs: Sequence[TableSpec], *, seed: int = 0,
                        scale: float | None = None, overwrite: bool = False,
                        block_rows: int = 65536, progress: bool = False,
                        attrs: Mapping[str, Any] | None = None,
                        chunk_rows: int | None = None) -> StoreInfo:
    """Create a store of uniform random rows in ``[-scale, scale]``.

    ``scale`` defaults to ``1/sqrt(rows)`` per table, the DLRM reference init.
    Deterministic for a seed; generated block by block.
    """
    specs = list(specs)
    total = sum(s.rows * s.dim * 4 for s in specs)
    with create_store(path, specs, overwrite=overwrite, attrs=attrs, chunk_rows=chunk_rows) as w, \
            _progress(total, "create-store", progress) as bar:
        for ti, s in enumerate(specs):
            rng = np.random.default_rng([seed, ti])
            a = float(scale) if scale is not None else 1.0 / np.sqrt(s.rows)
            for start in range(0, s.rows, block_rows):
                n = min(block_rows, s.rows - start)
                block = rng.uniform(-a, a, size=(n, s.dim)).astype(np.float32)
                w.write(s.name, block)
                bar.update(block.nbytes)
    return open_store(path)


def random_table(spec: TableSpec, seed: int, ti: int, scale: float | None = None) -> np.ndarray:
    """The float rows :func:`create_random_store` generates for table ``ti`` (for tests)."""
    rng = np.random.default_rng([seed, ti])
    a = float(scale) if scale is not None else 1.0 / np.sqrt(spec.rows)
    blocks = [rng.uniform(-a, a, size=(min(65536, spec.rows - s), spec.dim)).astype(np.float32)
              for s in range(0, spec.rows, 65536)]
    return np.concatenate(blocks)


# ---------------------------------------------------------------------------
# opening


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise StoreFormatError(f"{what}: {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreFormatError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise StoreFormatError(f"{what}: {path} does not hold a JSON object")
    return obj


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else default


def _check_array(meta: dict[str, Any], where: Path, shape: tuple[int, int], chunk_rows: int,
                 dtype: np.dtype) -> None:
    def bad(msg: str) -> StoreFormatError:
        return StoreFormatError(f"{where}: {msg}")

    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise bad("not a zarr v3 array")
    got_shape = meta.get("shape")
    if not isinstance(got_shape, list) or tuple(got_shape) != shape:
        raise bad(f"shape {got_shape} != expected {list(shape)}")
    if meta.get("data_type") != np.dtype(dtype).name:
        raise bad(f"data_type {meta.get('data_type')!r} != expected {np.dtype(dtype).name!r}")
    grid = meta.get("chunk_grid")
    cs = _get(_get(grid, "configuration"), "chunk_shape")
    if _get(grid, "name") != "regular" or cs != [chunk_rows, shape[1]]:
        raise bad(f"chunk grid {grid} != regular [{chunk_rows}, {shape[1]}]")
    cke = meta.get("chunk_key_encoding")
    sep = _get(_get(cke, "configuration", {}), "separator", "/")
    if _get(cke, "name") != "default" or sep != "/":
        raise bad(f"chunk_key_encoding {cke} is not default with '/'")
    codecs = meta.get("codecs")
    if (not isinstance(codecs, list) or len(codecs) != 1 or _get(codecs[0], "name") != "bytes"
            or _get(_get(codecs[0], "configuration", {}), "endian", "little") != "little"):
        raise bad(f"codecs {codecs} are not a single uncompressed little-endian 'bytes' codec")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file"


def _check_chunks(dir_: Path, n_chunks: int, chunk_bytes: int, real_root: str | None = None,
                  what: str = "chunk file") -> None:
    inside = None if real_root is None else real_root.rstrip(os.sep) + os.sep
    for i in range(n_chunks):
        p = dir_ / "c" / str(i) / "0"
        try:
            st = p.stat()
        except FileNotFoundError:
            raise StoreFormatError(f"{what} {p} is missing") from None
        except OSError as e:
            raise StoreFormatError(f"{what} {p} cannot be read: {os_reason(e)}") from None
        if not stat.S_ISREG(st.st_mode):  # a folder's st_size may equal the chunk's size
            raise StoreFormatError(f"{what} {p} is not a regular file "
                                   f"({_file_kind(st.st_mode)})")
        size = st.st_size
        if size != chunk_bytes:
            raise StoreFormatError(
                f"{what} {p} has {size} bytes, expected {chunk_bytes} (truncated or foreign)"
            )
        if inside is not None and (os.path.islink(p) or os.path.islink(p.parent)
                                   or os.path.islink(p.parent.parent)):
            real = os.path.realpath(p)
            if not real.startswith(inside):
                raise StoreFormatError(f"{what} {p} resolves outside the store (to {real}): "
                                       "a store's files must lie inside it")
    if inside is not None:  # a table's folders themselves may be links
        real = os.path.realpath(dir_)
        if not (real + os.sep).startswith(inside):
            raise StoreFormatError(f"{dir_} resolves outside the store (to {real}): "
                                   "a store's files must lie inside it")


def open_store(path: str | os.PathLike[str], *, check_chunks: bool = True) -> StoreInfo:
    """Open and validate a store; raises StoreFormatError naming what is wrong."""
    root = Path(path)
    try:
        root.stat()
    except FileNotFoundError:
        raise StoreFormatError(f"store {root} does not exist") from None
    except OSError as e:  # a symlink loop, a permission denied on the way...
        raise StoreFormatError(f"store {root} cannot be opened: {os_reason(e)}") from None
    if not root.is_dir():
        raise StoreFormatError(f"store {root} is not a folder (a zarr v3 group is a folder)")
    group = _load_json(root / "zarr.json", "store metadata")
    if group.get("zarr_format") != 3 or group.get("node_type") != "group":
        raise StoreFormatError(f"{root / 'zarr.json'}: not a zarr v3 group")
    meta = _get(group.get("attributes"), "tiermem")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise StoreFormatError(
            f"{root} is not a tiermem store (no complete 'tiermem' attribute: foreign group,"
            " or an interrupted creation)"
        )
    version = meta.get("version")
    if version not in READ_VERSIONS:
        raise StoreFormatError(f"{root}: store format version {version!r} is not supported "
                               "(this tiermem reads versions "
                               f"{', '.join(map(str, READ_VERSIONS))})")
    checked = version >= 2
    if checked and meta.get("checksum") != {"scheme": CHECKSUM_SCHEME, "block_bytes": BLOCK_BYTES}:
        raise StoreFormatError(f"{root}: checksum scheme {meta.get('checksum')!r} is not "
                               f"supported (this tiermem checks {CHECKSUM_SCHEME!r} per "
                               f"{BLOCK_BYTES}-byte block)")
    real_root = os.path.realpath(root)
    tables_meta = meta.get("tables")
    if not isinstance(tables_meta, list) or not tables_meta:
        raise StoreFormatError(f"{root}: metadata lists no tables")
    infos = []
    seen: set[str] = set()
    for tm in tables_meta:
        try:
            spec = TableSpec.from_dict(tm)
            chunk_rows = int(tm["chunk_rows"])
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise StoreFormatError(f"{root}: bad table entry {tm!r} in metadata ({e})") from None
        if chunk_rows < 1:
            raise StoreFormatError(f"{root}: table {spec.name!r} has chunk_rows {chunk_rows}")
        if spec.name in seen:
            raise StoreFormatError(f"{root}: table {spec.name!r} is listed twice in the metadata")
        seen.add(spec.name)
        _check_declared_size(root, spec, chunk_rows)
        wdir = root / "tables" / spec.name / "weight"
        if not (wdir / "zarr.json").exists():
            raise StoreFormatError(f"table {spec.name!r} is missing: {wdir} has no zarr.json")
        _check_array(_load_json(wdir / "zarr.json", f"table {spec.name!r}"), wdir,
                     (spec.rows, spec.dim), chunk_rows, spec.dtype.numpy)
        qdir = None
        if spec.dtype.quantized:
            qdir = root / "tables" / spec.name / "qparams"
            _check_array(_load_json(qdir / "zarr.json", f"table {spec.name!r} qparams"), qdir,
                         (spec.rows, 2), chunk_rows, np.dtype(np.float32))
        sums: dict[str, Path | None] = {"weight": None, "qparams": None}
        for arr, rb in (("weight", spec.row_bytes), ("qparams", 8)):
            if checked and (arr == "weight" or qdir is not None):
                sdir = root / "tables" / spec.name / f"{arr}_sums"
                sm = _sums_meta(spec.rows, chunk_rows, rb)
                _check_array(_load_json(sdir / "zarr.json", f"table {spec.name!r} {arr} checksums"),
                             sdir, tuple(sm["shape"]), 1, np.dtype(np.uint64))
                sums[arr] = sdir
            if version >= 3 and (arr == "weight" or qdir is not None):
                rdir = root / "tables" / spec.name / f"{arr}_rowsums"
                _check_array(_load_json(rdir / "zarr.json",
                                        f"table {spec.name!r} {arr} row checksums"),
                             rdir, (spec.rows, 1), chunk_rows, np.dtype(np.uint32))
                sums[arr + "_rows"] = rdir
        info = TableInfo(spec, chunk_rows, wdir, qdir, weight_sums_dir=sums["weight"],
                         qparams_sums_dir=sums["qparams"],
                         weight_rowsums_dir=sums.get("weight_rows"),
                         qparams_rowsums_dir=sums.get("qparams_rows"))
        if check_chunks:
            _check_chunks(wdir, info.n_chunks, chunk_rows * spec.row_bytes, real_root)
            if qdir is not None:
                _check_chunks(qdir, info.n_chunks, chunk_rows * 8, real_root)
            for arr, rb in (("weight", spec.row_bytes), ("qparams", 8)):
                block_dir, row_dir = sums[arr], sums.get(arr + "_rows")
                if block_dir is not None:
                    _check_chunks(block_dir, info.n_chunks, 8 * blocks_per_chunk(chunk_rows * rb),
                                  real_root, what="checksum file")
                if row_dir is not None:
                    _check_chunks(row_dir, info.n_chunks, 4 * chunk_rows, real_root,
                                  what="row checksum file")
        infos.append(info)
    return StoreInfo(root, tuple(infos), meta.get("attrs", {}), version=int(version))


def _check_declared_size(root: Path, spec: TableSpec, chunk_rows: int) -> None:
    """Refuse metadata that claims more bytes than the store's file system holds.

    Checked before any file is listed: a table of 10**11 rows would otherwise
    be a million stat calls, or a huge allocation later.
    """
    try:
        st = os.statvfs(root)
        fs_bytes = st.f_blocks * st.f_frsize
    except (OSError, AttributeError):
        return
    n_chunks = -(-spec.rows // chunk_rows)
    declared = n_chunks * chunk_rows * spec.row_bytes
    if fs_bytes and declared > fs_bytes:
        raise StoreFormatError(
            f"{root}: table {spec.name!r} declares {spec.rows:,} rows x {spec.row_bytes} bytes "
            f"({declared / 2**30:,.1f} GiB), more than its file system holds "
            f"({fs_bytes / 2**30:,.1f} GiB): the metadata is wrong")


def read_rows_into(t: TableInfo, start: int, stop: int, w: np.ndarray,
                   q: np.ndarray | None, on_bytes: Callable[[int], None] | None = None) -> None:
    """Sequentially read rows ``[start, stop)`` of a table into ``w`` (and ``q``)."""
    start, stop = start + t.row_offset, stop + t.row_offset
    cr = t.chunk_rows
    rb = t.spec.row_bytes
    wv = w.reshape(-1).view(np.uint8).data
    qv = q.reshape(-1).view(np.uint8).data if q is not None else None
    pos = start
    while pos < stop:
        c = pos // cr
        end = min(stop, (c + 1) * cr)
        off = pos - c * cr
        pread_exact(t.weight_chunk(c), off * rb, wv[(pos - start) * rb:(end - start) * rb])
        if qv is not None:
            pread_exact(t.qparams_chunk(c), off * 8, qv[(pos - start) * 8:(end - start) * 8])
        if on_bytes is not None:
            on_bytes((end - pos) * rb)
        pos = end


def table_specs(items: Iterable[tuple[str, int, int]], dtype: RowDtype | str) -> list[TableSpec]:
    """Build specs from ``(name, rows, dim)`` triples with one dtype."""
    return [TableSpec(n, r, d, RowDtype.parse(dtype)) for n, r, d in items]
