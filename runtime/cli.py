"""The ``tiermem`` command.

    tiermem demo                       build a model + store, serve a workload, report
    tiermem create-store OUT ...       random tables, or the tables of a checkpoint
    tiermem info STORE                 tables, sizes, dtypes of a store
    tiermem verify STORE               check every block against its checksum
                                       (see runtime/verify_cli.py)
    tiermem predict --model --store --batch --out
    tiermem trace-stats / trace-generate / trace-convert   (see traces/cli.py)
    tiermem replay / tune                                  (see traces/replay_cli.py)
    tiermem serve                                          (see runtime/server.py)
    tiermem plan --store --shards --strategy --out         (see runtime/distributed/plan_cli.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

# Light imports only: ``--help``, ``--version`` and ``info`` must not pay for torch (seconds);
# each command imports what it needs. tests/test_cli_startup.py holds this.
from runtime.argtypes import nonneg_int as _nonneg_int
from runtime.argtypes import positive_int as _positive_int
from runtime.argtypes import threads as _threads
from tiermem.errors import TierMemError

__all__ = ["main"]


def _table_list(s: str) -> list[tuple[str, int, int]]:
    """``name:rows:dim,...`` or ``rows:dim,...`` (names t0, t1, ...)."""
    out = []
    for i, item in enumerate(p for p in s.split(",") if p.strip()):
        parts = item.strip().split(":")
        try:
            if len(parts) == 3:
                out.append((parts[0], int(parts[1]), int(parts[2])))
            elif len(parts) == 2:
                out.append((f"t{i}", int(parts[0]), int(parts[1])))
            else:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad table {item!r}: expected name:rows:dim or rows:dim") from None
    if not out:
        raise argparse.ArgumentTypeError("no tables given")
    return out


def _add_tier_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tier")
    g.add_argument("--tier", choices=["dram", "ssd", "cxl"], default="dram",
                   help="where embedding rows are read from (default: dram)")
    g.add_argument("--threads", type=_threads, default="auto",
                   help="threads for the SLS kernels and torch: N, or auto (default: per "
                        "batch, the cores other processes leave idle)")
    g.add_argument("--prefetch-distance", type=_nonneg_int, default=48,
                   help="software prefetch distance of the SLS kernel, lookups (0 = off; "
                        "default 48)")
    g.add_argument("--io-threads", type=_positive_int, default=64,
                   help="SSD tier: parallel pread threads (default 64)")
    g.add_argument("--cxl-latency-ns", type=float, default=250.0,
                   help="CXL tier: modeled latency per row access (ns)")
    g.add_argument("--cxl-bandwidth-gbps", type=float, default=32.0,
                   help="CXL tier: modeled bandwidth (GB/s)")


def _tier_config(args: argparse.Namespace) -> Any:
    from tiermem.config import TierConfig

    return TierConfig(kind=args.tier, prefetch_distance=args.prefetch_distance,
                      io_threads=args.io_threads, cxl_latency_ns=args.cxl_latency_ns,
                      cxl_bandwidth_gbps=args.cxl_bandwidth_gbps)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tiermem",
        description="CPU inference for DLRM-style models with tiered (DRAM/SSD/CXL) embeddings.")
    from tiermem import __version__

    ap.add_argument("--version", action="version", version=f"tiermem {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="build a default model and store, run a workload, report",
                       description="Build a Criteo-shaped DLRM checkpoint and its store, then "
                       "serve a Zipf workload from the DRAM, SSD and CXL-emulated tiers.")
    d.add_argument("--out", default="demo-out", help="folder for the model, store and report")
    d.add_argument("--max-rows", type=_positive_int, default=200_000,
                   help="cap on rows per table (Criteo Kaggle sizes otherwise)")
    d.add_argument("--dim", type=_positive_int, default=16, help="embedding dimension")
    d.add_argument("--batch-size", type=_positive_int, default=2048)
    d.add_argument("--batches", type=_positive_int, default=20)
    d.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the ids")
    d.add_argument("--dtype", choices=["float32", "float16", "int8"], default="float32")
    d.add_argument("--threads", type=_threads, default="auto",
                   help="N, or auto (default: the cores other processes leave idle)")

    c = sub.add_parser("create-store", help="create a store: random tables or from a checkpoint",
                       description="Create a tiermem store (a zarr v3 group). Creation streams "
                       "in blocks and is atomic: an interrupted run leaves no store.")
    c.add_argument("out", help="path of the new store (a folder, e.g. tables.zarr)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--random", metavar="TABLES", type=_table_list,
                     help="random tables: name:rows:dim,... (or rows:dim,...)")
    src.add_argument("--from-checkpoint", metavar="CKPT",
                     help="a torch checkpoint in the facebookresearch/dlrm or TorchRec layout")
    c.add_argument("--layout", choices=["auto", "dlrm", "torchrec"], default="auto",
                   help="checkpoint layout (default: detect)")
    c.add_argument("--dtype", choices=["float32", "float16", "int8"], default="float32",
                   help="row storage type; int8 is row-wise quantized (scale, bias per row)")
    c.add_argument("--seed", type=int, default=0, help="seed of random tables")
    c.add_argument("--overwrite", action="store_true", help="replace an existing store")
    c.add_argument("--no-progress", "--quiet", "-q", dest="no_progress", action="store_true",
                   help="no progress bar (there is one only when stderr is a terminal)")

    i = sub.add_parser("info", help="show a store's tables, sizes and dtypes",
                       description="Validate a store and list its tables.")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("predict", help="score a batch file through a model and store",
                       description="Run a batch (.npz: dense + sparse features) through a DLRM "
                       "checkpoint whose tables are served from a store; write predictions.")
    p.add_argument("--model", required=True, help="checkpoint with the dense (MLP) weights")
    p.add_argument("--store", required=True, help="store with the embedding tables")
    p.add_argument("--batch", required=True,
                   help=".npz with 'dense' and 'sparse' (B, T) or 'values'+'offsets'/'lengths'")
    p.add_argument("--out", required=True, help="predictions file: .npy, .txt or .csv")
    p.add_argument("--layout", choices=["auto", "dlrm", "torchrec"], default="auto")
    p.add_argument("--stats", action="store_true",
                   help="print tier statistics as JSON on stdout (the other lines go to stderr)")
    _add_tier_args(p)
    from runtime.distributed.plan_cli import add_shard_args

    add_shard_args(p)

    from runtime.distributed.plan_cli import add_plan_commands
    from traces.cli import add_trace_commands
    from traces.replay_cli import add_replay_commands

    add_trace_commands(sub)
    add_replay_commands(sub)
    add_plan_commands(sub)
    from runtime.serve_cli import add_serve_commands

    add_serve_commands(sub)
    from runtime.warmup_cli import add_warmup_command

    add_warmup_command(sub)
    from runtime.verify_cli import add_verify_command

    add_verify_command(sub)
    return ap


def _cmd_demo(args: argparse.Namespace) -> int:
    from runtime.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, max_rows=args.max_rows, dim=args.dim,
                        batch_size=args.batch_size, batches=args.batches, alpha=args.alpha,
                        dtype=args.dtype, threads=args.threads))
    return 0


def _cmd_create_store(args: argparse.Namespace) -> int:
    from tiermem.format import create_random_store, table_specs

    progress = not args.no_progress and sys.stderr.isatty()  # never a bar into a pipe
    if args.from_checkpoint:
        from runtime.convert import store_from_checkpoint

        info = store_from_checkpoint(args.from_checkpoint, args.out, layout=args.layout,
                                     dtype=args.dtype, overwrite=args.overwrite,
                                     progress=progress)
    else:
        info = create_random_store(args.out, table_specs(args.random, args.dtype), seed=args.seed,
                                   overwrite=args.overwrite, progress=progress)
    print(f"created {info.path}: {len(info.tables)} tables, {info.nbytes / 2**20:.1f} MiB")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from tiermem.format import open_store

    info = open_store(args.store)
    if args.json:
        print(json.dumps({"path": str(info.path), "nbytes": info.nbytes, "attrs": info.attrs,
                          "version": info.version,
                          "checksums": "tmh64 per 4 KiB block" if info.verified else "unverified",
                          "tables": [{**t.spec.to_dict(), "chunk_rows": t.chunk_rows,
                                      "nbytes": t.spec.nbytes} for t in info.tables]}, indent=2))
        return 0
    print(f"store {info.path}: {len(info.tables)} tables, {info.nbytes / 2**20:.1f} MiB")
    print(f"format {info.version}, " + (("checksums per 4 KiB block" + (
        " and per row" if info.version >= 3 else "") + " (checked on every read; "
        "`tiermem verify` scrubs it all)") if info.verified else
                                        "unverified: no checksums (an older store; recreate it)"))
    print(f"{'table':<24} {'rows':>14} {'dim':>5} {'dtype':>8} {'MiB':>10} {'chunk rows':>11}")
    for t in info.tables:
        s = t.spec
        print(f"{s.name:<24} {s.rows:>14,} {s.dim:>5} {s.dtype.value:>8} "
              f"{s.nbytes / 2**20:>10.2f} {t.chunk_rows:>11,}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from runtime.batchfile import load_batch, write_predictions
    from runtime.distributed.plan_cli import open_session
    from runtime.session import RuntimeConfig

    cfg = RuntimeConfig(tier=_tier_config(args), num_threads=args.threads)
    with open_session(args, cfg) as sess:
        dense, sparse = load_batch(args.batch, sess.table_names)
        preds = sess.predict(dense, sparse)
        write_predictions(args.out, preds)
        # with --stats stdout is one JSON document (``| python -m json.tool``)
        print(f"wrote {len(preds)} predictions to {args.out}",
              file=sys.stderr if args.stats else sys.stdout)
        if args.stats:
            stats = dict(sess.stats)
            tables = stats.get("tables", {})
            # the sums over the tables first: what a reader looks for
            total = {k: sum(t.get(k, 0) for t in tables.values())
                     for k in (next(iter(tables.values())) if tables else {})}
            print(json.dumps({"total": total, **stats}, indent=2))
    return 0


def _cmd_warmup(args: argparse.Namespace) -> int:
    from runtime.warmup_cli import cmd_warmup

    return cmd_warmup(args)


_COMMANDS = {"demo": _cmd_demo, "create-store": _cmd_create_store, "info": _cmd_info,
             "predict": _cmd_predict, "warmup": _cmd_warmup}


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point: exit 2 with one line for bad input, 130 on Ctrl-C, never a traceback
    for either (Ctrl-C during torch's import included)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("tiermem: interrupted", file=sys.stderr)
        return 130


def _run(argv: Sequence[str] | None) -> int:
    from runtime.distributed.plan_cli import PLAN_COMMANDS
    from runtime.serve_cli import SERVE_COMMANDS
    from runtime.verify_cli import VERIFY_COMMANDS
    from traces.cli import TRACE_COMMANDS
    from traces.replay_cli import REPLAY_COMMANDS

    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {**_COMMANDS, **TRACE_COMMANDS, **REPLAY_COMMANDS, **PLAN_COMMANDS,
                **SERVE_COMMANDS, **VERIFY_COMMANDS}
    try:
        return commands[args.command](args)
    except TierMemError as e:
        print(f"tiermem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"tiermem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tiermem {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
