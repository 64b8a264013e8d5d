"""Scale-out: a placement planner and sharded inference on Ray.

The planner needs numpy only; the sharded runtime needs the ``ray`` extra.
"""

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
