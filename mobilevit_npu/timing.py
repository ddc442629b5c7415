"""Timing: the one synchronized timer, latency statistics, interleaved sampling and the progress bar.

Every timing of device work goes through `timed_call`, which synchronizes the device before each of its two reads
(devices.synchronize), so a timing never measures only the launch of asynchronous NPU/CUDA work. `timed_iter` times
host-only waits (a decoded batch), where there is nothing to synchronize.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from mobilevit_npu import devices

# The clock; a module attribute so tests can record each read. Always read right after devices.synchronize.
_clock = time.perf_counter


@dataclass
class LatencyStats:
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    stdev: float | None  # sample standard deviation (n - 1); None for a single sample


def latency_stats(samples_ms) -> LatencyStats:
    """mean, p50, p90, p99, min, max and stdev of the samples (milliseconds). Percentiles by numpy's default linear
    interpolation between closest ranks."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return LatencyStats(
        mean=float(values.mean()),
        p50=float(p50),
        p90=float(p90),
        p99=float(p99),
        min=float(values.min()),
        max=float(values.max()),
        stdev=float(values.std(ddof=1)) if values.size > 1 else None,
    )


def timed_call(fn: Callable[[], Any], device: devices.Device) -> tuple[Any, float]:
    """(result, milliseconds), the device synchronized before each of the two clock reads."""
    devices.synchronize(device)
    start = _clock()
    result = fn()
    devices.synchronize(device)
    return result, (_clock() - start) * 1000.0


def timed_iter(items: Iterable, waits: list[float] | None) -> Iterator:
    """`items`, appending to `waits` the seconds each next() took (host work only, such as waiting for a decoded
    batch: nothing on a device to synchronize)."""
    iterator = iter(items)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        if waits is not None:
            waits.append(time.perf_counter() - start)
        yield item


def interleaved_samples(
    calls: dict[str, Callable[[], Any]], iterations: int, device: devices.Device, desc: str = "", progress: bool = False
) -> dict[str, list[float]]:
    """{name: milliseconds per call}: iteration i runs every call once, the order rotated by i, each through
    timed_call, so a noisy machine slows them all alike."""
    order = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in order}
    with progress_bar(iterations if order else 0, progress and bool(order), desc, unit="it") as bar:
        for i in range(iterations if order else 0):
            for j in range(len(order)):
                name = order[(i + j) % len(order)]
                samples[name].append(timed_call(calls[name], device)[1])
            bar.update(1)
    return samples


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "img") -> tqdm:
    """A progress bar on stderr (rate included), shown only when `enabled` and stderr is a terminal."""
    return tqdm(
        total=total,
        disable=None if enabled else True,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
        leave=False,
    )
