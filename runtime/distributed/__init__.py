"""Scale-out: a placement planner and sharded inference on Ray.

The planner needs numpy only; the sharded runtime needs the ``ray`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tiermem._lazy import lazy_names

if TYPE_CHECKING:
    from runtime.distributed.plan import Piece, ShardPlan, load_plan
    from runtime.distributed.routing import Router
    from runtime.distributed.shard import EmbeddingShard
    from runtime.distributed.sharded import (
        ShardedSession,
        ShardError,
        ShardOptions,
        ShardTimeoutError,
        ShardUnavailableError,
    )

# loaded on first use, so that ``tiermem plan`` / ``--help`` need neither torch nor ray
_LAZY = {
    "Piece": "runtime.distributed.plan", "ShardPlan": "runtime.distributed.plan",
    "load_plan": "runtime.distributed.plan", "Router": "runtime.distributed.routing",
    "EmbeddingShard": "runtime.distributed.shard",
    **dict.fromkeys(["ShardedSession", "ShardError", "ShardOptions", "ShardTimeoutError",
                     "ShardUnavailableError"], "runtime.distributed.sharded"),
}


__getattr__, __dir__ = lazy_names("runtime.distributed", _LAZY, globals())


__all__ = [
    "EmbeddingShard",
    "Piece",
    "Router",
    "ShardError",
    "ShardOptions",
    "ShardPlan",
    "ShardTimeoutError",
    "ShardUnavailableError",
    "ShardedSession",
    "load_plan",
]
