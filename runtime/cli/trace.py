"""``tiermem trace-stats``, ``trace-generate`` and ``trace-convert``.

    tiermem trace-stats TRACE [--plots DIR] [--target meta2021]   analysis, text + PNG
    tiermem trace-generate OUT --tables criteo_kaggle ...          synthetic -> native
    tiermem trace-convert INPUT... --out OUT [--from meta|criteo]  Meta .pt(.gz) / TSV -> native
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from runtime.cli.argtypes import positive_int
from runtime.cli.output import add_progress_options, note, show_progress
from runtime.cli.trace_input import add_source_options, open_source
from tiermem.errors import ConfigError

__all__ = ["cmd_trace_convert", "cmd_trace_generate", "cmd_trace_stats", "register"]


def cmd_trace_stats(args: argparse.Namespace) -> int:
    from traces.stats import analyze, format_stats, meta_target, plot_stats

    src = open_source(args, args.trace)
    target = meta_target(args.target) if args.target else None
    st = analyze(src, max_batches=args.max_batches, progress=show_progress(args))
    if args.json:
        d = st.to_dict()
        if target is not None:
            from traces.stats import histogram_distance
            d["target_distance"] = histogram_distance(st.reuse.lookup_fractions, target)
        print(json.dumps(d, indent=1))
    else:
        print(format_stats(st, target=target))
    if getattr(src, "skipped", 0):
        print(f"skipped {src.skipped} malformed records; first: {src.skip_reasons[0]}",
              file=sys.stderr)
    if args.plots:
        name = Path(args.trace[0]).name if len(args.trace) == 1 else f"{len(args.trace)} files"
        for p in plot_stats(st, args.plots, target=target, name=name,
                            target_name=args.target):
            note(args, f"wrote {p}")
    return 0


def cmd_trace_generate(args: argparse.Namespace) -> int:
    from traces.formats import convert_trace
    from traces.synth import GeneratorConfig, SyntheticTrace, calibrate, format_calibration

    shape = dict(pooling=args.pooling, batch_size=args.batch_size,
                 n_batches=args.batches, alpha=args.alpha, alpha_spread=args.alpha_spread,
                 active_fraction=args.active_fraction, locality=args.locality,
                 locality_window=args.locality_window, drift=args.drift, seed=args.seed)
    attrs: dict[str, Any] = {}
    if args.for_store:
        if args.tables is not None:
            raise ConfigError("give --tables or --for-store, not both (--for-store takes the "
                              "store's table names and rows)")
        from tiermem.format import open_store

        if not Path(args.for_store).exists():
            raise ConfigError(f"--for-store: store {args.for_store} does not exist")
        info = open_store(args.for_store)
        cfg = GeneratorConfig.for_tables(info.names, [t.spec.rows for t in info.tables],
                                         **shape)
        attrs["for_store"] = str(args.for_store)
    else:
        cfg = GeneratorConfig.from_preset(args.tables or "criteo_kaggle", **shape)
    if args.calibrate_to:
        t0 = time.perf_counter()
        res = calibrate(args.calibrate_to, cfg, n_batches=args.calibrate_batches)
        cfg = res.config
        attrs["calibration"] = {"target": str(args.calibrate_to), **res.to_dict()}
        print(format_calibration(res, args.calibrate_to))
        print(f"calibrated to {args.calibrate_to} in {time.perf_counter() - t0:.1f} s "
              f"({res.evaluations} evaluations): alpha {res.config.alpha:.3f}, alpha_spread "
              f"{res.config.alpha_spread:.2f}, active_fraction {res.config.active_fraction:.4g}; "
              f"distance (total variation) {res.distance:.4f} (before: "
              f"{res.baseline_distance:.4f})")
    attrs["generator"] = cfg.to_dict()
    out = convert_trace(SyntheticTrace(cfg), args.out, overwrite=args.overwrite,
                        compress=args.compress, attrs=attrs, progress=show_progress(args))
    print(f"wrote {out}: {cfg.n_batches} batches of {cfg.batch_size} samples, "
          f"{len(cfg.table_rows)} tables")
    return 0


def cmd_trace_convert(args: argparse.Namespace) -> int:
    from traces.formats import convert_trace

    src = open_source(args, args.inputs)
    out = convert_trace(src, args.out, overwrite=args.overwrite, compress=args.compress,
                        attrs={"inputs": [str(p) for p in args.inputs]},
                        progress=show_progress(args))
    msg = f"wrote {out}"
    if getattr(src, "skipped", 0):
        msg += f" (skipped {src.skipped} malformed records; first: {src.skip_reasons[0]})"
    print(msg)
    return 0


def register(subparsers: Any) -> None:
    subparsers.add_parser(
        "trace-stats", help="unique ids, reuse histogram, coverage, pooling of a trace",
        description="Analyze a trace (native directory, Meta .pt[.gz] files or Criteo TSV): "
                    "unique ids per batch, reuse histogram in Meta's locality_stats bins, "
                    "coverage curve, pooling-factor distribution; text and PNG plots.",
        options=_stats_options, handler=cmd_trace_stats)
    subparsers.add_parser(
        "trace-generate", help="write a synthetic production-style trace (native format)",
        description="Generate a seeded trace: per-table Zipf popularity, pooling-factor "
                    "distributions, temporal locality and drift; optionally calibrated to a "
                    "target reuse histogram.",
        options=_generate_options, handler=cmd_trace_generate)
    subparsers.add_parser(
        "trace-convert", help="convert Meta dlrm_datasets .pt(.gz) or Criteo TSV to native",
        description="Stream input files into a native trace directory (atomic write).",
        options=_convert_options, handler=cmd_trace_convert)


def _stats_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("trace", nargs="+", help="native trace directory, or input files")
    add_source_options(s)
    s.add_argument("--max-batches", type=positive_int, default=None,
                   help="analyze the first N batches")
    s.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into DIR")
    s.add_argument("--target", default=None, metavar="meta2021|meta2022|PATH",
                   help="compare the reuse histogram with Meta's (or a locality_stats file)")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_progress_options(s)


def _generate_options(g: argparse.ArgumentParser) -> None:
    g.add_argument("out", help="output trace directory")
    g.add_argument("--tables", default=None,
                   help="preset (criteo_kaggle, criteo_terabyte, dlrmv2, criteo_terabyte_40m, "
                        "criteo_terabyte_10m) or rows 'r0,r1,...' (default criteo_kaggle)")
    g.add_argument("--for-store", default=None, metavar="STORE",
                   help="the store's table names and rows instead of --tables, so that the "
                        "trace replays on that store (ids stay below each table's rows)")
    g.add_argument("--batch-size", type=positive_int, default=2048)
    g.add_argument("--batches", type=positive_int, default=10)
    g.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent (default 1.05)")
    g.add_argument("--alpha-spread", type=float, default=0.0,
                   help="per-table spread of the exponent (log-normal, default 0)")
    g.add_argument("--active-fraction", type=float, default=1.0,
                   help="share of each table's rows that popularity ranges over (default 1)")
    g.add_argument("--pooling", default="1",
                   help="N | fixed:N | uniform:LO:HI | lognormal:MEAN:SIGMA[:MAX[:P_EMPTY]] | "
                        "dlrmv2 (multi-hot sizes; default 1)")
    g.add_argument("--locality", type=float, default=0.0,
                   help="probability a lookup repeats a recent id (default 0)")
    g.add_argument("--locality-window", type=positive_int, default=4,
                   help="batches of history for --locality (default 4)")
    g.add_argument("--drift", type=float, default=0.0,
                   help="popularity shift per batch, fraction of rows (default 0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--calibrate-to", default=None, metavar="meta2021|meta2022|PATH",
                   help="fit alpha, alpha-spread and active-fraction to this reuse histogram "
                        "first; prints the distance")
    g.add_argument("--calibrate-batches", type=positive_int, default=1,
                   help="batches per calibration evaluation (default 1)")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--compress", action="store_true", help="deflate the batch files")
    add_progress_options(g)


def _convert_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("inputs", nargs="+", help="input files, in order")
    c.add_argument("--out", required=True, help="output trace directory")
    add_source_options(c)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--compress", action="store_true", help="deflate the batch files")
    add_progress_options(c)
