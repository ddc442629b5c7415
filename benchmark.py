"""Benchmark core shared by accuracy_run_perf.py and inference.py --benchmark.

Entry points:
    run_benchmark(loaded, device, modes, batch_sizes, iterations, warmup, dtype, ...) -> list[dict]   one dict per
        (mode, batch size), in the report's "results" form
    format_table(results) -> str                                                   the console table
    benchmark_environment(device, allocator) -> dict                               common.environment + allocator etc.
    tune_malloc() -> dict                                                          the glibc allocator fix (see below)

Timing rules: the device is synchronized (common.synchronize) before every clock read; warm-up calls are excluded;
within one batch size the modes are interleaved round-robin (iteration i runs every mode once, the order rotated by i)
so their ratios hold on a busy machine; every sample is kept. Agreement is measured against eager float32 on the same
device and the same inputs (the bundled photos, tiled to the batch size), compared in float64 on the CPU.

Modes (`MODES`):
    eager          the Hugging Face model as loaded
    channels_last  the same model and input in channels-last memory (not on NPU: no channels-last kernels there)
    compiled       torch.compile of the Hugging Face model: CPU inductor with weight freezing; CUDA
                   mode="reduce-overhead" (CUDA graphs); NPU torchair's GE backend where it imports; MPS inductor
    fast           fastpath.FastMobileViT (BatchNorm folded, fused QKV + SDPA, channels-last unfold/fold) in
                   channels-last memory. CPU: torch.export + AOTInductor with freezing (torch >= 2.6; else, or if the
                   build fails, torch.compile with freezing and the C++ wrapper); CUDA as `compiled`; NPU: NCHW,
                   torchair when it imports, else eager
    bf16           `fast` under bfloat16 autocast (AMX on recent Xeons). Not exact: reported with its agreement cost.

Allocator: at batch 32 glibc malloc hands every block over 32 MB back to the OS, so each large activation is
page-faulted again on every forward (2.7x slower here). `tune_malloc()` calls mallopt at start-up (no mmap for large
blocks, no trimming, 1 GiB top pad), the in-process equivalent of GLIBC_TUNABLES=glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=...:glibc.malloc.top_pad=1073741824. The report's environment.allocator says what ran.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import ctypes
import ctypes.util
import functools
import logging
import math
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import accuracy
import common

logger = logging.getLogger("mobilevit_npu.benchmark")

MODES = ("eager", "channels_last", "compiled", "fast", "bf16")
# Modes whose logits must match eager float32: cosine >= EXACT_COSINE and the same top-1 on every input.
EXACT_MODES = ("eager", "channels_last", "compiled", "fast")
EXACT_COSINE = 0.99999  # float32 re-association (folded BatchNorm, fused kernels) stays far above this
COMPILE_CACHE_SIZE = 8  # compiled callables kept per process: each costs 15-50 s to build on 2 cores

# The clock; a module attribute so tests can record each read. Always read right after common.synchronize.
_clock = time.perf_counter


# --------------------------------------------------------------------------------------------------------------------
# Statistics and agreement
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LatencyStats:
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    stdev: float | None  # sample standard deviation (n - 1); None for a single sample


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks: rank = q/100 * (n - 1), the
    value between the two neighbouring samples weighted by the fractional part (numpy's default "linear" method)."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = q / 100.0 * (len(sorted_values) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    """mean, p50, p90, p99, min, max and stdev of the samples (milliseconds); the one place statistics are made."""
    values = sorted(float(v) for v in samples_ms)
    if not values:
        raise ValueError("no samples")
    n = len(values)
    mean = math.fsum(values) / n
    stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return LatencyStats(
        mean=mean,
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
        min=values[0],
        max=values[-1],
        stdev=stdev,
    )


@dataclass
class Agreement:
    cosine: float
    max_abs_diff: float
    top1_agreement: float  # fraction of inputs whose arg-max class equals the reference's


def compare(reference: torch.Tensor, test: torch.Tensor) -> Agreement:
    """Logits against reference logits, in float64 on the CPU."""
    ref = reference.detach().to("cpu", torch.float64)
    out = test.detach().to("cpu", torch.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(out.shape)}")
    return Agreement(
        cosine=accuracy.cosine(ref, out),
        max_abs_diff=float((ref - out).abs().max()),
        top1_agreement=float((ref.argmax(-1) == out.argmax(-1)).double().mean()),
    )


def is_exact(agreement: Agreement | None) -> bool | None:
    if agreement is None:
        return None
    return agreement.cosine >= EXACT_COSINE and agreement.top1_agreement == 1.0


# --------------------------------------------------------------------------------------------------------------------
# Environment: allocator and threads
# --------------------------------------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_TUNED_MALLOPT = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 1 << 30}
_allocator_state: dict[str, Any] = {}


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
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            codes = {"M_MMAP_MAX": _M_MMAP_MAX, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD, "M_TOP_PAD": _M_TOP_PAD}
            ok = all(mallopt(codes[k], v) == 1 for k, v in _TUNED_MALLOPT.items())
        except (OSError, AttributeError) as exc:  # musl has no mallopt
            info.update(name="system", tuned=False, note=f"mallopt unavailable: {exc}")
        else:
            info.update(name="glibc malloc", tuned=ok, mallopt=dict(_TUNED_MALLOPT))
    _allocator_state.update(info)
    return dict(info)


def system_allocator() -> dict[str, Any]:
    """What the allocator is when tune_malloc is not called (--allocator system)."""
    other = _preloaded_allocator()
    return {
        "name": other or ("glibc malloc" if sys.platform.startswith("linux") else "system"),
        "tuned": False,
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
    }


def benchmark_environment(device: common.Device, allocator: dict[str, Any] | None = None) -> dict[str, Any]:
    env = common.environment(device)
    env.update(
        allocator=allocator or system_allocator(),
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        mkldnn=bool(torch.backends.mkldnn.is_available()),
        cpu_bf16=_cpu_bf16_supported() if device.type == "cpu" else None,
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    return env


def _cpu_bf16_supported() -> bool:
    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


# --------------------------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """A mode that cannot run on this device or build; the message is the report's reason."""


@dataclass
class Prepared:
    """A ready mode: `call(x)` takes the device batch made by `to_input` and returns the logits."""

    call: Callable[[torch.Tensor], torch.Tensor]
    to_input: Callable[[torch.Tensor], torch.Tensor]
    compile_s: float | None = None
    notes: list[str] = field(default_factory=list)


def available_modes(device: common.Device) -> list[str]:
    """The modes `all` expands to on this device."""
    modes = list(MODES)
    if device.type == "npu":
        modes.remove("channels_last")
    if device.type == "mps" or (device.type == "cpu" and not _cpu_bf16_supported()):
        modes.remove("bf16")
    return modes


def _unique_function(fn: Callable, name: str) -> Callable:
    """A copy of `fn` with its own code object. Dynamo keeps its compiled graphs on the code object, so two
    wrappers made from one `def` could otherwise hand each other their graphs (frozen weights included)."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _compiler(device: common.Device) -> tuple[Callable[[Callable, str], Callable], dict[str, Any], list[str]]:
    """(compile(fn, name), inductor config patch for the first calls, notes) for the device; Unavailable if none."""
    if device.type == "npu":
        try:
            import torchair  # noqa: PLC0415 - ships inside torch_npu, imported only on the NPU path
        except Exception as exc:  # ImportError, or torch_npu/CANN errors surfacing at import
            raise Unavailable(f"torchair does not import ({type(exc).__name__}: {exc})") from exc
        backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
        return (
            lambda fn, name: torch.compile(_unique_function(fn, name), backend=backend, dynamic=False, fullgraph=True),
            {},
            ["torchair GE backend (CompilerConfig defaults)"],
        )
    if device.type == "cuda":
        return (
            lambda fn, name: torch.compile(
                _unique_function(fn, name), mode="reduce-overhead", dynamic=False, fullgraph=True
            ),
            {},
            ['inductor mode="reduce-overhead" (CUDA graphs)'],
        )
    if device.type == "cpu":
        # options={"freezing": True} is silently ignored by torch.compile; the config flag is what works.
        return (
            lambda fn, name: torch.compile(_unique_function(fn, name), dynamic=False, fullgraph=True),
            {"freezing": True},
            ["inductor, torch._inductor.config.freezing=True (weights constant-folded and prepacked)"],
        )
    return (
        lambda fn, name: torch.compile(_unique_function(fn, name), dynamic=False, fullgraph=True),
        {},
        ["inductor defaults"],
    )


def aoti_available() -> bool:
    """torch.export + AOTInductor packaging in the form used here (torch >= 2.6; 2.5 has another signature)."""
    import torch._inductor as inductor

    major_minor = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    api = hasattr(inductor, "aoti_compile_and_package") and hasattr(inductor, "aoti_load_package")
    return major_minor >= (2, 6) and api


def _prepare_aoti(
    module: torch.nn.Module,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    device: common.Device,
    notes: list[str],
) -> Prepared:
    """`module` exported with torch.export and built by AOTInductor (weights frozen) into a package in a temporary
    folder, loaded back as a C++ runner: no dynamo guard checks and no Python between kernels on each call, ~5% off
    `fast`'s batch-1 latency on CPU against torch.compile with the C++ wrapper. compile_s covers export, build, load
    and the first call."""
    x = to_input(batch)

    def build() -> Callable[[torch.Tensor], torch.Tensor]:
        with tempfile.TemporaryDirectory(prefix="mobilevit_aoti_") as folder:
            program = torch.export.export(module, (x,))
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(folder, "fast.pt2"), inductor_configs={"freezing": True}
            )
            runner = torch._inductor.aoti_load_package(package)  # the shared library is loaded: the folder can go
        runner(x)
        return runner

    runner, compile_ms = timed_call(build, device)
    compile_s = compile_ms / 1000.0
    note = "AOTInductor: torch.export + aoti_compile_and_package, freezing"
    return Prepared(runner, to_input, compile_s, [*notes, note])


def _inductor_patch(options: dict[str, Any]):
    if not options:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(**options)


def _hf_call(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits

    return forward


def _prepare(mode: str, model: torch.nn.Module, device: common.Device, dtype: str, batch: torch.Tensor) -> Prepared:
    """Build one mode for one batch shape; the first (compiling) call and its time are part of this."""
    torch_dtype = common.DTYPES[dtype]

    def plain(x: torch.Tensor) -> torch.Tensor:
        return x.to(device.torch, torch_dtype)

    def channels_last(x: torch.Tensor) -> torch.Tensor:
        return x.to(device.torch, torch_dtype).contiguous(memory_format=torch.channels_last)

    if mode == "eager":
        return Prepared(_hf_call(model), plain)
    if mode == "channels_last":
        if device.type == "npu":
            raise Unavailable("NPU has no channels-last kernels (torch_npu converts to its own formats)")
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return Prepared(_hf_call(cl_model), channels_last)

    if mode == "bf16":
        if dtype != "fp32":
            raise Unavailable("bf16 is autocast over float32 weights: run it with --dtype fp32")
        if device.type == "mps":
            raise Unavailable("bf16 autocast is not benchmarked on MPS")
        if device.type == "cpu" and not _cpu_bf16_supported():
            raise Unavailable("this CPU has no native bfloat16 (oneDNN reports none)")

    import fastpath

    notes: list[str] = []
    if mode == "compiled":
        fn, to_input = _hf_call(model), plain
    elif mode in ("fast", "bf16"):
        use_cl = device.type != "npu"
        fast = fastpath.build_fast_model(model, channels_last=use_cl)
        to_input = channels_last if use_cl else plain
        if mode == "bf16":
            autocast_type = device.type

            def fn(x: torch.Tensor, _fast=fast) -> torch.Tensor:
                with torch.autocast(device_type=autocast_type, dtype=torch.bfloat16):
                    return _fast(x).float()

            notes.append("bfloat16 autocast: not exact, see agreement")
        else:
            fn = fast
        notes.append("fastpath.FastMobileViT" + (" in channels-last memory" if use_cl else ""))
    else:
        raise Unavailable(f"unknown mode {mode!r}")

    if mode == "fast" and device.type == "cpu" and aoti_available():
        try:
            return _prepare_aoti(fn, to_input, batch, device, notes)
        except Exception as exc:  # an export or AOT build this torch cannot do: torch.compile below still can
            first = common.first_line(exc)
            logger.warning("AOTInductor failed for %s (%s: %s); using torch.compile", mode, type(exc).__name__, first)
            notes.append(f"AOTInductor failed ({type(exc).__name__}: {first}); torch.compile instead")

    try:
        compile_fn, options, compile_notes = _compiler(device)
    except Unavailable as exc:
        if mode == "compiled":
            raise
        notes.append(f"not compiled: {exc}")
        return Prepared(fn, to_input, None, notes)

    if device.type == "cpu" and mode in ("fast", "bf16"):
        # C++ instead of Python between kernels: ~150 kernel calls per forward, so it shows at batch 1
        options = {**options, "cpp_wrapper": True}
        compile_notes = [*compile_notes, "inductor cpp_wrapper=True"]

    def forward(pixel_values: torch.Tensor, _fn=fn) -> torch.Tensor:
        return _fn(pixel_values)

    compiled = compile_fn(forward, f"mobilevit_{mode}_b{batch.shape[0]}")
    x = to_input(batch)
    try:
        with _inductor_patch(options), torch.no_grad():
            compile_s = timed_call(lambda: compiled(x), device)[1] / 1000.0
    except Exception as exc:  # a backend that cannot compile this model: report it, keep the other modes
        raise Unavailable(f"torch.compile failed ({type(exc).__name__}: {common.first_line(exc)})") from exc
    return Prepared(compiled, to_input, compile_s, notes + compile_notes)


# Compiled callables per (model, mode, batch, dtype, device), least recently used dropped beyond COMPILE_CACHE_SIZE.
_cache: collections.OrderedDict[tuple, tuple[torch.nn.Module, Prepared]] = collections.OrderedDict()


def prepare_mode(mode: str, model: torch.nn.Module, device: common.Device, dtype: str, batch: torch.Tensor) -> Prepared:
    key = (id(model), mode, int(batch.shape[0]), dtype, str(device))
    hit = _cache.get(key)
    if hit is not None and hit[0] is model:
        _cache.move_to_end(key)
        return hit[1]
    prepared = _prepare(mode, model, device, dtype, batch)
    _cache[key] = (model, prepared)
    while len(_cache) > COMPILE_CACHE_SIZE:
        _cache.popitem(last=False)
    return prepared


def clear_cache() -> None:
    _cache.clear()


# --------------------------------------------------------------------------------------------------------------------
# Roofline: how far each mode is from the device's arithmetic ceiling
# --------------------------------------------------------------------------------------------------------------------

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


def matmul_ceiling(device: common.Device, dtype: torch.dtype, repeats: int = 3) -> float | None:
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
                _, ms = timed_call(matmul, device)
                if ms >= 50.0 or n >= largest:
                    break
                n = min(2 * n, largest)
            best = min(timed_call(matmul, device)[1] for _ in range(repeats))
            _ceilings[key] = 2.0 * n**3 / (best / 1000.0)
        except Exception as exc:  # e.g. no matmul kernel for this dtype on the device
            logger.info("matmul ceiling for %s unavailable: %s", dtype, exc)
            _ceilings[key] = None
    return _ceilings[key]


def roofline(flop_per_image: int | None, batch_size: int, p50_ms: float, ceiling: float | None) -> dict | None:
    """Achieved FLOP/s at p50, the ceiling, the fraction of it, and the time the work would take at the ceiling."""
    if not flop_per_image or p50_ms <= 0:
        return None
    flop = flop_per_image * batch_size
    achieved = flop / (p50_ms / 1000.0)
    return {
        "flop_per_image": flop_per_image,
        "achieved_gflop_per_s": achieved / 1e9,
        "ceiling_gflop_per_s": ceiling / 1e9 if ceiling else None,
        "fraction_of_ceiling": achieved / ceiling if ceiling else None,
        "floor_ms": flop / ceiling * 1000.0 if ceiling else None,
    }


# --------------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------------


def timed_call(fn: Callable[[], Any], device: common.Device) -> tuple[Any, float]:
    """(result, milliseconds), the device synchronized before each of the two clock reads."""
    common.synchronize(device)
    start = _clock()
    result = fn()
    common.synchronize(device)
    return result, (_clock() - start) * 1000.0


def interleaved_samples(
    calls: dict[str, Callable[[], Any]], iterations: int, device: common.Device, desc: str = "", progress: bool = False
) -> dict[str, list[float]]:
    """{name: milliseconds per call}: iteration i runs every call once, the order rotated by i, each through
    timed_call, so a noisy machine slows them all alike."""
    order = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in order}
    bar = _progress(iterations, desc, progress and bool(order))
    for i in range(iterations if order else 0):
        for j in range(len(order)):
            name = order[(i + j) % len(order)]
            samples[name].append(timed_call(calls[name], device)[1])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return samples


def photo_batches(paths: Sequence[str], cfg: common.PreprocessConfig, batch_size: int) -> list[torch.Tensor]:
    """The photos, preprocessed, cycled into enough batches of `batch_size` to cover every photo at least once."""
    tensors = [torch.from_numpy(common.preprocess(p, cfg)) for p in paths]
    if not tensors:
        raise common.UserError("no photos to benchmark on")
    count = max(1, math.ceil(len(tensors) / batch_size))
    return [
        torch.stack([tensors[(b * batch_size + i) % len(tensors)] for i in range(batch_size)]) for b in range(count)
    ]


def _end_to_end_call(prepared: Prepared, paths: Sequence[str], cfg: common.PreprocessConfig, batch_size: int):
    """decode + preprocess + copy in + forward + copy out, on `batch_size` photos (cycled)."""
    chosen = [paths[i % len(paths)] for i in range(batch_size)]

    def run() -> torch.Tensor:
        batch = torch.stack([torch.from_numpy(common.preprocess(p, cfg)) for p in chosen])
        return prepared.call(prepared.to_input(batch)).float().cpu()

    return run


def _result(mode: str, batch_size: int, dtype: str, end_to_end: bool, **extra) -> dict[str, Any]:
    base = {
        "mode": mode,
        "batch_size": batch_size,
        "dtype": "bf16 autocast" if mode == "bf16" else dtype,
        "end_to_end": end_to_end,
        "status": "ok",
        "reason": None,
        "latency_ms": None,
        "throughput_images_per_s": None,
        "samples_ms": [],
        "compile_s": None,
        "peak_memory_bytes": None,
        "agreement": None,
        "exact": None,
        "roofline": None,
        "notes": [],
    }
    base.update(extra)
    return base


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="it", disable=None if enabled else True, leave=False, file=sys.stderr)


@torch.no_grad()
def run_benchmark(
    loaded: common.LoadedModel,
    device: common.Device,
    modes: Sequence[str] = ("eager",),
    batch_sizes: Sequence[int] = (1,),
    iterations: int = 50,
    warmup: int = 10,
    dtype: str = "fp32",
    end_to_end: bool = False,
    images: Sequence[str] | None = None,
    progress: bool = True,
    measure_roofline: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark `modes` at each batch size on `device`; one result dict per (mode, batch size), report-ready.

    `loaded.model` must already be on `device` (common.load_model does that). Modes run interleaved round-robin,
    `warmup` untimed calls each first; the inputs are the bundled photos (or `images`), tiled to the batch size.
    Unavailable modes come back with status "unavailable" and a reason instead of raising. With `measure_roofline`
    each result also gets its "roofline": the model's FLOPs, the device's matmul ceiling in the mode's compute dtype
    (measured here), the fraction of it achieved at p50 and the floor (the FLOPs at the ceiling).
    """
    if iterations < 1 or warmup < 0:
        raise ValueError("iterations must be >= 1 and warmup >= 0")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise common.UserError(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    paths = list(images) if images is not None else common.bundled_images()
    model = loaded.model.eval()
    torch_dtype = common.DTYPES[dtype]
    if next(model.parameters()).dtype != torch_dtype:
        model = copy.deepcopy(model).to(torch_dtype)
    reference_model = model if torch_dtype == torch.float32 else copy.deepcopy(model).float()
    results: list[dict[str, Any]] = []
    for batch_size in batch_sizes:
        batches = photo_batches(paths, loaded.preprocess, batch_size)
        reference = [reference_model(pixel_values=b.to(device.torch)).logits.float().cpu() for b in batches]
        flop = model_flop(reference_model, batches[0][:1].to(device.torch)) if measure_roofline else None
        ready: dict[str, Prepared] = {}
        rows: dict[str, dict[str, Any]] = {}
        for mode in modes:
            logger.info("preparing %s at batch %d", mode, batch_size)
            try:
                prepared = prepare_mode(mode, model, device, dtype, batches[0])
            except Unavailable as exc:
                logger.warning("%s unavailable at batch %d: %s", mode, batch_size, exc)
                rows[mode] = _result(mode, batch_size, dtype, end_to_end, status="unavailable", reason=str(exc))
                continue
            outputs = [prepared.call(prepared.to_input(b)).float().cpu() for b in batches]
            agreement = compare(torch.cat(reference), torch.cat(outputs))
            rows[mode] = _result(
                mode,
                batch_size,
                dtype,
                end_to_end,
                compile_s=prepared.compile_s,
                agreement=asdict(agreement),
                exact=is_exact(agreement),
                notes=list(prepared.notes),
            )
            ready[mode] = prepared
        calls: dict[str, Callable[[], Any]] = {}
        for mode, prepared in ready.items():
            if end_to_end:
                calls[mode] = _end_to_end_call(prepared, paths, loaded.preprocess, batch_size)
            else:
                x = prepared.to_input(batches[0])
                calls[mode] = lambda p=prepared, x=x: p.call(x)
        for mode, call in calls.items():  # warm-up, untimed; then each mode's own peak memory
            for _ in range(warmup):
                call()
            common.reset_peak_memory(device)
            timed_call(call, device)
            rows[mode]["peak_memory_bytes"] = common.peak_memory_bytes(device)
        samples = interleaved_samples(calls, iterations, device, f"batch {batch_size}", progress)
        for mode in calls:
            stats = latency_stats(samples[mode])
            compute_dtype = torch.bfloat16 if mode == "bf16" else torch_dtype
            ceiling = matmul_ceiling(device, compute_dtype) if flop else None
            rows[mode].update(
                latency_ms=asdict(stats),
                samples_ms=samples[mode],
                throughput_images_per_s=batch_size * 1000.0 / stats.mean,
                roofline=roofline(flop, batch_size, stats.p50, ceiling),
            )
        results.extend(rows[mode] for mode in modes)
    return results


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


def build_report(
    loaded: common.LoadedModel,
    device: common.Device,
    results: list[dict[str, Any]],
    settings: dict[str, Any],
    environment: dict[str, Any],
) -> dict[str, Any]:
    """The JSON report of a run: what ran, where, how, and every result."""
    return {
        "model": loaded.name,
        "source": loaded.source,
        "synthetic": bool(loaded.source.get("synthetic")),
        "device": str(device),
        "settings": {**settings, "interleaved": True, "percentiles": "linear interpolation between closest ranks"},
        "environment": environment,
        "results": results,
    }


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table: one line per result, ratios against eager at the same batch size."""
    eager_p50 = {
        r["batch_size"]: r["latency_ms"]["p50"] for r in results if r["mode"] == "eager" and r.get("latency_ms")
    }
    eager_tp = {r["batch_size"]: r["throughput_images_per_s"] for r in results if r["mode"] == "eager"}
    header = (
        f"{'mode':<14}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}{'img/s':>9}{'p50 vs eager':>14}"
        f"{'img/s vs eager':>16}{'% ceiling':>11}{'compile s':>11}{'cosine':>12}{'top1':>7}  status"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lat = r.get("latency_ms")
        if not lat:
            lines.append(f"{r['mode']:<14}{r['batch_size']:>6}  {r['status']}: {r.get('reason') or ''}")
            continue
        base, tp_base = eager_p50.get(r["batch_size"]), eager_tp.get(r["batch_size"])
        ratio = f"{lat['p50'] / base:.2f}x" if base else "-"
        tp_ratio = f"{r['throughput_images_per_s'] / tp_base:.2f}x" if tp_base else "-"
        agreement = r.get("agreement") or {}
        cosine = f"{agreement['cosine']:.7f}" if agreement else "-"
        top1 = f"{agreement['top1_agreement'] * 100:.0f}%" if agreement else "-"
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        fraction = (r.get("roofline") or {}).get("fraction_of_ceiling")
        ceiling = f"{fraction * 100:.0f}%" if fraction is not None else "-"
        status = r["status"] + ("" if r.get("exact") in (None, True) else " (not exact)")
        lines.append(
            f"{r['mode']:<14}{r['batch_size']:>6}{lat['p50']:>10.2f}{lat['p90']:>10.2f}{lat['mean']:>10.2f}"
            f"{r['throughput_images_per_s']:>9.1f}{ratio:>14}{tp_ratio:>16}{ceiling:>11}{compile_s:>11}{cosine:>12}{top1:>7}"
            f"  {status}"
        )
    ceilings = {}
    for r in results:
        roof = r.get("roofline") or {}
        if roof.get("ceiling_gflop_per_s"):
            ceilings.setdefault(r["dtype"], (roof["ceiling_gflop_per_s"], roof["flop_per_image"]))
    for dtype, (gflops, flop) in ceilings.items():
        lines.append(
            f"% ceiling: FLOP/s at p50 ({flop / 1e9:.2f} GFLOP per image) over the measured {dtype} matmul ceiling, "
            f"{gflops:.0f} GFLOP/s: at it an image would take {flop / gflops / 1e6:.2f} ms"
        )
    return "\n".join(lines)


def plot_latencies(results: Sequence[dict[str, Any]], path: str) -> str:
    """Box plots of every mode's samples, one panel per batch size. Needs matplotlib (checked by the caller)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = sorted({r["batch_size"] for r in results if r.get("samples_ms")})
    if not batch_sizes:
        raise common.UserError("nothing to plot: no mode produced samples")
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5 * len(batch_sizes), 4), squeeze=False)
    for ax, batch_size in zip(axes[0], batch_sizes):
        rows = [r for r in results if r["batch_size"] == batch_size and r.get("samples_ms")]
        ax.boxplot([r["samples_ms"] for r in rows], showfliers=True)
        ax.set_xticks(range(1, len(rows) + 1), [r["mode"] for r in rows], rotation=30)
        ax.set_title(f"batch {batch_size}")
        ax.set_yscale("log")  # contention bursts on shared machines are 10-100x the typical call
        ax.set_ylabel("latency per call (ms, log scale)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def matplotlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
