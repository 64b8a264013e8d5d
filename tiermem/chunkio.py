"""Reading a store's chunk files: exact reads whose errors name the file and the reason.

Below both :mod:`tiermem.format` (the store layout) and :mod:`tiermem.integrity`
(checksums, which read what they check), so neither imports the other to read.
"""

from __future__ import annotations

import errno
from pathlib import Path

from tiermem.errors import StoreFormatError

__all__ = ["os_reason", "pread_exact"]


def os_reason(e: OSError) -> str:
    """An OS error in words, a symlink loop spelled out."""
    if e.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    return e.strerror or str(e)


def pread_exact(path: Path, offset: int, view: memoryview) -> None:
    """Read ``len(view)`` bytes at ``offset`` of a chunk file, or a StoreFormatError."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
    except IsADirectoryError:  # a store opened with check_chunks=False
        raise StoreFormatError(f"chunk file {path} is not a regular file (a folder)") from None
    except OSError as e:
        raise StoreFormatError(f"chunk file {path} cannot be read: {os_reason(e)}") from None
    with f:
        f.seek(offset)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise StoreFormatError(f"{path}: unexpected end of file at byte {offset + got}")
            got += n
