"""Execution modes: the ways the model can run, each built once per batch shape into a `Prepared` call.

    eager          the Hugging Face model as loaded
    channels_last  the same model and input in channels-last memory (not on NPU: no channels-last kernels there)
    compiled       compilers.compile_for(device) of the Hugging Face model
    fast           fastpath.FastMobileViT (BatchNorm folded, fused QKV + SDPA, channels-last unfold/fold). CPU:
                   torch.export + AOTInductor with freezing (else torch.compile with the C++ wrapper); elsewhere as
                   `compiled`
    bf16           `fast` under bfloat16 autocast. Not exact: reported with its agreement cost.
"""

from __future__ import annotations

import collections
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mobilevit_npu import compilers, devices, fastpath, models
from mobilevit_npu.errors import Unavailable, first_line

logger = logging.getLogger("mobilevit_npu.execution")


MODES = ("eager", "channels_last", "compiled", "fast", "bf16")
COMPILE_CACHE_SIZE = 8  # compiled callables kept per process: each costs 15-50 s to build on 2 cores


@dataclass
class Prepared:
    """A ready mode: `call(x)` takes the device batch made by `to_input` and returns the logits."""

    call: Callable[[torch.Tensor], torch.Tensor]
    to_input: Callable[[torch.Tensor], torch.Tensor]
    compile_s: float | None = None
    notes: list[str] = field(default_factory=list)
    module: torch.nn.Module | None = None  # the eager module behind `call` (what --layers can hook), if there is one


def available_modes(device: devices.Device) -> list[str]:
    """The modes `all` expands to on this device."""
    modes = list(MODES)
    if device.type == "npu":
        modes.remove("channels_last")
    if device.type == "mps" or (device.type == "cpu" and not devices.cpu_bf16_supported()):
        modes.remove("bf16")
    return modes


def _hf_call(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits

    return forward


def _prepare(mode: str, model: torch.nn.Module, device: devices.Device, dtype: str, batch: torch.Tensor) -> Prepared:
    """Build one mode for one batch shape; the first (compiling) call and its time are part of this."""
    torch_dtype = models.DTYPES[dtype]

    def plain(x: torch.Tensor) -> torch.Tensor:
        return x.to(device.torch, torch_dtype)

    def channels_last(x: torch.Tensor) -> torch.Tensor:
        return x.to(device.torch, torch_dtype).contiguous(memory_format=torch.channels_last)

    if mode == "eager":
        return Prepared(_hf_call(model), plain, module=model)
    if mode == "channels_last":
        if device.type == "npu":
            raise Unavailable("NPU has no channels-last kernels (torch_npu converts to its own formats)")
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return Prepared(_hf_call(cl_model), channels_last, module=cl_model)

    if mode == "bf16":
        if dtype != "fp32":
            raise Unavailable("bf16 is autocast over float32 weights: run it with --dtype fp32")
        if device.type == "mps":
            raise Unavailable("bf16 autocast is not benchmarked on MPS")
        if device.type == "cpu" and not devices.cpu_bf16_supported():
            raise Unavailable("this CPU has no native bfloat16 (oneDNN reports none)")

    notes: list[str] = []
    module: torch.nn.Module = model
    if mode == "compiled":
        fn, to_input = _hf_call(model), plain
    elif mode in ("fast", "bf16"):
        use_cl = device.type != "npu"
        fast = module = fastpath.build_fast_model(model, channels_last=use_cl)
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

    x = to_input(batch)
    if mode == "fast" and device.type == "cpu" and compilers.aoti_available():
        try:
            runner, compile_s, built = compilers.build_aoti(fn, device, x)
            return Prepared(runner, to_input, compile_s, notes + built, module=module)
        except Exception as exc:  # an export or AOT build this torch cannot do: torch.compile below still can
            first = first_line(exc)
            logger.warning("AOTInductor failed for %s (%s: %s); using torch.compile", mode, type(exc).__name__, first)
            notes.append(f"AOTInductor failed ({type(exc).__name__}: {first}); torch.compile instead")
    try:
        compiled, compile_s, built = compilers.compile_for(
            fn, device, f"mobilevit_{mode}_b{batch.shape[0]}", x, cpp_wrapper=mode in ("fast", "bf16")
        )
    except Unavailable as exc:
        if mode == "compiled":
            raise
        notes.append(f"not compiled: {exc}")
        return Prepared(fn, to_input, None, notes, module=module)
    return Prepared(compiled, to_input, compile_s, notes + built, module=module)


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
