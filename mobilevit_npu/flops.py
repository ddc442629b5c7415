"""Roofline: the model's FLOPs, the device's measured matmul ceiling, and how far a timing is from it."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from mobilevit_npu import devices, timing

logger = logging.getLogger("mobilevit_npu.flops")


CEILING_SIZE = {"cpu": 2048}  # square matmul side; 8192 elsewhere (smaller ones leave a big accelerator idle)


_ceilings: dict[tuple[str, torch.dtype], float | None] = {}


def model_flop(model: torch.nn.Module, batch: torch.Tensor) -> int | None:
    """Floating-point operations of one forward on `batch`, by torch's FLOP counter (convolutions and matmuls: the
    elementwise work is not counted). None where the counter is missing (torch < 2.1) or fails on the device."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(pixel_values=batch)
        return int(counter.get_total_flops()) or None
    except Exception as exc:  # a counter that cannot see this backend's ops: leave the roofline out
        logger.info("FLOP count unavailable: %s", exc)
        return None


def matmul_ceiling(device: devices.Device, dtype: torch.dtype, repeats: int = 3) -> float | None:
    """The device's dense matmul throughput in FLOP/s for `dtype`: the best of `repeats` synchronized n x n x n
    matmuls. n doubles from 256 until one matmul takes 50 ms or n reaches CEILING_SIZE (so a dtype without fast
    kernels, e.g. float16 on most CPUs, stays small); those calls are the warm-up. What a model made only of large
    matmuls could reach; measured once per process, device and dtype."""
    key = (str(device), dtype)
    if key not in _ceilings:
        largest = CEILING_SIZE.get(device.type, 8192)
        n = min(256, largest)
        try:
            while True:
                a = torch.randn(n, n, device=device.torch).to(dtype)
                matmul = functools.partial(torch.matmul, a, a.T.contiguous())
                _, ms = timing.timed_call(matmul, device)
                if ms >= 50.0 or n >= largest:
                    break
                n = min(2 * n, largest)
            best = min(timing.timed_call(matmul, device)[1] for _ in range(repeats))
            _ceilings[key] = 2.0 * n**3 / (best / 1000.0)
        except Exception as exc:  # e.g. no matmul kernel for this dtype on the device
            logger.info("matmul ceiling for %s unavailable: %s", dtype, exc)
            _ceilings[key] = None
    return _ceilings[key]


@dataclass
class Roofline:
    """A benchmark row's distance from the device's matmul ceiling (flops.roofline)."""

    flop_per_image: int  # by torch's FLOP counter: convolutions and matmuls
    achieved_gflop_per_s: float  # at the p50 latency
    ceiling_gflop_per_s: Optional[float]  # the measured matmul ceiling in the mode's compute dtype
    fraction_of_ceiling: Optional[float]
    floor_ms: Optional[float]  # the time the work would take at the ceiling


def roofline(flop_per_image: int | None, batch_size: int, p50_ms: float, ceiling: float | None) -> Roofline | None:
    """Achieved FLOP/s at p50, the ceiling, the fraction of it, and the time the work would take at the ceiling."""
    if not flop_per_image or p50_ms <= 0:
        return None
    flop = flop_per_image * batch_size
    achieved = flop / (p50_ms / 1000.0)
    return Roofline(
        flop_per_image=flop_per_image,
        achieved_gflop_per_s=achieved / 1e9,
        ceiling_gflop_per_s=ceiling / 1e9 if ceiling else None,
        fraction_of_ceiling=achieved / ceiling if ceiling else None,
        floor_ms=flop / ceiling * 1000.0 if ceiling else None,
    )
