"""The server's default limits, in a module without numpy: ``tiermem serve``'s parser shows
them in ``--help`` without loading the serving stack."""

from __future__ import annotations

__all__ = ["DEFAULT_BODY_TIMEOUT_S", "DEFAULT_HEADER_TIMEOUT_S", "DEFAULT_LIMIT_CONCURRENCY",
           "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_JSON_BYTES"]

DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_JSON_BYTES = 4 << 20
"""JSON parsing holds the GIL (~10 ms per MiB): larger JSON bodies would stall the server."""
DEFAULT_BODY_TIMEOUT_S = 5.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_LIMIT_CONCURRENCY = 2048
