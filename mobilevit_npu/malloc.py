"""The glibc allocator fix for CPU runs, and what the allocator is.

At batch 32 glibc malloc hands every block over 32 MB back to the OS, so each large activation is page-faulted again on
every forward (2.3-2.7x slower on the machines measured). `tune_malloc()` calls mallopt once per process (no mmap for
large blocks, no trimming, 1 GiB top pad): the in-process equivalent of GLIBC_TUNABLES=glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=...:glibc.malloc.top_pad=1073741824. It is process-wide and cannot be undone.
`select(choice)` is what the scripts' --allocator flag calls; its dict goes into every report's environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any

logger = logging.getLogger("mobilevit_npu.malloc")


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # mallopt codes (malloc.h)


_TUNED_MALLOPT = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 1 << 30}


_allocator_state: dict[str, Any] = {}


def _libc() -> ctypes.CDLL:
    """The C library (OSError where it cannot be loaded)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _preloaded_allocator() -> str | None:
    """tcmalloc or jemalloc when one is loaded into this process (LD_PRELOAD or linked)."""
    try:
        maps = open("/proc/self/maps", encoding="utf-8", errors="replace").read()
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in maps:
            return name
    return None


def tune_malloc() -> dict[str, Any]:
    """Apply the glibc malloc fix once per process (see the module docstring) and say what the allocator is."""
    if _allocator_state:
        return dict(_allocator_state)
    info: dict[str, Any] = {
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
    }
    other = _preloaded_allocator()
    if other:
        info.update(name=other, tuned=False, note=f"{other} is loaded; glibc malloc left alone")
    elif not sys.platform.startswith("linux"):
        info.update(name="system", tuned=False, note="mallopt tuning is glibc-only")
    else:
        try:
            mallopt = _libc().mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            codes = {"M_MMAP_MAX": _M_MMAP_MAX, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD, "M_TOP_PAD": _M_TOP_PAD}
            ok = all(mallopt(codes[k], v) == 1 for k, v in _TUNED_MALLOPT.items())
        except (OSError, AttributeError) as exc:  # musl has no mallopt
            info.update(name="system", tuned=False, note=f"mallopt unavailable: {exc}")
        else:
            info.update(name="glibc malloc", tuned=ok, mallopt=dict(_TUNED_MALLOPT))
    _allocator_state.update(info)
    return dict(info)


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc malloc_trim(0)); False where there is no such call.

    Call it before forking workers: every page the parent still maps is shared copy-on-write with them, and with the
    tuned allocator the free heap is the previous forwards' activations, so the parent's next forward would fault and
    copy each page it reuses (measured: the first batch-32 forward after the fork took 2.7 s instead of 1.2). Trimmed,
    those pages are unmapped and come back as fresh pages on the next forward, as on a first call."""
    if not sys.platform.startswith("linux") or _preloaded_allocator():
        return False
    try:
        trim = _libc().malloc_trim
    except (OSError, AttributeError):  # musl has no malloc_trim
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def system_allocator() -> dict[str, Any]:
    """What the allocator is when tune_malloc is not called (--allocator system)."""
    other = _preloaded_allocator()
    return {
        "name": other or ("glibc malloc" if sys.platform.startswith("linux") else "system"),
        "tuned": False,
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
    }


def select(choice: str) -> dict[str, Any]:
    """--allocator: "tuned" applies tune_malloc, "system" leaves malloc alone; either way, what the allocator is."""
    if choice not in ("tuned", "system"):
        raise ValueError(f"allocator {choice!r}: tuned or system")
    return tune_malloc() if choice == "tuned" else system_allocator()


def current() -> dict[str, Any]:
    """What the allocator is now: the tuned state once tune_malloc ran in this process, else the system's."""
    return dict(_allocator_state) if _allocator_state else system_allocator()


def available_memory(device: Any = None) -> tuple[int | None, str]:
    """(bytes a new allocation can take, where): the device's free memory on cuda/npu (torch.<type>.mem_get_info),
    else the host's MemAvailable (/proc/meminfo: free plus reclaimable, what the kernel says can be allocated without
    swapping), else free physical pages (sysconf); (None, why) when nothing says."""
    kind = getattr(device, "type", None)
    if kind in ("cuda", "npu"):
        try:
            module = getattr(__import__("torch"), kind)
            free, _total = module.mem_get_info(getattr(device, "torch", None))
            return int(free), f"free memory on {device}"
        except Exception:  # noqa: BLE001 - an old torch_npu without mem_get_info: the host bound still applies
            pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host memory available (MemAvailable)"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free host memory (sysconf)"
    except (AttributeError, ValueError, OSError):
        return None, "unknown"
