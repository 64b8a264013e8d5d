"""tiermem traces: formats, readers, a production-style generator, analysis and Belady's OPT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tiermem._lazy import lazy_names

if TYPE_CHECKING:
    from traces.formats import (
        CriteoTrace,
        MetaTrace,
        NativeTrace,
        OnError,
        Trace,
        TraceBatch,
        TraceFormatError,
        TraceWriter,
        convert_trace,
        open_source,
        open_trace,
        rebatch,
        sniff,
        write_trace,
    )
    from traces.opt import OptResult, belady, belady_curve, global_keys, next_use
    from traces.presets import TABLE_PRESETS
    from traces.stats import TraceStats, analyze, format_stats, plot_stats, reuse_histogram
    from traces.synth import (
        GeneratorConfig,
        Pooling,
        SyntheticTrace,
        calibrate,
        generate,
        synthetic_batches,
        zipf_ids,
    )

# loaded on first use, so that the ``tiermem`` command's parser needs none of them
_LAZY = {
    **dict.fromkeys(["CriteoTrace", "MetaTrace", "NativeTrace", "OnError", "Trace",
                     "TraceBatch", "TraceFormatError", "TraceWriter", "convert_trace",
                     "open_source", "open_trace", "rebatch", "sniff", "write_trace"],
                    "traces.formats"),
    **dict.fromkeys(["OptResult", "belady", "belady_curve", "global_keys", "next_use"],
                     "traces.opt"),
    **dict.fromkeys(["TraceStats", "analyze", "format_stats", "plot_stats", "reuse_histogram"],
                     "traces.stats"),
    "TABLE_PRESETS": "traces.presets",
    **dict.fromkeys(["GeneratorConfig", "Pooling", "SyntheticTrace", "calibrate", "generate",
                     "synthetic_batches", "zipf_ids"], "traces.synth"),
}


__getattr__, __dir__ = lazy_names("traces", _LAZY, globals())


__all__ = [
    "TABLE_PRESETS",
    "CriteoTrace",
    "GeneratorConfig",
    "MetaTrace",
    "NativeTrace",
    "OnError",
    "OptResult",
    "Pooling",
    "SyntheticTrace",
    "Trace",
    "TraceBatch",
    "TraceFormatError",
    "TraceStats",
    "TraceWriter",
    "analyze",
    "belady",
    "belady_curve",
    "calibrate",
    "convert_trace",
    "format_stats",
    "generate",
    "global_keys",
    "next_use",
    "open_source",
    "open_trace",
    "plot_stats",
    "rebatch",
    "reuse_histogram",
    "sniff",
    "synthetic_batches",
    "write_trace",
    "zipf_ids",
]
