"""Trace analysis: reuse histograms in Meta's bins, coverage, pooling factors.

The *reuse histogram* of a batch follows Meta's dlrm_datasets
``locality_stats``: per table, every distinct id of the batch has a "column
size" = how many times the batch looks it up; sizes fall in the bins::

    (0, 1], (1, 2], (2, 4], (4, 8], ..., (16384, 32768], (32768, inf)

and the histogram gives, per bin, the fraction of distinct ids and the
fraction of all lookups whose id falls in it. Over several batches the
counts add up (so the fractions are lookup-weighted means).

:func:`analyze` runs over any stream of batches in one pass; :func:`format_stats`
prints a report and :func:`plot_stats` writes PNG plots (matplotlib, Agg).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tiermem.errors import ConfigError, InvalidBatchError
from tiermem.features import SparseFeatures

__all__ = [
    "META2021_LOOKUP_FRACTIONS",
    "META2022_LOOKUP_FRACTIONS",
    "META_BIN_EDGES",
    "LocalityStats",
    "ReuseHistogram",
    "TraceStats",
    "analyze",
    "bin_labels",
    "format_stats",
    "histogram_distance",
    "meta_target",
    "parse_locality_stats",
    "plot_stats",
    "reachable_bins",
    "reuse_histogram",
    "short_bin_labels",
]

#: Left edges of Meta's column-size bins; bin i is (edges[i], edges[i+1]], the last is open.
META_BIN_EDGES: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                   4096, 8192, 16384, 32768)
NUM_BINS = len(META_BIN_EDGES)
_EDGES = np.asarray(META_BIN_EDGES, np.int64)

#: Fraction of lookups per bin, mean over the 17 files of
#: facebookresearch/dlrm_datasets locality_stats_2021.txt (t856, B=65536; MIT).
META2021_LOOKUP_FRACTIONS: tuple[float, ...] = (
    0.0568, 0.0431, 0.0746, 0.0991, 0.1125, 0.0918, 0.0645, 0.0524, 0.0492, 0.0500,
    0.0537, 0.0574, 0.0600, 0.0515, 0.0376, 0.0258, 0.0199)
#: Same for the 16 files of locality_stats_2022.txt (t788, B=131072).
META2022_LOOKUP_FRACTIONS: tuple[float, ...] = (
    0.0270, 0.0230, 0.0400, 0.0680, 0.1050, 0.1200, 0.0990, 0.0700, 0.0590, 0.0540,
    0.0400, 0.0717, 0.0640, 0.0470, 0.0210, 0.0171, 0.0751)


def bin_labels() -> list[str]:
    """``['(0, 1]', '(1, 2]', ..., '(32768+']`` as Meta prints them."""
    e = META_BIN_EDGES
    return [f"({e[i]}, {e[i + 1]}]" for i in range(len(e) - 1)] + [f"({e[-1]}+"]


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def short_bin_labels() -> list[str]:
    """Column sizes are integers, so ``(2, 4]`` is ``3-4``: ``['1', '2', '3-4', ..., '>32k']``
    (k = 1024), short enough to read unrotated on a plot axis."""
    e = META_BIN_EDGES
    out = []
    for i in range(len(e) - 1):
        lo, hi = e[i] + 1, e[i + 1]
        out.append(str(hi) if lo == hi else
                   (f"{_k(e[i])}-{_k(hi)}" if e[i] >= 1024 else f"{lo}-{_k(hi)}"))
    return out + [f">{_k(e[-1])}"]


def reachable_bins(max_column_size: int) -> np.ndarray:
    """Which bins a column size of at most ``max_column_size`` can land in (bin i needs a
    size above ``META_BIN_EDGES[i]``): a batch of B samples with at most P ids per bag
    never puts an id in a bin whose lower edge is >= B * P."""
    return _EDGES < max(0, int(max_column_size))


@dataclass(frozen=True)
class LocalityStats:
    """One block of a Meta ``locality_stats_*.txt`` file."""

    name: str
    num_batches: int
    batch_size: int
    avg_indices: float
    avg_unique: float
    unique_fractions: tuple[float, ...]
    """Fraction of distinct ids per bin."""
    lookup_fractions: tuple[float, ...]
    """Fraction of all lookups per bin."""

    def __post_init__(self) -> None:
        for name in ("unique_fractions", "lookup_fractions"):
            v = getattr(self, name)
            if len(v) != NUM_BINS:
                raise ConfigError(f"{self.name}: {name} has {len(v)} bins, expected {NUM_BINS}")


_BIN_LINE = re.compile(r"^\((\d+)(?:, (\d+)\]|\+):\s*([0-9.]+)\s*$")


def parse_locality_stats(src: str | os.PathLike[str]) -> list[LocalityStats]:
    """Parse Meta's ``locality_stats`` text (a path, or the text itself).

    Each block: a ``*.pt`` file name, "Locality stats after processing N
    batches of size B", averages, then "Histogram of col sizes:" (fraction of
    distinct ids per bin) and "Ratio of index distribution at different column
    sizes:" (fraction of lookups per bin), each with 17 ``(lo, hi]: x`` lines.
    """
    if isinstance(src, os.PathLike) or (isinstance(src, str) and "\n" not in src):
        path = Path(src)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read locality stats {path}: {e}") from None
    else:
        path, text = None, str(src)
    where = str(path) if path else "locality stats"
    out: list[LocalityStats] = []
    cur: dict[str, Any] | None = None
    section = None

    def finish() -> None:
        if cur is None:
            return
        try:
            out.append(LocalityStats(cur["name"], cur["batches"], cur["bs"], cur["idx"],
                                     cur["uniq"], tuple(cur["u"]), tuple(cur["l"])))
        except KeyError as e:
            raise ConfigError(f"{where}: block {cur.get('name')!r} lacks {e}") from None

    for ln, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if s.endswith(".pt") or s.endswith(".pt.gz"):
            finish()
            cur = {"name": s, "u": [], "l": []}
            section = None
            continue
        if cur is None:
            raise ConfigError(f"{where} line {ln}: expected a trace file name, got {s!r}")
        m = re.match(r"Locality stats after processing (\d+) batches of size (\d+)", s)
        if m:
            cur["batches"], cur["bs"] = int(m[1]), int(m[2])
        elif s.startswith("Avg # of indices:"):
            cur["idx"] = float(s.split(":")[1])
        elif s.startswith("Avg # of unique cols:"):
            cur["uniq"] = float(s.split(":")[1])
        elif s.startswith("Histogram of col sizes"):
            section = "u"
        elif s.startswith("Ratio of index distribution"):
            section = "l"
        elif (m := _BIN_LINE.match(s)) and section:
            cur[section].append(float(m[3]))
    finish()
    if not out:
        raise ConfigError(f"{where}: no locality stats blocks found")
    return out


def meta_target(name: str | os.PathLike[str] = "meta2021", *, block: str | None = None
                ) -> np.ndarray:
    """Fraction of lookups per bin to calibrate against.

    ``meta2021`` / ``meta2022``: the built-in means of Meta's published files;
    a path: a ``locality_stats`` file, averaged over its blocks (or the block
    named ``block``). Normalized to sum to 1.
    """
    if str(name) == "meta2021" and block is None:
        v = np.asarray(META2021_LOOKUP_FRACTIONS)
    elif str(name) == "meta2022" and block is None:
        v = np.asarray(META2022_LOOKUP_FRACTIONS)
    else:
        stats = parse_locality_stats(Path(name))
        if block is not None:
            stats = [s for s in stats if s.name == block]
            if not stats:
                raise ConfigError(f"{name}: no block {block!r}")
        v = np.mean([s.lookup_fractions for s in stats], axis=0)
    return v / v.sum()


def histogram_distance(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray
                       ) -> float:
    """Total-variation distance ``0.5 * sum |p - q|`` of two normalized histograms, in [0, 1]."""
    a = np.asarray(p, np.float64)
    b = np.asarray(q, np.float64)
    if a.shape != b.shape:
        raise ConfigError(f"histograms have {a.size} and {b.size} bins")
    a = a / a.sum() if a.sum() > 0 else a
    b = b / b.sum() if b.sum() > 0 else b
    return float(0.5 * np.abs(a - b).sum())


@dataclass
class ReuseHistogram:
    """Distinct ids and lookups per column-size bin (counts; add to merge)."""

    unique: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS, np.int64))
    lookups: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS, np.int64))

    def __add__(self, other: ReuseHistogram) -> ReuseHistogram:
        return ReuseHistogram(self.unique + other.unique, self.lookups + other.lookups)

    def add_counts(self, counts: np.ndarray) -> None:
        """Add the column sizes (per distinct id) of one table of one batch."""
        if counts.size == 0:
            return
        b = np.searchsorted(_EDGES, counts, side="left") - 1
        self.unique += np.bincount(b, minlength=NUM_BINS)
        self.lookups += np.bincount(b, weights=counts, minlength=NUM_BINS).astype(np.int64)

    @property
    def unique_fractions(self) -> np.ndarray:
        s = self.unique.sum()
        return self.unique / s if s else self.unique.astype(np.float64)

    @property
    def lookup_fractions(self) -> np.ndarray:
        s = self.lookups.sum()
        return self.lookups / s if s else self.lookups.astype(np.float64)


def _table_counts(sf: SparseFeatures) -> Iterable[tuple[int, np.ndarray, np.ndarray]]:
    for t in range(sf.num_tables):
        s, e = sf.table_range(t)
        ids, counts = np.unique(sf.values[s:e], return_counts=True)
        yield t, ids, counts


def reuse_histogram(batch: SparseFeatures) -> ReuseHistogram:
    """The reuse histogram of one batch (column sizes per table, Meta's bins)."""
    h = ReuseHistogram()
    for _, _, counts in _table_counts(batch):
        h.add_counts(counts)
    return h


@dataclass
class TraceStats:
    """What :func:`analyze` measured over a trace."""

    keys: tuple[str, ...]
    rows: tuple[int, ...] | None
    num_batches: int = 0
    num_samples: int = 0
    num_lookups: int = 0
    unique_per_batch: list[int] = field(default_factory=list)
    """Distinct (table, id) pairs of each batch."""
    lookups_per_batch: list[int] = field(default_factory=list)
    reuse: ReuseHistogram = field(default_factory=ReuseHistogram)
    pooling_hist: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    """Bags per pooling factor (index = bag length)."""
    pooling_sum: np.ndarray | None = None
    """Lookups per table (over all batches)."""
    coverage_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Fraction of rows (hottest first) - of all rows when ``rows`` is known."""
    coverage_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Fraction of lookups those rows take."""
    distinct_rows: int = 0
    """Rows looked up at least once over the whole trace."""

    @property
    def pooling_mean(self) -> float:
        n = self.pooling_hist.sum()
        if not n:
            return 0.0
        return float((self.pooling_hist * np.arange(self.pooling_hist.size)).sum() / n)

    def pooling_quantile(self, q: float) -> int:
        c = np.cumsum(self.pooling_hist)
        if not c.size or c[-1] == 0:
            return 0
        return int(np.searchsorted(c, q * c[-1], side="left"))

    def coverage_at(self, frac_rows: float) -> float:
        """Fraction of lookups taken by the hottest ``frac_rows`` of rows."""
        if not self.coverage_x.size:
            return 0.0
        return float(np.interp(frac_rows, self.coverage_x, self.coverage_y, left=0.0, right=1.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys), "rows": None if self.rows is None else list(self.rows),
            "num_batches": self.num_batches, "num_samples": self.num_samples,
            "num_lookups": self.num_lookups, "distinct_rows": self.distinct_rows,
            "unique_per_batch_mean": float(np.mean(self.unique_per_batch))
            if self.unique_per_batch else 0.0,
            "bins": bin_labels(),
            "reuse_unique_fractions": self.reuse.unique_fractions.round(6).tolist(),
            "reuse_lookup_fractions": self.reuse.lookup_fractions.round(6).tolist(),
            "pooling_mean": self.pooling_mean,
            "pooling_p50": self.pooling_quantile(0.5), "pooling_p99": self.pooling_quantile(0.99),
            "pooling_max": int(self.pooling_hist.size - 1),
            "pooling_empty_fraction": float(self.pooling_hist[0] / max(1, self.pooling_hist.sum())),
            "coverage": {f"{p:g}%": self.coverage_at(p / 100) for p in _COVERAGE_POINTS},
        }


_COVERAGE_POINTS = (0.01, 0.1, 1.0, 10.0, 50.0, 100.0)


class _Counter:
    """Distinct ids and their counts for one table, merged lazily (bounded work)."""

    def __init__(self) -> None:
        self.ids = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self._pend: list[tuple[np.ndarray, np.ndarray]] = []
        self._pend_n = 0

    def add(self, ids: np.ndarray, counts: np.ndarray) -> None:
        self._pend.append((ids, counts))
        self._pend_n += ids.size
        if self._pend_n > max(1 << 20, self.ids.size):
            self.merge()

    def merge(self) -> None:
        if not self._pend:
            return
        ids = np.concatenate([self.ids, *[p[0] for p in self._pend]])
        cnt = np.concatenate([self.counts, *[p[1] for p in self._pend]])
        self._pend, self._pend_n = [], 0
        u, inv = np.unique(ids, return_inverse=True)
        self.ids = u
        self.counts = np.bincount(inv.reshape(-1), weights=cnt, minlength=u.size).astype(np.int64)


def analyze(batches: Iterable[Any], *, rows: Sequence[int] | None = None,
            max_batches: int | None = None, progress: bool = False) -> TraceStats:
    """One pass over a trace (a :class:`~traces.formats.Trace`, TraceBatches or SparseFeatures).

    Parameters
    ----------
    batches : iterable
        The batches; a Trace also provides ``rows``.
    rows : sequence of int, optional
        Rows per table, for the coverage curve over all rows (default: the
        trace's, else the coverage is over rows looked up at least once).
    max_batches : int, optional
        Stop after this many batches.
    progress : bool
        A tqdm bar on stderr.
    """
    from tqdm.auto import tqdm

    try:
        total: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = tqdm(total=total, desc="trace-stats", unit="batch", disable=not progress,
               leave=False)
    if rows is None:
        try:
            rows = getattr(batches, "rows", None)
        except Exception:  # a reader that cannot know its rows cheaply
            rows = None
    st: TraceStats | None = None
    counters: list[_Counter] = []
    pool = np.zeros(64, np.int64)
    for i, x in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        sf = x if isinstance(x, SparseFeatures) else x[1]
        if st is None:
            st = TraceStats(sf.keys, None if rows is None else tuple(int(r) for r in rows))
            if st.rows is not None and len(st.rows) != sf.num_tables:
                raise InvalidBatchError(f"{len(st.rows)} row counts for {sf.num_tables} tables")
            counters = [_Counter() for _ in sf.keys]
            pooling_sum = st.pooling_sum = np.zeros(sf.num_tables, np.int64)
        elif sf.keys != st.keys:
            raise InvalidBatchError(
                f"batch {i}: tables {list(sf.keys)} differ from {list(st.keys)}")
        st.num_batches += 1
        st.num_samples += sf.batch_size
        st.num_lookups += sf.values.size
        st.lookups_per_batch.append(int(sf.values.size))
        uniq = 0
        for t, ids, counts in _table_counts(sf):
            st.reuse.add_counts(counts)
            uniq += ids.size
            counters[t].add(ids, counts)
            s, e = sf.table_range(t)
            pooling_sum[t] += e - s
        st.unique_per_batch.append(uniq)
        lens = sf.lengths
        if lens.size:
            m = int(lens.max())
            if m >= pool.size:
                pool = np.concatenate([pool, np.zeros(max(m + 1, 2 * pool.size) - pool.size,
                                                      np.int64)])
            pool += np.bincount(lens, minlength=pool.size)
        bar.update(1)
    bar.close()
    if st is None:
        raise InvalidBatchError("the trace has no batches")
    nz = np.flatnonzero(pool)
    st.pooling_hist = pool[: (nz[-1] + 1 if nz.size else 1)]
    for c in counters:
        c.merge()
    allc = np.concatenate([c.counts for c in counters])
    st.distinct_rows = int(allc.size)
    if allc.size:
        allc = np.sort(allc)[::-1]
        cum = np.cumsum(allc) / allc.sum()
        denom = float(sum(st.rows)) if st.rows is not None else float(allc.size)
        # sample the curve at <= 2000 log-spaced ranks (exact at the ends)
        r = np.unique(np.geomspace(1, allc.size, num=min(2000, allc.size)).astype(np.int64))
        st.coverage_x = np.concatenate([[0.0], r / denom])
        st.coverage_y = np.concatenate([[0.0], cum[r - 1]])
    return st


def format_stats(st: TraceStats, *, target: np.ndarray | None = None) -> str:
    """A text report; with ``target`` (lookup fractions) also the distance to it."""
    d = st.to_dict()
    lines = [
        f"tables: {len(st.keys)}  batches: {st.num_batches}  samples: {st.num_samples}  "
        f"lookups: {st.num_lookups}",
        f"unique ids per batch: mean {d['unique_per_batch_mean']:.1f}  "
        f"(lookups per batch {np.mean(st.lookups_per_batch):.1f}, "
        f"uses per unique id {st.num_lookups / max(1, sum(st.unique_per_batch)):.2f})",
        f"rows looked up over the trace: {st.distinct_rows}"
        + ("" if st.rows is None
           else f" of {sum(st.rows)} ({st.distinct_rows / sum(st.rows):.2%})"),
        "",
        "reuse histogram (column size per batch and table; Meta locality_stats bins):",
        f"  {'bin':>16} {'unique':>8} {'lookups':>8}" + (f" {'target':>8}" if target is not None
                                                      else ""),
    ]
    uf, lf = st.reuse.unique_fractions, st.reuse.lookup_fractions
    for i, lab in enumerate(bin_labels()):
        row = f"  {lab:>16} {uf[i]:8.3f} {lf[i]:8.3f}"
        if target is not None:
            row += f" {target[i]:8.3f}"
        lines.append(row)
    if target is not None:
        d_t = histogram_distance(lf, target)
        lines.append(f"  distance to target (total variation): {d_t:.4f}")
    base = "all rows" if st.rows is not None else "rows looked up"
    lines += ["", f"coverage (hottest x% of {base} -> share of lookups):"]
    lines += [f"  {k:>7}: {v:.3f}" for k, v in d["coverage"].items()]
    lines += ["", f"pooling factor: mean {d['pooling_mean']:.2f}  p50 {d['pooling_p50']}  "
              f"p99 {d['pooling_p99']}  max {d['pooling_max']}  "
              f"empty bags {d['pooling_empty_fraction']:.2%}"]
    return "\n".join(lines)


def plot_stats(st: TraceStats, out: str | os.PathLike[str], *, target: np.ndarray | None = None,
               title: str | None = None, name: str | None = None,
               target_name: str | None = None) -> list[Path]:
    """Write ``reuse.png``, ``coverage.png``, ``pooling.png``, ``unique.png`` into ``out``.

    ``name``: the trace's name, put in every title; ``target_name``: what the
    target histogram is (``meta2021``, a file), named in the legend.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    x = np.arange(NUM_BINS)
    of = f" of {name}" if name else ""

    def save(fig: Any, file: str) -> None:
        fig.tight_layout()
        paths.append(out / file)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    for fig, file in _figures(st, target, title, of, target_name, x):
        save(fig, file)
    return paths


def _figures(st: TraceStats, target: np.ndarray | None, title: str | None, of: str,
             target_name: str | None, x: np.ndarray) -> list[tuple[Any, str]]:
    """The four figures (matplotlib objects, not yet saved: tests read their axes)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figs = []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    w = 0.4 if target is not None else 0.8
    ax.bar(x - (w / 2 if target is not None else 0), st.reuse.lookup_fractions, w,
           label="this trace")
    if target is not None:
        ax.bar(x + w / 2, target, w, label=f"target ({target_name})" if target_name
               else "target")
        ax.legend()
    ax.set_xticks(x, short_bin_labels(), rotation=45, ha="right", fontsize=9)
    ax.set_xlim(-0.6, NUM_BINS - 0.4)
    ax.set_ylabel("fraction of lookups")
    ax.set_xlabel("column size: uses of an id within a batch and table (k = 1024)")
    ax.set_title(title or f"reuse histogram{of}")
    ax.grid(True, axis="y", alpha=0.3)
    figs.append((fig, "reuse.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    if st.coverage_x.size > 1:
        ax.plot(st.coverage_x[1:] * 100, st.coverage_y[1:])
        ax.set_xscale("log")
    ax.set_xlabel("hottest rows (% of " + ("all rows)" if st.rows is not None else
                                          "rows looked up)"))
    ax.set_ylabel("fraction of lookups")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"coverage{of}")
    figs.append((fig, "coverage.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    h = st.pooling_hist
    nz = np.flatnonzero(h)
    lo, hi = (int(nz[0]), int(nz[-1])) if nz.size else (0, 0)
    ax.bar(np.arange(lo, hi + 1), h[lo:hi + 1] / max(1, h.sum()), 0.8)
    pad = 0.6 if hi > lo else 2.5  # a lone bar would fill the whole axis
    ax.set_xlim(max(-0.6, lo - pad), hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12, min_n_ticks=1))
    ax.set_xlabel("pooling factor (ids per bag)")
    ax.set_ylabel("fraction of bags")
    if hi - lo > 50:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1.05 * float(h.max() / max(1, h.sum())) if h.sum() else 1)
    ax.set_title(f"pooling factor distribution{of}")
    figs.append((fig, "pooling.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    b = np.arange(len(st.unique_per_batch))
    ax.plot(b, st.lookups_per_batch, label="lookups")
    ax.plot(b, st.unique_per_batch, label="distinct ids (per table, summed)")
    ax.set_xlabel("batch")
    ax.set_ylabel("ids per batch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    top = max(st.lookups_per_batch, default=1)
    ax.set_ylim(0, 1.3 * top)  # headroom: the legend sits above the lines
    ax.legend(loc="upper right", ncols=2, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"lookups and distinct ids per batch{of}")
    figs.append((fig, "unique.png"))
    return figs
