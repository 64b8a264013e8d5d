"""HTTP front end of a :class:`~runtime.service.ServingRuntime`.

Endpoints
---------
``POST /predict``
    One request of B samples; answers ``{"predictions": [p_0, ..., p_{B-1}]}``.
    The body formats (JSON, npz, the binary body of :mod:`runtime.wire`) and
    the answer's are in :mod:`runtime.server.codecs`.

    Every table of the model must be given. A deadline may also come as the
    ``X-Deadline-Ms`` header or the ``deadline_ms`` query parameter.

    Status codes: 200; 400 body not parseable (bad JSON / npz); 413 body over
    ``max_body_bytes``; 415 other content types; 422 well-formed but invalid
    (shapes, unknown or missing tables, ids out of range); 503 overloaded or
    shutting down (with ``Retry-After``); 504 deadline exceeded. Error bodies
    are ``{"error": "<message naming the problem>"}``.
``GET /healthz``
    200 while the process serves HTTP.
``GET /readyz``
    200 once warm-up finished, 503 before (and after shutdown began).
``GET /metrics``
    Prometheus text format, from a registry of the app's own.

Modules: ``codecs`` (bodies), ``metrics`` (the Prometheus collector), ``app``
(:func:`create_app`), ``runner`` (:func:`run`: bind, serve until SIGINT/SIGTERM).
``tiermem serve`` (:mod:`runtime.cli.serve`) builds the runtime from its options
and calls :func:`run`. The names below load on first use: ``import runtime.server``
costs neither numpy nor the web stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tiermem._lazy import lazy_names

if TYPE_CHECKING:
    from runtime.server.app import create_app
    from runtime.server.codecs import (
        RequestCodec,
        parse_json_body,
        parse_npz_body,
        register_request_codec,
        register_response_codec,
    )
    from runtime.server.errors import HTTPError
    from runtime.server.runner import bind, run, server_config

# public name -> the module that defines it
_LAZY = {
    "create_app": "runtime.server.app",
    "RequestCodec": "runtime.server.codecs",
    "parse_json_body": "runtime.server.codecs",
    "parse_npz_body": "runtime.server.codecs",
    "register_request_codec": "runtime.server.codecs",
    "register_response_codec": "runtime.server.codecs",
    "HTTPError": "runtime.server.errors",
    "bind": "runtime.server.runner",
    "run": "runtime.server.runner",
    "server_config": "runtime.server.runner",
}

__all__ = ["HTTPError", "RequestCodec", "bind", "create_app", "parse_json_body", "parse_npz_body",
           "register_request_codec", "register_response_codec", "run", "server_config"]


__getattr__, __dir__ = lazy_names("runtime.server", _LAZY, globals())
