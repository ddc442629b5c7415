"""Compiling for a device: the one place that picks torch.compile's backend and options per device, used by every
compiled benchmark mode and by accuracy_run's compiled target (so the verdict covers the code path that is timed),
and the AOTInductor build used for `fast` on CPU.

- npu: torchair's GE backend (CompilerConfig defaults), or its "reduce-overhead" mode (aclgraph) for `npugraph`;
- cuda: inductor mode="reduce-overhead" (CUDA graphs);
- cpu: inductor with torch._inductor.config.freezing=True (options={"freezing": True} is silently ignored), plus the
  C++ wrapper where asked (`cpp_wrapper`: ~150 kernel calls per forward, so Python between them shows at batch 1);
- mps: inductor defaults.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
from collections.abc import Callable
from typing import Any

import torch
from packaging.version import Version

from mobilevit_npu import devices, timing
from mobilevit_npu.errors import Unavailable, first_line

Forward = Callable[[torch.Tensor], torch.Tensor]


def _unique_function(fn: Callable, name: str) -> Callable:
    """A copy of `fn` with its own code object. Dynamo keeps its compiled graphs on the code object, so two
    wrappers made from one `def` could otherwise hand each other their graphs (frozen weights included)."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


NPU_GRAPH_MODES = {"max-autotune": "torchair GE graph (CompilerConfig defaults)",
                   "reduce-overhead": 'torchair mode="reduce-overhead" (aclgraph, the NPU\'s CUDA graphs)'}  # fmt: skip


def _why(exc: BaseException) -> str:
    """Type and first line of an exception and of its cause: torchair's _TorchairImportError says only "an error
    occurred when importing torchair"; the cause (a missing protobuf, say) is the useful part."""
    text = f"{type(exc).__name__}: {first_line(exc)}"
    cause = exc.__cause__ or getattr(exc, "inner_exception", None)  # dynamo's BackendCompilerFailed keeps it there
    if cause is not None:
        text += f"; caused by {type(cause).__name__}: {first_line(cause)}"
    return text


def _torchair_backend(npu_mode: str):
    """torchair's backend for torch.compile in `npu_mode` (max-autotune: GE graph; reduce-overhead: aclgraph).
    Unavailable when torchair cannot be used: torch_npu installs a lazy placeholder as `torchair`, so `import
    torchair` succeeds even when it is broken and the failure comes at the first attribute use, as
    _TorchairImportError (not an ImportError); a torchair without the mode raises ValueError when it is set."""
    try:
        import torchair  # noqa: PLC0415 - ships inside torch_npu, imported only on the NPU path

        config = torchair.CompilerConfig()
        if npu_mode != "max-autotune":
            config.mode = "reduce-overhead"
        return torchair.get_npu_backend(compiler_config=config)
    except Exception as exc:  # anything torchair raises makes this mode unavailable, never the run
        raise Unavailable(f"torchair cannot provide {npu_mode!r} ({_why(exc)})") from exc


def _backend(
    device: devices.Device, cpp_wrapper: bool, npu_mode: str = "max-autotune"
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(torch.compile keywords, inductor config patch for the compiling calls, notes) for the device."""
    if device.type == "npu":
        return {"backend": _torchair_backend(npu_mode)}, {}, [NPU_GRAPH_MODES[npu_mode]]
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}, {}, ['inductor mode="reduce-overhead" (CUDA graphs)']
    if device.type == "cpu":
        notes = ["inductor, torch._inductor.config.freezing=True (weights constant-folded and prepacked)"]
        patch = {"freezing": True}
        if cpp_wrapper:
            patch["cpp_wrapper"] = True
            notes.append("inductor cpp_wrapper=True")
        return {}, patch, notes
    return {}, {}, ["inductor defaults"]


def compile_for(
    fn: Forward,
    device: devices.Device,
    name: str,
    example: torch.Tensor,
    cpp_wrapper: bool = False,
    npu_mode: str = "max-autotune",
) -> tuple[Forward, float, list[str]]:
    """`fn` compiled for `device` with a static shape, and its first (compiling) call made on `example`:
    (compiled callable, compile seconds, notes). `npu_mode` picks torchair's mode on npu. Unavailable when the
    device's compiler cannot build it."""
    kwargs, patch, notes = _backend(device, cpp_wrapper, npu_mode)

    def forward(pixel_values: torch.Tensor, _fn=fn) -> torch.Tensor:
        return _fn(pixel_values)

    compiled = torch.compile(_unique_function(forward, name), dynamic=False, fullgraph=True, **kwargs)
    try:
        with _inductor_patch(patch), torch.no_grad():
            compile_ms = timing.timed_call(lambda: compiled(example), device)[1]
    except Exception as exc:  # a backend that cannot compile this model: report it, keep the other modes
        raise Unavailable(f"torch.compile failed ({_why(exc)})") from exc
    return compiled, compile_ms / 1000.0, notes


def aoti_available() -> bool:
    """torch.export + AOTInductor packaging in the form used here (torch >= 2.6; 2.5 has another signature)."""
    import torch._inductor as inductor

    api = hasattr(inductor, "aoti_compile_and_package") and hasattr(inductor, "aoti_load_package")
    return Version(torch.__version__).release[:2] >= (2, 6) and api


def build_aoti(module: Forward, device: devices.Device, example: torch.Tensor) -> tuple[Forward, float, list[str]]:
    """`module` exported with torch.export and built by AOTInductor (weights frozen) into a package in a temporary
    folder, loaded back as a C++ runner: no dynamo guard checks and no Python between kernels on each call, ~5% off
    `fast`'s batch-1 latency on CPU against torch.compile with the C++ wrapper. (runner, seconds for export, build,
    load and the first call, notes)."""

    def build() -> Forward:
        with tempfile.TemporaryDirectory(prefix="mobilevit_aoti_") as folder:
            program = torch.export.export(module, (example,))
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(folder, "fast.pt2"), inductor_configs={"freezing": True}
            )
            runner = torch._inductor.aoti_load_package(package)  # the shared library is loaded: the folder can go
        runner(example)
        return runner

    runner, compile_ms = timing.timed_call(build, device)
    return runner, compile_ms / 1000.0, ["AOTInductor: torch.export + aoti_compile_and_package, freezing"]


def _inductor_patch(options: dict[str, Any]):
    if not options:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(**options)
