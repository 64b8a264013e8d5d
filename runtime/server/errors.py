"""The error a request's handling raises to be answered with a 4xx status."""

from __future__ import annotations

__all__ = ["HTTPError"]


class HTTPError(Exception):
    """An HTTP error answer: status code and a message naming the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
