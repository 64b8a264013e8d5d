"""Placement planner: which table, or which row range of a table, lives on which shard.

Strategies (``make_plan(..., strategy=)``)
------------------------------------------
``singular``
    Every table on shard 0, the others idle: the baseline of Lui et al.,
    "Understanding Capacity-Driven Scale-Out Neural Recommendation Inference"
    (ISPASS 2021). Impossible when the store is larger than one shard.
``capacity``
    Bin-packing by bytes: tables, largest first, each onto the shard holding
    the fewest bytes that has room for it.
``load``
    Bin-packing by expected lookups per batch (the trace profile's pooling
    factors x batch size, per table): hottest first onto the least loaded
    shard with room; bytes break ties.
``rowwise``
    Every table cut into ``min(shards, rows)`` contiguous row ranges of equal
    *measured* load (TorchRec's row-wise sharding, with ranges balanced by the
    access histogram, not by row count), the ranges of a table on distinct
    shards, the biggest ranges first onto the emptiest shard.
``cost``
    Minimises the :class:`CostModel`'s predicted slowest shard per batch. It
    starts from the best of the other strategies' plans under the same model
    and improves it by local search: move a piece of the slowest shard to
    another shard, move a load-balanced part of one (a row-wise split of a hot
    piece), or swap two pieces; each step must lower the slowest shard's time
    (or, at equal slowest, the sum of squared shard times; a split, which adds
    a piece and a reply, must lower the slowest by 0.1 %). Its prediction is
    therefore never worse than any other strategy's; it is deterministic.

In ``capacity`` and ``load``, a table larger than one shard's capacity is cut
row-wise first: into ranges of equal rows (capacity) or equal measured load
(load), enough of them to fit and to come near the per-shard share of bytes
(or lookups). Whenever the packer meets a piece that fits on no shard, it
fills the shard with the most free bytes with the piece's first rows and
goes on with the rest. With ``capacity_bytes >= total / shards + largest
row`` this always succeeds; between that and an exact fit, rows may not
pack (row granularity), which is a :class:`~tiermem.errors.CapacityError`
saying which rows could not be placed.

Every plan places every row exactly once and respects the capacity
(:class:`~runtime.distributed.plan.ShardPlan` checks both). Impossible plans
raise :class:`~tiermem.errors.CapacityError` naming what does not fit; bad
arguments :class:`~tiermem.errors.ConfigError`.

The cost model
--------------
Shards serve a batch in parallel; the batch waits for the slowest. The model
follows what :class:`~runtime.distributed.routing.Router` does: every shard
holding a piece is called once per batch, and every piece it holds gets the
bag lengths of the batch and returns ``B x D`` pooled (partial) sums, even
when no id of the batch falls in its rows. Per shard ``s`` holding pieces
``p`` (``L`` the expected lookups per batch in the piece's rows, ``U`` the
expected distinct rows among them, ``r`` the table's row bytes, ``D`` its
dimension, ``B`` the batch size)::

    time_s = rtt_us                                       one round trip (if s holds a piece)
           + sum_p L * (ns_per_lookup + r * ns_per_lookup_byte) / 1000         SLS compute
           + sum_p U * r * ns_per_byte_gathered / 1000          distinct rows from memory
           + sum_p [L * id_bytes + B * id_bytes                   request: ids, bag lengths
                    + B * D * output_value_bytes] / bandwidth       reply: pooled sums

(bandwidth in bytes per microsecond). Splitting a table over ``k`` pieces
therefore costs ``k`` replies of ``B x D`` values and up to ``k`` round
trips: that is what keeps the cost strategy from splitting everything, and
why row-wise sharding loses on small-pooling workloads.

The defaults are rough figures for a Ray actor call between processes of one
CPU host: about 1 ms per round trip (task submission, scheduling, pickling and
the reply through the object store), ~7 ns per lookup of a 64-dim fp32 row
in the SLS kernel (2 ns + 256 B x 0.02 ns), 0.1 ns per byte of distinct row
gathered from DRAM, and 1 GB/s for (de)serialised payloads. (Measured on a
busy 2-core VM with Ray 2: 1.2 ms for an empty call, ~0.85 GB/s marginal for
numpy replies; replies above Ray's inline-object limit, 100 KiB, paid another
~2.5 ms there, which the model leaves out.) Calibrate them with the
``--cost-*`` flags of ``tiermem plan`` for another setup.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.distributed.plan import Piece, ShardPlan
from runtime.distributed.profile import TableProfile, TraceProfile
from tiermem.config import ConfigDict
from tiermem.errors import CapacityError, ConfigError
from tiermem.format import TableSpec

__all__ = ["DEFAULT_BATCH_SIZE", "STRATEGIES", "CostModel", "compare_strategies", "make_plan"]

STRATEGIES = ("singular", "capacity", "load", "rowwise", "cost")
DEFAULT_BATCH_SIZE = 2048
"""Batch size of the uniform profile used when no profile is given."""


@dataclass(frozen=True)
class CostModel(ConfigDict):
    """Predicted per-batch time of each shard (formula and defaults: module docstring)."""

    rtt_us: float = 1000.0
    """One request/reply round trip to a shard actor, microseconds."""
    ns_per_lookup: float = 2.0
    """SLS cost per lookup, fixed part (index load, loop), nanoseconds."""
    ns_per_lookup_byte: float = 0.02
    """SLS cost per lookup and row byte (accumulating the row), nanoseconds."""
    ns_per_byte_gathered: float = 0.1
    """Cost per byte of each distinct row a batch gathers from memory, nanoseconds."""
    network_gbytes_per_s: float = 1.0
    """Bandwidth of requests and replies (serialised), GB/s (10^9 bytes)."""
    id_bytes: int = 8
    """Bytes per id and per offset in a request (int64)."""
    output_value_bytes: int = 4
    """Bytes per pooled value in a reply (fp32 partial sums)."""

    def __post_init__(self) -> None:
        for name in ("rtt_us", "ns_per_lookup", "ns_per_lookup_byte", "ns_per_byte_gathered"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ConfigError(f"cost model {name} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        bw = self.network_gbytes_per_s
        if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not math.isfinite(bw) \
                or bw <= 0:
            raise ConfigError(f"cost model network_gbytes_per_s must be a number > 0, got {bw!r}")
        object.__setattr__(self, "network_gbytes_per_s", float(bw))
        for name in ("id_bytes", "output_value_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"cost model {name} must be an integer >= 0, got {v!r}")

    # -- per-table coefficients ------------------------------------------------------
    def _coefficients(self, specs: Sequence[TableSpec], batch_size: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(alpha, gamma, kappa)`` per table: a piece costs ``L a + U g + k`` us."""
        bpu = self.network_gbytes_per_s * 1000.0  # bytes per microsecond
        rb = np.array([_row_bytes(s) for s in specs], np.float64)
        dim = np.array([s.dim for s in specs], np.float64)
        alpha = (self.ns_per_lookup + rb * self.ns_per_lookup_byte) / 1000.0 + self.id_bytes / bpu
        gamma = rb * self.ns_per_byte_gathered / 1000.0
        kappa = batch_size * (self.id_bytes + dim * self.output_value_bytes) / bpu
        return alpha, gamma, kappa

    def predict(self, plan: ShardPlan, profile: TraceProfile) -> dict[str, Any]:
        """Predicted per-batch figures of ``plan`` under ``profile``.

        Returns ``shard_us`` (per shard), ``slowest_us``, ``slowest_shard``,
        ``mean_us``, ``shard_lookups``, ``lookup_balance`` (max / mean over all
        shards; 1 is perfect), ``shard_bytes``, ``byte_balance``,
        ``shard_network_bytes`` (request + reply bytes per batch),
        ``shards_touched`` (shards called per batch), ``batch_size``.
        """
        specs = list(plan.tables.values())
        prof = profile.align(specs)
        index = {s.name: i for i, s in enumerate(specs)}
        S, B = plan.num_shards, prof.batch_size
        n = len(plan.pieces)
        t = np.empty(n, np.int64)
        sh = np.empty(n, np.int64)
        ls = np.empty(n)
        us = np.empty(n)
        pos = 0
        for name in plan.tables:
            ps = plan.table_pieces(name)
            a = np.array([p.row_start for p in ps], np.int64)
            b = np.array([p.row_stop for p in ps], np.int64)
            tp = prof.tables[name]
            sl = slice(pos, pos + len(ps))
            t[sl] = index[name]
            sh[sl] = [p.shard for p in ps]
            ls[sl] = np.atleast_1d(tp.range_lookups(a, b))
            us[sl] = np.atleast_1d(tp.range_unique(a, b))
            pos += len(ps)
        times = _shard_times(self, specs, B, S, t, sh, ls, us)
        dim = np.array([s.dim for s in specs], np.float64)
        net = np.bincount(sh, ls * self.id_bytes + B * (self.id_bytes
                                                        + dim[t] * self.output_value_bytes),
                          minlength=S)
        lk = np.bincount(sh, ls, minlength=S)
        nb = np.array(plan.shard_bytes(), np.float64)
        slow = int(np.argmax(times))
        return {
            "shard_us": [round(float(x), 3) for x in times],
            "slowest_us": round(float(times[slow]), 3), "slowest_shard": slow,
            "mean_us": round(float(times.mean()), 3),
            "shard_lookups": [round(float(x), 3) for x in lk],
            "lookup_balance": round(_balance(lk), 4),
            "shard_bytes": [int(x) for x in nb], "byte_balance": round(_balance(nb), 4),
            "shard_network_bytes": [int(round(float(x))) for x in net],
            "shards_touched": int(np.count_nonzero(np.bincount(sh, minlength=S))),
            "batch_size": B,
        }


def _balance(x: np.ndarray) -> float:
    m = float(np.mean(x))
    return float(np.max(x)) / m if m > 0 else 1.0


def _row_bytes(spec: TableSpec) -> int:
    """Bytes per row in the store and in memory (int8 rows carry 8 bytes of scale/bias)."""
    return spec.nbytes // spec.rows


def _shard_times(cm: CostModel, specs: Sequence[TableSpec], batch_size: int, num_shards: int,
                 t: np.ndarray, shard: np.ndarray, lookups: np.ndarray, unique: np.ndarray
                 ) -> np.ndarray:
    """Per-shard time of pieces given as arrays (table index, shard, L, U)."""
    alpha, gamma, kappa = cm._coefficients(specs, batch_size)
    w = lookups * alpha[t] + unique * gamma[t] + kappa[t]
    held = np.bincount(shard, minlength=num_shards) > 0
    return cm.rtt_us * held + np.bincount(shard, w, minlength=num_shards)


# -- internal pieces -------------------------------------------------------------------

class _P:
    """A piece while planning: table index, rows [a, b), shard, bytes, load."""

    __slots__ = ("t", "a", "b", "shard", "nbytes", "l", "u")

    def __init__(self, t: int, a: int, b: int, shard: int, nbytes: int, load: float, u: float):
        self.t, self.a, self.b, self.shard, self.nbytes, self.l, self.u = t, a, b, shard, \
            nbytes, load, u

    def copy(self) -> _P:
        return _P(self.t, self.a, self.b, self.shard, self.nbytes, self.l, self.u)


class _Ctx:
    """Everything a strategy needs: tables, shards, capacity, aligned profile, cost model."""

    def __init__(self, specs: list[TableSpec], num_shards: int, capacity: int | None,
                 profile: TraceProfile, cm: CostModel):
        self.specs = specs
        self.S = num_shards
        self.T = len(specs)
        self.capacity = capacity
        self.cap: float = float("inf") if capacity is None else capacity
        self.profile = profile
        self.tps: list[TableProfile] = [profile.tables[s.name] for s in specs]
        self.cm = cm
        self.rb = [_row_bytes(s) for s in specs]
        self.rows = [s.rows for s in specs]
        self.max_rows = [None if capacity is None else capacity // r for r in self.rb]
        self.alpha, self.gamma, self.kappa = cm._coefficients(specs, profile.batch_size)

    def piece(self, t: int, a: int, b: int, shard: int = -1) -> _P:
        tp = self.tps[t]
        return _P(t, a, b, shard, (b - a) * self.rb[t], tp.range_lookups(a, b),
                  tp.range_unique(a, b))

    def pieces_at(self, t: int, cuts: np.ndarray) -> list[_P]:
        """Pieces of table ``t`` between consecutive ``cuts`` (vectorized load)."""
        a, b = cuts[:-1], cuts[1:]
        tp = self.tps[t]
        ls = np.atleast_1d(tp.range_lookups(a, b))
        us = np.atleast_1d(tp.range_unique(a, b))
        return [_P(t, int(x), int(y), -1, int(y - x) * self.rb[t], float(lv), float(uv))
                for x, y, lv, uv in zip(a, b, ls, us, strict=True)]

    def row_cuts(self, t: int, k: int) -> np.ndarray:
        """``k`` ranges of table ``t`` of (nearly) equal rows, each within a shard."""
        n = self.rows[t]
        j = np.arange(1, k, dtype=np.int64)
        return TableProfile._constrain(j * n // k, 0, n, k, self.max_rows[t])

    def w(self, p: _P) -> float:
        """A piece's share of its shard's time (everything but the round trip)."""
        return p.l * self.alpha[p.t] + p.u * self.gamma[p.t] + self.kappa[p.t]

    def times(self, pieces: Sequence[_P]) -> np.ndarray:
        return _shard_times(self.cm, self.specs, self.profile.batch_size, self.S,
                            np.array([p.t for p in pieces], np.int64),
                            np.array([p.shard for p in pieces], np.int64),
                            np.array([p.l for p in pieces]), np.array([p.u for p in pieces]))

    def objective(self, pieces: Sequence[_P]) -> tuple[float, float]:
        t = self.times(pieces)
        return float(t.max()), float((t * t).sum())

    def to_plan(self, pieces: Sequence[_P], strategy: str, meta: Mapping[str, Any]) -> ShardPlan:
        # lookups rounded as the plan file writes them, so a plan equals its reloaded self
        out = tuple(Piece(self.specs[p.t].name, p.a, p.b, p.shard, p.nbytes,
                          round(max(0.0, float(p.l)), 3)) for p in pieces)
        return ShardPlan(self.S, {s.name: s for s in self.specs}, out, self.capacity, strategy,
                         dict(meta))


def _merge_adjacent(ctx: _Ctx, pieces: Iterable[_P]) -> list[_P]:
    """Join touching ranges of one table on one shard (same cost, fewer pieces)."""
    out: list[_P] = []
    for p in sorted(pieces, key=lambda p: (p.t, p.a)):
        last = out[-1] if out else None
        if last is not None and last.t == p.t and last.b == p.a and last.shard == p.shard:
            out[-1] = ctx.piece(p.t, last.a, p.b, p.shard)
        else:
            out.append(p)
    return out


# -- packing ---------------------------------------------------------------------------

def _pack(ctx: _Ctx, items: list[_P], by: str) -> list[_P]:
    """Greedy bin-packing (largest ``by`` first, onto the lightest shard with room).

    ``by`` is ``"bytes"`` or ``"lookups"``: what orders the items and what
    "lightest" means (the other breaks ties). Pieces of one table go to
    distinct shards when there is a choice. A piece that fits nowhere is cut:
    its first rows fill the shard with the most free bytes, the rest is
    queued again.
    """
    S = ctx.S
    sb = [0] * S
    sl = [0.0] * S
    held: list[set[int]] = [set() for _ in range(S)]
    seq = 0

    def key(p: _P) -> tuple[float, float, int, int, int]:
        nonlocal seq
        seq += 1
        w = (p.nbytes, p.l) if by == "bytes" else (p.l, p.nbytes)
        return (-w[0], -w[1], p.t, p.a, seq)

    heap = [(key(p), p) for p in items]
    heapq.heapify(heap)
    out: list[_P] = []
    while heap:
        _, p = heapq.heappop(heap)
        fits = [s for s in range(S) if sb[s] + p.nbytes <= ctx.cap]
        if fits:
            pref = [s for s in fits if p.t not in held[s]] or fits
            if by == "bytes":
                s = min(pref, key=lambda s: (sb[s], sl[s], s))
            else:
                s = min(pref, key=lambda s: (sl[s], sb[s], s))
        else:
            s = max(range(S), key=lambda s: (ctx.cap - sb[s], -s))
            free = ctx.cap - sb[s]
            n = int(free // ctx.rb[p.t])
            if n < 1:
                name = ctx.specs[p.t].name
                raise CapacityError(
                    f"cannot place rows [{p.a}, {p.b}) of table {name!r} ({p.nbytes:,} bytes): "
                    f"the largest free space left on a shard is {int(free):,} bytes, less than "
                    f"one {ctx.rb[p.t]}-byte row (free bytes per shard: "
                    f"{[int(ctx.cap - x) for x in sb]}); the rows do not pack into {S} shards "
                    f"x {ctx.capacity:,} bytes: give more capacity or shards")
            tail = ctx.piece(p.t, p.a + n, p.b)
            p = ctx.piece(p.t, p.a, p.a + n)
            heapq.heappush(heap, (key(tail), tail))
        p.shard = s
        sb[s] += p.nbytes
        sl[s] += p.l
        held[s].add(p.t)
        out.append(p)
    return out


def _presplit(ctx: _Ctx, by: str) -> list[_P]:
    """Whole tables, except those larger than a shard: cut into ranges (bytes or load)."""
    items: list[_P] = []
    total_b = sum(s.nbytes for s in ctx.specs)
    total_l = sum(tp.lookups for tp in ctx.tps)
    for t, spec in enumerate(ctx.specs):
        if spec.nbytes <= ctx.cap:
            items.append(ctx.piece(t, 0, spec.rows))
            continue
        mr = ctx.max_rows[t]
        assert mr is not None
        k = -(-spec.rows // mr)  # enough ranges to fit one per shard
        if by == "bytes":
            k = max(k, math.ceil(spec.nbytes / (total_b / ctx.S)))
        elif total_l > 0:
            k = max(k, math.ceil(ctx.tps[t].lookups / (total_l / ctx.S) - 1e-9))
        k = min(max(k, 1), spec.rows, max(ctx.S, -(-spec.rows // mr)))
        if by == "bytes":
            cuts = ctx.row_cuts(t, k)
        else:
            cuts = ctx.tps[t].split_points(k, max_rows=mr)
        items.extend(ctx.pieces_at(t, cuts))
    return items


def _singular(ctx: _Ctx) -> list[_P]:
    return [ctx.piece(t, 0, s.rows, 0) for t, s in enumerate(ctx.specs)]


def _capacity(ctx: _Ctx) -> list[_P]:
    return _pack(ctx, _presplit(ctx, "bytes"), "bytes")


def _load(ctx: _Ctx) -> list[_P]:
    return _pack(ctx, _presplit(ctx, "lookups"), "lookups")


def _rowwise(ctx: _Ctx) -> list[_P]:
    items: list[_P] = []
    for t, spec in enumerate(ctx.specs):
        k = min(ctx.S, spec.rows)
        mr = ctx.max_rows[t]
        if mr is not None:
            k = max(k, -(-spec.rows // mr))
        items.extend(ctx.pieces_at(t, ctx.tps[t].split_points(k, max_rows=mr)))
    return _pack(ctx, items, "bytes")


# -- the cost strategy: local search ---------------------------------------------------

_SPLIT_MIN_GAIN = 1e-3
"""A split must cut the slowest shard's time by this share (moves and swaps take any gain)."""


class _Search:
    """Local search on the cost model's shard times (see the module docstring).

    A shard's time is ``rtt * (it holds a piece) + sum of its pieces' w``
    (:meth:`_Ctx.w`), so a move changes two shards by known amounts and all
    destinations of one move are scored at once with numpy. Moving rows next
    to a piece of the same table on the destination merges the two (one
    reply less), which lets the search undo splits that stop paying.
    """

    def __init__(self, ctx: _Ctx, pieces: list[_P], max_iters: int):
        self.ctx = ctx
        self.pieces = [p.copy() for p in pieces]
        self.max_iters = max_iters
        self.stats = {"iterations": 0, "moves": 0, "splits": 0, "swaps": 0}
        self._rebuild()

    def _rebuild(self) -> None:
        c = self.ctx
        self.pieces = _merge_adjacent(c, self.pieces)
        S = c.S
        self.wp = [c.w(p) for p in self.pieces]
        sh = np.array([p.shard for p in self.pieces], np.int64)
        self.W = np.bincount(sh, np.array(self.wp), minlength=S)
        self.cnt = np.bincount(sh, minlength=S)
        self.bytes = np.bincount(sh, np.array([p.nbytes for p in self.pieces], np.float64),
                                 minlength=S)
        self.times = c.cm.rtt_us * (self.cnt > 0) + self.W
        self.starts = {(p.t, p.a): p for p in self.pieces}
        self.stops = {(p.t, p.b): p for p in self.pieces}

    @property
    def objective(self) -> tuple[float, float]:
        return float(self.times.max()), float((self.times * self.times).sum())

    @staticmethod
    def _better(new: tuple[float, float], cur: tuple[float, float]) -> bool:
        if new[0] > cur[0]:
            return False
        return new[0] < cur[0] - 1e-9 * max(1.0, cur[0]) or new[1] < cur[1] * (1 - 1e-7) - 1e-12

    def _others_max(self, s: int) -> tuple[int, float, float]:
        """Index and value of the slowest shard other than ``s``, and the runner-up's value."""
        tx = self.times.copy()
        tx[s] = -np.inf
        if self.ctx.S < 2:
            return -1, -np.inf, -np.inf
        order = np.argsort(-tx, kind="stable")
        v2 = float(tx[order[1]]) if self.ctx.S > 2 else -np.inf
        return int(order[0]), float(tx[order[0]]), v2

    def _eval_move(self, s: int, w_off: float, empties: bool, w_on: float, nb: int,
                   t: int, neighbours: Sequence[_P | None]) -> tuple[int, float, float]:
        """Best destination for rows leaving shard ``s``.

        ``w_off``: what ``s`` loses (``empties``: it then holds nothing);
        ``w_on``: what a destination gains, less one reply per neighbouring
        piece of table ``t`` already there. Returns (shard or -1, new max, new
        sum of squares).
        """
        c = self.ctx
        S = c.S
        times = self.times
        new_s = times[s] - w_off - (c.cm.rtt_us if empties else 0.0)
        new_d = times + w_on + c.cm.rtt_us * (self.cnt == 0)
        for q in neighbours:
            if q is not None:
                new_d[q.shard] -= c.kappa[t]
        feas = self.bytes + nb <= c.cap
        feas[s] = False
        if not feas.any():
            return -1, math.inf, math.inf
        i1, v1, v2 = self._others_max(s)
        excl = np.where(np.arange(S) == i1, v2, v1)
        new_max = np.maximum(np.maximum(excl, new_d), new_s)
        new_sq = float((times * times).sum()) - times[s] ** 2 - times * times + new_s ** 2 \
            + new_d * new_d
        new_max = np.where(feas, new_max, np.inf)
        m = float(new_max.min())
        cand = np.flatnonzero(new_max <= m + 1e-9 * max(1.0, m))
        d = int(cand[np.argmin(new_sq[cand])])
        return d, float(new_max[d]), float(new_sq[d])

    def _sub_ranges(self, p: _P) -> list[tuple[int, int]]:
        """Prefixes and suffixes of a piece at 1/4, 1/2, 3/4 of its load (or rows)."""
        if p.b - p.a < 2:
            return []
        cuts = self.ctx.tps[p.t].split_points(min(4, p.b - p.a), start=p.a, stop=p.b)
        out = []
        for x in sorted({int(v) for v in cuts[1:-1]}):
            out.append((p.a, x))
            out.append((x, p.b))
        return out

    def _best_swap(self, s: int, cur: tuple[float, float]) -> tuple[float, float, _P, _P] | None:
        """Best exchange of a piece of ``s`` (its 8 heaviest) with a lighter one elsewhere."""
        c = self.ctx
        idx_s = [i for i, p in enumerate(self.pieces) if p.shard == s]
        idx_o = np.array([i for i, p in enumerate(self.pieces) if p.shard != s], np.int64)
        if not idx_s or idx_o.size == 0:
            return None
        wq = np.array(self.wp)[idx_o]
        dq = np.array([self.pieces[i].shard for i in idx_o], np.int64)
        nbq = np.array([self.pieces[i].nbytes for i in idx_o], np.float64)
        times = self.times
        i1, v1, v2 = self._others_max(s)
        excl = np.where(dq == i1, v2, v1)
        sq = float((times * times).sum())
        best = None
        for i in sorted(idx_s, key=lambda i: -self.wp[i])[:8]:
            p, w = self.pieces[i], self.wp[i]
            new_s = times[s] - w + wq
            new_d = times[dq] - wq + w
            feas = (wq < w) & (self.bytes[s] - p.nbytes + nbq <= c.cap) & \
                (self.bytes[dq] - nbq + p.nbytes <= c.cap)
            if not feas.any():
                continue
            new_max = np.where(feas, np.maximum(np.maximum(excl, new_s), new_d), np.inf)
            new_sq = sq - times[s] ** 2 - times[dq] ** 2 + new_s * new_s + new_d * new_d
            m = float(new_max.min())
            cand = np.flatnonzero(new_max <= m + 1e-9 * max(1.0, m))
            j = int(cand[np.argmin(new_sq[cand])])
            new = (float(new_max[j]), float(new_sq[j]))
            if self._better(new, cur) and (best is None or new < best[:2]):
                best = (new[0], new[1], p, self.pieces[int(idx_o[j])])
        return best

    def run(self) -> list[_P]:
        c = self.ctx
        for it in range(self.max_iters):
            self.stats["iterations"] = it + 1
            cur = self.objective
            s = int(np.argmax(self.times))
            mine = [(i, p) for i, p in enumerate(self.pieces) if p.shard == s]
            best: tuple[float, float, int, _P, tuple[int, int] | None] | None = None
            for i, p in mine:
                nbrs = (self.stops.get((p.t, p.a)), self.starts.get((p.t, p.b)))
                d, m, sq = self._eval_move(s, self.wp[i], self.cnt[s] == 1, self.wp[i],
                                           p.nbytes, p.t, nbrs)
                if d >= 0 and self._better((m, sq), cur) and (best is None or (m, sq) < best[:2]):
                    best = (m, sq, d, p, None)
            # a load-balanced part of a hot piece (a row-wise split)
            for _i, p in sorted(mine, key=lambda x: -self.wp[x[0]])[:4]:
                for a, b in self._sub_ranges(p):
                    part = c.piece(p.t, a, b)
                    wr = c.w(part)
                    nbr = self.stops.get((p.t, a)) if a == p.a else self.starts.get((p.t, b))
                    d, m, sq = self._eval_move(s, wr - c.kappa[p.t], False, wr, part.nbytes,
                                               p.t, (nbr,))
                    # a split adds a piece (and a reply): only for a real gain on the slowest
                    if d >= 0 and m <= cur[0] * (1 - _SPLIT_MIN_GAIN) and \
                            (best is None or m < best[0] * (1 - 1e-9)):
                        best = (m, sq, d, p, (a, b))
            if best is not None:
                _, _, d, p, rng = best
                if rng is None:
                    p.shard = d
                    self.stats["moves"] += 1
                else:
                    a, b = rng
                    self.pieces.remove(p)
                    rest = (b, p.b) if a == p.a else (p.a, a)
                    self.pieces.append(c.piece(p.t, a, b, d))
                    self.pieces.append(c.piece(p.t, rest[0], rest[1], s))
                    self.stats["splits"] += 1
                self._rebuild()
                continue
            sw = self._best_swap(s, cur)
            if sw is None:
                break
            _, _, p, q = sw
            p.shard, q.shard = q.shard, p.shard
            self.stats["swaps"] += 1
            self._rebuild()
        return self.pieces


# -- entry points ----------------------------------------------------------------------

def _check_args(specs: Any, num_shards: Any, capacity_bytes: Any, strategy: Any
                ) -> list[TableSpec]:
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; valid strategies: "
                          f"{', '.join(STRATEGIES)}")
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) \
            or num_shards < 1:
        raise ConfigError(f"num_shards must be a positive integer, got {num_shards!r}")
    if capacity_bytes is not None and (isinstance(capacity_bytes, bool) or not isinstance(
            capacity_bytes, (int, np.integer)) or capacity_bytes < 1):
        raise ConfigError(f"capacity_bytes must be a positive integer (bytes per shard) or "
                          f"None, got {capacity_bytes!r}")
    specs = list(specs)
    if not specs:
        raise ConfigError("no tables to place")
    seen: set[str] = set()
    for s in specs:
        if not isinstance(s, TableSpec):
            raise ConfigError(f"expected TableSpec tables, got {type(s).__name__}")
        if s.name in seen:
            raise ConfigError(f"table {s.name!r} is listed twice")
        seen.add(s.name)
    return specs


def _check_fit(specs: list[TableSpec], S: int, cap: int | None, strategy: str) -> None:
    if cap is None:
        return
    big = max(specs, key=lambda s: (_row_bytes(s), s.name))
    if _row_bytes(big) > cap:
        raise CapacityError(f"table {big.name!r}: one row is {_row_bytes(big):,} bytes, more than "
                            f"a shard's capacity of {cap:,} bytes")
    total = sum(s.nbytes for s in specs)
    if total > S * cap:
        raise CapacityError(f"the store's {total:,} bytes do not fit in {S} shards x {cap:,} "
                            f"bytes ({S * cap:,} bytes)")
    if strategy == "singular" and total > cap:
        largest = max(specs, key=lambda s: (s.nbytes, s.name))
        raise CapacityError(f"strategy 'singular' puts all {total:,} bytes of the store on one "
                            f"shard, more than its capacity of {cap:,} bytes (largest table "
                            f"{largest.name!r}: {largest.nbytes:,} bytes)")


_BUILDERS = {"singular": _singular, "capacity": _capacity, "load": _load, "rowwise": _rowwise}


def make_plan(store_specs: Iterable[TableSpec], num_shards: int, capacity_bytes: int | None = None,
              strategy: str = "cost", profile: TraceProfile | None = None,
              cost_model: CostModel | None = None, *, store: str | None = None,
              max_iters: int | None = None) -> ShardPlan:
    """Place the tables ``store_specs`` on ``num_shards`` shards of ``capacity_bytes`` each.

    ``capacity_bytes=None``: shards have no byte limit. ``profile`` (a
    :class:`TraceProfile`, aligned to the tables here) gives the load; None
    means uniform access with one lookup per sample and a batch of
    :data:`DEFAULT_BATCH_SIZE`. ``store`` is recorded in the plan. The plan's
    ``meta`` holds ``store``, ``profile`` (summary), ``cost_model`` and
    ``predicted`` (:meth:`CostModel.predict`; for ``cost`` also the other
    strategies' slowest shard under ``candidates`` and the search counters
    under ``search``). ``max_iters`` bounds the cost strategy's local search
    (default ``50 * (shards + tables)``).
    """
    specs = _check_args(store_specs, num_shards, capacity_bytes, strategy)
    S = int(num_shards)
    cap = None if capacity_bytes is None else int(capacity_bytes)
    _check_fit(specs, S, cap, strategy)
    cm = cost_model if cost_model is not None else CostModel()
    if not isinstance(cm, CostModel):
        raise ConfigError(f"cost_model must be a CostModel, got {type(cm).__name__}")
    if profile is None:
        profile = TraceProfile.uniform(specs, DEFAULT_BATCH_SIZE)
    if not isinstance(profile, TraceProfile):
        raise ConfigError(f"profile must be a TraceProfile, got {type(profile).__name__}")
    prof = profile.align(specs)
    ctx = _Ctx(specs, S, cap, prof, cm)
    extra: dict[str, Any] = {}
    if strategy != "cost":
        pieces = _BUILDERS[strategy](ctx)
    else:
        cands: dict[str, Any] = {}
        best: tuple[tuple[float, float], str, list[_P]] | None = None
        for name in ("singular", "capacity", "load", "rowwise"):
            if name == "singular" and cap is not None and sum(s.nbytes for s in specs) > cap:
                cands[name] = "does not fit on one shard"
                continue
            try:
                ps = _merge_adjacent(ctx, _BUILDERS[name](ctx))
            except CapacityError as e:
                cands[name] = f"error: {e}"
                continue
            obj = ctx.objective(ps)
            cands[name] = round(obj[0], 3)
            if best is None or obj < best[0]:
                best = (obj, name, ps)
        if best is None:  # every start failed: report the first error
            raise CapacityError(next(v for v in cands.values() if isinstance(v, str)
                                     and v.startswith("error: "))[len("error: "):])
        if max_iters is not None and (isinstance(max_iters, bool) or int(max_iters) < 0):
            raise ConfigError(f"max_iters must be an integer >= 0, got {max_iters!r}")
        iters = 50 * (S + len(specs)) if max_iters is None else int(max_iters)
        search = _Search(ctx, best[2], iters)
        pieces = _merge_adjacent(ctx, search.run())
        if ctx.objective(pieces)[0] > best[0][0]:  # float noise: never worse than the start
            pieces = best[2]
        extra = {"candidates": cands, "search": {"start": best[1], **search.stats}}
    pieces = _merge_adjacent(ctx, pieces)
    meta: dict[str, Any] = {"store": store, "profile": prof.to_dict(), "cost_model": cm.to_dict()}
    plan = ctx.to_plan(pieces, strategy, meta)
    pred = cm.predict(plan, prof)
    if extra:
        pred["candidates"] = extra["candidates"]
        meta["search"] = extra["search"]
    meta["predicted"] = pred
    return ShardPlan(plan.num_shards, plan.tables, plan.pieces, plan.capacity_bytes,
                     plan.strategy, meta)


def compare_strategies(store_specs: Iterable[TableSpec], num_shards: int,
                       capacity_bytes: int | None = None, profile: TraceProfile | None = None,
                       cost_model: CostModel | None = None,
                       strategies: Sequence[str] = STRATEGIES) -> dict[str, dict[str, Any]]:
    """Every strategy's plan and prediction side by side (the simulated cluster).

    Returns strategy -> ``{"plan": ShardPlan, "predicted": {...}, "pieces": n,
    "split_tables": [...]}``, or ``{"error": message}`` where the strategy
    cannot place the tables.
    """
    specs = list(store_specs)
    out: dict[str, dict[str, Any]] = {}
    for name in strategies:
        try:
            plan = make_plan(specs, num_shards, capacity_bytes, name, profile, cost_model)
        except CapacityError as e:
            out[name] = {"error": str(e)}
            continue
        out[name] = {"plan": plan, "predicted": plan.meta["predicted"],
                     "pieces": len(plan.pieces), "split_tables": plan.split_tables}
    return out
