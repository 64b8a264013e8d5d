"""``tiermem replay`` and ``tiermem tune``: trace replay through the runtime, cache tuning.

    tiermem replay --store S --trace T [--tier ssd] [--policy lru --cache-size 5%]
                   [--admission tinylfu] [--prefetch N] [--model CKPT --predictions P.npy]
                   [--report R.json] [--max-batches N] [--profile-batches N] [--quiet]
                   [--table-map TRACE=STORE,...] [--prefetch-async]
    tiermem tune --trace T [--store S | --rows ... [--row-bytes N]] [--table-map ...]
                 --policies lru,lfu,clock,s3fifo,static,hybrid
                 --sizes 1%,2%,5%,10%,20% [--admission none,tinylfu]
                 [--target-hit-rate 0.8] [--json] [--out OUT.json] [--plot MRC.png]

``replay``'s tier options are ``TierConfig``'s fields (``--tier ssd`` by default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from runtime.cli.argtypes import fraction, nonneg_int, positive_int
from runtime.cli.output import add_progress_options, note, show_progress
from runtime.cli.session import add_tier_options, tier_config
from runtime.cli.trace_input import RenamedTrace, add_source_options, open_trace, table_map
from tiermem.errors import ConfigError

__all__ = ["cmd_replay", "cmd_tune", "format_report", "register"]


def cmd_replay(args: argparse.Namespace) -> int:
    from traces.replay import replay

    if not Path(args.store).exists():
        raise ConfigError(f"store {args.store} does not exist")
    model = None
    if args.model is not None:
        from runtime.replay_model import CheckpointModel

        model = CheckpointModel(args.model)
    src = open_trace(args)
    tcfg = tier_config(args).to_dict()
    kind, io_threads, direct_io = tcfg.pop("kind"), tcfg.pop("io_threads"), tcfg.pop("direct_io")
    rep = replay(args.store, src, tier=kind, policy=args.policy, cache_size=args.cache_size,
                 admission=None if args.admission in (None, "none") else args.admission,
                 pinned_fraction=args.pinned_fraction, dynamic=args.dynamic,
                 prefetch_lookahead=args.prefetch, io_threads=io_threads,
                 direct_io=direct_io, model=model,
                 profile_batches=args.profile_batches, max_batches=args.max_batches,
                 table_map=table_map(args.table_map), progress=show_progress(args),
                 predictions_out=args.predictions, report_out=args.report,
                 tier_options=tcfg, prefetch_async=args.prefetch_async)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(format_report(rep))
    if args.report:
        note(args, f"wrote {args.report}")
    if rep.get("interrupted"):
        print(f"interrupted: the report covers the {rep['batches']} batches done",
              file=sys.stderr)
        return 130
    return 0


def format_report(rep: dict[str, Any]) -> str:
    """A short human summary of a :func:`traces.replay.replay` report."""
    th, lat = rep["throughput"], rep["latency_ms"]
    lines = [f"{rep['batches']} batches ({rep['samples']} samples, {rep['lookups']} lookups) "
             f"in {rep['seconds']:.3f} s on {rep['tier']}"
             + (f" with model {rep['model']} (dense: {rep['dense']})" if rep["model"] else "")
             + f"; {rep['profile_batches']} profile/warm-up batches not measured"
             + ("; INTERRUPTED" if rep.get("interrupted") else ""),
             f"throughput: {th['batches_per_s']:.1f} batches/s, {th['samples_per_s']:.0f} "
             f"samples/s, {th['lookups_per_s'] / 1e6:.2f} M lookups/s",
             f"batch latency ms: p50 {lat['p50']:.2f}  p95 {lat['p95']:.2f}  "
             f"p99 {lat['p99']:.2f}  max {lat['max']:.2f}"]
    c = rep.get("cache")
    if c:
        lines.append(f"cache: {c['policy']}" + (f"+{c['admission']}" if c["admission"] else "")
                     + f", {c['capacity_rows']} rows ({c['capacity_bytes'] / 2**20:.1f} MiB), "
                     f"pinned {c['pinned_rows']}; hit rate {c['hit_rate']:.4f} (distinct rows "
                     f"per batch), {c['lookup_hit_rate']:.4f} (lookups)")
    cold = rep["reads"]["cold"]
    lines.append(f"{cold['kind']} reads: {cold['rows']} rows, {cold['bytes'] / 2**20:.2f} MiB, "
                 f"{cold['read_ops']} ops, device {cold['device_read_MBps']:.1f} MB/s")
    pf = rep.get("prefetch")
    if pf and pf.get("lookahead"):
        lines.append(f"prefetch (lookahead {pf['lookahead']}, {pf.get('mode', 'async')}): "
                     f"issued {pf['issued']}, useful "
                     f"{pf['useful']}, late {pf['late']}, wasted {pf['wasted']}, dropped "
                     f"{pf['dropped']}")
    if c:
        lines.append("per table hit rate: " + ", ".join(
            f"{k} {v['hit_rate']:.3f}" for k, v in list(rep["tables"].items())[:12])
            + (" ..." if len(rep["tables"]) > 12 else ""))
    return "\n".join(lines)


def cmd_tune(args: argparse.Namespace) -> int:
    from traces.replay import write_json_atomic
    from traces.tuning import format_results, plot_mrc, recommend, simulate

    src = open_trace(args)
    tmap = table_map(args.table_map)
    if tmap:
        src = RenamedTrace(src, tmap)
    if args.store:
        if not Path(args.store).exists():
            raise ConfigError(f"store {args.store} does not exist")
        if args.row_bytes is not None:
            raise ConfigError("--row-bytes is for a trace without a store: --store gives "
                              "the bytes per row")
        from tiermem.format import open_store
        from traces.replay import check_trace_rows
        from traces.tuning import table_mismatch

        info = open_store(args.store)
        missing = [k for k in src.keys if k not in info.names]
        if missing:
            raise ConfigError(table_mismatch(src.keys, info.names, missing))
        check_trace_rows(src, {}, {t.name: t.spec.rows for t in info.tables})
        layout: Any = info
    else:
        layout = None  # the trace's rows (native: declared, or max id + 1)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    adm = [a.strip() for a in args.admission.split(",") if a.strip()] if args.admission \
        else [None]
    if layout is None and getattr(src, "rows", None) is None:
        raise ConfigError("the trace does not know its table sizes: give --store or --rows")
    res = simulate(src, layout, policies, sizes, admission=adm,
                   pinned_fraction=args.pinned_fraction, dynamic=args.dynamic,
                   profile_batches=args.profile_batches, max_batches=args.max_batches,
                   opt=not args.no_opt, progress=show_progress(args), row_bytes=args.row_bytes)
    rec = recommend(res, args.target_hit_rate) if args.target_hit_rate is not None else None
    d = res.to_dict()
    d["recommendation"] = None if rec is None else rec.to_dict()
    if args.json:
        print(json.dumps(d, indent=1))
    else:
        print(format_results(res, rec))
    if args.out:
        write_json_atomic(args.out, d)
        note(args, f"wrote {args.out}")
    if args.plot:
        name = Path(args.trace[0]).name if len(args.trace) == 1 else f"{len(args.trace)} files"
        png = plot_mrc(res, args.plot, target_hit_rate=args.target_hit_rate, name=name)
        note(args, f"wrote {png}")
    return 0


_POLICIES = "lru, lfu, fifo, clock, s3fifo, static, hybrid"
_PROFILE_HELP = ("batches at the start of the trace used as the static/hybrid popularity profile "
                 "and as a warm-up for every policy; not measured (default: 10%% of the trace; "
                 "1 batch when its length is unknown up front, e.g. Meta files re-cut by "
                 "--batch-size, Criteo TSV)")


def register(subparsers: Any) -> None:
    subparsers.add_parser(
        "replay", help="replay a trace through a tier (+ cache, prefetcher, model) and report",
        description="Run every batch of a trace through the runtime: the store's tier (DRAM, "
                    "SSD via pread, CXL-emulated), an optional DRAM row cache and prefetcher, "
                    "and optionally a DLRM model (pipelined predictions). Reports throughput, "
                    "batch latency percentiles, hit rates per table, rows/bytes read per tier, "
                    "device read rate and prefetch counters.",
        options=_replay_options, handler=cmd_replay)
    subparsers.add_parser(
        "tune", help="simulate cache policies x sizes on a trace; recommend a size; MRC plot",
        description="Simulate each policy at each cache size on the exact batch semantics of "
                    "the runtime's cache (no rows read), with Belady's OPT as the lower bound "
                    "of misses; recommend the smallest size meeting a target hit rate; plot the "
                    "miss-ratio curve.",
        options=_tune_options, handler=cmd_tune)


def _replay_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--store", required=True, help="store with the embedding tables")
    r.add_argument("--trace", required=True, nargs="+",
                   help="native trace directory, or Meta .pt[.gz] / Criteo TSV files")
    add_source_options(r)
    add_tier_options(r, threads_option=False, defaults={"kind": "ssd"})
    g = r.add_argument_group("cache")
    g.add_argument("--policy", default=None, help=f"cache policy: {_POLICIES} (default: no "
                   "cache; lru when only --cache-size is given)")
    g.add_argument("--cache-size", default=None,
                   help="rows (100000), share of the tables ('5%%') or bytes ('256MiB')")
    g.add_argument("--admission", choices=["none", "tinylfu"], default=None,
                   help="admission filter (default none)")
    g.add_argument("--pinned-fraction", type=fraction, default=0.5,
                   help="hybrid: share of the cache pinned from the profile (default 0.5)")
    g.add_argument("--dynamic", default="lru", help="hybrid: the dynamic policy (default lru)")
    g.add_argument("--prefetch", type=nonneg_int, default=0, metavar="N",
                   help="prefetch lookahead in batches (0 = off; needs a cache). Each batch "
                        "waits for the prefetches submitted before it, so hit rates repeat "
                        "exactly from run to run")
    g.add_argument("--prefetch-async", action="store_true",
                   help="let the prefetch thread race the batches as a server would: closer "
                        "to serving latency, but hit rates then vary from run to run")
    g.add_argument("--table-map", default=None, metavar="TRACE=STORE,...",
                   help="rename trace tables to store tables (default: same names; "
                        "`trace-generate --for-store` makes a trace with the store's names)")
    o = r.add_argument_group("model and output")
    o.add_argument("--model", default=None, metavar="CKPT",
                   help="DLRM checkpoint: run full predictions (zeros for dense features when "
                        "the trace has none)")
    o.add_argument("--predictions", default=None, metavar="OUT.npy",
                   help="save the measured batches' predictions (needs --model)")
    o.add_argument("--report", default=None, metavar="OUT.json", help="write the report as JSON")
    o.add_argument("--json", action="store_true", help="print the report as JSON")
    o.add_argument("--max-batches", type=positive_int, default=None,
                   help="use the first N batches of the trace (profile included)")
    o.add_argument("--profile-batches", type=nonneg_int, default=None, help=_PROFILE_HELP)
    add_progress_options(o)


def _tune_options(t: argparse.ArgumentParser) -> None:
    t.add_argument("--trace", required=True, nargs="+",
                   help="native trace directory, or Meta .pt[.gz] / Criteo TSV files")
    add_source_options(t)
    t.add_argument("--store", default=None,
                   help="size the cache pools like this store's (dtype, dim groups, row bytes); "
                        "default: one pool over the trace's tables")
    t.add_argument("--row-bytes", type=positive_int, default=None, metavar="N",
                   help="without --store: bytes per cached row, for sizes in bytes ('256MiB')")
    t.add_argument("--table-map", default=None, metavar="TRACE=STORE,...",
                   help="rename trace tables to the store's (as replay --table-map)")
    t.add_argument("--policies", default="lru,lfu,clock,s3fifo,static,hybrid",
                   help=f"comma-separated: {_POLICIES} (default lru,lfu,clock,s3fifo,static,"
                        "hybrid)")
    t.add_argument("--sizes", default="1%,2%,5%,10%,20%",
                   help="comma-separated: '5%%' of the rows, rows, or bytes ('256MiB', with "
                        "--store or --row-bytes) (default 1%%,2%%,5%%,10%%,20%%)")
    t.add_argument("--admission", default=None, metavar="none,tinylfu",
                   help="admission variants to simulate, comma-separated (default none)")
    t.add_argument("--pinned-fraction", type=fraction, default=0.5,
                   help="hybrid: share of the cache pinned from the profile (default 0.5)")
    t.add_argument("--dynamic", default="lru", help="hybrid: the dynamic policy (default lru)")
    t.add_argument("--profile-batches", type=nonneg_int, default=None, help=_PROFILE_HELP)
    t.add_argument("--max-batches", type=positive_int, default=None,
                   help="use the first N batches of the trace (profile included)")
    t.add_argument("--target-hit-rate", type=fraction, default=None,
                   help="recommend the smallest size at which a policy reaches this hit rate")
    t.add_argument("--no-opt", action="store_true", help="skip Belady's OPT")
    t.add_argument("--json", action="store_true",
                   help="print the results as JSON instead of the table (as replay --json)")
    t.add_argument("--out", default=None, metavar="OUT.json",
                   help="also write the results as JSON to this file")
    t.add_argument("--plot", default=None, metavar="OUT.png",
                   help="write the miss-ratio curve (with the target, if given)")
    add_progress_options(t)
