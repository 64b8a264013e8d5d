"""``tiermem serve``: its options, and the runtime and server they describe.

Building the ``tiermem`` parser (``--help`` of every verb) imports this module,
not the serving stack: numpy, numba, torch and uvicorn load when ``serve`` runs.

    tiermem serve --model demo-out/model.pt --store demo-out/store.zarr \\
        [--host 127.0.0.1] [--port 8000] [--tier dram|ssd|cxl] [--cache-size 10%|100000|64MiB] \\
        [--policy lru] [--prefetch-lookahead 2] [--max-batch-size 2048] [--max-delay-ms 2] \\
        [--max-queue 1024] [--max-queue-samples 65536] [--overload reject|wait] [--workers 1] \\
        [--default-deadline-ms MS] [--max-body-bytes 16MiB] [--no-warmup]

binds 127.0.0.1 unless told otherwise before the model loads, prints ``listening on
http://HOST:PORT`` (``--port 0`` picks a free port), and on SIGINT/SIGTERM stops
accepting connections, answers the accepted requests and exits.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runtime.argtypes import nonneg_int, port, positive_int
from runtime.server.defaults import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_LIMIT_CONCURRENCY,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_JSON_BYTES,
)
from tiermem.config import parse_bytes
from tiermem.errors import ConfigError

if TYPE_CHECKING:
    from runtime.service import ServingRuntime

__all__ = ["SERVE_COMMANDS", "add_serve_commands", "build_runtime", "configure_serve", "serve"]


def _bytes(s: str) -> int:
    try:
        return parse_bytes(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cache_size(s: str) -> dict[str, Any]:
    """``10%`` or ``0.1`` (share of the tables), ``100000`` (rows), ``64MiB`` (bytes)."""
    from tiermem.cache.cache import parse_cache_size  # numba: only when the option is given

    try:
        return parse_cache_size(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not v >= 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


def configure_serve(p: argparse.ArgumentParser) -> None:
    """The options of ``tiermem serve``."""
    from runtime.cli import _add_tier_args
    from runtime.distributed.plan_cli import add_shard_args

    p.add_argument("--model", required=True, help="checkpoint with the dense (MLP) weights")
    p.add_argument("--store", required=True, help="store with the embedding tables")
    p.add_argument("--layout", choices=["auto", "dlrm", "torchrec"], default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000,
                   help="port, 0..65535 (default 8000; 0 picks a free one)")
    _add_tier_args(p)
    add_shard_args(p)
    c = p.add_argument_group("cache")
    c.add_argument("--cache-size", type=_cache_size, default=None,
                   help="DRAM row cache in front of an ssd/cxl tier: rows (100000), a fraction "
                   "of the tables (0.1 or 10%%) or bytes (64MiB); default: no cache")
    c.add_argument("--policy", default="lru",
                   help="cache policy: lru, lfu, fifo, clock, s3fifo, static, hybrid")
    c.add_argument("--prefetch-lookahead", type=nonneg_int, default=0,
                   help="lookahead prefetcher fed with queued requests (needs --cache-size; "
                   "0 = off)")
    b = p.add_argument_group("batching")
    b.add_argument("--max-batch-size", type=positive_int, default=2048,
                   help="most samples merged into one predict (default 2048)")
    b.add_argument("--max-delay-ms", type=_nonneg_float, default=2.0,
                   help="longest a batch waits for more requests (default 2)")
    b.add_argument("--max-queue", type=positive_int, default=1024,
                   help="most requests waiting (default 1024)")
    b.add_argument("--max-queue-samples", type=positive_int, default=65536,
                   help="most samples waiting (default 65536)")
    b.add_argument("--overload", choices=["reject", "wait"], default="reject",
                   help="queue full: answer 503 at once (reject) or wait --wait-timeout-s")
    b.add_argument("--wait-timeout-s", type=_nonneg_float, default=1.0)
    b.add_argument("--max-queue-delay-ms", type=_positive_float, default=None,
                   help="a request still queued this long after it arrived gets 503 instead "
                   "of running late (default: no bound in time)")
    b.add_argument("--default-deadline-ms", type=_positive_float, default=None,
                   help="deadline of requests that give none (default: none)")
    b.add_argument("--max-body-bytes", type=_bytes, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body (default 16MiB); larger ones get 413")
    b.add_argument("--max-json-bytes", type=_bytes, default=DEFAULT_MAX_JSON_BYTES,
                   help="largest JSON body (default 4MiB; parsing JSON holds the GIL); "
                   "larger requests go as application/x-tiermem or npz")
    b.add_argument("--max-request-samples", type=positive_int, default=65536,
                   help="most samples in one request (default 65536); more get 413")
    b.add_argument("--max-request-ids", type=positive_int, default=1 << 24,
                   help="most ids in one request, all tables (default 16777216); more get 413")
    h = p.add_argument_group("connections")
    h.add_argument("--limit-concurrency", type=positive_int, default=DEFAULT_LIMIT_CONCURRENCY,
                   help="most connections + requests at once; beyond, 503 (default 2048)")
    h.add_argument("--timeout-keep-alive", type=_positive_float, default=5.0,
                   help="idle keep-alive connections close after this many s (default 5)")
    h.add_argument("--header-timeout-s", type=_positive_float, default=DEFAULT_HEADER_TIMEOUT_S,
                   help="connections whose request headers take longer close (default 10)")
    h.add_argument("--body-timeout-s", type=_positive_float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="a request body pausing this long gets 408 (default 5)")
    h.add_argument("--auth-token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on /predict and /metrics "
                   "(default: $TIERMEM_AUTH_TOKEN; /healthz and /readyz stay open)")
    h.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    h.add_argument("--ssl-keyfile", default=None, help="the certificate's private key")
    b.add_argument("--workers", type=positive_int, default=1,
                   help="batches run at once, each on its own thread (default 1); without "
                   "--threads each worker gets cores / workers threads. On few cores "
                   "'--workers 2' serves more queries/s; 1 has the lowest idle latency")
    b.add_argument("--no-warmup", action="store_true", help="ready at once, no warm-up batch")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])


def add_serve_commands(subparsers: Any) -> None:
    """Add ``serve`` to the ``tiermem`` command's subparsers."""
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (dynamic batching, /metrics)",
        description="Serve a DLRM checkpoint + store over HTTP: POST /predict (JSON or npz), "
        "GET /healthz, /readyz, /metrics. Binds 127.0.0.1 unless --host says otherwise. "
        "Needs the [service] extra.")
    configure_serve(p)


def build_runtime(args: argparse.Namespace) -> ServingRuntime:
    """The session and serving runtime the ``serve`` options describe."""
    from runtime.cli import _tier_config
    from runtime.distributed.plan_cli import open_session
    from runtime.service import ServingConfig, ServingRuntime
    from runtime.session import RuntimeConfig

    cache = prefetch = None
    if args.cache_size is not None:
        from tiermem.cache.cache import CacheConfig

        cache = CacheConfig(policy=args.policy, **args.cache_size)
    if args.prefetch_lookahead:
        from tiermem.cache.prefetch import PrefetchConfig

        prefetch = PrefetchConfig(lookahead=args.prefetch_lookahead)
    threads = args.threads
    if threads == "auto" and args.workers > 1:  # the meter would give each worker every core
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    cfg = RuntimeConfig(tier=_tier_config(args), num_threads=threads, cache=cache,
                        prefetch=prefetch)
    scfg = ServingConfig(max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                         max_queue_requests=args.max_queue,
                         max_queue_samples=args.max_queue_samples, overload=args.overload,
                         max_request_samples=args.max_request_samples,
                         max_request_ids=args.max_request_ids,
                         wait_timeout_s=args.wait_timeout_s,
                         max_queue_delay_ms=args.max_queue_delay_ms,
                         default_deadline_ms=args.default_deadline_ms,
                         warmup=not args.no_warmup,
                         prefetch_batches=max(args.prefetch_lookahead, 1),
                         workers=args.workers)
    session = open_session(args, cfg)
    try:
        return ServingRuntime(session, scfg, owns_session=True)
    except BaseException:
        session.close()
        raise


def serve(args: argparse.Namespace) -> int:
    """``tiermem serve``: bind, load, warm up, serve until SIGINT/SIGTERM, drain."""
    from runtime.server.runner import bind, run

    sock = bind(args.host, args.port)
    try:
        runtime = build_runtime(args)
    except BaseException:
        sock.close()
        raise
    try:
        run(runtime, sock=sock, tier=args.tier, max_body_bytes=args.max_body_bytes,
            max_json_bytes=args.max_json_bytes, body_timeout_s=args.body_timeout_s,
            auth_token=args.auth_token or os.environ.get("TIERMEM_AUTH_TOKEN") or None,
            limit_concurrency=args.limit_concurrency,
            timeout_keep_alive=args.timeout_keep_alive, header_timeout_s=args.header_timeout_s,
            log_level=args.log_level, ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile)
    finally:
        runtime.close(drain=True)
    print("tiermem serve: stopped", flush=True)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"tiermem serve needs the [service] extra (pip install -e "
                          f"'.[service]'): {e}") from None
    return serve(args)


SERVE_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"serve": _cmd_serve}
