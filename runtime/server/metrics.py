"""The Prometheus view of a serving runtime: families read from ``runtime.metrics()`` at
scrape time, so ``/metrics`` shows the figures the runtime itself keeps."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.service import ServingRuntime

__all__ = ["RuntimeCollector"]


class RuntimeCollector:
    """Prometheus families read from ``runtime.metrics()`` at scrape time."""

    def __init__(self, runtime: ServingRuntime) -> None:
        self.runtime = runtime

    def describe(self) -> list[Any]:
        return []  # no fixed set: collect() is called at scrape time only

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self.runtime.metrics()
        c = CounterMetricFamily("tiermem_requests", "Requests by outcome (submitted = accepted "
                                "into the queue)", labels=["outcome"])
        for k, v in m["requests"].items():
            c.add_metric([k], v)
        yield c
        yield CounterMetricFamily("tiermem_batches", "Batches run", value=m["batches"])
        yield CounterMetricFamily("tiermem_samples", "Samples predicted", value=m["samples"])

        def hist(name: str, doc: str, h: dict[str, Any]) -> Any:
            cum, buckets = 0, []
            for b, n in zip([*h["bounds"], math.inf], h["counts"], strict=True):
                cum += n
                buckets.append(("+Inf" if b == math.inf else repr(float(b)), cum))
            return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h["sum"])

        yield hist("tiermem_request_latency_seconds",
                   "Latency of completed requests, submit to answer", m["latency_seconds"])
        yield hist("tiermem_batch_size_samples", "Samples per batch", m["batch_size"])
        yield hist("tiermem_batch_requests", "Requests merged per batch", m["batch_requests"])
        yield hist("tiermem_batch_seconds", "Time of one batch's predict", m["batch_seconds"])
        yield GaugeMetricFamily("tiermem_queue_requests", "Requests waiting",
                                value=m["queue"]["requests"])
        yield GaugeMetricFamily("tiermem_queue_samples", "Samples waiting",
                                value=m["queue"]["samples"])
        yield GaugeMetricFamily("tiermem_ready", "1 once warm-up finished and not degraded",
                                value=1.0 if m["ready"] else 0.0)
        f = CounterMetricFamily("tiermem_faults", "Server-side faults by kind (store, shard, "
                                "internal, nonfinite predictions)", labels=["kind"])
        for k, v in m["faults"].items():
            f.add_metric([k], v)
        yield f
        yield from _tier_families(m["tier"])


def _tier_families(tier: dict[str, Any]) -> Iterator[Any]:
    """The tier's and its cache's families: the one reader of ``tier_metrics``' shape."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    kind = [tier["kind"]]
    for key, doc in (("bytes_read", "Bytes read from the tier"),
                     ("rows_read", "Rows read from the tier"),
                     ("lookups", "Ids pooled"), ("read_ops", "Read operations")):
        f = CounterMetricFamily(f"tiermem_tier_{key}", doc, labels=["tier"])
        f.add_metric(kind, tier[key])
        yield f
    cache = tier["cache"]
    if cache is not None:
        g = GaugeMetricFamily("tiermem_cache_hit_ratio", "Share of distinct rows per batch "
                              "found in the DRAM cache", labels=["table"])
        g.add_metric(["all"], cache["hit_rate"])
        for name, v in cache["hit_rate_per_table"].items():
            g.add_metric([name], v)
        yield g
        yield GaugeMetricFamily("tiermem_cache_lookup_hit_ratio",
                                "Share of lookups served by the cache",
                                value=cache["lookup_hit_rate"])
        b = GaugeMetricFamily("tiermem_tier_bytes", "DRAM held per tier", labels=["tier"])
        b.add_metric(["dram_cache"], cache["nbytes"])
        yield b
        yield GaugeMetricFamily("tiermem_cache_resident_rows", "Rows in the cache",
                                value=cache["resident_rows"])
        yield CounterMetricFamily("tiermem_cache_hits", "Distinct rows found in the cache",
                                  value=cache["hits"])
        yield CounterMetricFamily("tiermem_cache_misses", "Distinct rows read from the tier",
                                  value=cache["misses"])
        p = CounterMetricFamily("tiermem_prefetch_rows", "Prefetcher rows by fate",
                                labels=["fate"])
        for k, v in cache["prefetch"].items():
            p.add_metric([k], v)
        yield p

