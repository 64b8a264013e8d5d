"""How many cores are free for this process now: the ``num_threads="auto"`` choice.

A parallel region waits for its slowest thread. When another process keeps a
core busy, a thread placed on that core runs only in the scheduler's time
slices, and every region of a batch (the SLS kernel, each of torch's matrix
products) waits for it: a batch on two threads next to a busy neighbour can be
slower than on one. The meter reads the machine's CPU counters
(``/proc/stat``) and this process's own (``/proc/self/stat``) at most every
``interval`` seconds and answers the cores that the *other* processes left
idle; a batch then runs on that many threads (at least one).
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["CoreMeter", "free_cores", "usable_cores"]


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; the core count elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _read_machine() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot, or None where /proc is missing."""
    try:
        with open("/proc/stat", "rb") as f:
            line = f.readline()
    except OSError:
        return None
    parts = line.split()
    if not parts or parts[0] != b"cpu" or len(parts) < 5:
        return None
    vals = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals)
    return total - idle, total


def _read_self() -> int | None:
    """utime + stime jiffies of this process (all its threads)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name may hold spaces: fields restart after its closing parenthesis
    rest = data[data.rfind(b")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # fields 14 and 15 of proc(5)


class CoreMeter:
    """Cores left idle by other processes, sampled at most every ``interval`` seconds."""

    def __init__(self, interval: float = 0.1, cores: int | None = None) -> None:
        self.interval = float(interval)
        self.cores = int(cores) if cores is not None else usable_cores()
        self._lock = threading.Lock()
        self._last: tuple[float, int, int, int] | None = None
        self._free = float(self.cores)
        self.available = _read_machine() is not None and _read_self() is not None

    def free(self) -> float:
        """Cores (fractional) that other processes left idle over the last interval."""
        if not self.available:
            return float(self.cores)
        now = time.monotonic()
        last = self._last
        if last is not None and now - last[0] < self.interval:
            return self._free
        with self._lock:
            last = self._last
            if last is not None and now - last[0] < self.interval:
                return self._free
            m, me = _read_machine(), _read_self()
            if m is None or me is None:
                return self._free
            if last is not None and m[1] > last[2]:
                n_all = os.cpu_count() or self.cores
                d_total = (m[1] - last[2]) / n_all  # jiffies per core in the window
                others = (m[0] - last[1]) - (me - last[3])  # busy, not ours
                busy_cores = max(0.0, others / d_total) if d_total > 0 else 0.0
                self._free = max(0.0, self.cores - busy_cores)
            self._last = (now, m[0], m[1], me)
            return self._free

    def threads(self, cap: int | None = None) -> int:
        """Threads for the next batch: the free cores rounded, at least 1, at most ``cap``."""
        n = max(1, int(self.free() + 0.5))
        return min(n, cap) if cap is not None else n


_METER: CoreMeter | None = None


def free_cores() -> CoreMeter:
    """The process-wide meter (created on first use)."""
    global _METER
    if _METER is None:
        _METER = CoreMeter()
    return _METER
