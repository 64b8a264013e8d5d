"""The ASGI app serving a :class:`~runtime.service.ServingRuntime`: ``/predict`` as a bare
ASGI handler (the hot path), ``/healthz``, ``/readyz`` and ``/metrics`` on FastAPI."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np

from runtime.batcher import (
    MAX_DEADLINE_S,
    BatcherClosed,
    DeadlineExceeded,
    Overloaded,
    RequestTooLarge,
)
from runtime.server.codecs import Decoded, DecodeLimits, encode_response, request_codec
from runtime.server.defaults import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_JSON_BYTES,
)
from runtime.server.errors import HTTPError
from runtime.server.metrics import RuntimeCollector
from tiermem.errors import ConfigError, InvalidBatchError, StoreError, TierMemError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from prometheus_client.registry import Collector

    from runtime.service import ServingRuntime

__all__ = ["create_app"]

DECODE_OFF_LOOP_BYTES = 64 << 10
"""Bodies larger than this (and every body of an ``off_loop`` codec: a small npz may
inflate 1000x) are decoded on a decode thread, not on the event loop."""
BODY_TOTAL_TIMEOUT_S = 60.0
"""Longest a request body may take to arrive, however steadily it trickles."""
_log = logging.getLogger("tiermem.server")


def _app_class() -> type:
    from fastapi import FastAPI

    class App(FastAPI):
        """FastAPI for every endpoint but ``/predict``, which a bare ASGI handler serves."""

        def __init__(self, predict: Callable[..., Any], **kw: Any) -> None:
            super().__init__(**kw)
            self._predict = predict

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] == "/predict":
                await self._predict(scope, receive, send)
            else:
                await super().__call__(scope, receive, send)

    return App


def _shard_errors() -> tuple[type[BaseException], ...]:
    """The sharded session's fault types, if it can be imported (Ray may be absent)."""
    try:
        from runtime.distributed.sharded import ShardError
    except Exception:  # noqa: BLE001 - no Ray, no shards
        return ()
    return (ShardError,)


def create_app(runtime: ServingRuntime, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               retry_after_s: int = 1, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
               auth_token: str | None = None) -> FastAPI:
    """A FastAPI app serving ``runtime`` (endpoints in :mod:`runtime.server`).

    ``max_json_bytes`` bounds JSON bodies (parsing holds the GIL: larger ones
    would stall every other request); ``body_timeout_s`` is the longest pause
    while a body arrives (then 408); ``auth_token`` makes ``/predict`` and
    ``/metrics`` require ``Authorization: Bearer <token>``. The app does not own
    the runtime: close it after the server stopped.
    """
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
    from prometheus_client import Histogram as PromHistogram

    from runtime.service import LATENCY_BUCKETS_S

    for name, v in (("max_body_bytes", max_body_bytes), ("max_json_bytes", max_json_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(body_timeout_s, bool) or not isinstance(body_timeout_s, (int, float)) \
            or not 0 < body_timeout_s < 1e6:
        raise ConfigError(f"body_timeout_s must be a number > 0, got {body_timeout_s!r}")
    if auth_token is not None and not auth_token:
        raise ConfigError("auth_token must not be empty")
    expected_auth = None if auth_token is None else f"Bearer {auth_token}".encode()
    registry = CollectorRegistry(auto_describe=False)
    collector: Collector = RuntimeCollector(runtime)
    registry.register(collector)
    http_requests = Counter("tiermem_http_requests", "HTTP requests by endpoint and status",
                            ["endpoint", "code"], registry=registry)
    http_latency = PromHistogram("tiermem_http_request_duration_seconds",
                                 "HTTP request time, body read to answer written",
                                 ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=registry)
    batcher = runtime.batcher
    limits = DecodeLimits(tuple(batcher.table_names), batcher.num_dense, batcher.check_size,
                          max_body_bytes, max_json_bytes)
    reject_mode = runtime.config.batcher.overload == "reject"
    shard_errors = _shard_errors()
    decode_pool = ThreadPoolExecutor(2, thread_name_prefix="tiermem-decode")
    retry = {"Retry-After": str(retry_after_s)}

    def error_body(message: str, request_id: str | None = None) -> bytes:
        d = {"error": message}
        if request_id is not None:
            d["request_id"] = request_id
        return json.dumps(d).encode()

    def authorized(headers: dict[bytes, bytes]) -> bool:
        return expected_auth is None or hmac.compare_digest(
            headers.get(b"authorization", b""), expected_auth)

    async def read_body(receive: Callable[[], Any], declared: bytes | None) -> bytes:
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise HTTPError(400, f"bad Content-Length {declared[:40]!r}") from None
            if n > max_body_bytes:
                raise HTTPError(413, f"body of {n} bytes is over the limit of {max_body_bytes} "
                                "bytes; split the request")
        chunks, n = [], 0
        t_end = time.monotonic() + BODY_TOTAL_TIMEOUT_S
        while True:
            wait = min(body_timeout_s, t_end - time.monotonic())
            try:
                msg = await asyncio.wait_for(receive(), max(wait, 0.0))
            except TimeoutError:
                raise HTTPError(408, f"the request body stopped arriving ({n} bytes received, "
                                f"none for {wait:.3g} s)", {"Connection": "close"}) from None
            if msg["type"] == "http.disconnect":
                raise asyncio.CancelledError("the client went away")
            chunk = msg.get("body", b"")
            n += len(chunk)
            if n > max_body_bytes:
                raise HTTPError(413, f"body is over the limit of {max_body_bytes} bytes; split "
                                "the request")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def decode(body: bytes, decode_body: Callable[[bytes, DecodeLimits], Decoded]) -> Decoded:
        """Parse one body (on the loop for small ones, on a decode thread for large)."""
        try:
            return decode_body(body, limits)
        except RequestTooLarge as e:
            raise HTTPError(413, str(e)) from None

    async def handle_predict(headers: dict[bytes, bytes], query: bytes,
                             receive: Callable[[], Any]) -> tuple[int, bytes, bytes]:
        if not authorized(headers):
            raise HTTPError(401, "missing or wrong 'Authorization: Bearer <token>' header",
                            {"WWW-Authenticate": "Bearer"})
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip()
        ctype_s = ctype.decode("latin-1").lower()
        codec = request_codec(ctype_s)
        raw = headers.get(b"x-deadline-ms")
        deadline = _deadline_param(None if raw is None else raw.decode("latin-1"),
                                   "X-Deadline-Ms header")
        if deadline is None and query:
            q = parse_qs(query.decode("latin-1")).get("deadline_ms")
            deadline = _deadline_param(q[-1] if q else None, "deadline_ms parameter")
        body = await read_body(receive, headers.get(b"content-length"))
        t_body = time.monotonic()
        if reject_mode and batcher.queue_full():  # decided before any decoding work
            raise HTTPError(503, "overloaded: the request queue is full", retry)
        if codec.off_loop or len(body) > DECODE_OFF_LOOP_BYTES:
            loop = asyncio.get_running_loop()
            dense, sparse, jd = await loop.run_in_executor(decode_pool, decode, body,
                                                           codec.decode)
        else:
            dense, sparse, jd = decode(body, codec.decode)
        if deadline is None and jd is not None:
            deadline = _deadline_param(str(jd), "'deadline_ms'")
        try:
            preds = await runtime.predict_async(dense, sparse, deadline_ms=deadline,
                                                t_start=t_body)
        except RequestTooLarge as e:
            raise HTTPError(413, str(e)) from None
        except InvalidBatchError as e:
            raise HTTPError(422, str(e)) from None
        except ConfigError as e:  # the deadline
            raise HTTPError(400, str(e)) from None
        except Overloaded as e:
            raise HTTPError(503, f"overloaded: {e}", retry) from None
        except BatcherClosed as e:
            raise HTTPError(503, f"shutting down: {e}", retry) from None
        except DeadlineExceeded as e:
            raise HTTPError(504, f"deadline exceeded: {e}") from None
        except shard_errors as e:
            raise _Fault("shard", 503, "a shard is unavailable", e, retry) from None
        except StoreError as e:
            raise _Fault("store", 503, "storage fault", e, retry) from None
        except Exception as e:  # noqa: BLE001 - anything else while predicting: ours
            raise _Fault("internal", 500, "internal error", e) from None
        if not np.isfinite(preds).all():
            bad = int(np.count_nonzero(~np.isfinite(preds)))
            raise _Fault("nonfinite", 500, f"{bad} of {preds.size} predictions are NaN or "
                         "infinite (a corrupted embedding row or model)", None)
        return (200, *encode_response(preds, headers.get(b"accept", b"")))

    ok_requests = http_requests.labels("/predict", "200")
    predict_latency = http_latency.labels("/predict")

    async def predict(scope: dict[str, Any], receive: Callable[[], Any],
                      send: Callable[[Any], Any]) -> None:
        """``POST /predict`` as a bare ASGI handler: the hot path of a server under load.

        Starlette's request/response layers cost ~0.3 ms of event-loop time per
        request, all under the GIL the batch workers also need.
        """
        t0 = time.perf_counter()
        extra: list[tuple[bytes, bytes]] = []
        ctype = b"application/json"
        if scope["method"] != "POST":
            status, body = 405, error_body("use POST for /predict")
            extra.append((b"allow", b"POST"))
        else:
            try:
                status, body, ctype = await handle_predict(dict(scope["headers"]),
                                                           scope.get("query_string", b""),
                                                           receive)
            except HTTPError as e:
                status, body = e.status, error_body(e.message)
                extra.extend((k.lower().encode(), v.encode()) for k, v in e.headers.items())
            except (TierMemError, ValueError) as e:  # input problems the parsers did not name
                status, body = 422, error_body(str(e)[:500])
            except asyncio.CancelledError:
                http_requests.labels("/predict", "499").inc()
                raise
            except Exception as e:  # noqa: BLE001 - answer 5xx, keep serving
                fault = e if isinstance(e, _Fault) else _Fault("internal", 500,
                                                                "internal error", e)
                rid = uuid.uuid4().hex[:16]
                what = fault.cause if fault.cause is not None else fault
                _log.error("request %s: %s: %s", rid, fault.message,
                           "" if fault.cause is None else repr(fault.cause),
                           exc_info=what if fault.cause is not None else None)
                runtime.record_fault(fault.kind, f"{fault.message} (request {rid})")
                status = fault.status
                body = error_body(f"{fault.message} (request id {rid}; details in the server "
                                  "log)", rid)
                extra.extend((k.lower().encode(), v.encode()) for k, v in fault.headers.items())
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype),
                                (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})
        (ok_requests if status == 200 else http_requests.labels("/predict", str(status))).inc()
        predict_latency.observe(time.perf_counter() - t0)

    app = _app_class()(predict, title="tiermem", summary="DLRM inference with tiered embeddings",
               docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.state.registry = registry
    app.state.decode_pool = decode_pool

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if runtime.ready:
            return JSONResponse({"ready": True})
        degraded = runtime.degraded_reason
        why = ("warm-up failed: " + repr(runtime.warmup_error) if runtime.warmup_error
               else "shutting down" if runtime.closed
               else "degraded: " + degraded if degraded is not None else "warming up")
        return JSONResponse({"ready": False, "reason": why}, status_code=503,
                            headers={"Retry-After": str(retry_after_s)})

    async def metrics(request: Request) -> Response:
        if not authorized({b"authorization": request.headers.get("authorization", "")
                           .encode("latin-1")}):
            return JSONResponse({"error": "missing or wrong 'Authorization: Bearer <token>' "
                                 "header"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_route("/healthz", healthz, methods=["GET"])
    app.add_route("/readyz", readyz, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    return app



class _Fault(Exception):
    """A server-side fault: counted, logged with a request id, answered 5xx without
    the exception's text."""

    def __init__(self, kind: str, status: int, message: str, cause: BaseException | None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.kind, self.status, self.message, self.cause = kind, status, message, cause
        self.headers = headers or {}




def _deadline_param(raw: str | None, where: str) -> float | None:
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        raise HTTPError(400, f"{where} must be a number of milliseconds, got {raw[:40]!r}"
                        ) from None
    if not math.isfinite(v) or not 0 < v <= MAX_DEADLINE_S * 1e3:
        raise HTTPError(400, f"{where} must be a number of milliseconds > 0 and at most "
                        f"{MAX_DEADLINE_S * 1e3:.0f} (one hour), got {raw[:40]!r}")
    return v

