"""Execution modes: the ways the model can run, each declared once in modes.REGISTRY and built here, once per batch
shape, into a `Prepared` call.

    eager          the Hugging Face model as loaded
    channels_last  the same model and input in channels-last memory (not on NPU: no channels-last kernels there)
    compiled       the Hugging Face model compiled: compilers.compile_for(device); on CPU built by AOTInductor instead
                   (the same inductor with freezing, ahead of time, so the package is cached on disk)
    fast           fastpath.FastMobileViT (BatchNorm folded, fused QKV + SDPA, channels-last unfold/fold), compiled as
                   `compiled` is (CPU: AOTInductor, else torch.compile with the C++ wrapper)
    bf16, fp16     `fast` under bfloat16 / float16 autocast, compiled as `fast`. Not exact: reported with its agreement
                   cost. For a family without the fast path, the Hugging Face model under autocast, compiled.
    npugraph       npu only: the Hugging Face model compiled by torchair in mode="reduce-overhead" (aclgraph, the NPU's
                   analogue of CUDA graphs); unavailable where the installed torchair lacks the mode

On npu, `fast` (and the autocast modes) whose graph torchair cannot convert (torchair 7.0.0 has no converter for the
flash SDPA) falls back to the same model with its attention spelt out (matmul, softmax, matmul), else runs uncompiled;
the notes say which ran.

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

from mobilevit_npu import compilers, devices, families, fastpath, models, modes
from mobilevit_npu.errors import Unavailable, first_line

logger = logging.getLogger("mobilevit_npu.execution")


MODES = modes.mode_names()  # the registry's, in its order (mobilevit_npu/modes.py)
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
    return modes.available(device)


class Logits(torch.nn.Module):
    """The Hugging Face model as a module returning the logits tensor: how eager modes call it, and what torch.export
    needs for the compiled one."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class Autocast(torch.nn.Module):
    """`inner` under autocast to `autocast_dtype` (bf16 | fp16) on `device_type`, logits returned in float32. The
    dtype is a public attribute, so the compile cache's structure digest keys on it (refcache.structure_digest)."""

    def __init__(self, inner: torch.nn.Module, device_type: str, autocast_dtype: str = "bf16") -> None:
        super().__init__()
        self.inner = inner
        self.device_type = device_type
        self.autocast_dtype = autocast_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=models.DTYPES[self.autocast_dtype]):
            return self.inner(x).float()


def _prepare(name: str, model: torch.nn.Module, device: devices.Device, dtype: str, batch: torch.Tensor) -> Prepared:
    """Build one mode for one batch shape from its declaration (modes.Mode); the first (compiling) call and its time
    are part of this."""
    mode = modes.REGISTRY.get(name)
    if mode is None:
        raise Unavailable(f"unknown mode {name!r}")
    refused = mode.refusal(device, dtype)
    if refused:
        raise Unavailable(refused)
    torch_dtype = models.DTYPES[dtype]

    def plain(x: torch.Tensor) -> torch.Tensor:
        return x.to(device.torch, torch_dtype)

    def channels_last(x: torch.Tensor) -> torch.Tensor:
        return x.to(device.torch, torch_dtype).contiguous(memory_format=torch.channels_last)

    if not mode.compiled:
        if mode.channels_last:
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        fn: torch.nn.Module = Logits(model)
        notes = []
        if mode.autocast:  # eager under autocast: torch.autocast decides per op what runs in the lower precision
            fn = Autocast(fn, device.type, mode.autocast)
            notes.append(f"{mode.text()}: not exact, see agreement")
        return Prepared(fn, channels_last if mode.channels_last else plain, notes=notes, module=model)

    notes: list[str] = []
    module: torch.nn.Module = model
    aoti = device.type == "cpu" and compilers.aoti_available()
    autotune = aoti and mode.autotune
    family = families.for_model(model) if mode.model == "fast" else None
    if mode.model == "fast" and not mode.autocast and not family.fast_path:
        raise Unavailable(family.fast_unavailable())
    if mode.model == "hf":
        fn, to_input = Logits(model), plain
    elif not family.fast_path:  # autocast over the model itself, compiled as `compiled` is
        fn, to_input, autotune = Autocast(Logits(model), device.type, mode.autocast), plain, False
        notes.append(f"{mode.text()} over the {family.title} model (no fast path): not exact, see agreement")
    else:
        use_cl = device.type != "npu"
        fast = module = fastpath.build_fast_model(
            model, channels_last=use_cl, linear_max_pixels=FAST_LINEAR_MAX_PIXELS if autotune else None
        )
        to_input = channels_last if use_cl else plain
        if mode.autocast:
            fn = Autocast(fast, device.type, mode.autocast)
            notes.append(f"{mode.text()}: not exact, see agreement")
        else:
            fn = fast
        notes.append(
            "fastpath.FastMobileViT"
            + (" in channels-last memory" if use_cl else "")
            + (f", 1x1 convolutions of <= {FAST_LINEAR_MAX_PIXELS} pixels as linears" if autotune else "")
        )

    x = to_input(batch)
    if aoti:
        try:
            runner, compile_s, built, cached = compilers.build_aoti(fn, device, x, autotune=autotune)
            return Prepared(runner, to_input, compile_s, notes + built, module=module, compile_cache=cached)
        except Exception as exc:  # an export or AOT build this torch cannot do: torch.compile below still can
            first = first_line(exc)
            logger.warning("AOTInductor failed for %s (%s: %s); using torch.compile", name, type(exc).__name__, first)
            notes.append(f"AOTInductor failed ({type(exc).__name__}: {first}); torch.compile instead")
    graph_name = f"mobilevit_{name}_b{batch.shape[0]}"
    graph = {"npu_mode": mode.npu_graph} if mode.npu_graph else {}  # else compile_for's default: GE graph
    try:
        compiled, compile_s, built = compilers.compile_for(
            fn, device, graph_name, x, cpp_wrapper=mode.model == "fast", **graph
        )
    except Unavailable as exc:
        if mode.model == "hf":
            raise
        if device.type == "npu" and isinstance(module, fastpath.FastMobileViT):
            return _fast_without_sdpa(mode, model, device, fn, module, to_input, x, notes, exc, graph_name)
        notes.append(f"not compiled: {exc}")
        return Prepared(fn, to_input, None, notes, module=module)
    return Prepared(compiled, to_input, compile_s, notes + built, module=module)


def _fast_without_sdpa(mode, model, device, fn, fast, to_input, x, notes, exc, name) -> Prepared:
    """torchair could not compile `fast` (its converter for the flash SDPA is missing in 7.0.0): the same model with
    the attention spelt out, compiled; else `fast` uncompiled. The notes say which one ran."""
    notes = notes + [f"torchair could not compile fast with scaled_dot_product_attention ({exc})"]
    math_fast = fastpath.build_fast_model(model, channels_last=False, math_attention=True)
    math_fn = Autocast(math_fast, device.type, mode.autocast) if mode.autocast else math_fast
    try:
        compiled, compile_s, built = compilers.compile_for(math_fn, device, f"{name}_math", x)
    except Unavailable as again:
        logger.warning("%s runs uncompiled on %s: %s", mode.name, device, again)
        notes.append(f"fell back to fast uncompiled (math attention did not compile either: {again})")
        return Prepared(fn, to_input, None, notes, module=fast)
    logger.warning("%s on %s: compiled with math attention instead of SDPA", mode.name, device)
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
