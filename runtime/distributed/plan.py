"""A placement plan: which table, or which row range of a table, lives on which shard.

The plan file is JSON (``tiermem plan`` writes it, the sharded runtime reads
it)::

    {"format": "tiermem-plan", "version": 1,
     "strategy": "cost", "num_shards": 2, "capacity_bytes": 1073741824,
     "store": "/data/store",                  # informative; the runtime takes a store path
     "tables": {"t0": {"rows": 1000000, "dim": 64, "dtype": "float32", "nbytes": 256000000}},
     "pieces": [{"table": "t0", "row_start": 0, "row_stop": 400000, "shard": 1,
                 "nbytes": 102400000, "lookups": 1800.5}, ...],
     "shards": [{"shard": 0, "nbytes": ..., "lookups": ..., "predicted_us": ...}, ...],
     "profile": {...}, "cost_model": {...}, "predicted": {...}}

``pieces`` is the placement proper: every row of every table in exactly one
piece, pieces of one table contiguous and in row order. ``lookups`` are the
expected lookups per batch from the trace profile the planner used (0 when it
had none). The other keys describe the plan for people and benchmarks and are
not needed to run it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiermem.atomicio import chmod_default
from tiermem.config import ConfigDict
from tiermem.errors import ConfigError
from tiermem.format import StoreInfo, TableSpec

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "Piece", "ShardPlan", "load_plan"]

PLAN_FORMAT = "tiermem-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Piece(ConfigDict):
    """Rows ``[row_start, row_stop)`` of ``table``, held by ``shard``."""

    table: str
    row_start: int
    row_stop: int
    shard: int
    nbytes: int = 0
    """Bytes of the piece in the store (rows x row bytes, plus int8 qparams)."""
    lookups: float = 0.0
    """Expected lookups per batch that fall into this piece (from a profile)."""

    def __post_init__(self) -> None:
        for name in ("row_start", "row_stop", "shard", "nbytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"plan piece of table {self.table!r}: {name} must be a "
                                  f"non-negative integer, got {v!r}")
        if self.row_stop <= self.row_start:
            raise ConfigError(f"plan piece of table {self.table!r}: empty row range "
                              f"[{self.row_start}, {self.row_stop})")
        if isinstance(self.lookups, bool) or not isinstance(self.lookups, (int, float)) \
                or self.lookups < 0:
            raise ConfigError(f"plan piece of table {self.table!r}: lookups must be >= 0, "
                              f"got {self.lookups!r}")
        object.__setattr__(self, "lookups", float(self.lookups))

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def name(self) -> str:
        """The piece's table name inside its shard (the table's own name when whole)."""
        return self.table if self.row_start == 0 and not self._split else (
            f"{self.table}.rows-{self.row_start}-{self.row_stop}")

    # set by ShardPlan: whether the table is split over several pieces
    _split: bool = field(default=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "lookups": round(self.lookups, 3)}


@dataclass(frozen=True)
class ShardPlan(ConfigDict):
    """A validated placement of a store's tables on ``num_shards`` shards."""

    num_shards: int
    tables: Mapping[str, TableSpec]
    pieces: tuple[Piece, ...]
    capacity_bytes: int | None = None
    strategy: str = "manual"
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Everything else in the file: store path, profile, cost model, predictions."""

    def __post_init__(self) -> None:
        if isinstance(self.num_shards, bool) or not isinstance(self.num_shards, int) \
                or self.num_shards < 1:
            raise ConfigError(f"plan num_shards must be a positive integer, got "
                              f"{self.num_shards!r}")
        tables = dict(self.tables)
        object.__setattr__(self, "tables", tables)
        by_table: dict[str, list[Piece]] = {n: [] for n in tables}
        for p in self.pieces:
            if p.table not in tables:
                raise ConfigError(f"plan piece names table {p.table!r}, which the plan's "
                                  f"tables do not list ({sorted(tables)[:8]})")
            if p.shard >= self.num_shards:
                raise ConfigError(f"plan piece of table {p.table!r} rows [{p.row_start}, "
                                  f"{p.row_stop}) is on shard {p.shard}, but the plan has "
                                  f"{self.num_shards} shards (0..{self.num_shards - 1})")
            by_table[p.table].append(p)
        pieces: list[Piece] = []
        for name, spec in tables.items():
            ps = sorted(by_table[name], key=lambda p: p.row_start)
            if not ps:
                raise ConfigError(f"plan places no rows of table {name!r}")
            pos = 0
            for p in ps:
                if p.row_start != pos:
                    what = "overlap" if p.row_start < pos else "gap"
                    raise ConfigError(
                        f"plan pieces of table {name!r} {what} at row {min(pos, p.row_start)}: "
                        f"every row must be placed exactly once")
                pos = p.row_stop
            if pos != spec.rows:
                raise ConfigError(f"plan pieces of table {name!r} cover rows [0, {pos}) but the "
                                  f"table has {spec.rows} rows")
            split = len(ps) > 1
            for p in ps:
                object.__setattr__(p, "_split", split)
            pieces.extend(ps)
        object.__setattr__(self, "pieces", tuple(pieces))
        if self.capacity_bytes is not None:
            for s, used in enumerate(self.shard_bytes()):
                if used > self.capacity_bytes:
                    raise ConfigError(f"plan puts {used:,} bytes on shard {s}, more than its "
                                      f"capacity of {self.capacity_bytes:,} bytes")

    # -- views ----------------------------------------------------------------
    def shard_pieces(self, shard: int) -> list[Piece]:
        """The pieces held by ``shard``, in plan order."""
        return [p for p in self.pieces if p.shard == shard]

    def table_pieces(self, table: str) -> list[Piece]:
        """The pieces of ``table`` in row order."""
        return [p for p in self.pieces if p.table == table]

    def shard_bytes(self) -> list[int]:
        out = [0] * self.num_shards
        for p in self.pieces:
            out[p.shard] += p.nbytes
        return out

    def shard_lookups(self) -> list[float]:
        out = [0.0] * self.num_shards
        for p in self.pieces:
            out[p.shard] += p.lookups
        return out

    @property
    def split_tables(self) -> list[str]:
        """Tables spread over several pieces (row-wise split)."""
        return [n for n in self.tables if len(self.table_pieces(n)) > 1]

    def check_store(self, store: StoreInfo) -> None:
        """Raise unless the store holds every planned table with the same shape."""
        have = {t.name: t.spec for t in store.tables}
        for name, spec in self.tables.items():
            got = have.get(name)
            if got is None:
                raise ConfigError(f"the plan places table {name!r}, which the store "
                                  f"{store.path} lacks")
            if (got.rows, got.dim, got.dtype) != (spec.rows, spec.dim, spec.dtype):
                raise ConfigError(
                    f"table {name!r}: the plan was made for {spec.rows} x {spec.dim} "
                    f"{spec.dtype.value}, the store has {got.rows} x {got.dim} {got.dtype.value}")

    # -- files ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The plan file's JSON: its fields, what follows from them (bytes and lookups per
        shard, the tables' bytes) and ``meta``'s keys at the top level."""
        d: dict[str, Any] = {
            "format": PLAN_FORMAT, "version": PLAN_VERSION, "strategy": self.strategy,
            "num_shards": self.num_shards, "capacity_bytes": self.capacity_bytes,
            "tables": {n: {"rows": s.rows, "dim": s.dim, "dtype": s.dtype.value,
                           "nbytes": s.nbytes} for n, s in self.tables.items()},
            "pieces": [p.to_dict() for p in self.pieces],
            "shards": [{"shard": s, "nbytes": b, "lookups": round(lk, 3),
                        "tables": sorted({p.table for p in self.shard_pieces(s)})}
                       for s, (b, lk) in enumerate(zip(self.shard_bytes(),
                                                       self.shard_lookups(), strict=True))],
        }
        pred = self.meta.get("predicted")
        us = pred.get("shard_us") if isinstance(pred, Mapping) else None
        if isinstance(us, Sequence) and len(us) == self.num_shards:
            for entry, t in zip(d["shards"], us, strict=True):
                entry["predicted_us"] = t
        for k, v in self.meta.items():
            if k not in d:
                d[k] = v
        return d

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON, atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            chmod_default(fd)  # mkstemp's 0600 would outlive the rename
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "plan") -> ShardPlan:
        """A plan file's JSON (:meth:`to_dict`'s): its header checked, the derived keys
        (``shards``, the tables' ``nbytes``) dropped, the others kept in ``meta``; errors
        name ``where``."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: a plan is a JSON object, got {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            raise ConfigError(f"{where}: not a tiermem plan (format is {d.get('format')!r}, "
                              f"expected {PLAN_FORMAT!r})")
        if d.get("version") != PLAN_VERSION:
            raise ConfigError(f"{where}: plan version {d.get('version')!r} is not supported "
                              f"(this tiermem reads version {PLAN_VERSION})")
        known = {"format", "version", "strategy", "num_shards", "capacity_bytes", "tables",
                 "pieces", "shards"}
        try:
            # an entry's nbytes is derived: TableSpec.from_dict reads only the spec's keys
            tables = {n: {**dict(t), "name": n} for n, t in dict(d["tables"]).items()}
            return super().from_dict({
                "num_shards": d["num_shards"], "tables": tables, "pieces": list(d["pieces"]),
                "capacity_bytes": d.get("capacity_bytes"),
                "strategy": d.get("strategy", "manual"),
                "meta": {k: v for k, v in d.items() if k not in known}})
        except KeyError as e:
            raise ConfigError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, AttributeError) as e:
            raise ConfigError(f"{where}: malformed plan ({e})") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def whole_tables(cls, specs: Iterable[TableSpec], assignment: Mapping[str, int] | Sequence[int],
                     num_shards: int, **kwargs: Any) -> ShardPlan:
        """A plan of whole tables: ``assignment`` maps table -> shard (or lists shards in order)."""
        specs = list(specs)
        if not isinstance(assignment, Mapping):
            assignment = {s.name: int(a) for s, a in zip(specs, assignment, strict=True)}
        pieces = tuple(Piece(s.name, 0, s.rows, int(assignment[s.name]), s.nbytes) for s in specs)
        return cls(num_shards, {s.name: s for s in specs}, pieces, **kwargs)


def load_plan(path: str | os.PathLike[str]) -> ShardPlan:
    """Read and validate a plan file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"plan file {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read plan file {p}: {e.strerror}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"plan file {p} is not valid JSON: {e}") from None
    return ShardPlan.from_dict(d, where=f"plan file {p}")
