"""Offline runtimes as targets: ONNX Runtime (CPU, CUDA or CANN execution provider) on an ONNX file
(mobilevit_npu.runtime_ort), and an ATC .om through ais_bench's InferSession (mobilevit_npu.runtime_om). This module
keeps what they share: the --runtime flags and their checks, where a runtime runs, export_onnx.py's JSON beside the
artefact (the precision ATC was given, the weights it was exported from), and the dispatch to the accuracy target
(runtime_target) and the benchmark's runners (bench_runtime). Each runner is a bench.Builder returning an
execution.Prepared, so accuracy_run wraps it as the target side and the benchmark times it beside the torch modes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from mobilevit_npu import bench, devices, models, onnx_export, reports, runtime_om, runtime_ort, targets
from mobilevit_npu.distributed import local_rank
from mobilevit_npu.errors import Unavailable, UserError

logger = logging.getLogger("mobilevit_npu.runtimes")

RUNTIMES = ("torch", "onnxruntime", "om")
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


def add_runtime_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--runtime and its artefacts and precision, the same in accuracy_run.py and accuracy_run_perf.py."""
    group = parser.add_argument_group("offline runtime (docs/offline.md)")
    group.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="what runs the target: torch (the model itself); onnxruntime (the ONNX file: CPUExecutionProvider on "
        "--device cpu, CUDAExecutionProvider on cuda, CANNExecutionProvider on npu; a provider that is absent or "
        "fails is an error, never a CPU run); om (an ATC .om through ais_bench's InferSession on --device npu[:N])",
    )
    group.add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="--runtime onnxruntime: this file (default: exported now, into a temporary folder, dynamic batch)",
    )
    group.add_argument("--om", metavar="FILE.om", help="--runtime om: the ATC model to run (required)")
    group.add_argument(
        "--precision_mode",
        "--precision-mode",
        choices=sorted(onnx_export.PRECISION_MODES),
        default=None,
        help="CANN precision: passed to the CANN execution provider; for --om, the mode ATC was given (default: "
        "the one in the export's FILE.json beside it). Default must_keep_origin_dtype keeps fp32; a mode that lowers "
        "operators is judged with that dtype's thresholds (fp16 or bf16)",
    )
    group.add_argument(
        "--cann_graph",
        "--cann-graph",
        choices=("0", "1"),
        default="1",
        help="CANN execution provider enable_cann_graph: 1 runs the whole graph through CANN's graph engine, 0 "
        "operator by operator",
    )
    group.add_argument(
        "--allow_foreign_weights",
        "--allow-foreign-weights",
        action="store_true",
        help="run an --onnx / --om whose export JSON names other weights than the model loaded (refused otherwise: "
        "its verdict would judge other weights against this model)",
    )
    return group


def check_runtime_args(settings: RuntimeArgs) -> None:
    """Usage errors before any model is loaded."""
    runtime, onnx, om = settings.runtime, settings.onnx, settings.om
    if runtime != "torch":
        if settings.target_mode != "eager":
            raise UserError(f"--target_mode goes with --runtime torch; --runtime {runtime} runs its own graph")
        if settings.layers:
            raise UserError(f"--layers needs the torch modules; --runtime {runtime} has none to hook")
    if runtime == "torch":
        for flag, value in (("onnx", onnx), ("om", om)):
            if value:
                raise UserError(f"--{flag} goes with --runtime {'onnxruntime' if flag == 'onnx' else 'om'}")
        if settings.precision_mode:
            raise UserError("--precision_mode goes with --runtime onnxruntime (CANN) or om")
        if settings.allow_foreign_weights:
            raise UserError("--allow_foreign_weights goes with --runtime onnxruntime --onnx FILE or --runtime om")
        return
    if settings.dtype != "fp32":
        raise UserError(
            f"--runtime {runtime} runs the float32 ONNX/.om: its precision is --precision_mode, not --dtype"
        )
    if runtime == "onnxruntime" and om:
        raise UserError("--om goes with --runtime om")
    if runtime == "om":
        if onnx:
            raise UserError("--onnx goes with --runtime onnxruntime")
        if not om:
            raise UserError("--runtime om needs --om FILE.om (make one with export_onnx.py's ATC command)")
        if not Path(om).is_file():
            raise UserError(f"--om {om} is not a file")
    if runtime == "onnxruntime" and onnx and not Path(onnx).is_file():
        raise UserError(f"--onnx {onnx} is not a file")


def runtime_device(runtime: str, spec: str, default_index: int = 0) -> devices.Device:
    """Where an offline runtime runs, without importing torch_npu (the runtimes bring their own CANN bindings):
    auto = the best provider onnxruntime has (npu, cuda, cpu); om is always npu."""
    match = _DEVICE_RE.match(spec.strip().lower())
    if not match:
        raise UserError(f"--runtime {runtime} runs on cpu, cuda[:N] or npu[:N], not {spec!r}")
    kind, index = match.group(1), match.group(2)
    if runtime == "om":
        if kind not in ("auto", "npu"):
            raise UserError(f"an .om runs on an Ascend NPU: --device npu[:N], not {spec}")
        kind = "npu"
    elif kind == "auto":
        available = runtime_ort._ort().get_available_providers()
        kind = next((k for k in ("npu", "cuda") if runtime_ort.PROVIDERS[k] in available), "cpu")
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
    for flag in ("onnx", "om"):
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
    """The dtype whose thresholds will judge --runtime onnxruntime|om, known before anything is loaded: fp32 on the CPU
    and CUDA providers; on CANN (provider or .om) the one --precision_mode calls for."""
    if args.runtime == "om":
        return onnx_export.verdict_dtype(om_precision_mode(args.om, args.precision_mode)[0])
    device = runtime_device(args.runtime, args.device, default_index)
    if device.type == "npu":
        return onnx_export.verdict_dtype(args.precision_mode or onnx_export.DEFAULT_PRECISION_MODE)
    return "fp32"


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
    args: RuntimeArgs, loaded: models.LoadedModel, example: torch.Tensor, default_index: int = 0
) -> RuntimeSide:
    """accuracy_run's target for --runtime onnxruntime|om: the ONNX file (given, or exported now with a dynamic batch
    into a temporary folder, gone once the session has read it) or the .om, on the runtime's device, after its export
    JSON's weights are checked against the model. Its dtype is the verdict dtype its precision mode calls for."""
    device = runtime_device(args.runtime, args.device, default_index)
    host = devices.Device("cpu")
    artefact = args.onnx if args.runtime == "onnxruntime" else args.om
    weights = check_weights(artefact, loaded, args.allow_foreign_weights) if artefact else None
    try:
        if args.runtime == "onnxruntime":
            sessions: list[runtime_ort.OrtSession] = []
            with workdir() as tmp:
                build = runtime_ort.onnxruntime_builder(
                    device,
                    Path(tmp),
                    args.onnx,
                    args.precision_mode,
                    args.cann_graph == "1",
                    dynamic_batch=True,
                    sessions=sessions,
                )
                prepared = build(loaded.model, host, "fp32", example)
            info = {"model": str(args.onnx) if args.onnx else "exported now (dynamic batch)", "weights": weights}
            return ort_side(sessions[0], prepared, device, loaded.model, info)
        mode, source = om_precision_mode(args.om, args.precision_mode)
        runner = runtime_om.OmRunner(args.om, device, loaded.preprocess, mode, source)
        prepared = runner(loaded.model, host, "fp32", example)
    except Unavailable as exc:  # e.g. a static-batch file for another batch: one line, exit 2
        raise UserError(str(exc)) from exc
    return RuntimeSide(
        prepared=prepared,
        hook_model=loaded.model,
        device=host,
        dtype=runner.verdict_dtype,
        mode="om ais_bench",
        where=str(device),
        runtime=runner.info() | {"weights": weights},
    )


class BenchRuntime:
    """accuracy_run_perf's --runtime: the runner to time beside (or instead of) the torch modes, and what goes in the
    report about it."""

    def __init__(self, args: RuntimeArgs, loaded: models.LoadedModel, tmp: Path | None):
        self.name = args.runtime
        self.runners: dict[str, bench.Builder] = {}
        self.info: dict[str, Any] = {"name": "torch"}
        self.device: devices.Device | None = None
        self._om: runtime_om.OmRunner | None = None
        self._sessions: list[runtime_ort.OrtSession] = []
        self._weights: str | None = None
        if self.name == "torch":
            return
        self.device = runtime_device(self.name, args.device, local_rank())
        artefact = args.onnx if self.name == "onnxruntime" else args.om
        if artefact:
            self._weights = check_weights(artefact, loaded, args.allow_foreign_weights)
        if self.name == "onnxruntime":
            self.runners["onnxruntime"] = runtime_ort.onnxruntime_builder(
                self.device, tmp, args.onnx, args.precision_mode, args.cann_graph == "1", sessions=self._sessions
            )
        else:
            mode, source = om_precision_mode(args.om, args.precision_mode)
            self._om = runtime_om.OmRunner(args.om, self.device, loaded.preprocess, mode, source)
            self.runners["om"] = self._om

    @property
    def torch_modes(self) -> bool:
        """Time the torch modes too: only beside a runtime on the CPU, where both share the device."""
        return self.device is None or self.device.type == "cpu"

    def finish(self, results: list[dict[str, Any]], iterations: int) -> None:
        if self.name == "onnxruntime" and self._sessions:
            self.info = {
                **self._sessions[0].info(),
                "device": str(self.device),
                "weights": self._weights,
                "timing": "end to end of InferenceSession.run (onnxruntime does not report compute apart)",
            }
        elif self._om is not None and self._om.opened:
            runtime_om.attach_compute_times(results, self._om, "om", iterations)
            self.info = {
                **self._om.info(),
                "device": str(self.device),
                "weights": self._weights,
                "timing": "latency_ms end to end of InferSession.infer; compute_ms the NPU alone",
            }


@contextlib.contextmanager
def bench_runtime(args: RuntimeArgs, loaded: models.LoadedModel):
    """A BenchRuntime with a temporary folder for on-the-fly exports, removed afterwards."""
    if args.runtime == "torch":
        yield BenchRuntime(args, loaded, None)
        return
    with workdir() as tmp:
        yield BenchRuntime(args, loaded, Path(tmp))


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="mobilevit_onnx_")
