"""The tiermem error tree.

Every error raised for bad input names what was wrong: the table, the field
and the first bad value, or the file and the reason.
"""

from __future__ import annotations

__all__ = [
    "CapacityError",
    "ConfigError",
    "CorruptBlockError",
    "InvalidBatchError",
    "StoreError",
    "StoreFormatError",
    "TierMemError",
]


class TierMemError(Exception):
    """Base class of every error tiermem raises on purpose."""


class ConfigError(TierMemError, ValueError):
    """A configuration value is invalid (unknown name, out of range...)."""


class InvalidBatchError(TierMemError, ValueError):
    """A batch of lookups is malformed: bad ids, offsets, lengths or dtypes."""


class StoreError(TierMemError):
    """A store cannot be created or opened."""


class StoreFormatError(StoreError, ValueError):
    """A store on disk is not a valid tiermem store (missing, truncated, foreign)."""


class CorruptBlockError(StoreError):
    """Stored bytes do not match their checksum; ``bad_blocks`` lists them."""

    def __init__(self, message: str, bad_blocks: list | None = None) -> None:
        super().__init__(message)
        self.bad_blocks = list(bad_blocks or [])


class CapacityError(TierMemError, ValueError):
    """Something does not fit in the memory or capacity it was given."""
