"""Where the time goes: one profiled pass per mode and batch size, after the timed one, and its summary.

The benchmark times first; only then, for each (mode, batch size), `Profiler.profile` runs a separate pass under the
device's own profiler, so no timed sample is ever taken under a profiler. On CPU and CUDA that is torch.profiler (its
trace written as Chrome-trace JSON, `<mode>-batch<N>.pt.trace.json`, which Perfetto, chrome://tracing and
TensorBoard's profiler plugin open); on the NPU it is torch_npu.profiler (the Ascend profiler's own folder,
`<mode>-batch<N>/<worker>_<time>_ascend_pt/`, which MindStudio Insight and msprof-analyze open), whose CSVs are read
here by header name.

Per mode the summary (`ModeProfile`) holds the top operators by self time with their share of a step, the time by
operator class (CLASSES), the host-vs-device split and, on the NPU, the time by core type with the AI CPU share, the
HF32-eligible operators and the CPU-fallback operators with the host time they cost.

The NPU profiler's settings are passed explicitly and read back from its config object as used, because their
defaults moved between wheels (torch_npu/profiler/experimental_config.py: 2.5.1 l.58-67 `aic_metrics=AicMetricsNone`,
`export_type=None`; 2.13.0/2.14.0 l.91-107 `aic_metrics=AicPipeUtilization`, `export_type=ExportType.Text`).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from mobilevit_npu import devices, reports, timing
from mobilevit_npu.errors import UserError, first_line

logger = logging.getLogger("mobilevit_npu.profiling")

CLASSES = ("convolution", "matmul", "attention", "normalisation", "elementwise", "data movement", "other")
TOP_OPERATORS = 10
DEFAULT_STEPS = 5

# First match wins, on the lower-cased operator name: aten/mkldnn/mkl names from torch.profiler, kernel types
# (Conv2D, MatMulV2, FlashAttentionScore, TransData...) from the Ascend profiler's kernel_details.csv.
_CLASS_RULES = (
    ("attention", r"attention|softmax|flash|sdpa"),
    ("convolution", r"conv(?!ert)|depthwise"),
    ("matmul", r"matmul|gemm|linear|addmm|bmm|(^|[:_])mm($|[._])|mkl_linear|cublas"),
    ("normalisation", r"norm|bninfer|bntraining"),
    (
        "data movement",
        r"copy|contiguous|clone|cat($|[._])|concat|permute|transpose|transdata|view|reshape|unfold|fold|flatten"
        r"|expand|slice|select|index|gather|scatter|pad|(^|::|_)to($|_)|empty|memcpy|memset|cast|stack|split|chunk"
        r"|squeeze|narrow|as_strided|interpolate|upsample|resize|identity|detach|alias|t$",
    ),
    (
        "elementwise",
        r"add|mul|sub|div|silu|swish|sigmoid|relu|gelu|tanh|exp|pow|sqrt|clamp|where|neg|abs|mean|sum|fused|triton"
        r"|hardswish|dropout|max|min|pool|reduce|zeros|ones|fill|fma|erf|log|square|rsub|bias",
    ),
)
_CLASS_RES = tuple((name, re.compile(pattern)) for name, pattern in _CLASS_RULES)


def op_class(name: str) -> str:
    """The operator class of an operator or kernel name: one of CLASSES."""
    text = name.lower()
    for cls, pattern in _CLASS_RES:
        if pattern.search(text):
            return cls
    return "other"


# ------------------------------------------------------------------------------------------------ report sections


@dataclass
class OperatorTime:
    """One operator (torch.profiler) or kernel type (Ascend profiler) of a profiled step."""

    name: str
    op_class: str  # one of profiling.CLASSES
    calls: float  # per step
    self_ms: float  # self time per step: host on cpu, device kernels on cuda and npu
    share_of_step: float  # self_ms / step_ms
    core_type: Optional[str] = None  # npu: AI_CORE | AI_VECTOR_CORE | MIX_AIC | MIX_AIV | AI_CPU
    hf32_eligible: Optional[bool] = None  # npu: the profiler's "HF32 Eligible" column said YES


@dataclass
class HostDevice:
    """How much of a step the device worked and how much it sat idle waiting for the host."""

    basis: str  # where the figures come from
    device_busy_ms: float
    device_idle_ms: float
    device_idle_share: float  # device_idle_ms / step_ms


@dataclass
class FallbackCost:
    """An operator torch_npu ran on the CPU, and the host time its calls took in the profiled steps."""

    operator: str
    calls: float  # per step
    host_ms: float  # per step, from operator_details.csv's "Host Self Duration(us)"


@dataclass
class NpuTimes:
    """The Ascend profiler's own view of a step (its CSVs under ASCEND_PROFILER_OUTPUT, read by header name)."""

    output: str  # the ASCEND_PROFILER_OUTPUT folder read
    kernel_details_columns: list[str]  # the header of kernel_details.csv as written (it differs between wheels)
    core_types_ms: dict[str, float]  # device time per step by core type (op_statistic.csv, else kernel_details.csv)
    ai_cpu_share: float  # AI CPU time over all device kernel time
    hf32_eligible: list[str]  # kernel types the profiler marked "HF32 Eligible" YES
    cpu_fallbacks: list[FallbackCost]  # operators torch_npu ran on the CPU (npu.CpuFallbacks), with their host time


@dataclass
class ModeProfile:
    """The profiled pass of one (mode, batch size)."""

    mode: str
    batch_size: int
    status: str  # ok | unavailable
    reason: Optional[str]
    steps: int  # profiled steps (after one warm-up step under the profiler)
    step_ms: Optional[float]  # mean step under the profiler, device synchronized (the profiler's overhead included)
    operators_ms: Optional[float]  # all operators' self time per step (the sum the top list is taken from)
    top_operators: list[OperatorTime]
    classes_ms: dict[str, float]  # self time per step by operator class
    classes_share: dict[str, float]  # classes_ms / step_ms
    host_device: Optional[HostDevice]
    trace: Optional[str]  # the trace file (cpu, cuda) or the Ascend profiler's folder (npu)
    npu: Optional[NpuTimes] = None
    notes: list[str] = field(default_factory=list)  # what the figures cannot show (compiled code the profiler misses)


@dataclass
class ProfileSection:
    """--profile DIR: how the profiled passes ran, and one ModeProfile per (mode, batch size)."""

    tool: str  # torch.profiler | torch_npu.profiler
    directory: str
    trace_format: str  # what the trace files are and what opens them
    settings: dict[str, Any]  # as used (npu: profiler_level, aic_metrics, export_type read back from its config)
    how: str
    results: list[ModeProfile] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ the output folder


def check_profile_dir(path: str, model_dir: Optional[str] = None) -> None:
    """Refuse (one line) a --profile folder that cannot take the traces: a file, a folder that is not empty (its files
    are the user's: a run never writes over them), a folder inside the model folder."""
    if not path or not path.strip():
        raise UserError("--profile is an empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--profile {path} is a file, not a folder")
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f"--profile {path} is a folder that is not empty: give a new or empty folder")
    if model_dir is not None and os.path.isdir(model_dir):
        folder = os.path.realpath(model_dir)
        if os.path.commonpath([folder, os.path.realpath(path)]) == folder:
            raise UserError(f"--profile {path} lies inside the model folder {model_dir}: give a folder outside it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"--profile {path}: its parent folder {parent} does not exist")
    if not os.access(parent if not os.path.isdir(path) else path, os.W_OK):
        raise UserError(f"--profile {path}: the folder cannot be written")


def _stem(mode: str, batch_size: int) -> str:
    return reports.file_stem(f"{mode}-batch{batch_size}")


# ------------------------------------------------------------------------------------------------ the profiler


class Profiler:
    """Profiles calls into `directory` (created here if absent) on `device`; `section()` is the report's `profile`."""

    def __init__(self, directory: str, device: devices.Device, steps: int = DEFAULT_STEPS):
        self.directory = directory
        self.device = device
        self.steps = max(1, steps)
        self.results: list[ModeProfile] = []
        self.settings: dict[str, Any] = {"steps": self.steps, "warmup_steps": 1}
        self.tool = "torch_npu.profiler" if device.type == "npu" else "torch.profiler"

    def profile(self, call: Callable[[], Any], mode: str, batch_size: int) -> ModeProfile:
        """One profiled pass of `call` (already warm): a warm-up step, then `steps` profiled steps."""
        os.makedirs(self.directory, exist_ok=True)
        try:
            if self.device.type == "npu":
                result = self._profile_npu(call, mode, batch_size)
            else:
                result = self._profile_torch(call, mode, batch_size)
        except (RuntimeError, OSError, ValueError) as exc:
            logger.warning("profiling %s at batch %d failed: %s", mode, batch_size, first_line(exc))
            result = unavailable(mode, batch_size, f"the profiler failed: {first_line(exc)}", self.steps)
        self.results.append(result)
        return result

    # ----------------------------------------------------------------------------------------------- torch.profiler
    def _profile_torch(self, call: Callable[[], Any], mode: str, batch_size: int) -> ModeProfile:
        import torch.profiler as tp

        activities = [tp.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(tp.ProfilerActivity.CUDA)
        self.settings.update(activities=[str(a).split(".")[-1] for a in activities], record_shapes=False)
        trace = os.path.join(self.directory, _stem(mode, batch_size) + ".pt.trace.json")
        step_ms: list[float] = []
        sched = tp.schedule(wait=0, warmup=1, active=self.steps, repeat=1)
        with tp.profile(
            activities=activities, schedule=sched, on_trace_ready=lambda p: p.export_chrome_trace(trace)
        ) as prof:
            for i in range(1 + self.steps):
                _, ms = timing.timed_call(call, self.device)
                if i >= 1:
                    step_ms.append(ms)
                prof.step()
        device_side = self.device.type == "cuda"
        per_op: dict[str, list[float]] = {}  # name -> [calls, self ms] over all steps
        for evt in prof.key_averages():
            if evt.key.startswith("ProfilerStep"):  # "ProfilerStep*": the step's own time outside any operator
                continue
            if device_side:
                self_us = getattr(evt, "self_device_time_total", None)
                if self_us is None:
                    self_us = getattr(evt, "self_cuda_time_total", 0.0)
            else:
                self_us = evt.self_cpu_time_total
            if self_us <= 0 and not evt.count:
                continue
            entry = per_op.setdefault(evt.key, [0.0, 0.0])
            entry[0] += evt.count
            entry[1] += self_us / 1000.0
        step = statistics.fmean(step_ms)  # the mean: the operators' figures are totals over the steps / steps
        ops = {name: (calls / self.steps, ms / self.steps) for name, (calls, ms) in per_op.items()}
        busy = sum(ms for _, ms in ops.values())
        if device_side:
            basis = "CUDA kernel time attributed to operators (self device time) against the synchronized step"
        else:
            basis = (
                "on the CPU the host is the device: busy is the operators' self time, idle the rest of the step "
                "(Python, module calls, dispatch, the profiler's own overhead)"
            )
        split = _split(basis, busy, step)
        result = profile_from_ops(mode, batch_size, self.steps, step, ops, split, trace)
        if not device_side and busy < 0.5 * step:
            # AOTInductor's generated kernels and its direct oneDNN/MKL calls do not pass the dispatcher, so
            # torch.profiler records no operator for them: their time is in the step, outside every operator.
            result.notes.append(
                f"operators cover {busy / step:.0%} of the step: compiled code runs kernels torch.profiler does not "
                "see (AOTInductor's generated kernels and its direct oneDNN/MKL calls), counted outside operators"
            )
        return result

    # ----------------------------------------------------------------------------------------------- torch_npu
    def _profile_npu(self, call: Callable[[], Any], mode: str, batch_size: int) -> ModeProfile:
        import torch_npu
        import torch_npu.profiler  # noqa: F401  (2.13.0 loads its submodules at run time: import it by name)

        folder = os.path.join(self.directory, _stem(mode, batch_size))
        os.makedirs(folder, exist_ok=True)
        config = torch_npu.profiler._ExperimentalConfig(
            profiler_level=torch_npu.profiler.ProfilerLevel.Level1,  # Level1: op_statistic.csv and every column
            aic_metrics=torch_npu.profiler.AiCMetrics.PipeUtilization,
            export_type=torch_npu.profiler.ExportType.Text,  # the CSVs read here
        )
        # read back as the wheel resolved them (experimental_config.py _check_params may reset them)
        self.settings.update(
            profiler_level=str(config._profiler_level),
            aic_metrics=str(config._aic_metrics),
            export_type=[str(t) for t in config.export_type],
            torch_npu=getattr(torch_npu, "__version__", None),
        )
        step_ms: list[float] = []
        sched = torch_npu.profiler.schedule(wait=0, warmup=1, active=self.steps, repeat=1)
        handler = torch_npu.profiler.tensorboard_trace_handler(folder, worker_name=_stem(mode, batch_size))
        with torch_npu.profiler.profile(schedule=sched, on_trace_ready=handler, experimental_config=config) as prof:
            for i in range(1 + self.steps):
                _, ms = timing.timed_call(call, self.device)
                if i >= 1:
                    step_ms.append(ms)
                prof.step()
        outputs = sorted(glob.glob(os.path.join(folder, "*_ascend_pt", "ASCEND_PROFILER_OUTPUT")))
        if not outputs or not os.path.isfile(os.path.join(outputs[-1], "kernel_details.csv")):
            # torch_npu swallows its own failures (profiler.py: start/stop/step under @no_exception_func)
            return unavailable(
                mode,
                batch_size,
                f"torch_npu.profiler wrote no kernel_details.csv under {folder} (see its log in that folder)",
                self.steps,
                trace=folder,
            )
        return summarize_npu(mode, batch_size, self.steps, statistics.fmean(step_ms), outputs[-1])

    def section(self) -> ProfileSection:
        if self.tool == "torch_npu.profiler":
            fmt = (
                "the Ascend profiler's folder per mode and batch size (<mode>-batch<N>/<worker>_<time>_ascend_pt: "
                "trace_view.json, kernel_details.csv, op_statistic.csv, ...), opened by MindStudio Insight and "
                "msprof-analyze"
            )
        else:
            fmt = (
                "Chrome-trace JSON per mode and batch size (<mode>-batch<N>.pt.trace.json), opened by Perfetto "
                "(ui.perfetto.dev), chrome://tracing and TensorBoard's profiler plugin"
            )
        how = (
            "a separate pass after the timed one, never timed: one warm-up step, then the profiled steps; figures are "
            "per step (totals over the profiled steps divided by their number)"
        )
        return ProfileSection(
            tool=self.tool,
            directory=self.directory,
            trace_format=fmt,
            settings=dict(self.settings),
            how=how,
            results=list(self.results),
        )


def unavailable(mode: str, batch_size: int, reason: str, steps: int, trace: Optional[str] = None) -> ModeProfile:
    return ModeProfile(
        mode=mode,
        batch_size=batch_size,
        status="unavailable",
        reason=reason,
        steps=steps,
        step_ms=None,
        operators_ms=None,
        top_operators=[],
        classes_ms={},
        classes_share={},
        host_device=None,
        trace=trace,
    )


def _split(basis: str, busy: float, step: float) -> HostDevice:
    busy = min(busy, step)
    return HostDevice(basis, busy, step - busy, (step - busy) / step if step > 0 else 0.0)


def profile_from_ops(
    mode: str,
    batch_size: int,
    steps: int,
    step_ms: float,
    ops: dict[str, tuple[float, float]],
    split: Optional[HostDevice],
    trace: Optional[str],
    core_types: Optional[dict[str, str]] = None,
    hf32: Optional[set[str]] = None,
    npu: Optional[NpuTimes] = None,
) -> ModeProfile:
    """A ModeProfile from {operator: (calls per step, self ms per step)}."""
    classes = dict.fromkeys(CLASSES, 0.0)
    for name, (_, ms) in ops.items():
        classes[op_class(name)] += ms
    ranked = sorted(ops.items(), key=lambda kv: (-kv[1][1], kv[0]))[:TOP_OPERATORS]
    top = [
        OperatorTime(
            name=name,
            op_class=op_class(name),
            calls=calls,
            self_ms=ms,
            share_of_step=ms / step_ms if step_ms > 0 else 0.0,
            core_type=(core_types or {}).get(name),
            hf32_eligible=(name in hf32) if hf32 is not None else None,
        )
        for name, (calls, ms) in ranked
    ]
    return ModeProfile(
        mode=mode,
        batch_size=batch_size,
        status="ok",
        reason=None,
        steps=steps,
        step_ms=step_ms,
        operators_ms=sum(ms for _, ms in ops.values()),
        top_operators=top,
        classes_ms=classes,
        classes_share={k: (v / step_ms if step_ms > 0 else 0.0) for k, v in classes.items()},
        host_device=split,
        trace=trace,
        npu=npu,
    )


# ------------------------------------------------------------------------------------------------ the Ascend CSVs
# Headers as the wheels write them (read from their sources; tests/npu_profiler_standin.py writes every variant):
# - kernel_details.csv: prof_view/_kernel_view_parser.py (2.5.1 l.47-63, 2.13.0 l.56-78) writes ["Step Id"] (when
#   steps were marked) + the op_summary columns renamed by prof_common_func/_csv_headers.py (Op Name -> Name, OP Type ->
#   Type, Task Type -> Accelerator Core, Task Duration(us) -> Duration(us), ...): at Level0 only those columns, at
#   Level1/2 every op_summary column (HF32 Eligible, Input Shapes, aicore_time(us), ...). 2.5.1's CommonBean drops
#   Device_id from every CANN row (prof_bean/_common_bean.py l.16-25); 2.13.0/2.14.0 keep it, first. 2.5.1 says
#   "Block Dim", 2.13.0 "Block Num".
# - op_statistic.csv: CANN's op_statistic columns as read (prof_bean/_op_statistic_bean.py): OP Type, Core Type,
#   Count, Total Time(us), Min Time(us), Avg Time(us), Max Time(us), Ratio(%), with Device_id first from 2.13.0.
# - step_trace_time.csv: prof_view/_trace_step_time_parser.py title (2.5.1 l.27-28; 2.13.0 l.48-49, Device_id first):
#   Step, Computing, ..., Free, Stage, ... in microseconds.
# - operator_details.csv: prof_view/_operator_view_parser.py l.15-17: Name, Input Shapes, Call Stack, Host Self
#   Duration(us), Host Total Duration(us), Device Self Duration(us), ...

KERNEL_NAME = ("Type", "Name")  # the kernel type groups calls; Name (the instance) when Type is absent
CORE_NAMES = {"AICPU": "AI_CPU", "AI_CPU": "AI_CPU"}


def read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows by header name) of one of the profiler's CSVs."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
        header = [h.strip() for h in (reader.fieldnames or [])]
    return header, rows


def number_cell(text: Any) -> Optional[float]:
    """A numeric cell of an Ascend tool's CSV ("0.25", "37.5%": 37.5), or None for N/A, empty, NaN and the like
    (the profiler's CSVs here, msprobe's compare table in probe)."""
    text = str(text if text is not None else "").strip().rstrip("%")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _number(text: Any) -> float:
    """A duration or count cell: number_cell, 0 where the cell holds none."""
    return number_cell(text) or 0.0


def core_type(text: str) -> str:
    name = (text or "").strip().upper().replace(" ", "_") or "UNKNOWN"
    return CORE_NAMES.get(name, name)


def _column(header: list[str], *names: str) -> Optional[str]:
    for name in names:
        if name in header:
            return name
    return None


def parse_kernel_details(path: str, steps: int) -> dict[str, Any]:
    """kernel_details.csv by header name: per kernel type, calls and device ms per step, its core type and whether
    the profiler marked it HF32-eligible. Rows of a step outside the profiled ones (Step Id) are left out."""
    header, rows = read_csv(path)
    name_col = _column(header, *KERNEL_NAME)
    duration = _column(header, "Duration(us)", "Task Duration(us)")
    if name_col is None or duration is None:
        raise ValueError(f"{path}: no Type/Name or Duration(us) column (header: {', '.join(header)})")
    core_col = _column(header, "Accelerator Core", "Task Type")
    hf32_col = _column(header, "HF32 Eligible")
    step_col = _column(header, "Step Id")
    step_ids = sorted({r[step_col] for r in rows if r.get(step_col)}) if step_col else []
    divide = len(step_ids) if step_ids else steps
    ops: dict[str, list[float]] = {}
    cores: dict[str, str] = {}
    by_core: dict[str, float] = {}
    hf32: set[str] = set()
    for r in rows:
        if step_col and step_ids and not r.get(step_col):
            continue  # outside every marked step
        name = r.get(name_col) or r.get("Name") or "?"
        us = _number(r.get(duration))
        entry = ops.setdefault(name, [0.0, 0.0])
        entry[0] += 1
        entry[1] += us / 1000.0
        core = core_type(r.get(core_col, "")) if core_col else "UNKNOWN"
        cores.setdefault(name, core)
        by_core[core] = by_core.get(core, 0.0) + us / 1000.0
        if hf32_col and r.get(hf32_col, "").upper() == "YES":
            hf32.add(name)
    return {
        "header": header,
        "ops": {k: (calls / divide, ms / divide) for k, (calls, ms) in ops.items()},
        "cores": cores,
        "by_core": {k: v / divide for k, v in by_core.items()},
        "hf32": hf32,
        "steps": divide,
    }


def parse_op_statistic(path: str, steps: int) -> dict[str, float]:
    """op_statistic.csv by header name: device ms per step by core type."""
    header, rows = read_csv(path)
    core_col, total = _column(header, "Core Type"), _column(header, "Total Time(us)")
    if core_col is None or total is None:
        raise ValueError(f"{path}: no Core Type or Total Time(us) column (header: {', '.join(header)})")
    out: dict[str, float] = {}
    for r in rows:
        core = core_type(r.get(core_col, ""))
        out[core] = out.get(core, 0.0) + _number(r.get(total)) / 1000.0 / steps
    return out


def parse_step_trace(path: str) -> Optional[tuple[float, float, float]]:
    """step_trace_time.csv by header name: (Computing, Free, Stage) in ms, the mean over the steps it lists."""
    header, rows = read_csv(path)
    if not rows or _column(header, "Computing") is None or _column(header, "Free") is None:
        return None
    computing = statistics.fmean(_number(r.get("Computing")) for r in rows) / 1000.0
    free = statistics.fmean(_number(r.get("Free")) for r in rows) / 1000.0
    stage = statistics.fmean(_number(r.get("Stage")) for r in rows) / 1000.0 if "Stage" in header else 0.0
    return computing, free, stage


def fallback_costs(path: str, operators: list[str], steps: int) -> list[FallbackCost]:
    """operator_details.csv by header name: the host time of the calls of each operator that fell back to the CPU."""
    if not operators or not os.path.isfile(path):
        return [FallbackCost(op, 0.0, 0.0) for op in operators] if operators else []
    header, rows = read_csv(path)
    host = _column(header, "Host Self Duration(us)", "Host Total Duration(us)")
    out = []
    for op in operators:
        names = {op, op.split(".")[0]}
        hits = [r for r in rows if r.get("Name") in names]
        ms = sum(_number(r.get(host)) for r in hits) / 1000.0 if host else 0.0
        out.append(FallbackCost(op, len(hits) / steps, ms / steps))
    return out


def summarize_npu(
    mode: str, batch_size: int, steps: int, step_ms: float, output: str, fallbacks: Optional[list[str]] = None
) -> ModeProfile:
    """A ModeProfile from one ASCEND_PROFILER_OUTPUT folder."""
    kd = parse_kernel_details(os.path.join(output, "kernel_details.csv"), steps)
    stat_path = os.path.join(output, "op_statistic.csv")
    by_core = parse_op_statistic(stat_path, kd["steps"]) if os.path.isfile(stat_path) else kd["by_core"]
    device_ms = sum(by_core.values())
    trace = (
        parse_step_trace(os.path.join(output, "step_trace_time.csv"))
        if os.path.isfile(os.path.join(output, "step_trace_time.csv"))
        else None
    )
    if trace is not None and trace[2] > 0:
        computing, free, stage = trace
        split = HostDevice(
            "step_trace_time.csv: Computing (device busy) and Free (device idle) of the profiled steps",
            computing,
            free,
            free / stage,
        )
    else:
        split = _split("device kernel time (kernel_details.csv) against the synchronized step", device_ms, step_ms)
    npu = NpuTimes(
        output=output,
        kernel_details_columns=kd["header"],
        core_types_ms=by_core,
        ai_cpu_share=by_core.get("AI_CPU", 0.0) / device_ms if device_ms > 0 else 0.0,
        hf32_eligible=sorted(kd["hf32"]),
        cpu_fallbacks=fallback_costs(os.path.join(output, "operator_details.csv"), fallbacks or [], kd["steps"]),
    )
    return profile_from_ops(
        mode, batch_size, steps, step_ms, kd["ops"], split, os.path.dirname(output), kd["cores"], kd["hf32"], npu
    )


def add_fallbacks(section: Optional[ProfileSection], operators: list[str]) -> None:
    """Once the run knows which operators fell back to the CPU (npu.CpuFallbacks), their host time per profile."""
    if section is None or not operators:
        return
    for result in section.results:
        if result.npu is not None:
            result.npu.cpu_fallbacks = fallback_costs(
                os.path.join(result.npu.output, "operator_details.csv"), operators, result.steps
            )


# ------------------------------------------------------------------------------------------------ checks, console


def check_chrome_trace(path: str) -> int:
    """The number of events in a Chrome-trace JSON file (Perfetto's JSON importer reads `traceEvents`); ValueError
    when it is not one."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list) or not all(isinstance(e, dict) and "ph" in e for e in events):
        raise ValueError(f"{path}: not Chrome-trace JSON (no list of events with a phase `ph`)")
    return len(events)


def format_profile(section: ProfileSection) -> str:
    """The console lines: per mode, the step, the classes and the top operators."""
    lines = [
        f"where the time goes ({section.tool}, {section.settings.get('steps')} profiled steps per mode; traces in "
        f"{section.directory}):"
    ]
    for r in section.results:
        if r.status != "ok":
            lines.append(f"  {r.mode} batch {r.batch_size}: {r.status}: {r.reason}")
            continue
        classes = ", ".join(
            f"{k} {v * 100:.0f}%" for k, v in sorted(r.classes_share.items(), key=lambda kv: -kv[1]) if v >= 0.005
        )
        lines.append(f"  {r.mode} batch {r.batch_size}: step {r.step_ms:.2f} ms under the profiler; {classes}")
        if r.host_device is not None:
            what = (
                "outside operators"
                if section.tool == "torch.profiler" and "CPU" in r.host_device.basis
                else "device idle"
            )
            lines.append(f"    {what}: {r.host_device.device_idle_share * 100:.0f}% of the step")
        lines += [f"    note: {note}" for note in r.notes]
        if r.npu is not None:
            cores = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(r.npu.core_types_ms.items()))
            lines.append(f"    core types: {cores}; AI CPU {r.npu.ai_cpu_share * 100:.1f}% of device time")
            for fb in r.npu.cpu_fallbacks:
                lines.append(f"    CPU fallback {fb.operator}: {fb.calls:g} calls, {fb.host_ms:.3f} ms per step")
        for op in r.top_operators[:5]:
            lines.append(f"    {op.self_ms:8.3f} ms {op.share_of_step * 100:5.1f}%  {op.name} ({op.op_class})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the plot


def class_figure(results: list[Any], where: str = ""):
    """A stacked bar per profiled (mode, batch size): the share of a step by operator class, the rest of the step
    ("outside operators") last. `results` are ModeProfiles (or their dicts). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key)

    rows = [r for r in results if get(r, "status") == "ok"]
    if not rows:
        raise UserError("nothing to plot: no mode was profiled")
    labels = [f"{get(r, 'mode')} b{get(r, 'batch_size')}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.8))
    left = [0.0] * len(rows)
    colours = plt.get_cmap("tab10").colors
    for i, cls in enumerate((*CLASSES, "outside operators")):
        if cls == "outside operators":
            widths = [max(0.0, 1.0 - sum(get(r, "classes_share").values())) * 100 for r in rows]
        else:
            widths = [get(r, "classes_share").get(cls, 0.0) * 100 for r in rows]
        ax.barh(labels, widths, left=left, color=colours[i % len(colours)], label=cls)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("share of a profiled step (%)")
    ax.set_title(f"Where the time goes{', ' + where if where else ''}", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    return fig
