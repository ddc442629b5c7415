"""The runtimes' one interface (Runtime) and its implementations, declared in mobilevit_npu.runtime_registry: torch
(the model itself, in an execution mode), ONNX Runtime on an ONNX file (CPU, CUDA or CANN execution provider:
mobilevit_npu.runtime_ort), an ATC .om through ais_bench's InferSession (mobilevit_npu.runtime_om), and OpenVINO as a
peer of benchmarks/bench_peers.py. Every caller goes through the registry: accuracy_run.py's target
(runtime_target -> Runtime.target), accuracy_run_perf.py's runners (bench_runtime -> Runtime.bench) and the peers
(Runtime.peer). An offline runner is a bench.Builder returning an execution.Prepared, so accuracy_run wraps it as the
target side and the benchmark times it beside the torch modes.

This module also keeps what the offline runtimes share: the --runtime flags' checks, where a runtime runs, and
export_onnx.py's JSON beside the artefact (the precision ATC was given, the weights it was exported from).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from mobilevit_npu import (
    bench,
    devices,
    execution,
    flags,
    models,
    onnx_export,
    reports,
    runtime_om,
    runtime_ort,
    runtime_registry,
    targets,
)
from mobilevit_npu.distributed import local_rank
from mobilevit_npu.errors import Unavailable, UserError

logger = logging.getLogger("mobilevit_npu.runtimes")

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|npu)(?::(\d+))?$")


class RuntimeArgs(Protocol):
    """What the runtimes read, resolved once from the command line: verify.Settings (accuracy_run.py) and
    RuntimeSettings (accuracy_run_perf.py) both carry these, spelt as the flags' destinations."""

    runtime: str
    onnx: Optional[str]
    om: Optional[str]
    precision_mode: Optional[str]
    cann_graph: str
    allow_foreign_weights: bool
    device: str
    dtype: str
    target_mode: str
    layers: bool


@dataclass
class RuntimeSettings:
    """The --runtime flags (add_runtime_args) and those they are checked against, for a script without a settings
    object of its own (accuracy_run_perf.py: RuntimeSettings.pick(vars(args)))."""

    runtime: str = "torch"
    onnx: Optional[str] = None
    om: Optional[str] = None
    precision_mode: Optional[str] = None
    cann_graph: str = "1"
    allow_foreign_weights: bool = False
    device: str = "auto"
    dtype: str = "fp32"
    target_mode: str = "eager"
    layers: bool = False

    @classmethod
    def pick(cls, values: dict[str, Any]) -> RuntimeSettings:
        """The settings among `values` (the parsed flags as a dict); the others keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


add_runtime_args = flags.add_runtime_args  # --runtime and its flags: declared torch-free, for --help


def check_runtime_args(settings: RuntimeArgs) -> None:
    """Usage errors before any model is loaded, from the registry's declarations: an unknown runtime, a flag that goes
    with another runtime, a missing or absent artefact."""
    entry = runtime_registry.entry(settings.runtime)  # unknown: one line, never another runtime
    runtime = entry.name
    if not entry.modes:
        if settings.target_mode != "eager":
            raise UserError(f"--target_mode goes with --runtime torch; --runtime {runtime} runs its own graph")
        if settings.layers:
            raise UserError(f"--layers needs the torch modules; --runtime {runtime} has none to hook")
    given = {flag: getattr(settings, flag, None) for flag in _artefact_flags()}
    for flag, value in given.items():
        if value and flag != entry.artefact:
            raise UserError(f"--{flag} goes with --runtime {runtime_registry.artefact_help(flag)}")
    if settings.precision_mode and not entry.precision:
        takes = " or ".join(e.precision for e in _offered() if e.precision)
        raise UserError(f"--precision_mode goes with --runtime {takes}")
    if settings.allow_foreign_weights and not entry.artefact:
        runs = " or ".join(f"--runtime {e.name} --{e.artefact} FILE" for e in _offered() if e.artefact)
        raise UserError(f"--allow_foreign_weights goes with {runs}")
    if not entry.modes and settings.dtype != "fp32":
        raise UserError(
            f"--runtime {runtime} runs the float32 ONNX/.om: its precision is --precision_mode, not --dtype"
        )
    artefact = given.get(entry.artefact) if entry.artefact else None
    if entry.artefact_needed and not artefact:
        raise UserError(f"--runtime {runtime} needs --{entry.artefact} FILE.{entry.artefact} ({entry.artefact_needed})")
    if artefact and not Path(artefact).is_file():
        raise UserError(f"--{entry.artefact} {artefact} is not a file")


def _offered() -> list[runtime_registry.RuntimeEntry]:
    return [runtime_registry.REGISTRY[name] for name in runtime_registry.runtime_names()]


def _artefact_flags() -> list[str]:
    """The artefact flags (--onnx, --om) of the runtimes --runtime offers, in declaration order."""
    return list(dict.fromkeys(e.artefact for e in _offered() if e.artefact))


def implementation(name: str, offered: bool = True) -> Runtime:
    """The registry's runtime `name` as its Runtime object (an unknown name: UserError, one line)."""
    return runtime_registry.entry(name, offered).load()


def runtime_device(runtime: str, spec: str, default_index: int = 0) -> devices.Device:
    """Where an offline runtime runs (Runtime.device), without importing torch_npu (the runtimes bring their own CANN
    bindings)."""
    return implementation(runtime).device(spec, default_index)


def _parse_device(runtime: str, spec: str) -> tuple[str, Optional[str]]:
    match = _DEVICE_RE.match(spec.strip().lower())
    if not match:
        raise UserError(f"--runtime {runtime} runs on cpu, cuda[:N] or npu[:N], not {spec!r}")
    return match.group(1), match.group(2)


def _device(kind: str, index: Optional[str], default_index: int) -> devices.Device:
    if kind == "cpu":
        return devices.Device("cpu")
    return devices.Device(kind, int(index) if index is not None else default_index)


# ------------------------------------------------------------------------------------------- the export's JSON


def sidecar_path(artefact: str | Path) -> Path:
    """export_onnx.py's JSON for an .onnx (OUT.json beside OUT.onnx) or its .om (ATC's --output=OUT makes OUT.om)."""
    return Path(artefact).with_suffix(".json")


def artefact_inputs(settings: RuntimeArgs) -> dict[str, Optional[str]]:
    """The files an offline runtime reads, as the output guard (common.check_outputs) names them: the --onnx / --om
    file and export_onnx.py's JSON beside it (sidecar_path), which a report written over it would destroy."""
    named: dict[str, Optional[str]] = {}
    for flag in _artefact_flags():
        artefact = getattr(settings, flag, None)
        named[f"--{flag}"] = artefact
        named[f"--{flag}'s export JSON"] = str(sidecar_path(artefact)) if artefact else None
    return named


def sidecar(artefact: str | Path) -> dict[str, Any]:
    """export_onnx.py's JSON beside an .onnx/.om of the same stem ({} when absent or unreadable)."""
    candidate = sidecar_path(artefact)
    try:  # reports.read_json: a regular file within the size bound of a config file, else a UserError
        return reports.read_json(candidate, "the export JSON") if candidate.is_file() else {}
    except UserError:
        return {}


def om_precision_mode(om_path: str | Path, flag: str | None) -> tuple[str, str]:
    """(mode, source) ATC compiled the .om with: the flag, else the export's JSON beside it, else the default
    (assumed, and said so)."""
    if flag:
        return flag, "--precision_mode"
    mode = (sidecar(om_path).get("atc") or {}).get("precision_mode")
    if mode in onnx_export.PRECISION_MODES:
        return mode, f"{sidecar_path(om_path)}"
    return onnx_export.DEFAULT_PRECISION_MODE, "assumed (no --precision_mode, no export JSON beside the .om)"


def check_weights(artefact: str | Path, loaded: models.LoadedModel, allow_foreign: bool = False) -> str:
    """The artefact's identity against the model loaded, before anything runs: the weights its export JSON names
    (models.weights_digest of the exported weights; older exports named the weights file's sha256) must be this
    model's, else UserError naming both, unless `allow_foreign`. Returns what was found, for the report."""
    named = sidecar(artefact).get("weights_sha256")
    if not named:
        return f"unchecked: no export JSON ({sidecar_path(artefact).name}) naming its weights"
    ours = models.weights_digest(loaded.model)
    if named in (ours, loaded.source.get("sha256")):
        return "match: the export JSON names the weights loaded"
    what = (
        f"{artefact} was exported from other weights (weights_sha256 {named} in {sidecar_path(artefact)}) than "
        f"the model loaded ({ours})"
    )
    if not allow_foreign:
        raise UserError(f"{what}: refusing to judge it against this model; --allow_foreign_weights runs it anyway")
    logger.warning("%s: run anyway (--allow_foreign_weights)", what)
    return f"foreign, allowed by --allow_foreign_weights: {what}"


# ------------------------------------------------------------------------------------------------ accuracy targets


@dataclass
class RuntimeSide(targets.Side):
    """The target side for an offline runtime: `device` stays the host (the runtime brings its own device bindings,
    and torch is not synchronised for it); `where` names the runtime's device and `mode` the runtime and provider
    ("onnxruntime CANNExecutionProvider", "om ais_bench"), as reports and the card show the target."""

    where: str = ""
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        mode = self.runtime.get("precision_mode")
        return f"{self.where} {self.mode}" + (f" precision_mode={mode}" if mode else "")

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, on_hook_model: bool = False) -> torch.Tensor:
        return self.prepared.call(self.prepared.to_input(pixels)).detach().to("cpu", torch.float64)


def planned_verdict_dtype(args: RuntimeArgs, default_index: int = 0) -> str:
    """The dtype whose thresholds will judge an offline --runtime, known before anything is loaded
    (Runtime.verdict_dtype)."""
    return implementation(args.runtime).verdict_dtype(args, default_index)


def ort_side(
    session: runtime_ort.OrtSession, prepared, device: devices.Device, model: torch.nn.Module, info: dict[str, Any]
) -> RuntimeSide:
    """An opened ONNX Runtime session as the target side."""
    return RuntimeSide(
        prepared=prepared,
        hook_model=model,
        device=devices.Device("cpu"),
        dtype=session.verdict_dtype,
        mode=f"onnxruntime {session.provider}",
        where=str(device),
        runtime=session.info() | info,
    )


def runtime_target(
    args: RuntimeArgs,
    loaded: models.LoadedModel,
    example: torch.Tensor,
    default_index: int = 0,
    device: devices.Device | None = None,
) -> targets.Side:
    """accuracy_run's target for --runtime NAME (Runtime.target): `device` is the torch device the run resolved (the
    torch runtime builds its mode there; an offline runtime runs on its own device, the host CPU feeding it)."""
    return implementation(args.runtime).target(args, loaded, example, device or devices.Device("cpu"), default_index)


def torch_device_spec(runtime: str, spec: str) -> str:
    """The --device the torch side of a run resolves: the flag for the torch runtime, the host CPU for an offline
    runtime (it has its own device)."""
    return spec if runtime_registry.entry(runtime).modes else "cpu"


# ----------------------------------------------------------------------------------------------- the benchmark


@dataclass
class BenchRuntime:
    """accuracy_run_perf's --runtime: the runners to time beside (or instead of) the torch modes, and what goes in the
    report about it (`info`: once the runners have run, finish() puts the runtime's `facts` there with its device,
    the weights check and what its timing measures)."""

    name: str
    device: Optional[devices.Device] = None
    runners: dict[str, bench.Builder] = field(default_factory=dict)
    weights: Optional[str] = None
    timing: str = ""
    facts: Optional[Callable[[list[dict[str, Any]], int], Optional[dict[str, Any]]]] = None  # None: nothing opened
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.info = self.info or {"name": self.name}

    @property
    def torch_modes(self) -> bool:
        """Time the torch modes too: only beside a runtime on the CPU, where both share the device."""
        return self.device is None or self.device.type == "cpu"

    def finish(self, results: list[dict[str, Any]], iterations: int) -> None:
        facts = self.facts(results, iterations) if self.facts is not None else None
        if facts:
            self.info = {**facts, "device": str(self.device), "weights": self.weights, "timing": self.timing}


@contextlib.contextmanager
def bench_runtime(args: RuntimeArgs, loaded: models.LoadedModel):
    """The BenchRuntime of --runtime NAME (Runtime.bench), with a temporary folder for on-the-fly exports, removed
    afterwards."""
    runtime = implementation(args.runtime)
    if not runtime.needs_workdir:
        yield runtime.bench(args, loaded, None)
        return
    with workdir() as tmp:
        yield runtime.bench(args, loaded, Path(tmp))


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="mobilevit_onnx_")


# ---------------------------------------------------------------------------------------- the one interface


class Runtime:
    """What every runtime of the registry implements (mobilevit_npu.runtime_registry names the object): accuracy
    (target), benchmark (bench) and the peers (peer) all go through it. A method a runtime does not support says so
    in one line."""

    name = ""
    needs_workdir = True  # bench() gets a temporary folder for on-the-fly exports

    def device(self, spec: str, default_index: int = 0) -> devices.Device:
        """Where it runs for --device `spec`."""
        raise UserError(f"--runtime {self.name} has no device of its own")

    def verdict_dtype(self, args: RuntimeArgs, default_index: int = 0) -> str:
        """The dtype whose thresholds judge it, before anything is loaded."""
        return "fp32"

    def target(
        self,
        args: RuntimeArgs,
        loaded: models.LoadedModel,
        example: torch.Tensor,
        device: devices.Device,
        default_index: int = 0,
    ) -> targets.Side:
        """accuracy_run.py's target side, built for batches shaped like `example`."""
        raise UserError(f"--runtime {self.name} cannot be verified by accuracy_run.py")

    def bench(self, args: RuntimeArgs, loaded: models.LoadedModel, tmp: Optional[Path]) -> BenchRuntime:
        """accuracy_run_perf.py's runners (`tmp`: a temporary folder for exports)."""
        raise UserError(f"--runtime {self.name} cannot be benchmarked by accuracy_run_perf.py")

    def peer(self, workdir: Path) -> bench.Builder:
        """benchmarks/bench_peers.py's builder: CPU, float32, the model exported at each batch's static shape."""
        raise UserError(f"{self.name} is not a peer of benchmarks/bench_peers.py")


class TorchRuntime(Runtime):
    """The model itself, in an execution mode on the torch device (targets.prepare_target; the benchmark's modes)."""

    name = "torch"
    needs_workdir = False

    def target(self, args, loaded, example, device, default_index=0) -> targets.Side:
        # weights_dtype: verify.Settings' (the execution mode's weights dtype: float32 under bf16 autocast)
        weights = getattr(args, "weights_dtype", args.dtype)
        return targets.prepare_target(loaded.model, device, weights, args.target_mode, example, layers=args.layers)

    def bench(self, args, loaded, tmp) -> BenchRuntime:
        return BenchRuntime("torch")  # no runner of its own: the torch modes are the benchmark's


class OnnxFileRuntime(Runtime):
    """A runtime that runs the ONNX file: as a peer, the model exported at the batch's static shape and opened on the
    CPU by open_cpu."""

    def open_cpu(self, path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        """A function running the ONNX file on the CPU in float32 on `threads` threads: NCHW float32 in, logits out."""
        raise NotImplementedError

    def device(self, spec: str, default_index: int = 0) -> devices.Device:
        kind, index = _parse_device(self.name, spec)
        if kind not in ("auto", "cpu"):
            raise UserError(f"--runtime {self.name} runs on the CPU only, not {spec}")
        return devices.Device("cpu")

    def peer(self, workdir: Path) -> bench.Builder:
        name, package = self.name, runtime_registry.entry(self.name, offered=False).package or self.name

        def build(model: torch.nn.Module, device: devices.Device, dtype: str, batch: torch.Tensor):
            if device.type != "cpu" or dtype != "fp32":
                raise Unavailable(f"{name} is benchmarked on the CPU in fp32 only")
            exported = onnx_export.export_onnx(  # the same export as export_onnx.py, at the batch's static shape
                model,
                Path(workdir) / f"mobilevit_b{batch.shape[0]}.onnx",
                batch_size=int(batch.shape[0]),
                image_size=(int(batch.shape[2]), int(batch.shape[3])),
            )
            run = self.open_cpu(exported.path, torch.get_num_threads())
            version = importlib.import_module(package).__version__
            return execution.Prepared(
                call=lambda feed: torch.from_numpy(np.asarray(run(feed))),
                to_input=lambda x: x.to(torch.float32).contiguous().numpy(),
                notes=[f"{name} {version}, ONNX opset {exported.opset} ({exported.exporter} exporter), fp32"],
            )

        return build


class OnnxRuntimeRuntime(OnnxFileRuntime):
    """ONNX Runtime on the ONNX file (--onnx, or exported now), on the CPU, CUDA or CANN execution provider: every
    session opened by runtime_ort.open_session (the one place, fallback refused)."""

    name = "onnxruntime"

    def open_cpu(self, path: Path, threads: int):
        return runtime_ort.open_session(path, devices.Device("cpu"), threads=threads).run

    def device(self, spec: str, default_index: int = 0) -> devices.Device:
        """auto = the best provider onnxruntime has (npu, cuda, cpu)."""
        kind, index = _parse_device(self.name, spec)
        if kind == "auto":
            available = runtime_ort._ort().get_available_providers()
            kind = next((k for k in ("npu", "cuda") if runtime_ort.PROVIDERS[k] in available), "cpu")
        return _device(kind, index, default_index)

    def verdict_dtype(self, args, default_index=0) -> str:
        """fp32 on the CPU and CUDA providers; on CANN the one --precision_mode calls for."""
        if self.device(args.device, default_index).type == "npu":
            return onnx_export.verdict_dtype(args.precision_mode or onnx_export.DEFAULT_PRECISION_MODE)
        return "fp32"

    def target(self, args, loaded, example, device, default_index=0) -> targets.Side:
        """The ONNX file (given, or exported now with a dynamic batch into a temporary folder, gone once the session
        has read it) after its export JSON's weights are checked against the model. Its dtype is the verdict dtype
        its precision mode calls for."""
        where = self.device(args.device, default_index)
        weights = check_weights(args.onnx, loaded, args.allow_foreign_weights) if args.onnx else None
        sessions: list[runtime_ort.OrtSession] = []
        try:
            with workdir() as tmp:
                build = runtime_ort.onnxruntime_builder(
                    where,
                    Path(tmp),
                    args.onnx,
                    args.precision_mode,
                    args.cann_graph == "1",
                    dynamic_batch=True,
                    sessions=sessions,
                )
                prepared = build(loaded.model, devices.Device("cpu"), "fp32", example)
        except Unavailable as exc:  # e.g. a static-batch file for another batch: one line, exit 2
            raise UserError(str(exc)) from exc
        info = {"model": str(args.onnx) if args.onnx else "exported now (dynamic batch)", "weights": weights}
        return ort_side(sessions[0], prepared, where, loaded.model, info)

    def bench(self, args, loaded, tmp) -> BenchRuntime:
        where = self.device(args.device, local_rank())
        weights = check_weights(args.onnx, loaded, args.allow_foreign_weights) if args.onnx else None
        sessions: list[runtime_ort.OrtSession] = []
        runner = runtime_ort.onnxruntime_builder(
            where, tmp, args.onnx, args.precision_mode, args.cann_graph == "1", sessions=sessions
        )

        return BenchRuntime(
            self.name,
            where,
            {self.name: runner},
            weights,
            "end to end of InferenceSession.run (onnxruntime does not report compute apart)",
            lambda results, iterations: sessions[0].info() if sessions else None,
        )


class OmRuntime(Runtime):
    """An ATC .om through ais_bench's InferSession on an Ascend NPU (runtime_om.OmRunner)."""

    name = "om"
    needs_workdir = False

    def device(self, spec: str, default_index: int = 0) -> devices.Device:
        """Always the NPU: an .om runs on nothing else."""
        kind, index = _parse_device(self.name, spec)
        if kind not in ("auto", "npu"):
            raise UserError(f"an .om runs on an Ascend NPU: --device npu[:N], not {spec}")
        return _device("npu", index, default_index)

    def verdict_dtype(self, args, default_index=0) -> str:
        """The dtype the precision ATC compiled it with calls for."""
        return onnx_export.verdict_dtype(om_precision_mode(args.om, args.precision_mode)[0])

    def _runner(self, args, loaded, where: devices.Device) -> runtime_om.OmRunner:
        mode, source = om_precision_mode(args.om, args.precision_mode)
        return runtime_om.OmRunner(args.om, where, loaded.preprocess, mode, source)

    def target(self, args, loaded, example, device, default_index=0) -> targets.Side:
        """The .om after its export JSON's weights are checked against the model, judged with the verdict dtype of
        the precision ATC compiled it with."""
        where = self.device(args.device, default_index)
        host = devices.Device("cpu")
        weights = check_weights(args.om, loaded, args.allow_foreign_weights)
        runner = self._runner(args, loaded, where)
        try:
            prepared = runner(loaded.model, host, "fp32", example)
        except Unavailable as exc:
            raise UserError(str(exc)) from exc
        return RuntimeSide(
            prepared=prepared,
            hook_model=loaded.model,
            device=host,
            dtype=runner.verdict_dtype,
            mode="om ais_bench",
            where=str(where),
            runtime=runner.info() | {"weights": weights},
        )

    def bench(self, args, loaded, tmp) -> BenchRuntime:
        where = self.device(args.device, local_rank())
        weights = check_weights(args.om, loaded, args.allow_foreign_weights)
        runner = self._runner(args, loaded, where)

        def facts(results, iterations):
            if not runner.opened:
                return None
            runtime_om.attach_compute_times(results, runner, self.name, iterations)
            return runner.info()

        timing = "latency_ms end to end of InferSession.infer; compute_ms the NPU alone"
        return BenchRuntime(self.name, where, {self.name: runner}, weights, timing, facts)


class OpenVinoRuntime(OnnxFileRuntime):
    """OpenVINO, a peer of benchmarks/bench_peers.py: the ONNX file compiled for the CPU with
    INFERENCE_PRECISION_HINT=f32 (its default on CPUs with bfloat16 is bf16, which is not exact), the LATENCY hint
    and as many inference threads as torch uses."""

    name = "openvino"

    def open_cpu(self, path: Path, threads: int):
        ov = importlib.import_module("openvino")
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
        return lambda feed: request.infer({"pixel_values": feed})[0]


# The registry's implementations (runtime_registry names them "mobilevit_npu.runtimes:NAME").
TORCH = TorchRuntime()
ONNXRUNTIME = OnnxRuntimeRuntime()
OM = OmRuntime()
OPENVINO = OpenVinoRuntime()
