"""Execution modes: the ways the model can run, each built once per batch shape into a `Prepared` call.

    eager          the Hugging Face model as loaded
    channels_last  the same model and input in channels-last memory (not on NPU: no channels-last kernels there)
    compiled       the Hugging Face model compiled: compilers.compile_for(device); on CPU built by AOTInductor instead
                   (the same inductor with freezing, ahead of time, so the package is cached on disk)
    fast           fastpath.FastMobileViT (BatchNorm folded, fused QKV + SDPA, channels-last unfold/fold), compiled as
                   `compiled` is (CPU: AOTInductor, else torch.compile with the C++ wrapper)
    bf16           `fast` under bfloat16 autocast, compiled as `fast`. Not exact: reported with its agreement cost.
                   For a family without the fast path, the Hugging Face model under bfloat16 autocast, compiled.
    npugraph       npu only: the Hugging Face model compiled by torchair in mode="reduce-overhead" (aclgraph, the NPU's
                   analogue of CUDA graphs); unavailable where the installed torchair lacks the mode

On npu, `fast` (and bf16) whose graph torchair cannot convert (torchair 7.0.0 has no converter for the flash SDPA)
falls back to the same model with its attention spelt out (matmul, softmax, matmul), else runs uncompiled; the notes
say which ran.

`fast` is MobileViT's (families.Family.fast_path); other families get `compiled` as their fastest exact mode, and
`fast` is unavailable for them with a reason that says so.
"""

from __future__ import annotations

import collections
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mobilevit_npu import compilers, devices, families, fastpath, models
from mobilevit_npu.errors import Unavailable, first_line

logger = logging.getLogger("mobilevit_npu.execution")


MODES = ("eager", "channels_last", "compiled", "fast", "bf16", "npugraph")
# `fast` on CPU: inductor's GEMM autotuning, with the 1x1 convolutions of maps up to this many pixels (batch x height
# x width) as linears, so that they are GEMMs it can tune and fuse. Measured on the 2-core Xeon VM, interleaved runs:
# batch 1 p50 18.5 ms against 19.5 with every 1x1 as a linear and 18.1 -> 16.7 against none (OpenVINO 19.6, 17.9);
# batch 32 58.9 images/s against 56.6 without autotuning (OpenVINO 55.9), 53.3 with every 1x1 as a linear.
FAST_LINEAR_MAX_PIXELS = 4096
COMPILE_CACHE_SIZE = 8  # compiled callables kept per process: each costs 15-50 s to build on 2 cores


@dataclass
class Prepared:
    """A ready mode: `call(x)` takes the device batch made by `to_input` and returns the logits."""

    call: Callable[[torch.Tensor], torch.Tensor]
    to_input: Callable[[torch.Tensor], torch.Tensor]
    compile_s: float | None = None
    notes: list[str] = field(default_factory=list)
    module: torch.nn.Module | None = None  # the eager module behind `call` (what --layers can hook), if there is one
    compile_cache: str | None = None  # "hit" | "miss" | "off" where the compiled artefact has a disk cache


def available_modes(device: devices.Device) -> list[str]:
    """The modes `all` expands to on this device."""
    modes = list(MODES)
    if device.type == "npu":
        modes.remove("channels_last")
    else:
        modes.remove("npugraph")
    if device.type == "mps" or (device.type == "cpu" and not devices.cpu_bf16_supported()):
        modes.remove("bf16")
    return modes


class Logits(torch.nn.Module):
    """The Hugging Face model as a module returning the logits tensor: how eager modes call it, and what torch.export
    needs for the compiled one."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class Autocast(torch.nn.Module):
    """`inner` under bfloat16 autocast on `device_type`, logits returned in float32."""

    def __init__(self, inner: torch.nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner = inner
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            return self.inner(x).float()


def _prepare(mode: str, model: torch.nn.Module, device: devices.Device, dtype: str, batch: torch.Tensor) -> Prepared:
    """Build one mode for one batch shape; the first (compiling) call and its time are part of this."""
    torch_dtype = models.DTYPES[dtype]

    def plain(x: torch.Tensor) -> torch.Tensor:
        return x.to(device.torch, torch_dtype)

    def channels_last(x: torch.Tensor) -> torch.Tensor:
        return x.to(device.torch, torch_dtype).contiguous(memory_format=torch.channels_last)

    if mode == "eager":
        return Prepared(Logits(model), plain, module=model)
    if mode == "channels_last":
        if device.type == "npu":
            raise Unavailable("NPU has no channels-last kernels (torch_npu converts to its own formats)")
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return Prepared(Logits(cl_model), channels_last, module=cl_model)

    if mode == "bf16":
        if dtype != "fp32":
            raise Unavailable("bf16 is autocast over float32 weights: run it with --dtype fp32")
        if device.type == "mps":
            raise Unavailable("bf16 autocast is not benchmarked on MPS")
        if device.type == "cpu" and not devices.cpu_bf16_supported():
            raise Unavailable("this CPU has no native bfloat16 (oneDNN reports none)")

    if mode == "npugraph" and device.type != "npu":
        raise Unavailable("npugraph is torchair's reduce-overhead (aclgraph) mode: npu only")

    notes: list[str] = []
    module: torch.nn.Module = model
    aoti = mode in ("compiled", "fast", "bf16") and device.type == "cpu" and compilers.aoti_available()
    autotune = aoti and mode == "fast"
    family = families.for_model(model) if mode in ("fast", "bf16") else None
    if mode == "fast" and not family.fast_path:
        raise Unavailable(family.fast_unavailable())
    if mode in ("compiled", "npugraph"):
        fn, to_input = Logits(model), plain
    elif mode == "bf16" and not family.fast_path:  # autocast over the model itself, compiled as `compiled` is
        fn, to_input, autotune = Autocast(Logits(model), device.type), plain, False
        notes.append(f"bfloat16 autocast over the {family.title} model (no fast path): not exact, see agreement")
    elif mode in ("fast", "bf16"):
        use_cl = device.type != "npu"
        fast = module = fastpath.build_fast_model(
            model, channels_last=use_cl, linear_max_pixels=FAST_LINEAR_MAX_PIXELS if autotune else None
        )
        to_input = channels_last if use_cl else plain
        if mode == "bf16":
            fn = Autocast(fast, device.type)
            notes.append("bfloat16 autocast: not exact, see agreement")
        else:
            fn = fast
        notes.append(
            "fastpath.FastMobileViT"
            + (" in channels-last memory" if use_cl else "")
            + (f", 1x1 convolutions of <= {FAST_LINEAR_MAX_PIXELS} pixels as linears" if autotune else "")
        )
    else:
        raise Unavailable(f"unknown mode {mode!r}")

    x = to_input(batch)
    if aoti:
        try:
            runner, compile_s, built, cached = compilers.build_aoti(fn, device, x, autotune=autotune)
            return Prepared(runner, to_input, compile_s, notes + built, module=module, compile_cache=cached)
        except Exception as exc:  # an export or AOT build this torch cannot do: torch.compile below still can
            first = first_line(exc)
            logger.warning("AOTInductor failed for %s (%s: %s); using torch.compile", mode, type(exc).__name__, first)
            notes.append(f"AOTInductor failed ({type(exc).__name__}: {first}); torch.compile instead")
    name = f"mobilevit_{mode}_b{batch.shape[0]}"
    graph = {"npu_mode": "reduce-overhead"} if mode == "npugraph" else {}  # else compile_for's default: GE graph
    try:
        compiled, compile_s, built = compilers.compile_for(
            fn, device, name, x, cpp_wrapper=mode in ("fast", "bf16"), **graph
        )
    except Unavailable as exc:
        if mode in ("compiled", "npugraph"):
            raise
        if device.type == "npu" and isinstance(module, fastpath.FastMobileViT):
            return _fast_without_sdpa(mode, model, device, fn, module, to_input, x, notes, exc, name)
        notes.append(f"not compiled: {exc}")
        return Prepared(fn, to_input, None, notes, module=module)
    return Prepared(compiled, to_input, compile_s, notes + built, module=module)


def _fast_without_sdpa(mode, model, device, fn, fast, to_input, x, notes, exc, name) -> Prepared:
    """torchair could not compile `fast` (its converter for the flash SDPA is missing in 7.0.0): the same model with
    the attention spelt out, compiled; else `fast` uncompiled. The notes say which one ran."""
    notes = notes + [f"torchair could not compile fast with scaled_dot_product_attention ({exc})"]
    math_fast = fastpath.build_fast_model(model, channels_last=False, math_attention=True)
    math_fn = Autocast(math_fast, device.type) if mode == "bf16" else math_fast
    try:
        compiled, compile_s, built = compilers.compile_for(math_fn, device, f"{name}_math", x)
    except Unavailable as again:
        logger.warning("%s runs uncompiled on %s: %s", mode, device, again)
        notes.append(f"fell back to fast uncompiled (math attention did not compile either: {again})")
        return Prepared(fn, to_input, None, notes, module=fast)
    logger.warning("%s on %s: compiled with math attention instead of SDPA", mode, device)
    notes.append("fell back to math attention (matmul-softmax-matmul), compiled by torchair")
    return Prepared(compiled, to_input, compile_s, notes + built, module=math_fast)


# Compiled callables per (model, mode, batch, dtype, device), least recently used dropped beyond COMPILE_CACHE_SIZE.
_cache: collections.OrderedDict[tuple, tuple[torch.nn.Module, Prepared]] = collections.OrderedDict()


def prepare_mode(
    mode: str, model: torch.nn.Module, device: devices.Device, dtype: str, batch: torch.Tensor
) -> Prepared:
    """`mode` built for `model` (already in `dtype` on `device`) at `batch`'s shape; cached per process."""
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
