"""``tiermem serve``: its options, and the runtime and server they describe.

    tiermem serve --model demo-out/model.pt --store demo-out/store.zarr \\
        [--host 127.0.0.1] [--port 8000] [--tier dram|ssd|cxl] [--cache-size 10%|100000|64MiB] \\
        [--policy lru] [--prefetch-lookahead 2] [--max-batch-size 2048] [--max-delay-ms 2] \\
        [--max-queue-requests 1024] [--max-queue-samples 65536] [--overload reject|wait] \\
        [--workers 1] [--default-deadline-ms MS] [--max-body-bytes 16MiB] [--no-warmup]

binds 127.0.0.1 unless told otherwise before the model loads, prints ``listening on
http://HOST:PORT`` (``--port 0`` picks a free port), and on SIGINT/SIGTERM stops
accepting connections, answers the accepted requests and exits. The tier, cache,
prefetch and batching options are the fields of ``TierConfig``, ``CacheConfig``,
``PrefetchConfig`` and ``ServingConfig`` (see :mod:`runtime.cli.options`); the
HTTP limits are the arguments of :func:`runtime.server.run`.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from runtime.cli.argtypes import byte_size, nonneg_int, port, positive_float, positive_int
from runtime.cli.options import ConfigOptions
from runtime.cli.session import add_shard_options, add_tier_options, open_session, tier_config
from tiermem.errors import ConfigError

if TYPE_CHECKING:
    from runtime.service import ServingRuntime

__all__ = ["build_runtime", "cmd_serve", "register"]

CACHE_CONFIG = "tiermem.cache.cache:CacheConfig"
PREFETCH_CONFIG = "tiermem.cache.prefetch:PrefetchConfig"
SERVING_CONFIG = "runtime.service:ServingConfig"
_CAPACITY = ("capacity_rows", "capacity_bytes", "capacity_fraction")  # one --cache-size


def register(subparsers: Any) -> None:
    subparsers.add_parser(
        "serve", help="serve a model over HTTP (dynamic batching, /metrics)",
        description="Serve a DLRM checkpoint + store over HTTP: POST /predict (JSON or npz), "
        "GET /healthz, /readyz, /metrics. Binds 127.0.0.1 unless --host says otherwise. "
        "Needs the [service] extra.", options=_options, handler=cmd_serve)


def _cache_size(s: str) -> dict[str, Any]:
    """``10%`` or ``0.1`` (share of the tables), ``100000`` (rows), ``64MiB`` (bytes)."""
    from tiermem.cache.cache import parse_cache_size  # numba: only when the option is given

    try:
        return parse_cache_size(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _options(p: argparse.ArgumentParser) -> None:
    from runtime.server.defaults import (
        DEFAULT_BODY_TIMEOUT_S,
        DEFAULT_HEADER_TIMEOUT_S,
        DEFAULT_LIMIT_CONCURRENCY,
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_MAX_JSON_BYTES,
    )

    p.add_argument("--model", required=True, help="checkpoint with the dense (MLP) weights")
    p.add_argument("--store", required=True, help="store with the embedding tables")
    p.add_argument("--layout", choices=["auto", "dlrm", "torchrec"], default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000,
                   help="port, 0..65535 (default 8000; 0 picks a free one)")
    add_tier_options(p)
    add_shard_options(p)
    c = p.add_argument_group("cache")
    c.add_argument("--cache-size", type=_cache_size, default=None,
                   help="DRAM row cache in front of an ssd/cxl tier: rows (100000), a fraction "
                   "of the tables (0.1 or 10%%) or bytes (64MiB); default: no cache")
    p.set_defaults(cache_options=ConfigOptions(c, CACHE_CONFIG, exclude=_CAPACITY,
                                               probe={"capacity_rows": 1}))
    # 0 = no prefetcher (PrefetchConfig itself needs a lookahead >= 1)
    p.set_defaults(prefetch_options=ConfigOptions(
        c, PREFETCH_CONFIG, prefix="prefetch", defaults={"lookahead": 0},
        types={"lookahead": nonneg_int}, notes={"lookahead": "0 = off; needs --cache-size"}))
    b = p.add_argument_group("batching")
    # prefetch_batches follows --prefetch-lookahead (build_runtime)
    p.set_defaults(serving_options=ConfigOptions(b, SERVING_CONFIG,
                                                 exclude=("prefetch_batches",)))
    h = p.add_argument_group("HTTP")
    h.add_argument("--max-body-bytes", type=byte_size, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body (default 16MiB); larger ones get 413")
    h.add_argument("--max-json-bytes", type=byte_size, default=DEFAULT_MAX_JSON_BYTES,
                   help="largest JSON body (default 4MiB; parsing JSON holds the GIL); "
                   "larger requests go as application/x-tiermem or npz")
    h.add_argument("--limit-concurrency", type=positive_int, default=DEFAULT_LIMIT_CONCURRENCY,
                   help="most connections + requests at once; beyond, 503 (default 2048)")
    h.add_argument("--timeout-keep-alive", type=positive_float, default=5.0,
                   help="idle keep-alive connections close after this many s (default 5)")
    h.add_argument("--header-timeout-s", type=positive_float, default=DEFAULT_HEADER_TIMEOUT_S,
                   help="connections whose request headers take longer close (default 10)")
    h.add_argument("--body-timeout-s", type=positive_float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="a request body pausing this long gets 408 (default 5)")
    h.add_argument("--auth-token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on /predict and /metrics "
                   "(default: $TIERMEM_AUTH_TOKEN; /healthz and /readyz stay open)")
    h.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    h.add_argument("--ssl-keyfile", default=None, help="the certificate's private key")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])


def build_runtime(args: argparse.Namespace) -> ServingRuntime:
    """The session and serving runtime the ``serve`` options describe."""
    from runtime.service import ServingRuntime
    from runtime.session import RuntimeConfig

    cache = prefetch = None
    if args.cache_size is not None:
        cache = args.cache_options.build(args, **args.cache_size)
    if args.prefetch_lookahead:
        prefetch = args.prefetch_options.build(args)
    workers = args.workers
    threads = args.threads
    if threads == "auto" and workers > 1:  # the meter would give each worker every core
        threads = max(1, (os.cpu_count() or 1) // workers)
    cfg = RuntimeConfig(tier=tier_config(args), num_threads=threads, cache=cache,
                        prefetch=prefetch)
    scfg = args.serving_options.build(args, prefetch_batches=max(args.prefetch_lookahead, 1))
    session = open_session(args, cfg)
    try:
        return ServingRuntime(session, scfg, owns_session=True)
    except BaseException:
        session.close()
        raise


def cmd_serve(args: argparse.Namespace) -> int:
    """Bind, load, warm up, serve until SIGINT/SIGTERM, drain."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"tiermem serve needs the [service] extra (pip install -e "
                          f"'.[service]'): {e}") from None
    from runtime.server import bind, run

    sock = bind(args.host, args.port)
    try:
        runtime = build_runtime(args)
    except BaseException:
        sock.close()
        raise
    try:
        run(runtime, sock=sock, tier=tier_config(args).kind.value,
            max_body_bytes=args.max_body_bytes, max_json_bytes=args.max_json_bytes,
            body_timeout_s=args.body_timeout_s,
            auth_token=args.auth_token or os.environ.get("TIERMEM_AUTH_TOKEN") or None,
            limit_concurrency=args.limit_concurrency,
            timeout_keep_alive=args.timeout_keep_alive, header_timeout_s=args.header_timeout_s,
            log_level=args.log_level, ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile)
    finally:
        runtime.close(drain=True)
    print("tiermem serve: stopped", flush=True)
    return 0
