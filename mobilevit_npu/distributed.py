"""torchrun: this process's rank, its device (LOCAL_RANK) and a process group (HCCL on npu, NCCL on cuda, gloo
on cpu) with a gloo side group for gathering Python objects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from mobilevit_npu import devices
from mobilevit_npu.errors import UserError

logger = logging.getLogger("mobilevit_npu.distributed")


BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo", "mps": "gloo"}


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    _group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """Every world_size-th item from this rank's offset: each item exactly once over all ranks, no padding. The one
        sharding policy of both scripts: strided, so a set sorted by class (ImageNet folders) spreads every class over
        every rank and the ranks finish together; `unshard` puts gathered results back in the input's order."""
        return list(items[self.rank :: self.world_size])

    @staticmethod
    def unshard(parts: Sequence[Sequence[Any]]) -> list[Any]:
        """The inverse of `shard`: every rank's items (`parts`, in rank order) back in the original order."""
        longest = max((len(part) for part in parts), default=0)
        return [part[i] for i in range(longest) for part in parts if i < len(part)]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere). Over gloo, whatever the device backend."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0, group=self._group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier(group=self._group)

    def close(self) -> None:
        """Meet at a barrier, then destroy the process group, so a finished run never ends in an abort."""
        if self.enabled and torch.distributed.is_initialized():
            self.barrier()
            torch.distributed.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    """This process's LOCAL_RANK under torchrun (its device index), 0 otherwise: the one reader of it."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(device_spec: str, jit_compile: bool = False) -> tuple[Distributed, devices.Device]:
    """Resolve the device, and under torchrun pin it to LOCAL_RANK and join the process group."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return Distributed(), devices.resolve_device(device_spec, jit_compile)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank()
    if ":" in device_spec:
        kind = device_spec.split(":")[0].strip()
        raise UserError(f"under torchrun each rank takes device LOCAL_RANK: --device {kind}, not {device_spec}")
    device = devices.resolve_device(device_spec, jit_compile, default_index=local)
    backend = BACKENDS[device.type]
    import torch.distributed as dist

    timeout = timedelta(minutes=int(os.environ.get("MOBILEVIT_DIST_TIMEOUT_MIN", "60")))
    dist.init_process_group(backend=backend, timeout=timeout)
    group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    logger.debug("rank %d/%d on %s over %s", rank, world, device, backend)
    return Distributed(rank, world, backend, group), device
