"""CXL-emulated tier: rows in DRAM, plus the cost a CXL expander would add.

The model charges every row access ``latency_ns / outstanding`` (accesses
overlap up to ``outstanding`` deep) plus ``bytes / bandwidth``. The modeled
time is applied after the kernel by waiting, and reported apart in
``TableStats.modeled_delay_seconds`` so a run shows DRAM time and the
emulated penalty separately.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from tiermem.config import PoolingMode, TierKind
from tiermem.features import SparseFeatures
from tiermem.stats import TableStats
from tiermem.tiers.base import ReadRequest
from tiermem.tiers.dram import DramTier

__all__ = ["CxlTier", "wait_for"]


def wait_for(seconds: float) -> None:
    """Wait ``seconds`` precisely: sleep for the bulk, spin for the tail."""
    if seconds <= 0:
        return
    end = time.perf_counter() + seconds
    if seconds > 0.002:
        time.sleep(seconds - 0.001)
    while time.perf_counter() < end:
        pass


class CxlTier(DramTier):
    """DRAM tier whose accesses are charged a CXL latency/bandwidth model."""

    kind = TierKind.CXL

    def modeled_seconds(self, accesses: int, nbytes: int) -> float:
        c = self.config
        return (accesses * c.cxl_latency_ns * 1e-9 / c.cxl_outstanding
                + nbytes / (c.cxl_bandwidth_gbps * 1e9))

    def _pool_group(self, features: SparseFeatures, tids: list[int], col_base: np.ndarray,
                    mode: PoolingMode, out: np.ndarray, stats: dict[str, TableStats]) -> None:
        before = {self.tables[i].name: stats[self.tables[i].name].rows_read for i in tids}
        super()._pool_group(features, tids, col_base, mode, out, stats)
        total = 0.0
        for i in tids:
            t = self.tables[i]
            st = stats[t.name]
            n = st.rows_read - before[t.name]
            delay = self.modeled_seconds(n, n * t.spec.row_bytes)
            st.read_ops += n
            st.modeled_delay_seconds += delay
            total += delay
        wait_for(total)

    def read_many(self, requests: Sequence[ReadRequest],
                  stats: dict[str, TableStats] | None = None, *, background: bool = False) -> None:
        """Copy rows out (for a cache in front), charging the model for them."""
        super().read_many(requests, stats, background=background)
        total = 0.0
        for req in requests:
            i, rows = req[0], req[1]
            spec = self.tables[i].spec
            delay = self.modeled_seconds(rows.size, rows.size * spec.row_bytes)
            total += delay
            if stats is not None:
                stats[spec.name].modeled_delay_seconds += delay
        wait_for(total)
