"""The core meter behind num_threads="auto": other processes' load counts, ours does not."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import numpy as np
import pytest

from runtime import RuntimeConfig
from tiermem import ConfigError
from tiermem.cpu import CoreMeter, usable_cores
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
