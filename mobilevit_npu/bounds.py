"""How much one run may ask of the machine: the batch its memory holds (refused with one line, before it is
allocated, instead of an out-of-memory kill) and the decoding workers its cores run. inference.py, accuracy_run.py,
accuracy_run_perf.py, export_onnx.py and the verification ask here; labelsets re-exports the names.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mobilevit_npu import malloc
from mobilevit_npu.errors import UserError

if TYPE_CHECKING:
    from mobilevit_npu import preprocessing

# Memory one image costs in an eager forward, as a multiple of its float32 input (3 x 256 x 256 x 4 = 0.75 MiB): the
# X-Small's largest single activation is 8 MiB per image at 256x256 (forward hooks over every module) and a few are
# alive at once, so 40x (30 MiB) bounds it with room for the reference's float64 copy and the stacked crops.
BYTES_PER_INPUT_BYTE = 40


def batch_bytes(batch_size: int, cfg: preprocessing.PreprocessConfig) -> int:
    """The estimated memory of one forward over `batch_size` images (BYTES_PER_INPUT_BYTE x the float32 input)."""
    return batch_size * 3 * cfg.crop_height * cfg.crop_width * 4 * BYTES_PER_INPUT_BYTE


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def bounded_batch(
    requested: int, images: int, cfg: preprocessing.PreprocessConfig, device: Any = None, flag: str = "--batch_size"
) -> int:
    """The batch a run will really use: never more than its `images` (the warm-up and the example input the target
    is built for must use this, not the flag), and refused (UserError, exit 2, naming the size) when the estimate of
    its memory (batch_bytes) exceeds what `device` (cuda/npu: its free memory) or the host has free
    (malloc.available_memory), instead of an out-of-memory kill. `images` <= 0 (a benchmark on cycled photos) leaves
    the request unbounded by the work."""
    batch = max(1, min(requested, images)) if images > 0 else requested
    need = batch_bytes(batch, cfg)
    free, where = malloc.available_memory(device)
    if free is not None and need > free:
        raise UserError(
            f"{flag} {requested}: a batch of {batch} image(s) needs about {_size(need)} (estimate: "
            f"{BYTES_PER_INPUT_BYTE}x its float32 input), more than the {_size(free)} of {where}; give a smaller {flag}"
        )
    return batch


def default_workers(world_size: int = 1) -> int:
    """As many decoding workers as the rank has cores (at most 8). They run at idle priority (`_worker_init`), so
    they overlap the model wherever it leaves a core idle (between its parallel regions, or the whole CPU while a
    device computes) and never preempt its threads; when the model waits for a batch, every core decodes it.

    Why, measured on a 2-core VM (CPU target at batch 32, 640 JPEGs, cached reference): a normal-priority worker
    preempts one of the model's two threads, which stalls the other at its next barrier, and the model ran 15-20%
    slower than alone; nice 19 still cost it ~8%; SCHED_IDLE workers cost it nothing measurable
    (docs/performance.md, labelled sets)."""
    cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, world_size)))


def max_workers() -> int:
    """The most decoding workers accuracy_run.py starts: the machine's cores (a larger --workers is lowered to this,
    with a notice). Each worker is a process with its own interpreter and torch: past the cores they only compete
    for them, and `--workers 10000` would spend the run forking instead of decoding."""
    return os.cpu_count() or 1
