"""``tiermem plan``: place a store's tables on shards and write the plan file.

    tiermem plan --store STORE [--trace TRACE... [--from ...] [--batch-size B] [--max-batches N]
                 [--table-map TRACE=STORE,...]] [--pooling P]
                 --shards N [--capacity 2GiB|30%] [--strategy singular|capacity|load|rowwise|cost]
                 [--out plan.json] [--compare] [--json]
                 [--cost-rtt-us US] [--cost-ns-per-lookup NS] [--cost-ns-per-lookup-byte NS]
                 [--cost-ns-per-byte-gathered NS] [--cost-network-gbytes-per-s GBPS]

The load comes from a trace profile (the first ``--max-batches`` batches,
re-cut to ``--batch-size`` samples: the serving batch size); without
``--trace`` every row is equally likely, ``--pooling`` lookups per sample and
batches of ``--batch-size`` (default 2048). ``--capacity`` is bytes per shard
or a share of the store's bytes; without it shards have no limit.
``--compare`` plans with every strategy and prints their predicted slowest
shard, balance and bytes per shard side by side (the simulated cluster); the
plan written is still ``--strategy``'s. The plan file format is documented
in :mod:`runtime.distributed.plan`, the strategies and the cost model in
:mod:`runtime.distributed.planner`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from runtime.cli.argtypes import positive_int
from runtime.cli.options import ConfigOptions
from runtime.cli.trace_input import add_source_options, open_trace, table_map
from tiermem.errors import CapacityError, ConfigError

__all__ = ["STRATEGY_CHOICES", "cmd_plan", "format_compare", "format_plan", "parse_capacity",
           "register"]


def parse_capacity(spec: str | None, store_bytes: int) -> int | None:
    """``"2GiB"``/``"1500000000"`` -> bytes; ``"30%"``/``"0.3"`` -> that share of the store's
    bytes (rounded up); None -> None (no limit)."""
    from tiermem.config import parse_share_or_bytes

    if spec is None:
        return None
    try:
        kind, value = parse_share_or_bytes(spec)
    except (ValueError, ConfigError):
        raise ConfigError(f"bad --capacity {spec!r}: expected bytes per shard ('2GiB', "
                          "'1500000000') or a share of the store ('30%', '0.3')") from None
    if kind == "share" and not 0 < value <= 1:
        raise ConfigError(f"--capacity {spec!r}: a share of the store must be in (0%, 100%]")
    return int(value) if kind == "bytes" else max(1, math.ceil(value * store_bytes))


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _profile(args: argparse.Namespace, specs: list[Any]) -> Any:
    from runtime.distributed.planner import DEFAULT_BATCH_SIZE
    from runtime.distributed.profile import TraceProfile

    if not args.trace:
        if args.max_batches is not None or args.table_map:
            raise ConfigError("--max-batches and --table-map need --trace")
        pooling = 1.0 if args.pooling is None else args.pooling
        return TraceProfile.uniform(specs, args.batch_size or DEFAULT_BATCH_SIZE, pooling)
    if args.pooling is not None:
        raise ConfigError("--pooling is for uniform access (no --trace): a trace has its own "
                          "pooling factors")
    mapping = table_map(args.table_map) or {}
    inverse = {v: k for k, v in mapping.items()}
    rows = {inverse.get(s.name, s.name): s.rows for s in specs}
    src = open_trace(args)
    prof = TraceProfile.from_trace(src, rows, max_batches=args.max_batches,
                                   source=",".join(map(str, args.trace)))
    return prof.renamed(mapping) if mapping else prof


def _cost_model(args: argparse.Namespace) -> Any:
    return args.cost_options.build(args)


def format_plan(plan: Any) -> str:
    """A readable per-shard table of a plan made by ``planner.make_plan``."""
    meta = plan.meta
    pred = meta.get("predicted") or {}
    prof = meta.get("profile") or {}
    cap = plan.capacity_bytes
    total = sum(s.nbytes for s in plan.tables.values())
    lines = [f"plan {plan.strategy!r}: {len(plan.tables)} tables ({_fmt_bytes(total)}) on "
             f"{plan.num_shards} shards" + (f" x {_fmt_bytes(cap)}" if cap else
                                            " (no capacity limit)")
             + (f", store {meta['store']}" if meta.get("store") else "")]
    if prof:
        src = prof.get("source")
        what = (f"uniform access, batch {prof['batch_size']}" if src == "uniform" else
                f"trace {src}: {prof['num_batches']} batches of {prof['batch_size']} samples")
        lines.append(f"profile: {what}, {prof.get('lookups_per_batch', 0):,.1f} lookups/batch"
                     + (f"; not in the trace (zero load): {', '.join(prof['unprofiled'][:8])}"
                        + (" ..." if len(prof["unprofiled"]) > 8 else "")
                        if prof.get("unprofiled") else ""))
    us = pred.get("shard_us") or [None] * plan.num_shards
    lines.append(f"{'shard':>5} {'pieces':>6} {'tables':>6} {'MiB':>11} {'% cap':>6} "
                 f"{'lookups/batch':>14} {'pred. us':>10}")
    lk = plan.shard_lookups()
    for s, nb in enumerate(plan.shard_bytes()):
        ps = plan.shard_pieces(s)
        pct = f"{100 * nb / cap:6.1f}" if cap else f"{'-':>6}"
        lines.append(f"{s:>5} {len(ps):>6} {len({p.table for p in ps}):>6} "
                     f"{nb / 2**20:>11.2f} {pct} {lk[s]:>14,.1f} "
                     + (f"{us[s]:>10,.1f}" if us[s] is not None else f"{'-':>10}"))
    if pred:
        lines.append(f"predicted per batch: slowest shard {pred['slowest_us']:,.1f} us (shard "
                     f"{pred['slowest_shard']}), mean {pred['mean_us']:,.1f} us; lookup balance "
                     f"{pred['lookup_balance']:.3f}, byte balance {pred['byte_balance']:.3f} "
                     f"(max/mean)")
    split = plan.split_tables
    if split:
        lines.append("split tables: " + ", ".join(
            f"{n} ({len(plan.table_pieces(n))} pieces)" for n in split[:12])
            + (" ..." if len(split) > 12 else ""))
    return "\n".join(lines)


def format_compare(results: dict[str, dict[str, Any]], chosen: str) -> str:
    """Strategies side by side: predicted slowest/mean shard, balance, bytes and time per shard."""
    lines = [f"{'strategy':<10} {'slowest us':>11} {'mean us':>10} {'lookup bal':>10} "
             f"{'byte bal':>9} {'pieces':>7} {'split':>6} {'max MiB':>10}"]
    ok = {}
    for name, r in results.items():
        mark = " *" if name == chosen else ""
        if "error" in r:
            lines.append(f"{name:<10} cannot plan: {r['error']}{mark}")
            continue
        p = r["predicted"]
        ok[name] = r
        lines.append(f"{name:<10} {p['slowest_us']:>11,.1f} {p['mean_us']:>10,.1f} "
                     f"{p['lookup_balance']:>10.3f} {p['byte_balance']:>9.3f} {r['pieces']:>7} "
                     f"{len(r['split_tables']):>6} {max(p['shard_bytes']) / 2**20:>10.2f}{mark}")
    if ok:
        names = list(ok)
        n_shards = len(next(iter(ok.values()))["predicted"]["shard_us"])
        lines.append("")
        lines.append("per shard, predicted us | MiB:")
        lines.append(f"{'shard':>5} " + " ".join(f"{n:>20}" for n in names))
        for s in range(n_shards):
            cells = [f"{ok[n]['predicted']['shard_us'][s]:>9,.0f} | "
                     f"{ok[n]['predicted']['shard_bytes'][s] / 2**20:>8.1f}" for n in names]
            lines.append(f"{s:>5} " + " ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from runtime.distributed.planner import compare_strategies, make_plan
    from tiermem.format import open_store

    if not Path(args.store).exists():
        raise ConfigError(f"store {args.store} does not exist")
    info = open_store(args.store)
    specs = info.specs
    capacity = parse_capacity(args.capacity, info.nbytes)
    cm = _cost_model(args)
    profile = _profile(args, specs)
    compared: dict[str, dict[str, Any]] | None = None
    if args.compare:
        compared = compare_strategies(specs, args.shards, capacity, profile, cm)
        r = compared[args.strategy]
        if "error" in r:
            if not args.json:
                print(format_compare(compared, args.strategy))
            raise CapacityError(r["error"])
        plan = r["plan"]
    else:
        plan = make_plan(specs, args.shards, capacity, args.strategy, profile, cm)
    meta = dict(plan.meta)
    meta["store"] = str(info.path)
    plan = type(plan)(plan.num_shards, plan.tables, plan.pieces, plan.capacity_bytes,
                      plan.strategy, meta)
    if args.out:
        plan.save(args.out)
    if args.json:
        d: dict[str, Any] = {"plan": plan.to_dict(), "out": args.out}
        if compared is not None:
            d["compare"] = {n: ({"error": r["error"]} if "error" in r else
                                {"predicted": r["predicted"], "pieces": r["pieces"],
                                 "split_tables": r["split_tables"]})
                            for n, r in compared.items()}
        print(json.dumps(d, indent=1))
    else:
        print(format_plan(plan))
        if compared is not None:
            print()
            print(format_compare(compared, args.strategy))
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


# planner.STRATEGIES, spelled out so that building the parser needs no numpy/numba
# (tests/test_cli_startup.py checks that the two agree)
STRATEGY_CHOICES = ("singular", "capacity", "load", "rowwise", "cost")


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def register(subparsers: Any) -> None:
    subparsers.add_parser(
        "plan", help="place a store's tables on shards (a plan file for sharded inference)",
        description="Decide which table, or which row range of a table, lives on which shard, "
                    "from the store's table sizes and a trace profile (lookups per batch per "
                    "table and per row range), and write the plan as JSON. Strategies: singular "
                    "(all on one shard), capacity (bin-packing by bytes), load (by expected "
                    "lookups), rowwise (every table split over all shards, ranges balanced by "
                    "measured load), cost (minimise the predicted slowest shard per batch). "
                    "Without --trace, access is uniform with --pooling lookups per sample and "
                    "batches of --batch-size (default 2048).",
        options=_options, handler=cmd_plan)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store with the embedding tables")
    p.add_argument("--trace", nargs="+", default=None,
                   help="trace to profile: native directory, or Meta .pt[.gz] / Criteo TSV files "
                        "(default: uniform access)")
    add_source_options(p)
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="profile the first N batches of the trace (default: all)")
    p.add_argument("--table-map", default=None, metavar="TRACE=STORE,...",
                   help="rename trace tables to store tables (default: same names)")
    p.add_argument("--pooling", type=_nonneg_float, default=None,
                   help="without --trace: lookups per sample of every table (default 1)")
    g = p.add_argument_group("placement")
    g.add_argument("--shards", required=True, type=positive_int, help="number of shards")
    g.add_argument("--capacity", default=None,
                   help="bytes per shard ('2GiB', '1500000000') or a share of the store's bytes "
                        "('30%%', '0.3'); default: no limit")
    g.add_argument("--strategy", choices=STRATEGY_CHOICES, default="cost",
                   help="placement strategy (default cost)")
    g.add_argument("--out", default=None, metavar="PLAN.json",
                   help="write the plan here (atomically); default: print only")
    g.add_argument("--compare", action="store_true",
                   help="also plan with every strategy and print their predictions side by side")
    g.add_argument("--json", action="store_true", help="print JSON instead of text")
    c = p.add_argument_group("cost model (see runtime/distributed/planner.py)")
    # flags of CostModel's fields (--cost-rtt-us ...); the byte sizes of the wire stay fixed
    p.set_defaults(cost_options=ConfigOptions(c, "runtime.distributed.planner:CostModel",
                                              prefix="cost",
                                              exclude=("id_bytes", "output_value_bytes")))
