"""The ``tiermem`` command: one parser, a module per verb group.

    tiermem demo / predict                                   (runtime/cli/predict.py)
    tiermem create-store / info / verify                     (runtime/cli/store.py)
    tiermem warmup                                           (runtime/cli/warmup.py)
    tiermem trace-stats / trace-generate / trace-convert     (runtime/cli/trace.py)
    tiermem replay / tune                                    (runtime/cli/replay.py)
    tiermem plan                                             (runtime/cli/plan.py)
    tiermem serve                                            (runtime/cli/serve.py)

A verb module has ``register(subparsers)``, which adds its parsers with
``options=`` (a function adding the options) and ``handler=`` (the ``cmd_*``
function running it); a new verb is its module plus one line in ``VERBS``.
A verb's options are added only when that verb is parsed, so ``--help`` and
``info`` read no config class; handlers import torch/numba/zarr themselves
(tests/test_cli_startup.py holds this).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import runtime.cli.plan as plan
import runtime.cli.predict as predict
import runtime.cli.replay as replay
import runtime.cli.serve as serve
import runtime.cli.store as store
import runtime.cli.trace as trace
import runtime.cli.warmup as warmup
from tiermem.errors import TierMemError

__all__ = ["VERBS", "build_parser", "main"]

VERBS = (predict, store, trace, replay, plan, serve, warmup)
"""The verb modules, in the order of ``tiermem --help``'s list."""


class VerbParser(argparse.ArgumentParser):
    """A verb's parser: ``options(parser)`` adds its options when the verb is parsed (or
    its help shown), not when the ``tiermem`` parser is built."""

    def __init__(self, *args: Any, options: Callable[[argparse.ArgumentParser], None] |
                 None = None, handler: Callable[[argparse.Namespace], int] | None = None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._add_options = options
        if handler is not None:
            self.set_defaults(handler=handler)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._add_options is not None:
            add, self._add_options = self._add_options, None
            add(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    from tiermem import __version__

    ap = argparse.ArgumentParser(
        prog="tiermem",
        description="CPU inference for DLRM-style models with tiered (DRAM/SSD/CXL) embeddings.")
    ap.add_argument("--version", action="version", version=f"tiermem {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=VerbParser)
    sub.required = True
    for verb in VERBS:
        verb.register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point: exit 2 with one line for bad input, 130 on Ctrl-C, never a traceback
    for either (Ctrl-C during torch's import included)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("tiermem: interrupted", file=sys.stderr)
        return 130


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
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
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
