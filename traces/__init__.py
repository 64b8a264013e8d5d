"""tiermem traces: workload generators (formats, replay and tuning come next)."""

from traces.synth import synthetic_batches, zipf_ids

__all__ = ["synthetic_batches", "zipf_ids"]
