"""Offline runtimes as targets: ONNX Runtime (CPU, CUDA or CANN execution provider) on an ONNX file, and an ATC .om
through ais_bench's InferSession. Each is a bench.Builder returning an execution.Prepared, so accuracy_run wraps it as
the target side and the benchmark times it beside the torch modes (bench.run_benchmark(..., runners=...)).

Real APIs these calls follow (read from their sources, not run here):
  onnxruntime: InferenceSession(path, sess_options, providers=[(name, {option: str})]); get_available_providers();
    session.get_providers() lists the providers the session really has. Asked for a provider it lacks, onnxruntime
    only warns and runs on the CPU, hence the explicit check here. CANN provider options: device_id,
    enable_cann_graph, precision_mode (onnxruntime-cann 1.22/1.24 wheels; upstream main renamed it
    precision_mode_v2, microsoft/onnxruntime core/providers/cann/cann_execution_provider_info.cc), parsed strictly:
    an unknown option is 'Unknown provider option: "NAME"' (core/framework/provider_options_utils.h).
  ais_bench: `from ais_bench.infer.interface import InferSession`; InferSession(device_id, model_path);
    .get_inputs() -> descs with .name, .shape, .datatype; .infer(feeds, mode="static"|"dymbatch", ...) -> [ndarray];
    .summary().exec_time_list -> [(start_ms, end_ms)] per run, the NPU compute time without host copies
    (msit docs/benchmark/API_GUIDE.md; ais_bench infer/interface.py; its __main__ computes end - start).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilevit_npu import bench, devices, execution, models, onnx_export, preprocessing, targets
from mobilevit_npu.errors import Unavailable, UserError, first_line

logger = logging.getLogger("mobilevit_npu.runtimes")

RUNTIMES = ("torch", "onnxruntime", "om")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "npu": "CANNExecutionProvider"}
INSTALL_HINT = {
    "CUDAExecutionProvider": "pip install onnxruntime-gpu (instead of onnxruntime)",
    "CANNExecutionProvider": "pip install onnxruntime-cann (instead of onnxruntime) and source CANN's set_env.sh",
}
AIS_BENCH_INSTALL = ("ais_bench is not installed (the om runtime needs it): pip install the aclruntime and ais_bench "
                     "wheels from https://gitee.com/ascend/tools/tree/master/ais-bench_workload/tool/ais_bench, then "
                     "source /usr/local/Ascend/ascend-toolkit/set_env.sh")  # fmt: skip
# precision_mode (onnxruntime-cann <= 1.24, ATC) -> precision_mode_v2 (onnxruntime main), for builds that renamed it
PRECISION_MODE_V2 = {
    "must_keep_origin_dtype": "origin",
    "force_fp16": "fp16",
    "force_fp32": "cube_fp16in_fp32out",
    "cube_fp16in_fp32out": "cube_fp16in_fp32out",
    "allow_mix_precision": "mixed_float16",
    "allow_mix_precision_fp16": "mixed_float16",
    "allow_mix_precision_bf16": "mixed_bfloat16",
}
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|npu)(?::(\d+))?$")


def add_runtime_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--runtime and its artefacts and precision, the same in accuracy_run.py and accuracy_run_perf.py."""
    group = parser.add_argument_group("offline runtime (readme: the offline route)")
    group.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="what runs the target: torch (the model itself); onnxruntime (the ONNX file: CPUExecutionProvider on "
        "--device cpu, CUDAExecutionProvider on cuda, CANNExecutionProvider on npu; a provider that is absent is an "
        "error, never a CPU run); om (an ATC .om through ais_bench's InferSession on --device npu[:N])",
    )
    group.add_argument("--onnx", metavar="FILE.onnx", help="--runtime onnxruntime: this file (default: exported now, "
                       "into a temporary folder, dynamic batch)")  # fmt: skip
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
    return group


def check_runtime_args(args: argparse.Namespace) -> None:
    """Usage errors before any model is loaded."""
    runtime = getattr(args, "runtime", "torch")
    if runtime != "torch":
        if getattr(args, "target_mode", "eager") != "eager":
            raise UserError(f"--target_mode goes with --runtime torch; --runtime {runtime} runs its own graph")
        if getattr(args, "layers", False):
            raise UserError(f"--layers needs the torch modules; --runtime {runtime} has none to hook")
    if runtime == "torch":
        for flag in ("onnx", "om"):
            if getattr(args, flag, None):
                raise UserError(f"--{flag} goes with --runtime {'onnxruntime' if flag == 'onnx' else 'om'}")
        if getattr(args, "precision_mode", None):
            raise UserError("--precision_mode goes with --runtime onnxruntime (CANN) or om")
        return
    if getattr(args, "dtype", "fp32") != "fp32":
        raise UserError(f"--runtime {runtime} runs the float32 ONNX/.om: its precision is --precision_mode, not "
                        "--dtype")
    if runtime == "onnxruntime" and args.om:
        raise UserError("--om goes with --runtime om")
    if runtime == "om":
        if args.onnx:
            raise UserError("--onnx goes with --runtime onnxruntime")
        if not args.om:
            raise UserError("--runtime om needs --om FILE.om (make one with export_onnx.py's ATC command)")
        if not Path(args.om).is_file():
            raise UserError(f"--om {args.om} is not a file")
    if runtime == "onnxruntime" and args.onnx and not Path(args.onnx).is_file():
        raise UserError(f"--onnx {args.onnx} is not a file")


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
        available = _ort().get_available_providers()
        kind = next((k for k in ("npu", "cuda") if PROVIDERS[k] in available), "cpu")
    if kind == "cpu":
        return devices.Device("cpu")
    return devices.Device(kind, int(index) if index is not None else default_index)


def _ort():
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise UserError("onnxruntime is not installed: pip install onnxruntime (onnxruntime-gpu for cuda, "
                        "onnxruntime-cann for npu)") from exc  # fmt: skip


# ------------------------------------------------------------------------------------------------------ onnxruntime


@dataclass
class OrtSession:
    run: Callable[[np.ndarray], np.ndarray]
    provider: str
    provider_options: dict[str, str]
    providers_used: list[str]
    precision_mode: str | None
    verdict_dtype: str
    version: str
    notes: list[str] = field(default_factory=list)
    input_shape: list[Any] = field(default_factory=list)  # a dynamic dimension as its name (a str)

    def info(self) -> dict[str, Any]:
        return {"name": "onnxruntime", "version": self.version, "provider": self.provider,
                "provider_options": self.provider_options, "providers_used": self.providers_used,
                "precision_mode": self.precision_mode, "verdict_dtype": self.verdict_dtype}  # fmt: skip


def provider_options(device: devices.Device, precision_mode: str, cann_graph: bool) -> tuple[str, dict[str, str]]:
    """The execution provider for the device and the options that matter, as the strings onnxruntime parses."""
    provider = PROVIDERS[device.type]
    if device.type == "npu":
        return provider, {"device_id": str(device.index or 0), "precision_mode": precision_mode,
                          "enable_cann_graph": "1" if cann_graph else "0"}  # fmt: skip
    if device.type == "cuda":
        return provider, {"device_id": str(device.index or 0)}
    return provider, {}


def open_onnxruntime(
    path: str | Path,
    device: devices.Device,
    precision_mode: str | None = None,
    cann_graph: bool = True,
    threads: int | None = None,
) -> OrtSession:
    """An ONNX Runtime session on the device's provider, or UserError when that provider is not in this build (never a
    silent CPU run); the session's own providers are recorded."""
    ort = _ort()
    provider, options = provider_options(device, precision_mode or onnx_export.DEFAULT_PRECISION_MODE, cann_graph)
    available = ort.get_available_providers()
    if provider not in available:
        hint = INSTALL_HINT.get(provider, "")
        raise UserError(f"{provider} is not in this onnxruntime build (it has {', '.join(available)}) so --device "
                        f"{device} cannot run it{': ' + hint if hint else ''}")  # fmt: skip
    sess_options = ort.SessionOptions()
    sess_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        sess_options.intra_op_num_threads = threads
        sess_options.inter_op_num_threads = 1
        # its workers otherwise busy-spin ~25 ms after each call and steal the CPU from whatever runs next
        sess_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    notes = []
    chain = [(provider, options)] + ([] if provider == "CPUExecutionProvider" else ["CPUExecutionProvider"])
    try:
        session = ort.InferenceSession(str(path), sess_options, providers=chain)
    except Exception as exc:
        message = first_line(exc)
        if provider == "CANNExecutionProvider" and 'Unknown provider option: "precision_mode"' in message:
            # a build from after the rename: the same mode under its new name
            v2 = PRECISION_MODE_V2.get(options["precision_mode"])
            if v2 is None:
                raise UserError(f"this onnxruntime-cann takes precision_mode_v2, which has no equivalent of "
                                f"{options['precision_mode']}") from exc  # fmt: skip
            options = {k: v for k, v in options.items() if k != "precision_mode"} | {"precision_mode_v2": v2}
            notes.append(f"this onnxruntime-cann names it precision_mode_v2: {v2}")
            try:
                session = ort.InferenceSession(str(path), sess_options, providers=[(provider, options),
                                                                                   "CPUExecutionProvider"])
            except Exception as exc2:
                raise UserError(f"onnxruntime could not open {path} on {provider}: {first_line(exc2)}") from exc2
        else:
            raise UserError(f"onnxruntime could not open {path} on {provider}: {message}") from exc
    used = list(session.get_providers())
    if not used or used[0] != provider:
        raise UserError(f"onnxruntime gave the session {used} instead of {provider}: refusing a silent CPU run")
    if provider == "CANNExecutionProvider":
        mode = precision_mode or onnx_export.DEFAULT_PRECISION_MODE
    else:
        mode = None
        if precision_mode:
            notes.append(f"--precision_mode {precision_mode} ignored: only the CANN execution provider takes it")
        if provider == "CUDAExecutionProvider":
            notes.append("CUDA execution provider: TF32 as onnxruntime's use_tf32 default (on Ampere and newer)")
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def run(feed: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: feed})[0]

    return OrtSession(run, provider, options, used, mode, onnx_export.verdict_dtype(mode) if mode else "fp32",
                      ort.__version__, notes, list(session.get_inputs()[0].shape))  # fmt: skip


def onnxruntime_builder(
    device: devices.Device,
    workdir: Path,
    onnx_path: str | Path | None = None,
    precision_mode: str | None = None,
    cann_graph: bool = True,
    opset: int = onnx_export.DEFAULT_OPSET,
    dynamic_batch: bool = False,
    sessions: list[OrtSession] | None = None,
) -> bench.Builder:
    """A bench.Builder: the given ONNX file, or the model exported into `workdir` at the batch's shape (or with a
    dynamic batch), opened on the device's provider. The torch `device` the builder is called with is ignored: the
    runtime's own device is `device`. Opened sessions are appended to `sessions` (their providers go in reports)."""

    def build(model: torch.nn.Module, _torch_device: devices.Device, dtype: str, batch: torch.Tensor):
        if dtype != "fp32":
            raise Unavailable("the ONNX file is float32: its precision on CANN is --precision_mode")
        notes = []
        path = onnx_path
        if path is None:
            size = (batch.shape[2], batch.shape[3])
            name = "mobilevit_dynamic.onnx" if dynamic_batch else f"mobilevit_b{batch.shape[0]}.onnx"
            target = Path(workdir) / name
            if not target.exists():
                exported = onnx_export.export_onnx(model, target, opset=opset, batch_size=int(batch.shape[0]),
                                                   dynamic_batch=dynamic_batch, image_size=size)  # fmt: skip
                logger.info("exported %s: %s", target.name, exported.summary())
                notes.append(f"exported here: {exported.summary()}")
            path = target
        threads = torch.get_num_threads() if device.type == "cpu" else None
        session = open_onnxruntime(path, device, precision_mode, cann_graph, threads)
        fixed = session.input_shape[0] if session.input_shape else None
        if isinstance(fixed, int) and fixed > 0 and fixed != batch.shape[0]:
            raise Unavailable(f"{path} takes batch {fixed} only (export it with --dynamic_batch for others)")
        if sessions is not None:
            sessions.append(session)
        mode = f", precision_mode {session.precision_mode}" if session.precision_mode else ""
        notes = [f"onnxruntime {session.version} {session.provider} on {device}{mode}; session providers "
                 f"{session.providers_used}"] + notes + session.notes  # fmt: skip
        return execution.Prepared(
            call=lambda feed: torch.from_numpy(np.asarray(session.run(feed), dtype=np.float32)),
            to_input=lambda x: x.to(torch.float32).contiguous().numpy(),
            notes=notes,
        )

    return build


# --------------------------------------------------------------------------------------------------------------- om


def import_infer_session():
    """ais_bench's InferSession, or UserError saying how to install it."""
    try:
        return importlib.import_module("ais_bench.infer.interface").InferSession
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "ais_bench":
            raise UserError(AIS_BENCH_INSTALL) from exc
        why = f"{type(exc).__name__}: {first_line(exc)}"  # aclruntime missing
        raise UserError(f"ais_bench failed to import ({why}); {AIS_BENCH_INSTALL}") from exc
    except Exception as exc:  # CANN not sourced
        why = f"{type(exc).__name__}: {first_line(exc)}"
        raise UserError(f"ais_bench failed to import ({why}); {AIS_BENCH_INSTALL}") from exc


def sidecar(path: str | Path) -> dict[str, Any]:
    """export_onnx.py's JSON beside an .onnx/.om of the same stem ({} when absent or unreadable)."""
    candidate = Path(path).with_suffix(".json")
    try:
        return json.loads(candidate.read_text(encoding="utf-8")) if candidate.is_file() else {}
    except (OSError, ValueError):
        return {}


def om_precision_mode(om_path: str | Path, flag: str | None) -> tuple[str, str]:
    """(mode, source) ATC compiled the .om with: the flag, else the export's JSON beside it, else the default
    (assumed, and said so)."""
    if flag:
        return flag, "--precision_mode"
    mode = (sidecar(om_path).get("atc") or {}).get("precision_mode")
    if mode in onnx_export.PRECISION_MODES:
        return mode, f"{Path(om_path).with_suffix('.json')}"
    return onnx_export.DEFAULT_PRECISION_MODE, "assumed (no --precision_mode, no export JSON beside the .om)"


class OmRunner:
    """A bench.Builder for an .om: one InferSession, fed whole batches (split or padded to the .om's own batch when it
    is static), with the NPU compute time of every call kept apart (ais_bench's summary excludes the host copies)."""

    def __init__(self, om_path: str | Path, device: devices.Device, cfg: preprocessing.PreprocessConfig,
                 precision_mode: str | None = None):  # fmt: skip
        self.om_path = Path(om_path)
        self.device = device
        self.cfg = cfg
        self.precision_mode, self.precision_source = om_precision_mode(om_path, precision_mode)
        self.compute_ms: list[list[float]] = []  # one list per Prepared built (one per batch size benchmarked)
        self._session = None
        self._summary_seen = 0

    @property
    def verdict_dtype(self) -> str:
        return onnx_export.verdict_dtype(self.precision_mode)

    def session(self):
        if self._session is None:
            InferSession = import_infer_session()
            try:
                self._session = InferSession(self.device.index or 0, str(self.om_path))
            except Exception as exc:
                raise UserError(f"ais_bench could not load {self.om_path} on {self.device}: {first_line(exc)}") from exc
            desc = self._session.get_inputs()[0]
            self.input_name = desc.name
            self.input_shape = [int(d) for d in desc.shape]
            self.input_dtype = getattr(desc.datatype, "name", str(desc.datatype)).lower()
            # AIPP: uint8 NHWC in (atlasatc_16_0025 restriction 9); else the model's float NCHW
            self.aipp = "uint8" in self.input_dtype or (len(self.input_shape) == 4 and self.input_shape[-1] == 3)
        return self._session

    def info(self) -> dict[str, Any]:
        self.session()
        return {"name": "om", "runner": "ais_bench InferSession", "model": str(self.om_path),
                "device_id": self.device.index or 0, "input": {"name": self.input_name, "shape": self.input_shape,
                "dtype": self.input_dtype}, "aipp": self.aipp, "precision_mode": self.precision_mode,
                "precision_mode_source": self.precision_source, "verdict_dtype": self.verdict_dtype}  # fmt: skip

    def _compute_ms_since(self) -> float | None:
        times = list(getattr(self._session.summary(), "exec_time_list", []) or [])
        new, self._summary_seen = times[self._summary_seen:], len(times)
        if not new:
            return None
        return float(sum(end - start for start, end in new))

    def _infer(self, feed: np.ndarray, sink: list[float]) -> np.ndarray:
        """One batch through the .om: a static .om gets chunks of its batch (the last padded), a dynamic-batch one
        (ATC --dynamic_batch_size, export_onnx.py's gears 1, 2, 4 ... 32) chunks of at most 32, each padded up to the
        next gear. Padding rows are dropped from the output."""
        session = self.session()
        fixed = self.input_shape[0] if self.input_shape and self.input_shape[0] > 0 else None
        mode = "static" if fixed else "dymbatch"
        step = fixed or onnx_export.DYNAMIC_BATCH_GEARS[-1]
        outputs, total = [], 0.0
        for start in range(0, len(feed), step):
            chunk = feed[start:start + step]
            rows = chunk.shape[0]
            size = fixed or next(g for g in onnx_export.DYNAMIC_BATCH_GEARS if g >= rows)
            if rows < size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - rows, axis=0)])
            out = session.infer([np.ascontiguousarray(chunk)], mode=mode)[0]
            outputs.append(np.asarray(out, dtype=np.float32).reshape(size, -1)[:rows])
            spent = self._compute_ms_since()
            total += spent if spent is not None else float("nan")
        sink.append(total)
        return np.concatenate(outputs)

    def to_input(self, x: torch.Tensor) -> np.ndarray:
        self.session()
        if self.aipp:
            return onnx_export.aipp_host_input(x, self.cfg)
        return x.to(torch.float32).contiguous().numpy()

    def __call__(self, model: torch.nn.Module, _torch_device: devices.Device, dtype: str, batch: torch.Tensor):
        if dtype != "fp32":
            raise Unavailable("an .om's precision is fixed by ATC's --precision_mode")
        self.session()
        self._summary_seen = len(list(getattr(self._session.summary(), "exec_time_list", []) or []))
        sink: list[float] = []
        self.compute_ms.append(sink)
        notes = [f"ais_bench InferSession on {self.device}: {self.om_path.name}, input {self.input_name} "
                 f"{self.input_shape} {self.input_dtype}{' (AIPP: uint8 RGB NHWC in)' if self.aipp else ''}; "
                 f"ATC precision_mode {self.precision_mode} ({self.precision_source})"]  # fmt: skip
        return execution.Prepared(
            call=lambda feed: torch.from_numpy(self._infer(feed, sink)), to_input=self.to_input, notes=notes
        )


def attach_compute_times(results: list[dict[str, Any]], runner: OmRunner, name: str, iterations: int) -> None:
    """Put the .om's NPU compute time (ais_bench's, host copies excluded) beside each of its timed results: the last
    `iterations` calls of each Prepared are the timed ones (agreement, warm-up and the memory call come first)."""
    from mobilevit_npu import timing

    rows = [r for r in results if r["mode"] == name and r["status"] == "ok"]
    for row, samples in zip(rows, runner.compute_ms):
        timed = samples[-iterations:]
        if timed and all(np.isfinite(timed)):
            row["compute_ms"] = {**timing.latency_stats(timed).__dict__, "samples_ms": timed,
                                 "what": "NPU compute only (ais_bench summary().exec_time_list), host copies "
                                 "excluded; latency_ms is end to end of InferSession.infer"}  # fmt: skip
        else:
            row["compute_ms"] = None


# ------------------------------------------------------------------------------------------------ accuracy targets


@dataclass
class RuntimeSide(targets.Side):
    """The target side for an offline runtime: `device` stays the host (the runtime brings its own device bindings,
    and torch is not synchronised for it); `where` names the runtime's device."""

    where: str = ""
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        what = self.runtime.get("provider") or self.runtime.get("runner") or self.mode
        mode = self.runtime.get("precision_mode")
        return f"{self.where} {self.mode} {what}" + (f" precision_mode={mode}" if mode else "")

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, on_hook_model: bool = False) -> torch.Tensor:
        return self.prepared.call(self.prepared.to_input(pixels)).detach().to("cpu", torch.float64)


def planned_verdict_dtype(args: argparse.Namespace, default_index: int = 0) -> str:
    """The dtype whose thresholds will judge --runtime onnxruntime|om, known before anything is loaded: fp32 on the CPU
    and CUDA providers; on CANN (provider or .om) the one --precision_mode calls for."""
    if args.runtime == "om":
        return onnx_export.verdict_dtype(om_precision_mode(args.om, args.precision_mode)[0])
    device = runtime_device(args.runtime, args.device, default_index)
    if device.type == "npu":
        return onnx_export.verdict_dtype(args.precision_mode or onnx_export.DEFAULT_PRECISION_MODE)
    return "fp32"


def runtime_target(args: argparse.Namespace, loaded: models.LoadedModel, example: torch.Tensor,
                   default_index: int = 0) -> RuntimeSide:  # fmt: skip
    """accuracy_run's target for --runtime onnxruntime|om: the ONNX file (given, or exported now with a dynamic batch
    into a temporary folder, gone once the session has read it) or the .om, on the runtime's device. Its dtype is the
    verdict dtype its precision mode calls for."""
    device = runtime_device(args.runtime, args.device, default_index)
    host = devices.Device("cpu")
    if args.runtime == "onnxruntime":
        sessions: list[OrtSession] = []
        with workdir() as tmp:
            build = onnxruntime_builder(device, Path(tmp), args.onnx, args.precision_mode, args.cann_graph == "1",
                                        dynamic_batch=True, sessions=sessions)  # fmt: skip
            prepared = build(loaded.model, host, "fp32", example)
        info = sessions[0].info() | {"model": str(args.onnx) if args.onnx else "exported now (dynamic batch)"}
        dtype = sessions[0].verdict_dtype
    else:
        runner = OmRunner(args.om, device, loaded.preprocess, args.precision_mode)
        prepared = runner(loaded.model, host, "fp32", example)
        info = runner.info()
        dtype = runner.verdict_dtype
    return RuntimeSide(prepared=prepared, hook_model=loaded.model, device=host, dtype=dtype, mode=args.runtime,
                       where=str(device), runtime=info)  # fmt: skip


class BenchRuntime:
    """accuracy_run_perf's --runtime: the runner to time beside (or instead of) the torch modes, and what goes in the
    report about it."""

    def __init__(self, args: argparse.Namespace, loaded: models.LoadedModel, tmp: Path | None):
        self.name = args.runtime
        self.runners: dict[str, bench.Builder] = {}
        self.info: dict[str, Any] = {"name": "torch"}
        self.device: devices.Device | None = None
        self._om: OmRunner | None = None
        self._sessions: list[OrtSession] = []
        if self.name == "torch":
            return
        self.device = runtime_device(self.name, args.device, local_rank())
        if self.name == "onnxruntime":
            self.runners["onnxruntime"] = onnxruntime_builder(
                self.device, tmp, args.onnx, args.precision_mode, args.cann_graph == "1", sessions=self._sessions
            )
        else:
            self._om = OmRunner(args.om, self.device, loaded.preprocess, args.precision_mode)
            self.runners["om"] = self._om

    @property
    def torch_modes(self) -> bool:
        """Time the torch modes too: only beside a runtime on the CPU, where both share the device."""
        return self.device is None or self.device.type == "cpu"

    def finish(self, results: list[dict[str, Any]], iterations: int) -> None:
        if self.name == "onnxruntime" and self._sessions:
            self.info = {**self._sessions[0].info(), "device": str(self.device),
                         "timing": "end to end of InferenceSession.run (onnxruntime does not report compute apart)"}
        elif self._om is not None and self._om._session is not None:
            attach_compute_times(results, self._om, "om", iterations)
            self.info = {**self._om.info(), "device": str(self.device),
                         "timing": "latency_ms end to end of InferSession.infer; compute_ms the NPU alone"}


@contextlib.contextmanager
def bench_runtime(args: argparse.Namespace, loaded: models.LoadedModel):
    """A BenchRuntime with a temporary folder for on-the-fly exports, removed afterwards."""
    if getattr(args, "runtime", "torch") == "torch":
        yield BenchRuntime(args, loaded, None)
        return
    with workdir() as tmp:
        yield BenchRuntime(args, loaded, Path(tmp))


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="mobilevit_onnx_")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
