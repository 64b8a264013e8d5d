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

import math
import os
import threading
import time

__all__ = ["CoreMeter", "free_cores", "parse_cpu_max", "parse_stat", "usable_cores"]


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return None


def parse_cpu_max(text: str) -> float | None:
    """Cores a cgroup v2 ``cpu.max`` (``"QUOTA PERIOD"`` or ``"max PERIOD"``) allows."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_cores() -> float | None:
    """The CPU bandwidth limit of this process's cgroup (v2, else v1), in cores."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            return parse_cpu_max(f.read())
    except OSError:
        pass
    for d in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"):
        try:
            with open(f"{d}/cpu.cfs_quota_us") as f:
                quota = int(f.read())
            with open(f"{d}/cpu.cfs_period_us") as f:
                period = int(f.read())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup CPU quota
    (a container given ``--cpus 2`` on a 64-core host gets 2, not 64)."""
    aff = _affinity()
    n = len(aff) if aff else (os.cpu_count() or 1)
    quota = _quota_cores()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def parse_stat(data: bytes, cpus: set[int] | None) -> tuple[int, int, int] | None:
    """(busy, total, cpus counted) jiffies from ``/proc/stat`` text, summed over the
    per-CPU lines of ``cpus`` (this process's affinity: other cores' load is not ours to
    share), or over every per-CPU line when none of them is listed (a container whose
    ``/proc/stat`` is renumbered, e.g. lxcfs). Idle = idle + iowait; the rest is busy."""
    mine: list[list[int]] = []
    every: list[list[int]] = []
    for line in data.split(b"\n"):
        if not line.startswith(b"cpu") or line[3:4] in (b" ", b""):
            continue  # the aggregate line, or not a CPU line
        parts = line.split()
        try:
            cpu = int(parts[0][3:])
            vals = [int(x) for x in parts[1:9]]
        except ValueError:
            continue
        if len(vals) < 4:
            continue
        every.append(vals)
        if cpus is None or cpu in cpus:
            mine.append(vals)
    rows = mine or every
    if not rows:
        return None
    busy = total = 0
    for vals in rows:
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        t = sum(vals)
        busy += t - idle
        total += t
    return busy, total, len(rows)


def _read_machine(cpus: set[int] | None) -> tuple[int, int, int] | None:
    """(busy, total, cpus) jiffies since boot over ``cpus``, or None where /proc is missing."""
    try:
        with open("/proc/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return parse_stat(data, cpus)


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
        self._cpus = _affinity()
        self._lock = threading.Lock()
        self._last: tuple[float, int, int, int] | None = None
        self._free = float(self.cores)
        self.available = _read_machine(self._cpus) is not None and _read_self() is not None

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
            m, me = _read_machine(self._cpus), _read_self()
            if m is None or me is None:
                return self._free
            # a window much longer than the interval (an idle service) averages a load
            # that just began away: take it as a new starting point, keep the last answer
            if last is not None and m[1] > last[2] and now - last[0] <= 10 * self.interval:
                d_total = (m[1] - last[2]) / m[2]  # jiffies per counted core
                others = (m[0] - last[1]) - (me - last[3])  # busy, not ours
                busy_cores = max(0.0, others / d_total) if d_total > 0 else 0.0
                self._free = max(0.0, min(float(self.cores), m[2] - busy_cores))
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
