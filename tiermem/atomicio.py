"""Permissions of files written through a temporary name.

``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 folders whatever
the umask, so a file renamed into place from one would be unreadable to the
group and others where a plain ``open(path, "w")`` would not. Call
:func:`chmod_default` on the temporary before the rename.
"""

from __future__ import annotations

import os

__all__ = ["chmod_default", "default_mode", "current_umask"]


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    ``os.umask`` can only be read by setting it, which races with threads that
    create files meanwhile; Linux reports it in ``/proc/self/status``.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` (0666) or ``mkdir()`` (0777) would give under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def chmod_default(target: int | str | os.PathLike[str], *, directory: bool = False) -> None:
    """Give a file (an open fd or a path) or a folder the mode the umask implies."""
    mode = default_mode(directory)
    if isinstance(target, int):
        os.fchmod(target, mode)
    else:
        os.chmod(target, mode)
