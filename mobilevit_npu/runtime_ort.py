"""ONNX Runtime as a runtime: the one place an ONNX Runtime session is opened (--runtime onnxruntime in accuracy_run.py
and accuracy_run_perf.py, export_onnx.py's check, benchmarks/bench_peers.py), on the CPU, CUDA or CANN execution
provider, and the bench.Builder that times it.

No silent CPU session. onnxruntime's Python InferenceSession catches a ValueError / RuntimeError raised while it
creates the session on the requested providers (a provider library that does not load because CANN's set_env.sh was
not sourced, an unknown provider option), prints "EP Error ... when using ..." to stdout and creates the session again
on CPUExecutionProvider; Session.run does the same once for an EPFail. Both obey `enable_fallback`, which
InferenceSession reads from its keyword arguments (onnxruntime/capi/onnxruntime_inference_collection.py, onnxruntime
1.32.0: enable_fallback l.672, the catch and CPU retry l.694-709, run's l.404-415; the onnxruntime-cann 1.24.4 wheel:
l.482, l.503-519, l.294-305). Sessions here pass enable_fallback=0, so the provider's own error comes back; a build
that ignores the keyword is still caught: its printed "EP Error" line is read back and the session's providers are
checked. A provider the build lacks is never asked for: onnxruntime only warns about it and runs on the CPU
(check_and_normalize_provider_args, l.196-201 in 1.32.0).

The CANN precision option's name comes from the installed build, never from an error: the CANN EP parses its options
strictly ('Unknown provider option: "KEY".', core/framework/provider_options_utils.h). precision_mode is the key of
onnxruntime-cann up to 1.24.4, the newest on PyPI (its libonnxruntime_providers_cann.so, disassembled: the option
parser registers the 14-character "precision_mode"; microsoft/onnxruntime core/providers/cann/
cann_execution_provider_info.cc kPrecisionMode at commit a809122); upstream main renamed it precision_mode_v2
(kPrecisionMode_V2 at commit 38170d0), so a later build gets the new name and the mode's new spelling.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from mobilevit_npu import bench, devices, execution, onnx_export
from mobilevit_npu.errors import Unavailable, UserError, first_line

logger = logging.getLogger("mobilevit_npu.runtime_ort")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "npu": "CANNExecutionProvider"}
INSTALL_HINT = {
    "CUDAExecutionProvider": "pip install onnxruntime-gpu (instead of onnxruntime)",
    "CANNExecutionProvider": "pip install onnxruntime-cann (instead of onnxruntime) and source CANN's set_env.sh",
}
# Session config key: "1" makes session creation fail when any node is placed on the CPU EP (onnxruntime
# include/onnxruntime/core/session/onnxruntime_session_options_config_keys.h kOrtSessionOptionsDisableCPUEPFallback;
# the refusal "This session contains graph nodes that are assigned to the default CPU EP, but fallback to CPU EP has
# been explicitly disabled by the user." is in core/session/inference_session.cc; both strings are in the installed
# onnxruntime's pybind11 library). enable_fallback=0 stops the session-level retry on the CPU, not the placement of
# single nodes the CANN provider does not take on the CPU EP: this stops that.
DISABLE_CPU_EP_FALLBACK = "session.disable_cpu_ep_fallback"
CPU_NODES_REFUSED = "fallback to CPU EP has been explicitly disabled"
LAST_PRECISION_MODE_V1 = (1, 24)  # onnxruntime-cann 1.24.x takes precision_mode; later builds precision_mode_v2
# precision_mode (ATC, onnxruntime-cann <= 1.24) -> precision_mode_v2 (onnxruntime main, ATC's --precision_mode_v2)
PRECISION_MODE_V2 = {
    "must_keep_origin_dtype": "origin",
    "force_fp16": "fp16",
    "force_fp32": "cube_fp16in_fp32out",
    "cube_fp16in_fp32out": "cube_fp16in_fp32out",
    "allow_mix_precision": "mixed_float16",
    "allow_mix_precision_fp16": "mixed_float16",
    "allow_mix_precision_bf16": "mixed_bfloat16",
}
_EP_ERROR = re.compile(r"^EP Error:? (?P<error>.*?)(?: when using \[.*| using \[.*)?$", re.M)
Providers = Sequence[Union[str, tuple[str, dict[str, str]]]]


def _ort():
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise UserError(
            "onnxruntime is not installed: pip install onnxruntime (onnxruntime-gpu for cuda, onnxruntime-cann for npu)"
        ) from exc


def cann_precision_key(version: str) -> str:
    """The CANN provider option that carries the precision mode in this onnxruntime build: precision_mode up to
    1.24.x, precision_mode_v2 after (see the module docstring for the sources)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (int(match.group(1)), int(match.group(2))) <= LAST_PRECISION_MODE_V1:
        return "precision_mode"
    return "precision_mode_v2"


def provider_options(
    device: devices.Device, precision_mode: str, cann_graph: bool, ort_version: str
) -> tuple[str, dict[str, str]]:
    """The execution provider for the device and the options that matter, as the strings onnxruntime parses; the CANN
    precision under the name this build takes."""
    provider = PROVIDERS[device.type]
    if device.type == "npu":
        key = cann_precision_key(ort_version)
        value = precision_mode
        if key == "precision_mode_v2":
            value = PRECISION_MODE_V2.get(precision_mode)
            if value is None:
                raise UserError(
                    f"onnxruntime {ort_version}'s CANN provider takes precision_mode_v2, which has no "
                    f"equivalent of {precision_mode}: use one of {', '.join(PRECISION_MODE_V2)}"
                )
        return provider, {
            "device_id": str(device.index or 0),
            key: value,
            "enable_cann_graph": "1" if cann_graph else "0",
        }
    if device.type == "cuda":
        return provider, {"device_id": str(device.index or 0)}
    return provider, {}


def _name(entry) -> str:
    return entry if isinstance(entry, str) else entry[0]


def inference_session(path: str | Path, providers: Providers, sess_options=None):
    """onnxruntime.InferenceSession(path, sess_options, providers) with its CPU fallback off: the session on the first
    provider, or a UserError carrying that provider's own error, never the CPU session onnxruntime would make."""
    ort = _ort()
    wanted = _name(providers[0])
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            session = ort.InferenceSession(str(path), sess_options, providers=list(providers), enable_fallback=0)
    except Exception as exc:  # the provider's own error (onnxruntime raises several classes, not all RuntimeError)
        # a build that ignores enable_fallback printed the provider's error and retried on the CPU; that retry's error
        # (on CANN: the CPU EP refused, "Conflicting session configuration") is not the cause: name the provider's
        found = _EP_ERROR.search(printed.getvalue())
        why = found.group("error").strip() if found else first_line(exc)
        raise UserError(f"onnxruntime could not open {path} on {wanted}: {why}") from exc
    finally:
        text = printed.getvalue()
        if text and not _EP_ERROR.search(text):
            sys.stdout.write(text)  # whatever else was printed, passed on
    used = list(session.get_providers())
    found = _EP_ERROR.search(text)
    if found or not used or used[0] != wanted:
        why = found.group("error").strip() if found else f"the session has {used}"
        raise UserError(
            f"onnxruntime could not open {path} on {wanted}: {why} (onnxruntime fell back to the CPU; "
            "refusing a CPU run)"
        )
    return session


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

    @property
    def fixed_batch(self) -> int | None:
        """The graph's batch when it is static, None when dynamic."""
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) and first > 0 else None

    def prepared(self, notes: list[str] | None = None) -> execution.Prepared:
        """The session as an execution.Prepared: float32 NCHW in (from a torch batch), float32 logits out."""
        return execution.Prepared(
            call=lambda feed: torch.from_numpy(np.asarray(self.run(feed), dtype=np.float32)),
            to_input=lambda x: x.to(torch.float32).contiguous().numpy(),
            notes=list(notes or []),
        )

    def info(self) -> dict[str, Any]:
        return {
            "name": "onnxruntime",
            "version": self.version,
            "provider": self.provider,
            "provider_options": self.provider_options,
            "providers_used": self.providers_used,
            "precision_mode": self.precision_mode,
            "verdict_dtype": self.verdict_dtype,
        }


def open_session(
    path: str | Path,
    device: devices.Device | None = None,
    precision_mode: str | None = None,
    cann_graph: bool = True,
    threads: int | None = None,
) -> OrtSession:
    """The ONNX file in an ONNX Runtime session on the device's provider (the CPU by default): a provider absent from
    this build is a UserError with its install hint, a provider that fails is a UserError with its own message, never
    a silent CPU run. On CANN every node must run on the CANN provider (session.disable_cpu_ep_fallback=1): a graph
    with nodes it does not take is a UserError saying so; on CUDA such nodes run on the CPU provider listed after it
    (ordinary placement: onnxruntime keeps shape computations there)."""
    ort = _ort()
    device = device or devices.Device("cpu")
    mode = precision_mode or onnx_export.DEFAULT_PRECISION_MODE
    provider, options = provider_options(device, mode, cann_graph, ort.__version__)
    available = ort.get_available_providers()
    if provider not in available:
        hint = INSTALL_HINT.get(provider, "")
        raise UserError(
            f"{provider} is not in this onnxruntime build (it has {', '.join(available)}) so --device "
            f"{device} cannot run it{': ' + hint if hint else ''}"
        )
    sess_options = ort.SessionOptions()
    sess_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        sess_options.intra_op_num_threads = threads
        sess_options.inter_op_num_threads = 1
        # its workers otherwise busy-spin ~25 ms after each call and steal the CPU from whatever runs next
        sess_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chain = [(provider, options)]
    if provider == "CANNExecutionProvider":
        # The CPU EP stays implicit: with the fallback disabled, an explicitly listed CPU EP is itself refused
        # ("Conflicting session configuration", onnxruntime/core/session/inference_session.cc, InferenceSession::
        # Initialize, `if (!execution_providers_.GetCpuProviderWasImplicitlyAdded())`), and any node the implicit
        # one would take is refused too ("...graph nodes that are assigned to the default CPU EP...").
        sess_options.add_session_config_entry(DISABLE_CPU_EP_FALLBACK, "1")
    elif provider != "CPUExecutionProvider":
        chain.append("CPUExecutionProvider")
    try:
        session = inference_session(path, chain, sess_options)
    except UserError as exc:
        if CPU_NODES_REFUSED in str(exc):
            raise UserError(
                f"{exc} (some nodes of {path} have no CANN kernel and would run on the CPU: the toolkit refuses a "
                "mixed run; use --runtime torch, or convert with ATC to an .om and use --runtime om)"
            ) from exc
        raise
    notes = []
    if provider == "CANNExecutionProvider":
        notes.append(f"{DISABLE_CPU_EP_FALLBACK}=1: every node runs on the CANN provider")
        if "precision_mode_v2" in options:
            notes.append(f"onnxruntime {ort.__version__} names it precision_mode_v2: {options['precision_mode_v2']}")
    else:
        mode = None
        if precision_mode:
            notes.append(f"--precision_mode {precision_mode} ignored: only the CANN execution provider takes it")
        if provider == "CUDAExecutionProvider":
            notes.append("CUDA execution provider: TF32 as onnxruntime's use_tf32 default (on Ampere and newer)")
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    shape = list(session.get_inputs()[0].shape)
    fixed = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None

    def run(feed: np.ndarray) -> np.ndarray:
        rows = feed.shape[0]
        if fixed and rows < fixed:  # a last, partial batch: filled up with its last row, the extra rows dropped
            feed = np.concatenate([feed, np.repeat(feed[-1:], fixed - rows, axis=0)])
        try:
            return session.run([output_name], {input_name: feed})[0][:rows]
        except Exception as exc:
            if type(exc).__name__ == "EPFail":  # run's own fallback is off too: the provider's error, one line
                raise UserError(f"{provider} failed running {path}: {first_line(exc)}") from exc
            raise

    return OrtSession(
        run,
        provider,
        options,
        list(session.get_providers()),
        mode,
        onnx_export.verdict_dtype(mode) if mode else "fp32",
        ort.__version__,
        notes,
        shape,
    )


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
    runtime's own device is `device`. Opened sessions are appended to `sessions` (their providers go in reports). A
    static graph at another batch is Unavailable (the benchmark times the batch it names, nothing padded)."""

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
                exported = onnx_export.export_onnx(
                    model,
                    target,
                    opset=opset,
                    batch_size=int(batch.shape[0]),
                    dynamic_batch=dynamic_batch,
                    image_size=size,
                )
                logger.info("exported %s: %s", target.name, exported.summary())
                notes.append(f"exported here: {exported.summary()}")
            path = target
        threads = torch.get_num_threads() if device.type == "cpu" else None
        session = open_session(path, device, precision_mode, cann_graph, threads)
        if session.fixed_batch and session.fixed_batch != batch.shape[0]:
            raise Unavailable(
                f"{path} takes batch {session.fixed_batch} only (export it with --dynamic_batch for others)"
            )
        if sessions is not None:
            sessions.append(session)
        mode = f", precision_mode {session.precision_mode}" if session.precision_mode else ""
        notes = (
            [
                f"onnxruntime {session.version} {session.provider} on {device}{mode}; session providers "
                f"{session.providers_used}"
            ]
            + notes
            + session.notes
        )
        return session.prepared(notes)

    return build
