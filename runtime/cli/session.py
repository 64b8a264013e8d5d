"""The options that open a session: the tier (``TierConfig``'s fields), ``--threads``, and
``--plan`` with the Ray shard options (``ShardOptions``'s fields); the session they open."""

from __future__ import annotations

import argparse
from typing import Any

from runtime.cli.argtypes import threads
from runtime.cli.options import ConfigOptions

__all__ = ["add_shard_options", "add_tier_options", "open_session", "tier_config"]

TIER_CONFIG = "tiermem.config:TierConfig"
SHARD_OPTIONS = "runtime.distributed.sharded:ShardOptions"


def add_tier_options(p: argparse.ArgumentParser, *, threads_option: bool = True,
                     **overrides: Any) -> None:
    """``--tier`` and the other ``TierConfig`` fields (``overrides`` as for ConfigOptions,
    e.g. ``defaults={"kind": "ssd"}``), and ``--threads``."""
    g = p.add_argument_group("tier")
    names = {"kind": "tier", **overrides.pop("names", {})}
    p.set_defaults(tier_options=ConfigOptions(g, TIER_CONFIG, names=names, **overrides))
    if threads_option:
        g.add_argument("--threads", type=threads, default="auto",
                       help="threads for the SLS kernels and torch: N, or auto (default: per "
                            "batch, the cores other processes leave idle)")


def tier_config(args: argparse.Namespace) -> Any:
    """The ``TierConfig`` of the tier options."""
    return args.tier_options.build(args)


def add_shard_options(p: argparse.ArgumentParser) -> None:
    """``--plan`` and the Ray options of commands that can run a model sharded."""
    g = p.add_argument_group("scale-out on Ray (with --plan)")
    g.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="serve the tables from Ray shard actors placed by this plan "
                   "(tiermem plan); default: this process alone")
    g.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster ('auto', HOST:6379, ray://HOST:10001); "
                   "default: start a local one")
    p.set_defaults(shard_options=ConfigOptions(g, SHARD_OPTIONS, prefix="shard",
                                               names={"transport": "transport"}))


def open_session(args: argparse.Namespace, config: Any) -> Any:
    """An InferenceSession, or a ShardedSession when ``--plan`` is given."""
    if args.plan:
        from runtime.distributed.sharded import ShardedSession

        return ShardedSession.open(args.model, args.store, args.plan, config,
                                   args.shard_options.build(args), layout=args.layout,
                                   address=args.ray_address)
    from runtime.session import InferenceSession

    return InferenceSession.open(args.model, args.store, config, layout=args.layout)
