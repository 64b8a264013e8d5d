"""The i+1 / i+2 pipeline of a batch stream, written once.

A session's stream overlaps the embedding stage of batch i+1 (Numba without
the GIL, or the shards) with the MLPs of batch i (torch), and tells the
prefetcher of the batches after that. :func:`pipelined` owns the window and
the order; the sessions give it four small steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

__all__ = ["pipelined"]

B = TypeVar("B")  # a batch as the caller gives it
I = TypeVar("I")  # noqa: E741  # a prepared batch (checked features, dense tensor, ...)
H = TypeVar("H")  # a launched embedding stage (a future, refs)
R = TypeVar("R")  # a result


def pipelined(batches: Iterable[B], prepare: Callable[[B], I],
              launch: Callable[[I, Sequence[I]], H], finish: Callable[[I, H], R], *,
              overlap: bool = True, horizon: int = 2,
              hint: Callable[[I], None] | None = None) -> Iterator[R]:
    """``finish(item, launch(item, later))`` of every batch, in order.

    ``prepare`` runs ahead so that ``horizon`` batches, launched or not, are
    prepared past the one finishing; a batch prepared two or more places
    after the one finishing next is passed to ``hint`` (a prefetch). With
    ``overlap`` batch i+1 is launched before batch i finishes. ``launch``
    sees the prepared batches after its own (``later``), for a hint that
    rides along with the launch.
    """
    it = iter(batches)
    waiting: deque[I] = deque()  # prepared, not launched
    inflight: deque[tuple[I, H]] = deque()  # launched, oldest first
    depth = 2 if overlap else 1
    horizon = max(horizon, depth)

    def pull() -> bool:
        for b in it:
            item = prepare(b)
            waiting.append(item)
            if hint is not None and len(inflight) + len(waiting) > 2:
                hint(item)  # two or more places after the batch finishing next
            return True
        return False

    def fill() -> None:
        while len(inflight) + len(waiting) < horizon and pull():
            pass

    fill()
    while waiting or inflight:
        while waiting and len(inflight) < depth:
            item = waiting.popleft()
            inflight.append((item, launch(item, waiting)))
            fill()
        item, handle = inflight.popleft()
        fill()
        yield finish(item, handle)
