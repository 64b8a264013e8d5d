"""``tiermem replay`` and ``tiermem tune``: trace replay through the runtime, cache tuning.

    tiermem replay --store S --trace T [--tier ssd] [--policy lru --cache-size 5%]
                   [--admission tinylfu] [--prefetch N] [--model CKPT --predictions P.npy]
                   [--report R.json] [--max-batches N] [--profile-batches N] [--no-progress]
    tiermem tune --trace T [--store S | --rows ...] --policies lru,lfu,clock,s3fifo,static,hybrid
                 --sizes 1%,2%,5%,10%,20% [--admission none,tinylfu]
                 [--target-hit-rate 0.8] [--json OUT] [--plot MRC.png]

Wiring (as :mod:`traces.cli`)::

    add_replay_commands(sub)                  # each parser gets defaults(handler=...)
    return REPLAY_COMMANDS[args.command](args)

Handlers return an exit code and raise :class:`~tiermem.errors.TierMemError`
for bad input. ``python -m traces.replay_cli`` runs them standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.argtypes import nonneg_int as _nonneg_int
from tiermem.errors import ConfigError
from traces.cli import _add_source_args, _open_source, _pos_int

__all__ = ["REPLAY_COMMANDS", "add_replay_commands", "main"]


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1], got {v}")
    return v


def _table_map(s: str | None) -> dict[str, str] | None:
    if not s:
        return None
    out = {}
    for item in s.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ConfigError(f"bad --table-map entry {item!r}: expected trace_name=store_name")
        a, b = item.split("=", 1)
        out[a.strip()] = b.strip()
    return out


def _trace(args: argparse.Namespace) -> Any:
    paths = [args.trace] if isinstance(args.trace, str) else list(args.trace)
    for p in paths:
        if not Path(p).exists():
            raise ConfigError(f"trace {p} does not exist")
    return _open_source(args, paths)


def cmd_replay(args: argparse.Namespace) -> int:
    from traces.replay import replay

    if not Path(args.store).exists():
        raise ConfigError(f"store {args.store} does not exist")
    src = _trace(args)
    tier_options = {}
    if args.tier == "cxl":
        tier_options = {"cxl_latency_ns": args.cxl_latency_ns,
                        "cxl_bandwidth_gbps": args.cxl_bandwidth_gbps}
    rep = replay(args.store, src, tier=args.tier, policy=args.policy, cache_size=args.cache_size,
                 admission=None if args.admission in (None, "none") else args.admission,
                 pinned_fraction=args.pinned_fraction, dynamic=args.dynamic,
                 prefetch_lookahead=args.prefetch, io_threads=args.io_threads,
                 direct_io=args.direct_io, model=args.model,
                 profile_batches=args.profile_batches, max_batches=args.max_batches,
                 table_map=_table_map(args.table_map), progress=not args.no_progress,
                 predictions_out=args.predictions, report_out=args.report,
                 tier_options=tier_options)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(format_report(rep))
    if args.report:
        print(f"wrote {args.report}", file=sys.stderr)
    return 0


def format_report(rep: dict[str, Any]) -> str:
    """A short human summary of a :func:`traces.replay.replay` report."""
    th, lat = rep["throughput"], rep["latency_ms"]
    lines = [f"{rep['batches']} batches ({rep['samples']} samples, {rep['lookups']} lookups) "
             f"in {rep['seconds']:.3f} s on {rep['tier']}"
             + (f" with model {rep['model']} (dense: {rep['dense']})" if rep["model"] else "")
             + f"; {rep['profile_batches']} profile/warm-up batches not measured",
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
        lines.append(f"prefetch (lookahead {pf['lookahead']}): issued {pf['issued']}, useful "
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

    src = _trace(args)
    if args.store:
        if not Path(args.store).exists():
            raise ConfigError(f"store {args.store} does not exist")
        layout: Any = args.store
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
                   opt=not args.no_opt, progress=not args.no_progress)
    rec = recommend(res, args.target_hit_rate) if args.target_hit_rate is not None else None
    print(format_results(res, rec))
    if args.json:
        d = res.to_dict()
        d["recommendation"] = None if rec is None else rec.to_dict()
        write_json_atomic(args.json, d)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot_mrc(res, args.plot)}", file=sys.stderr)
    return 0


REPLAY_COMMANDS = {"replay": cmd_replay, "tune": cmd_tune}

_POLICIES = "lru, lfu, fifo, clock, s3fifo, static, hybrid"
_PROFILE_HELP = ("batches at the start of the trace used as the static/hybrid popularity profile "
                 "and as a warm-up for every policy; not measured (default: 10%% of the trace)")


def add_replay_commands(subparsers: Any) -> None:
    """Register ``replay`` and ``tune``."""
    r = subparsers.add_parser(
        "replay", help="replay a trace through a tier (+ cache, prefetcher, model) and report",
        description="Run every batch of a trace through the runtime: the store's tier (DRAM, "
                    "SSD via pread, CXL-emulated), an optional DRAM row cache and prefetcher, "
                    "and optionally a DLRM model (pipelined predictions). Reports throughput, "
                    "batch latency percentiles, hit rates per table, rows/bytes read per tier, "
                    "device read rate and prefetch counters.")
    r.add_argument("--store", required=True, help="store with the embedding tables")
    r.add_argument("--trace", required=True, nargs="+",
                   help="native trace directory, or Meta .pt[.gz] / Criteo TSV files")
    _add_source_args(r)
    g = r.add_argument_group("tier and cache")
    g.add_argument("--tier", choices=["ssd", "cxl", "dram"], default="ssd",
                   help="tier holding the tables (default ssd)")
    g.add_argument("--policy", default=None, help=f"cache policy: {_POLICIES} (default: no "
                   "cache; lru when only --cache-size is given)")
    g.add_argument("--cache-size", default=None,
                   help="rows (100000), share of the tables ('5%%') or bytes ('256MiB')")
    g.add_argument("--admission", choices=["none", "tinylfu"], default=None,
                   help="admission filter (default none)")
    g.add_argument("--pinned-fraction", type=_fraction, default=0.5,
                   help="hybrid: share of the cache pinned from the profile (default 0.5)")
    g.add_argument("--dynamic", default="lru", help="hybrid: the dynamic policy (default lru)")
    g.add_argument("--prefetch", type=_nonneg_int, default=0, metavar="N",
                   help="prefetch lookahead in batches (0 = off; needs a cache)")
    g.add_argument("--io-threads", type=_pos_int, default=64,
                   help="SSD tier: parallel pread threads (default 64)")
    g.add_argument("--direct-io", action="store_true", help="SSD tier: O_DIRECT reads")
    g.add_argument("--cxl-latency-ns", type=float, default=250.0,
                   help="CXL tier: modeled latency per row access (ns)")
    g.add_argument("--cxl-bandwidth-gbps", type=float, default=32.0,
                   help="CXL tier: modeled bandwidth (GB/s)")
    g.add_argument("--table-map", default=None, metavar="TRACE=STORE,...",
                   help="rename trace tables to store tables (default: same names)")
    o = r.add_argument_group("model and output")
    o.add_argument("--model", default=None, metavar="CKPT",
                   help="DLRM checkpoint: run full predictions (zeros for dense features when "
                        "the trace has none)")
    o.add_argument("--predictions", default=None, metavar="OUT.npy",
                   help="save the measured batches' predictions (needs --model)")
    o.add_argument("--report", default=None, metavar="OUT.json", help="write the report as JSON")
    o.add_argument("--json", action="store_true", help="print the report as JSON")
    o.add_argument("--max-batches", type=_pos_int, default=None,
                   help="use the first N batches of the trace (profile included)")
    o.add_argument("--profile-batches", type=_nonneg_int, default=None, help=_PROFILE_HELP)
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(handler=cmd_replay)

    t = subparsers.add_parser(
        "tune", help="simulate cache policies x sizes on a trace; recommend a size; MRC plot",
        description="Simulate each policy at each cache size on the exact batch semantics of "
                    "the runtime's cache (no rows read), with Belady's OPT as the lower bound "
                    "of misses; recommend the smallest size meeting a target hit rate; plot the "
                    "miss-ratio curve.")
    t.add_argument("--trace", required=True, nargs="+",
                   help="native trace directory, or Meta .pt[.gz] / Criteo TSV files")
    _add_source_args(t)
    t.add_argument("--store", default=None,
                   help="size the cache pools like this store's (dtype, dim groups, row bytes); "
                        "default: one pool over the trace's tables")
    t.add_argument("--policies", default="lru,lfu,clock,s3fifo,static,hybrid",
                   help=f"comma-separated: {_POLICIES} (default lru,lfu,clock,s3fifo,static,"
                        "hybrid)")
    t.add_argument("--sizes", default="1%,2%,5%,10%,20%",
                   help="comma-separated: '5%%' of the rows, rows, or bytes with --store "
                        "(default 1%%,2%%,5%%,10%%,20%%)")
    t.add_argument("--admission", default=None, metavar="none,tinylfu",
                   help="admission variants to simulate, comma-separated (default none)")
    t.add_argument("--pinned-fraction", type=_fraction, default=0.5,
                   help="hybrid: share of the cache pinned from the profile (default 0.5)")
    t.add_argument("--dynamic", default="lru", help="hybrid: the dynamic policy (default lru)")
    t.add_argument("--profile-batches", type=_nonneg_int, default=None, help=_PROFILE_HELP)
    t.add_argument("--max-batches", type=_pos_int, default=None,
                   help="use the first N batches of the trace (profile included)")
    t.add_argument("--target-hit-rate", type=_fraction, default=None,
                   help="recommend the smallest size at which a policy reaches this hit rate")
    t.add_argument("--no-opt", action="store_true", help="skip Belady's OPT")
    t.add_argument("--json", default=None, metavar="OUT.json", help="write the results as JSON")
    t.add_argument("--plot", default=None, metavar="OUT.png", help="write the miss-ratio curve")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(handler=cmd_tune)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m traces.replay_cli COMMAND ...``: the ``tiermem`` command itself."""
    from runtime.cli import main as tiermem_main

    return tiermem_main(argv)


if __name__ == "__main__":
    sys.exit(main())
