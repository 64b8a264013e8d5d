"""``tiermem replay`` and ``tiermem tune``: trace replay through the runtime, cache tuning.

    tiermem replay --store S --trace T [--tier ssd] [--policy lru --cache-size 5%]
                   [--admission tinylfu] [--prefetch N] [--model CKPT --predictions P.npy]
                   [--report R.json] [--max-batches N] [--profile-batches N] [--quiet]
                   [--table-map TRACE=STORE,...] [--prefetch-async]
    tiermem tune --trace T [--store S | --rows ... [--row-bytes N]] [--table-map ...]
                 --policies lru,lfu,clock,s3fifo,static,hybrid
                 --sizes 1%,2%,5%,10%,20% [--admission none,tinylfu]
                 [--target-hit-rate 0.8] [--json] [--out OUT.json] [--plot MRC.png]

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
from traces.cli import (
    _add_source_args,
    _open_source,
    _pos_int,
    add_progress_args,
    note,
    show_progress,
)

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


class _RenamedTrace:
    """A trace whose table names go through ``--table-map`` (``tune`` on a store's names)."""

    def __init__(self, trace: Any, table_map: dict[str, str]) -> None:
        self.trace = trace
        keys = tuple(trace.keys)
        bad = [k for k in table_map if k not in keys]
        if bad:
            raise ConfigError(f"--table-map names trace table(s) {bad[:8]} that the trace "
                              f"lacks; trace tables: {list(keys)[:16]}")
        self.map = table_map
        self.keys = tuple(table_map.get(k, k) for k in keys)
        if len(set(self.keys)) != len(self.keys):
            raise ConfigError(f"--table-map sends two trace tables to one table: {self.keys}")

    @property
    def rows(self) -> Any:
        return self.trace.rows

    def __len__(self) -> int:
        return len(self.trace)

    def __iter__(self) -> Any:
        from tiermem.features import SparseFeatures
        from traces.formats import TraceBatch

        for b in self.trace:
            d, sf, lab = b if isinstance(b, TraceBatch) else (None, b, None)
            yield TraceBatch(d, SparseFeatures(self.keys, sf.values, sf.offsets, sf.weights)
                             if sf.keys != self.keys else sf, lab)


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
                 table_map=_table_map(args.table_map), progress=show_progress(args),
                 predictions_out=args.predictions, report_out=args.report,
                 tier_options=tier_options, prefetch_async=args.prefetch_async)
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

    src = _trace(args)
    tmap = _table_map(args.table_map)
    if tmap:
        src = _RenamedTrace(src, tmap)
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


REPLAY_COMMANDS = {"replay": cmd_replay, "tune": cmd_tune}

_POLICIES = "lru, lfu, fifo, clock, s3fifo, static, hybrid"
_PROFILE_HELP = ("batches at the start of the trace used as the static/hybrid popularity profile "
                 "and as a warm-up for every policy; not measured (default: 10%% of the trace; "
                 "1 batch when its length is unknown up front, e.g. Meta files re-cut by "
                 "--batch-size, Criteo TSV)")


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
                   help="prefetch lookahead in batches (0 = off; needs a cache). Each batch "
                        "waits for the prefetches submitted before it, so hit rates repeat "
                        "exactly from run to run")
    g.add_argument("--prefetch-async", action="store_true",
                   help="let the prefetch thread race the batches as a server would: closer "
                        "to serving latency, but hit rates then vary from run to run")
    g.add_argument("--io-threads", type=_pos_int, default=64,
                   help="SSD tier: parallel pread threads (default 64)")
    g.add_argument("--direct-io", action="store_true", help="SSD tier: O_DIRECT reads")
    g.add_argument("--cxl-latency-ns", type=float, default=250.0,
                   help="CXL tier: modeled latency per row access (ns)")
    g.add_argument("--cxl-bandwidth-gbps", type=float, default=32.0,
                   help="CXL tier: modeled bandwidth (GB/s)")
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
    o.add_argument("--max-batches", type=_pos_int, default=None,
                   help="use the first N batches of the trace (profile included)")
    o.add_argument("--profile-batches", type=_nonneg_int, default=None, help=_PROFILE_HELP)
    add_progress_args(o)
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
    t.add_argument("--row-bytes", type=_pos_int, default=None, metavar="N",
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
    t.add_argument("--pinned-fraction", type=_fraction, default=0.5,
                   help="hybrid: share of the cache pinned from the profile (default 0.5)")
    t.add_argument("--dynamic", default="lru", help="hybrid: the dynamic policy (default lru)")
    t.add_argument("--profile-batches", type=_nonneg_int, default=None, help=_PROFILE_HELP)
    t.add_argument("--max-batches", type=_pos_int, default=None,
                   help="use the first N batches of the trace (profile included)")
    t.add_argument("--target-hit-rate", type=_fraction, default=None,
                   help="recommend the smallest size at which a policy reaches this hit rate")
    t.add_argument("--no-opt", action="store_true", help="skip Belady's OPT")
    t.add_argument("--json", action="store_true",
                   help="print the results as JSON instead of the table (as replay --json)")
    t.add_argument("--out", default=None, metavar="OUT.json",
                   help="also write the results as JSON to this file")
    t.add_argument("--plot", default=None, metavar="OUT.png",
                   help="write the miss-ratio curve (with the target, if given)")
    add_progress_args(t)
    t.set_defaults(handler=cmd_tune)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m traces.replay_cli COMMAND ...``: the ``tiermem`` command itself."""
    from runtime.cli import main as tiermem_main

    return tiermem_main(argv)


if __name__ == "__main__":
    sys.exit(main())
