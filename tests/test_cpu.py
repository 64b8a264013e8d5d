"""The core meter behind num_threads="auto": other processes' load counts, ours does not."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest

from runtime import RuntimeConfig
from tiermem import ConfigError
from tiermem.cpu import CoreMeter, parse_cpu_max, parse_stat, usable_cores
from tiermem.kernels import resolve_threads

pytestmark = pytest.mark.skipif(not CoreMeter().available, reason="no /proc/stat here")


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def _free_over(meter: CoreMeter, seconds: float) -> float:
    meter.free()
    time.sleep(seconds)
    return meter.free()


def test_a_busy_neighbour_process_takes_a_core_and_our_own_threads_do_not():
    meter = CoreMeter(interval=0.2)
    # our own busy thread: the meter must not count it against us
    stop = threading.Event()
    t = threading.Thread(target=_spin, args=(stop,), daemon=True)
    t.start()
    try:
        time.sleep(0.1)
        own = _free_over(meter, 0.4)
    finally:
        stop.set()
        t.join()
    ctx = mp.get_context("spawn")
    pstop = ctx.Event()
    p = ctx.Process(target=_spin, args=(pstop,), daemon=True)
    p.start()
    try:
        time.sleep(1.0)  # the spawned interpreter starts, then spins
        other = _free_over(meter, 0.4)
    finally:
        pstop.set()
        p.join(10)
    assert 0.0 <= other <= meter.cores and 0.0 <= own <= meter.cores
    assert other <= own - 0.5, (own, other)


def test_threads_stay_in_bounds():
    meter = CoreMeter(interval=0.0)
    for _ in range(5):
        n = meter.threads(cap=3)
        assert 1 <= n <= 3
    assert 1 <= meter.threads() <= usable_cores()
    assert resolve_threads(None) is None and resolve_threads(2) == 2
    assert 1 <= resolve_threads("auto") <= usable_cores()


def test_reads_are_cached_within_the_interval():
    meter = CoreMeter(interval=60.0)
    first = meter.free()
    x = np.ones(10**6)
    for _ in range(50):  # busy, but inside the interval: the same answer
        x.sum()
        assert meter.free() == first


@pytest.mark.parametrize("bad", ["all", 0, -1, 1.5, True])
def test_runtime_config_threads(bad):
    assert RuntimeConfig().num_threads == "auto"
    assert RuntimeConfig(num_threads=1).num_threads == 1
    with pytest.raises(ConfigError, match="num_threads"):
        RuntimeConfig(num_threads=bad)


STAT = b"""cpu  300 0 100 600 0 0 0 0 0 0
cpu0 100 0 50 50 0 0 0 0 0 0
cpu1 200 0 50 550 0 0 0 0 0 0
cpu7 0 0 0 1000 0 0 0 0 0 0
intr 12345
"""


def test_parse_stat_sums_the_cpus_of_our_affinity_only():
    # busy = user + nice + system + ...; idle = idle + iowait
    assert parse_stat(STAT, {0}) == (150, 200, 1)
    assert parse_stat(STAT, {0, 1}) == (150 + 250, 200 + 800, 2)
    # a renumbered /proc/stat (lxcfs): none of our CPUs listed, so every CPU line counts
    assert parse_stat(STAT, {42}) == (400, 2000, 3)
    assert parse_stat(STAT, None) == (400, 2000, 3)
    assert parse_stat(b"intr 1\n", {0}) is None


def test_cpu_quota_caps_the_cores():
    assert parse_cpu_max("200000 100000\n") == 2.0
    assert parse_cpu_max("150000 100000") == 1.5
    assert parse_cpu_max("max 100000") is None
    assert parse_cpu_max("garbage") is None
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
