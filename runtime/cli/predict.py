"""``tiermem predict`` (a batch file through a model and store) and ``tiermem demo``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from runtime.cli.argtypes import positive_int, threads
from runtime.cli.session import add_shard_options, add_tier_options, open_session, tier_config

__all__ = ["cmd_demo", "cmd_predict", "register"]


def register(subparsers: Any) -> None:
    subparsers.add_parser(
        "demo", help="build a default model and store, run a workload, report",
        description="Build a Criteo-shaped DLRM checkpoint and its store, then serve a Zipf "
                    "workload from the DRAM, SSD and CXL-emulated tiers.",
        options=_demo_options, handler=cmd_demo)
    subparsers.add_parser(
        "predict", help="score a batch file through a model and store",
        description="Run a batch (.npz: dense + sparse features) through a DLRM checkpoint "
                    "whose tables are served from a store; write predictions.",
        options=_predict_options, handler=cmd_predict)


def _demo_options(d: argparse.ArgumentParser) -> None:
    d.add_argument("--out", default="demo-out", help="folder for the model, store and report")
    d.add_argument("--max-rows", type=positive_int, default=200_000,
                   help="cap on rows per table (Criteo Kaggle sizes otherwise)")
    d.add_argument("--dim", type=positive_int, default=16, help="embedding dimension")
    d.add_argument("--batch-size", type=positive_int, default=2048)
    d.add_argument("--batches", type=positive_int, default=20)
    d.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the ids")
    d.add_argument("--dtype", choices=["float32", "float16", "int8"], default="float32")
    d.add_argument("--threads", type=threads, default="auto",
                   help="N, or auto (default: the cores other processes leave idle)")


def _predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint with the dense (MLP) weights")
    p.add_argument("--store", required=True, help="store with the embedding tables")
    p.add_argument("--batch", required=True,
                   help=".npz with 'dense' and 'sparse' (B, T) or 'values'+'offsets'/'lengths'")
    p.add_argument("--out", required=True, help="predictions file: .npy, .txt or .csv")
    p.add_argument("--layout", choices=["auto", "dlrm", "torchrec"], default="auto")
    p.add_argument("--stats", action="store_true",
                   help="print tier statistics as JSON on stdout (the other lines go to stderr)")
    add_tier_options(p)
    add_shard_options(p)


def cmd_demo(args: argparse.Namespace) -> int:
    from runtime.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, max_rows=args.max_rows, dim=args.dim,
                        batch_size=args.batch_size, batches=args.batches, alpha=args.alpha,
                        dtype=args.dtype, threads=args.threads))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from runtime.batchfile import load_batch, write_predictions
    from runtime.session import RuntimeConfig

    cfg = RuntimeConfig(tier=tier_config(args), num_threads=args.threads)
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
