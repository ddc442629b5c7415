"""The runtimes, each declared once: what can run the model (torch itself, ONNX Runtime on an ONNX file, an ATC .om
through ais_bench, OpenVINO beside them in benchmarks/bench_peers.py). Everything that names a runtime reads this
registry: --runtime's choices and help in accuracy_run.py and accuracy_run_perf.py (flags.add_runtime_args), the flag
checks (runtimes.check_runtime_args), the accuracy target and the benchmark's runner (runtimes.runtime_target,
runtimes.bench_runtime), and the peers of benchmarks/bench_peers.py. A name that is not here is an error (one line,
exit 2), never another runtime.

Torch-free (the scripts' --help reads it without importing torch): an entry names its implementation as
"module:attribute", loaded on first use; the implementations (mobilevit_npu.runtimes) share one interface,
runtimes.Runtime: where it runs (device), the verdict dtype it plans (verdict_dtype), the accuracy target (target),
the benchmark's runners (bench) and, for a peer, a CPU float32 builder at the batch's static shape (peer).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional

from mobilevit_npu.errors import UserError


@dataclass(frozen=True)
class RuntimeEntry:
    """One runtime, declared once."""

    name: str  # its --runtime value (and --peers name)
    help: str  # what it runs, for --runtime's help: "NAME (HELP)"
    implementation: str  # "module:attribute": its runtimes.Runtime object (imports torch), loaded on first use
    modes: bool = False  # runs the torch execution modes: --target_mode, --dtype, --layers go with it (torch only)
    artefact: Optional[str] = None  # the flag naming the file it runs ("onnx" -> --onnx FILE), None: the model itself
    artefact_needed: Optional[str] = None  # the file is required: how to make one (shown when it is missing)
    precision: Optional[str] = None  # takes --precision_mode: how the refusal names it ("onnxruntime (CANN)")
    package: Optional[str] = None  # the import it needs (bench_peers skips a peer that is not installed)
    offered: bool = True  # a --runtime choice of accuracy_run.py and accuracy_run_perf.py
    peer: bool = False  # benchmarks/bench_peers.py can time it beside the torch modes (CPU, float32)

    def load(self) -> Any:
        """Its implementation (runtimes.Runtime), imported now."""
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


REGISTRY: dict[str, RuntimeEntry] = {
    entry.name: entry
    for entry in (
        RuntimeEntry("torch", "the model itself", "mobilevit_npu.runtimes:TORCH", modes=True),
        RuntimeEntry(
            "onnxruntime",
            "the ONNX file: CPUExecutionProvider on --device cpu, CUDAExecutionProvider on cuda, "
            "CANNExecutionProvider on npu; a provider that is absent or fails is an error, never a CPU run",
            "mobilevit_npu.runtimes:ONNXRUNTIME",
            artefact="onnx",
            precision="onnxruntime (CANN)",
            package="onnxruntime",
            peer=True,
        ),
        RuntimeEntry(
            "om",
            "an ATC .om through ais_bench's InferSession on --device npu[:N]",
            "mobilevit_npu.runtimes:OM",
            artefact="om",
            artefact_needed="make one with export_onnx.py's ATC command",
            precision="om",
            package="ais_bench",
        ),
        RuntimeEntry(
            "openvino",
            "the ONNX file compiled by OpenVINO for the CPU, f32 (benchmarks/bench_peers.py only)",
            "mobilevit_npu.runtimes:OPENVINO",
            artefact="onnx",
            package="openvino",
            offered=False,
            peer=True,
        ),
    )
}


def runtime_names(offered: bool = True) -> tuple[str, ...]:
    """The runtimes' names in declaration order: those offered to --runtime (default), or every one."""
    return tuple(name for name, entry in REGISTRY.items() if entry.offered or not offered)


def peers() -> tuple[str, ...]:
    """The runtimes benchmarks/bench_peers.py can time."""
    return tuple(name for name, entry in REGISTRY.items() if entry.peer)


def entry(name: str, offered: bool = True) -> RuntimeEntry:
    """The entry for `name`; an unknown name (or, with `offered`, one --runtime does not offer) is a UserError in one
    line naming the choices, never another runtime."""
    entry = REGISTRY.get(name)
    if entry is None or (offered and not entry.offered):
        raise UserError(f"unknown runtime {name!r}: choose from {', '.join(runtime_names(offered))}")
    return entry


def runtime_help() -> str:
    """--runtime's help, one clause per offered runtime."""
    return "what runs the target: " + "; ".join(f"{e.name} ({e.help})" for e in REGISTRY.values() if e.offered)


def artefact_help(flag: str) -> str:
    """Which runtimes an artefact flag goes with: "onnxruntime" or "onnxruntime|openvino"."""
    return "|".join(e.name for e in REGISTRY.values() if e.offered and e.artefact == flag)
