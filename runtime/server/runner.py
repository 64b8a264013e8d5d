"""Running an app on uvicorn: the listening socket, the server's limits, the signals."""

from __future__ import annotations

import signal
import socket
import threading
from typing import TYPE_CHECKING, Any

from runtime.server.defaults import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_LIMIT_CONCURRENCY,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_JSON_BYTES,
)
from tiermem.errors import ConfigError

if TYPE_CHECKING:
    from runtime.service import ServingRuntime

__all__ = ["bind", "run", "server_config"]


def _protocol_class(header_timeout_s: float) -> type:
    """uvicorn's HTTP protocol, closing connections whose request headers do not arrive
    within ``header_timeout_s`` (uvicorn itself waits forever for them)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Protocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._tm_arm()

        def _tm_arm(self) -> None:
            self._tm_timer = self.loop.call_later(header_timeout_s, self._tm_timeout)

        def _tm_timeout(self) -> None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # no request being served: headers
                if not self.transport.is_closing():        # stalled (or an idle keep-alive)
                    self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._tm_timer.cancel()
            self._tm_arm()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_tm_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return Protocol


def server_config(app: Any, *, limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY,
                  timeout_keep_alive: float = 5.0,
                  header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                  log_level: str = "warning", **kw: Any) -> Any:
    """The ``uvicorn.Config`` ``tiermem serve`` runs ``app`` with: a connection cap
    (``limit_concurrency``: beyond it, 503), keep-alive and header timeouts, a bound
    on an incomplete request's buffered bytes. ``kw`` go to ``uvicorn.Config``
    (e.g. ``ssl_certfile``, ``ssl_keyfile``)."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                          timeout_graceful_shutdown=30, limit_concurrency=limit_concurrency,
                          # typed int, but only handed to loop.call_later: fractions work
                          timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=64 << 10,
                          http=_protocol_class(header_timeout_s), **kw)


class _Stop(Exception):
    """SIGTERM arrived (after uvicorn's graceful shutdown)."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port fails in a moment."""
    import errno

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        hint = (" (another process listens there: pick another --port, or --port 0 for a "
                "free one)" if isinstance(e, OSError) and e.errno == errno.EADDRINUSE else "")
        raise ConfigError(f"cannot bind {host}:{port}: {why}{hint}") from None
    return sock


def run(runtime: ServingRuntime, *, host: str = "127.0.0.1", port: int = 8000,
        sock: socket.socket | None = None, tier: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, auth_token: str | None = None,
        limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY,
        timeout_keep_alive: float = 5.0,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, log_level: str = "warning",
        ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """Serve ``runtime`` over HTTP(S) until SIGINT/SIGTERM, then return once uvicorn
    answered the accepted requests.

    Listens on ``sock`` (from :func:`bind`, so that a taken port fails before the
    model loads) or binds ``host:port`` (port 0: a free one), and prints
    ``tiermem serve: listening on http://HOST:PORT (N tables[, tier TIER])`` once
    a client can connect. The runtime stays open: close it after ``run`` returns.
    """
    import uvicorn

    from runtime.server.app import create_app

    if sock is None:
        sock = bind(host, port)
    app = create_app(runtime, max_body_bytes=max_body_bytes, max_json_bytes=max_json_bytes,
                     body_timeout_s=body_timeout_s, auth_token=auth_token)
    host, port = sock.getsockname()[:2]
    tls = {k: v for k, v in (("ssl_certfile", ssl_certfile), ("ssl_keyfile", ssl_keyfile))
           if v}
    config = server_config(app, limit_concurrency=limit_concurrency,
                           timeout_keep_alive=timeout_keep_alive,
                           header_timeout_s=header_timeout_s, log_level=log_level, **tls)
    server = uvicorn.Server(config)
    sock.listen(config.backlog)  # now: a client that read the line below can connect
    scheme = "https" if tls else "http"
    what = f"{len(runtime.batcher.table_names)} tables" + (f", tier {tier}" if tier else "")
    print(f"tiermem serve: listening on {scheme}://{host}:{port} ({what})", flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal
    # with the handler found at start: make both land here, not kill the process
    # before the queue is drained.
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_stop) if main_thread else None
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
