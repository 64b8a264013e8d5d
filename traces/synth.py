"""Production-style synthetic lookup traces, and their calibration.

Popularity
    Per table, ranks follow a Zipf law truncated to the table
    (``P(rank k) ~ k^-alpha``, k in 1..rows, sampled by inverting the
    continuous CDF); ranks map to rows through a fixed per-table affine
    bijection so that hot rows are scattered over the table, as hashed ids are
    in production. ``alpha`` is global or per table; ``alpha_spread`` makes
    tables heterogeneous (``alpha_t = alpha * exp(spread * z_t)``, z_t fixed
    normal quantiles in a seeded order).
Pooling
    :class:`Pooling`: fixed, uniform, or heavy-tailed (log-normal, with a
    share of empty bags and a cap, the shapes of Meta's traces); per table,
    e.g. DLRM-v2's multi-hot sizes (``pooling="dlrmv2"``).
Drift
    The hot set moves: each batch the rank -> row map shifts by
    ``drift * rows`` ranks, so new rows enter at the top and every row cools
    down slowly (trending items in, old items out).
Temporal locality
    With probability ``locality`` a lookup repeats an id drawn from the
    table's last ``locality_window`` batches.

:func:`calibrate` fits ``alpha`` and ``alpha_spread`` so that the per-batch
reuse histogram (Meta's ``locality_stats`` bins, fraction of lookups per bin)
matches a target, and reports the total-variation distance to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np

from tiermem.config import ConfigDict
from tiermem.errors import ConfigError
from tiermem.features import SparseFeatures
from traces.formats.base import Trace
from traces.formats.batch import TraceBatch
from traces.presets import DLRMV2_MULTI_HOT, TABLE_PRESETS, table_preset

__all__ = [
    "CalibrationResult",
    "GeneratorConfig",
    "Pooling",
    "PoolingKind",
    "SyntheticTrace",
    "calibrate",
    "fit_zipf_alpha",
    "format_calibration",
    "generate",
    "synthetic_batches",
    "zipf_ids",
]

# -- Zipf ------------------------------------------------------------------------------

def _coprime_multiplier(n: int, seed: int) -> int:
    rng = np.random.default_rng([seed, n])
    while True:
        a = int(rng.integers(1, max(2, n))) | 1
        if math.gcd(a, n) == 1:
            return a


def _zipf_ranks(u: np.ndarray, rows: int, alpha: float) -> np.ndarray:
    """0-based ranks from uniforms ``u`` (inverse of the continuous truncated CDF)."""
    if alpha == 0:
        return np.minimum((u * rows).astype(np.int64), rows - 1)
    if abs(alpha - 1.0) < 1e-9:
        k = np.exp(u * math.log(rows + 1.0))
    else:
        e = 1.0 - alpha
        k = (1.0 + u * ((rows + 1.0) ** e - 1.0)) ** (1.0 / e)
    rank = np.minimum(k.astype(np.int64) - 1, rows - 1)
    return np.maximum(rank, 0)


def _rank_to_row(rank: np.ndarray, rows: int, seed: int) -> np.ndarray:
    a = _coprime_multiplier(rows, seed)
    c = int(np.random.default_rng([seed, rows, 1]).integers(0, rows))
    return (rank * a + c) % rows


def zipf_ids(rng: np.random.Generator, rows: int, size: int, alpha: float,
             *, seed: int = 0) -> np.ndarray:
    """``size`` ids in ``[0, rows)`` with Zipf(alpha) popularity (alpha=0: uniform)."""
    if rows < 1:
        raise ConfigError(f"rows must be >= 1, got {rows}")
    if alpha < 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    if alpha == 0:
        return rng.integers(0, rows, size, dtype=np.int64)
    return _rank_to_row(_zipf_ranks(rng.random(size), rows, alpha), rows, seed)


def _zipf_pmf(rows: int, alpha: float, k: np.ndarray) -> np.ndarray:
    """P(rank = k) (k 1-based) of the sampler above: mass of [k, k+1) under x^-alpha."""
    if abs(alpha - 1.0) < 1e-9:
        return np.log((k + 1.0) / k) / math.log(rows + 1.0)
    e = 1.0 - alpha
    return ((k + 1.0) ** e - k ** e) / ((rows + 1.0) ** e - 1.0)


def fit_zipf_alpha(ids: np.ndarray, rows: int, *, min_count: int = 20,
                   bounds: tuple[float, float] = (0.05, 3.0)) -> float:
    """Fit the Zipf exponent of ``ids`` drawn from a table of ``rows`` rows.

    Ranks are empirical (ids by decreasing count); the fit is the maximum
    likelihood of the truncated model over the ranks whose count is at least
    ``min_count`` (there the empirical order is reliable), conditioned on
    falling among them.
    """
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    c = np.sort(counts)[::-1].astype(np.float64)
    top = int(np.searchsorted(-c, -min_count, side="right"))
    if top < 3:
        raise ConfigError(f"too few ids with >= {min_count} uses ({top}) to fit a Zipf law")
    c = c[:top]
    k = np.arange(1, top + 1, dtype=np.float64)

    def nll(a: float) -> float:
        p = _zipf_pmf(rows, a, k)
        return -float((c * np.log(p / p.sum())).sum())

    lo, hi = bounds
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = nll(x1), nll(x2)
    for _ in range(80):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = nll(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = nll(x2)
    return (lo + hi) / 2


# -- pooling ---------------------------------------------------------------------------

class PoolingKind(StrEnum):
    """Shape of the pooling-factor (ids per bag) distribution."""

    FIXED = "fixed"
    UNIFORM = "uniform"
    LOGNORMAL = "lognormal"


@dataclass(frozen=True)
class Pooling:
    """Pooling-factor distribution of one table.

    ``fixed``: every bag has ``mean`` ids. ``uniform``: integers in
    ``[low, high]``. ``lognormal`` (heavy-tailed): ``ceil(X)`` with X
    log-normal of shape ``sigma`` and ``E[X] = mean - 0.5`` (so the mean is
    about ``mean``), capped at ``high`` when ``high > 0``. Any kind: a share
    ``p_empty`` of bags is empty (Meta's traces have many).
    """

    kind: PoolingKind = PoolingKind.FIXED
    mean: float = 1.0
    low: int = 0
    high: int = 0
    sigma: float = 1.0
    p_empty: float = 0.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", PoolingKind(self.kind))
        except ValueError:
            raise ConfigError(f"Expected pooling kind in {[k.value for k in PoolingKind]}. "
                              f"Got {self.kind!r} instead.") from None
        if self.kind is PoolingKind.FIXED and (self.mean < 0 or self.mean != int(self.mean)):
            raise ConfigError(f"Expected an integer mean >= 0 for fixed pooling. Got {self.mean}.")
        if self.kind is PoolingKind.UNIFORM and not 0 <= self.low <= self.high:
            raise ConfigError(f"Expected 0 <= low <= high. Got {self.low}, {self.high} instead.")
        if self.kind is PoolingKind.LOGNORMAL and (self.mean <= 0.5 or self.sigma <= 0):
            raise ConfigError(f"Expected mean > 0.5 and sigma > 0 for lognormal pooling. "
                              f"Got {self.mean}, {self.sigma} instead.")
        if self.high < 0:
            raise ConfigError(f"Expected high >= 0. Got {self.high} instead.")
        if not 0 <= self.p_empty < 1:
            raise ConfigError(f"Expected 0 <= p_empty < 1. Got {self.p_empty} instead.")

    @classmethod
    def parse(cls, spec: str) -> Pooling:
        """From text: ``"4"``, ``"fixed:4"``, ``"uniform:1:10"``,
        ``"lognormal:MEAN:SIGMA[:MAX[:P_EMPTY]]"``."""
        parts = spec.strip().split(":")
        try:
            if len(parts) == 1:
                return cls(PoolingKind.FIXED, float(int(parts[0])))
            kind = parts[0]
            if kind == "fixed" and len(parts) == 2:
                return cls(PoolingKind.FIXED, float(int(parts[1])))
            if kind == "uniform" and len(parts) == 3:
                lo, hi = int(parts[1]), int(parts[2])
                return cls(PoolingKind.UNIFORM, (lo + hi) / 2, lo, hi)
            if kind == "lognormal" and 3 <= len(parts) <= 5:
                return cls(PoolingKind.LOGNORMAL, float(parts[1]), 0,
                           int(parts[3]) if len(parts) > 3 else 0, float(parts[2]),
                           float(parts[4]) if len(parts) > 4 else 0.0)
        except ValueError:
            pass
        raise ConfigError(f"bad pooling {spec!r}: expected N, fixed:N, uniform:LO:HI or "
                          "lognormal:MEAN:SIGMA[:MAX[:P_EMPTY]]")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` bag lengths (int64)."""
        if self.kind is PoolingKind.FIXED:
            out = np.full(n, int(self.mean), np.int64)
        elif self.kind is PoolingKind.UNIFORM:
            out = rng.integers(self.low, self.high + 1, n, dtype=np.int64)
        else:
            m = self.mean - 0.5
            mu = math.log(m) - self.sigma ** 2 / 2
            out = np.ceil(rng.lognormal(mu, self.sigma, n)).astype(np.int64)
            if self.high > 0:
                np.minimum(out, self.high, out=out)
        if self.p_empty > 0:
            out[rng.random(n) < self.p_empty] = 0
        return out

    @property
    def expected_mean(self) -> float:
        """Mean bag length (approximate for a capped log-normal)."""
        m = {PoolingKind.FIXED: self.mean, PoolingKind.UNIFORM: (self.low + self.high) / 2,
             PoolingKind.LOGNORMAL: self.mean}[self.kind]
        return float(m) * (1 - self.p_empty)


# -- the generator ---------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratorConfig(ConfigDict):
    """A seeded production-style workload (see the module docstring).

    Use ``GeneratorConfig.from_preset("criteo_kaggle", ...)`` or give
    ``table_rows`` directly.
    """

    table_rows: tuple[int, ...]
    """Rows per table."""
    batch_size: int = 2048
    n_batches: int = 10
    alpha: float | tuple[float, ...] = 1.05
    """Zipf exponent: one for all tables or one per table."""
    alpha_spread: float = 0.0
    """Heterogeneity of the per-table exponents (log-normal spread around ``alpha``)."""
    pooling: Pooling | tuple[Pooling, ...] = field(default_factory=Pooling)
    """Pooling-factor distribution, one for all tables or one per table."""
    locality: float = 0.0
    """Probability that a lookup repeats an id of the last ``locality_window`` batches."""
    locality_window: int = 4
    active_fraction: float = 1.0
    """Share of each table's rows that Zipf ranks range over (the rest is never looked
    up, drift aside): real tables have many rows that a batch window never touches."""
    drift: float = 0.0
    """Rank shift per batch, as a fraction of the table's rows (the hot set moves)."""
    keys: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        rows = tuple(int(r) for r in self.table_rows)
        if not rows or min(rows) < 1:
            raise ConfigError(f"Expected table_rows >= 1. Got {list(rows)} instead.")
        object.__setattr__(self, "table_rows", rows)
        T = len(rows)
        if self.batch_size < 1 or self.n_batches < 0:
            raise ConfigError(f"Expected batch_size >= 1 and n_batches >= 0. Got "
                              f"{self.batch_size}, {self.n_batches} instead.")
        alphas = self.alpha if isinstance(self.alpha, tuple | list) else (self.alpha,)
        if len(alphas) not in (1, T) or min(alphas) < 0:
            raise ConfigError(f"Expected alpha >= 0, one or one per table ({T}). Got "
                              f"{self.alpha} instead.")
        if isinstance(self.alpha, list):
            object.__setattr__(self, "alpha", tuple(float(a) for a in self.alpha))
        if self.alpha_spread < 0:
            raise ConfigError(f"Expected alpha_spread >= 0. Got {self.alpha_spread} instead.")
        pools = self.pooling if isinstance(self.pooling, tuple | list) else (self.pooling,)
        if len(pools) not in (1, T) or not all(isinstance(p, Pooling) for p in pools):
            raise ConfigError(f"Expected one Pooling or one per table ({T}).")
        if isinstance(self.pooling, list):
            object.__setattr__(self, "pooling", tuple(self.pooling))
        if not 0 <= self.locality < 1:
            raise ConfigError(f"Expected 0 <= locality < 1. Got {self.locality} instead.")
        if self.locality_window < 1:
            raise ConfigError(f"Expected locality_window >= 1. Got {self.locality_window}.")
        if not 0 < self.active_fraction <= 1:
            raise ConfigError(f"Expected 0 < active_fraction <= 1. Got {self.active_fraction}.")
        if not 0 <= self.drift <= 1:
            raise ConfigError(f"Expected 0 <= drift <= 1. Got {self.drift} instead.")
        if self.keys is not None:
            keys = tuple(self.keys)
            if len(keys) != T or len(set(keys)) != T:
                raise ConfigError(f"Expected {T} distinct keys. Got {list(keys)} instead.")
            object.__setattr__(self, "keys", keys)

    @classmethod
    def from_preset(cls, preset: str, *, pooling: Pooling | tuple[Pooling, ...] | str | None = None,
                    **kw: Any) -> GeneratorConfig:
        """Tables of a preset (:data:`TABLE_PRESETS` or a custom ``"rows,rows,..."``).

        ``pooling="dlrmv2"`` gives each table its DLRM-v2 multi-hot size.
        """
        rows = table_preset(preset)
        if pooling is not None:
            kw["pooling"] = _pooling_arg(pooling, len(rows))
        if preset in TABLE_PRESETS and len(rows) == 26 and "keys" not in kw:
            kw["keys"] = tuple(f"C{i + 1}" for i in range(26))
        return cls(rows, **kw)

    @classmethod
    def for_tables(cls, keys: Sequence[str], rows: Sequence[int], *,
                   pooling: Pooling | tuple[Pooling, ...] | str | None = None,
                   **kw: Any) -> GeneratorConfig:
        """Tables named and sized as given (e.g. a store's), so its trace replays on them.

        Ids stay below each table's rows; the popularity and pooling shapes are
        the same as for a preset.
        """
        if pooling is not None:
            kw["pooling"] = _pooling_arg(pooling, len(rows))
        return cls(tuple(int(r) for r in rows), keys=tuple(str(k) for k in keys), **kw)

    @property
    def table_keys(self) -> tuple[str, ...]:
        return self.keys if self.keys is not None else tuple(
            f"t{i}" for i in range(len(self.table_rows)))

    def table_alphas(self) -> np.ndarray:
        """The effective Zipf exponent of every table."""
        T = len(self.table_rows)
        a = np.broadcast_to(np.asarray(self.alpha, np.float64), (T,)).copy()
        if self.alpha_spread > 0 and T > 1:
            z = _normal_quantiles(T)
            np.random.default_rng([self.seed, 7]).shuffle(z)
            a *= np.exp(self.alpha_spread * z)
        return a

    def table_pooling(self) -> tuple[Pooling, ...]:
        p = self.pooling
        return p if isinstance(p, tuple) else (p,) * len(self.table_rows)


def _pooling_arg(pooling: Pooling | tuple[Pooling, ...] | str,
                 n_tables: int) -> Pooling | tuple[Pooling, ...]:
    """A pooling spec: a Pooling, one per table, text, or ``"dlrmv2"`` (multi-hot sizes)."""
    if pooling == "dlrmv2":
        if n_tables != len(DLRMV2_MULTI_HOT):
            raise ConfigError("dlrmv2 multi-hot pooling needs the 26 Criteo tables")
        return tuple(Pooling(PoolingKind.FIXED, float(m)) for m in DLRMV2_MULTI_HOT)
    if isinstance(pooling, str):
        return Pooling.parse(pooling)
    return pooling


def _normal_quantiles(n: int) -> np.ndarray:
    # inverse normal CDF at (i + 0.5) / n, by bisection on erf (no scipy)
    q = (np.arange(n) + 0.5) / n
    lo, hi = np.full(n, -8.0), np.full(n, 8.0)
    erf = np.vectorize(math.erf)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = 0.5 * (1 + erf(mid / math.sqrt(2))) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return (lo + hi) / 2


def generate(config: GeneratorConfig) -> Iterator[Any]:
    """Yield ``config.n_batches`` :class:`~traces.formats.TraceBatch` (no dense, no labels)."""
    rows = config.table_rows
    T = len(rows)
    keys = config.table_keys
    alphas = config.table_alphas()
    pools = config.table_pooling()
    B = config.batch_size
    rng = np.random.default_rng(config.seed)
    maps = [(_coprime_multiplier(r, config.seed + t),
             int(np.random.default_rng([config.seed + t, r, 1]).integers(0, r)))
            for t, r in enumerate(rows)]
    history: list[list[np.ndarray]] = [[] for _ in range(T)]
    for i in range(config.n_batches):
        lens = np.concatenate([pools[t].sample(rng, B) for t in range(T)])
        per_table = lens.reshape(T, B).sum(axis=1)
        vals = []
        for t in range(T):
            r, n = rows[t], int(per_table[t])
            r_act = max(1, int(round(config.active_fraction * r)))
            rank = _zipf_ranks(rng.random(n), r_act, float(alphas[t]))
            if config.drift > 0:
                shift = int(config.drift * r * i) % r
                rank = (rank - shift) % r
            a, c = maps[t]
            ids = (rank * a + c) % r
            if config.locality > 0:
                h = history[t]
                if h:
                    hist = np.concatenate(h)
                    m = np.flatnonzero(rng.random(n) < config.locality)
                    if hist.size and m.size:
                        ids[m] = hist[rng.integers(0, hist.size, m.size)]
                h.append(ids)
                if len(h) > config.locality_window:
                    h.pop(0)
            vals.append(ids)
        sf = SparseFeatures.from_lengths(keys, np.concatenate(vals), lens)
        yield TraceBatch(None, sf, None)


class SyntheticTrace(Trace):
    """:func:`generate` as a :class:`~traces.formats.Trace` (keys, rows, iteration)."""

    num_dense = 0
    has_labels = False

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.keys = config.table_keys
        self.skipped = 0
        self.skip_reasons: list[str] = []

    @property
    def rows(self) -> tuple[int, ...]:
        return self.config.table_rows

    def __len__(self) -> int:
        return self.config.n_batches

    def __iter__(self) -> Iterator[Any]:
        return generate(self.config)


def synthetic_batches(table_rows: Sequence[int], *, batch_size: int, n_batches: int,
                      alpha: float = 1.05, pooling: int = 1, keys: Sequence[str] | None = None,
                      seed: int = 0) -> Iterator[SparseFeatures]:
    """Batches of fixed pooling factor over tables of ``table_rows`` rows (simple form)."""
    if batch_size < 1 or n_batches < 0 or pooling < 0:
        raise ConfigError("batch_size must be >= 1, n_batches and pooling >= 0")
    keys = list(keys) if keys is not None else [f"t{i}" for i in range(len(table_rows))]
    rng = np.random.default_rng(seed)
    T = len(table_rows)
    offsets = np.arange(0, T * batch_size * pooling + 1, pooling, dtype=np.int64) \
        if pooling else np.zeros(T * batch_size + 1, np.int64)
    for _ in range(n_batches):
        values = np.concatenate([zipf_ids(rng, int(r), batch_size * pooling, alpha, seed=seed + t)
                                 for t, r in enumerate(table_rows)])
        yield SparseFeatures(tuple(keys), values, offsets)


# -- calibration -----------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` found."""

    config: GeneratorConfig
    """The input config with the fitted ``alpha``, ``alpha_spread``, ``active_fraction``."""
    distance: float
    """Total-variation distance of the fitted lookup histogram to the target, in [0, 1]."""
    histogram: tuple[float, ...]
    """Fraction of lookups per reuse bin of the fitted generator."""
    target: tuple[float, ...]
    evaluations: int
    baseline_distance: float = float("nan")
    """Distance of the input config before fitting."""
    max_column_size: int = 0
    """Most lookups one table gets in one generated batch: no id can be used more often
    within a batch, so the bins from this size up cannot be reached at this batch size
    and pooling."""

    @property
    def reachable(self) -> tuple[bool, ...]:
        """Per bin: whether a column size of at most :attr:`max_column_size` can fall in it."""
        from traces.stats import reachable_bins

        return tuple(bool(x) for x in reachable_bins(self.max_column_size))

    @property
    def unreachable_bins(self) -> list[str]:
        from traces.stats import bin_labels

        return [lab for lab, ok in zip(bin_labels(), self.reachable, strict=True) if not ok]

    @property
    def unreachable_mass(self) -> float:
        """Target share of lookups in unreachable bins: no fit gets the distance below it."""
        return float(sum(t for t, ok in zip(self.target, self.reachable, strict=True)
                         if not ok))

    @property
    def bin_distance(self) -> tuple[float, ...]:
        """Each bin's share of the distance, ``|achieved - target| / 2`` (sums to it)."""
        return tuple(abs(h - t) / 2 for h, t in zip(self.histogram, self.target, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.config.alpha, "alpha_spread": self.config.alpha_spread,
                "active_fraction": self.config.active_fraction,
                "distance": self.distance, "baseline_distance": self.baseline_distance,
                "histogram": list(self.histogram), "target": list(self.target),
                "bin_distance": list(self.bin_distance),
                "max_column_size": self.max_column_size,
                "unreachable_bins": self.unreachable_bins,
                "unreachable_mass": self.unreachable_mass,
                "evaluations": self.evaluations}


def format_calibration(res: CalibrationResult, target_name: Any = "target") -> str:
    """Per bin: achieved vs target share of lookups and its part of the distance; which
    bins this batch size and pooling cannot reach, and the floor that puts on the distance."""
    from traces.stats import bin_labels

    lines = [f"calibration to {target_name}, per reuse bin (share of lookups):",
             f"  {'bin':>16} {'achieved':>9} {'target':>8} {'distance':>9}"]
    for lab, h, t, d, ok in zip(bin_labels(), res.histogram, res.target, res.bin_distance,
                                res.reachable, strict=True):
        lines.append(f"  {lab:>16} {h:9.3f} {t:8.3f} {d:9.3f}"
                     + ("" if ok else "  unreachable"))
    cfg = res.config
    if res.unreachable_bins:
        lines.append(
            f"  {len(res.unreachable_bins)} target bins ({res.unreachable_bins[0]} and up, "
            f"{res.unreachable_mass:.1%} of the target's lookups) are unreachable: a table "
            f"gets at most {res.max_column_size} lookups in a batch of {cfg.batch_size} "
            f"samples at this pooling, so no id is used more often; the distance cannot go "
            f"below {res.unreachable_mass:.4f}. Larger --batch-size or --pooling reach them.")
    return "\n".join(lines)


def _batch_histogram(config: GeneratorConfig, n_batches: int) -> np.ndarray:
    from traces.stats import ReuseHistogram, reuse_histogram

    h = ReuseHistogram()
    for tb in generate(replace(config, n_batches=n_batches)):
        h = h + reuse_histogram(tb.sparse)
    return h.lookup_fractions


def _golden(f: Any, lo: float, hi: float, iters: int) -> tuple[float, float]:
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = f(x2)
    return (x1, f1) if f1 < f2 else (x2, f2)


def calibrate(target: Sequence[float] | np.ndarray | str, config: GeneratorConfig, *,
              n_batches: int = 1, alpha_bounds: tuple[float, float] = (0.0, 2.0),
              fraction_bounds: tuple[float, float] = (1e-4, 1.0),
              spreads: Sequence[float] = (0.0, 0.15, 0.3, 0.5, 0.75),
              rounds: int = 2, fit_fraction: bool = True) -> CalibrationResult:
    """Fit ``alpha``, ``alpha_spread`` and ``active_fraction`` to a reuse histogram.

    Parameters
    ----------
    target : array of 17 floats, or str
        Fraction of lookups per Meta reuse bin, or ``"meta2021"``,
        ``"meta2022"`` or a path to a ``locality_stats`` file.
    config : GeneratorConfig
        Tables, batch size and pooling to calibrate at (the per-batch reuse
        histogram depends on them: a batch of few lookups per table cannot
        reach the high bins). Locality and drift are kept as given.
    n_batches : int
        Batches generated per evaluation (same seed every time, so the
        objective is a smooth function of the parameters).
    alpha_bounds, fraction_bounds, spreads, rounds
        Search space: a coarse grid over (alpha, active_fraction), then
        ``rounds`` of coordinate descent (golden-section on alpha and on
        log(active_fraction), a grid over alpha_spread).
    fit_fraction : bool
        Fit ``active_fraction`` too (else keep the config's).

    Returns
    -------
    CalibrationResult
        The fitted config and its total-variation distance to the target.
    """
    from traces.stats import NUM_BINS, histogram_distance, meta_target

    tgt = meta_target(target) if isinstance(target, str) else np.asarray(target, np.float64)
    if tgt.shape != (NUM_BINS,) or tgt.min() < 0 or tgt.sum() <= 0:
        raise ConfigError(f"target must be {NUM_BINS} non-negative fractions, got {tgt.shape}")
    tgt = tgt / tgt.sum()
    evals = 0
    cache: dict[tuple[float, float, float], float] = {}

    def dist(a: float, s: float, f: float) -> float:
        nonlocal evals
        key = (round(a, 5), round(s, 5), round(f, 7))
        if key not in cache:
            evals += 1
            c = replace(config, alpha=float(a), alpha_spread=float(s),
                        active_fraction=float(min(1.0, f)))
            cache[key] = histogram_distance(_batch_histogram(c, n_batches), tgt)
        return cache[key]

    base = float(histogram_distance(_batch_histogram(config, n_batches), tgt))
    lo, hi = alpha_bounds
    flo, fhi = (np.log10(fraction_bounds[0]), np.log10(fraction_bounds[1])) if fit_fraction \
        else (np.log10(config.active_fraction),) * 2
    s_best = config.alpha_spread
    grid = [(a, f) for a in np.linspace(lo, hi, 6)
            for f in (np.linspace(flo, fhi, 5) if fit_fraction else [flo])]
    a_best, lf_best = min(grid, key=lambda x: dist(x[0], s_best, 10 ** x[1]))
    a_step, f_step = (hi - lo) / 5, (fhi - flo) / 4
    for _ in range(rounds):
        a_best, _ = _golden(lambda a, s_best=s_best, lf_best=lf_best:
                            dist(a, s_best, 10 ** lf_best),
                            max(lo, a_best - a_step), min(hi, a_best + a_step), 12)
        if fit_fraction:
            lf_best, _ = _golden(lambda lf, a_best=a_best, s_best=s_best:
                                 dist(a_best, s_best, 10 ** lf),
                                 max(flo, lf_best - f_step), min(fhi, lf_best + f_step), 12)
        s_best = float(min([s_best, *spreads], key=lambda s: dist(a_best, s, 10 ** lf_best)))
        a_step /= 2
        f_step /= 2
    fitted = replace(config, alpha=float(a_best), alpha_spread=s_best,
                     active_fraction=float(min(1.0, 10 ** lf_best)))
    h = _batch_histogram(fitted, n_batches)
    return CalibrationResult(fitted, histogram_distance(h, tgt), tuple(float(x) for x in h),
                             tuple(float(x) for x in tgt), evals, base,
                             max_column_size=_max_table_lookups(fitted, n_batches))


def _max_table_lookups(config: GeneratorConfig, n_batches: int) -> int:
    """Most lookups of one table in one of the calibration batches (the largest possible
    column size: every lookup of the table on one id)."""
    best = 0
    for tb in generate(replace(config, n_batches=max(1, n_batches))):
        sf = tb.sparse
        ends = sf.offsets[np.arange(sf.num_tables + 1) * sf.batch_size]
        best = max(best, int(np.diff(ends).max(initial=0)))
    return best
