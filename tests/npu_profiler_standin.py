"""The torch_npu.profiler of the stand-in torch_npu (tests/npu_standin.py builds it into the package): the public names
the project uses, the settings' defaults and resets of each wheel, and an output folder laid out and headed as each
wheel writes it, so the project's CSV reading is tested on every header variant.

Read from the real wheels (torch-npu 2.5.1, 2.13.0, 2.14.0; `pip download --no-deps torch-npu==X`):
- torch_npu/profiler/experimental_config.py: `_ExperimentalConfig` defaults, 2.5.1 l.58-67 (aic_metrics AicMetricsNone,
  export_type None, and l.70-72: a level other than Level0 with AicMetricsNone becomes PipeUtilization), 2.13.0/2.14.0
  l.91-107 (aic_metrics PipeUtilization, export_type Text); `_check_params` resets aic_metrics to AicMetricsNone at
  Level0/Level_none (2.5.1 l.122-125); `_conver_export_type_to_list` makes a falsy export_type [text].
- analysis/prof_common_func/_constant.py: the values ("Level0", "ACL_AICORE_PIPE_UTILIZATION", "ACL_AICORE_NONE",
  "text", "db"; 2.5.1 l.110-124) and OUTPUT_DIR "ASCEND_PROFILER_OUTPUT" (l.19).
- _profiler_path_creator.py l.72 (2.5.1): the folder `<worker>_<yyyymmddHHMMSSfff>_ascend_pt` under dir_name, with the
  worker name `<worker_name or hostname>_<pid>` (2.13.0 l.67-72).
- kernel_details.csv: analysis/prof_view/_kernel_view_parser.py (2.5.1 l.47-63; 2.13.0 l.35-78) and
  prof_common_func/_csv_headers.py (2.5.1 l.4-7; 2.13.0 l.4-9); all of op_summary's columns when
  ProfilerConfig.is_all_kernel_headers() (2.5.1 _profiler_config.py l.175-179: aic_metrics not None; 2.13.0 l.256-260:
  level not Level0); "Step Id" first when steps were marked; 2.5.1's CommonBean drops Device_id
  (prof_bean/_common_bean.py l.16-25), 2.13.0/2.14.0 keep it.
- op_statistic.csv: prof_bean/_op_statistic_bean.py (CANN's columns as read; Device_id dropped by 2.5.1's CommonBean).
- step_trace_time.csv: prof_view/_trace_step_time_parser.py title (2.5.1 l.27-28; 2.13.0 l.48-49).
- operator_details.csv: prof_view/_operator_view_parser.py l.15-17.
CANN's own op_summary columns (Device_id, Model ID, Task ID, Stream ID, Op Name, OP Type, OP State, Task Type, ...,
HF32 Eligible, ...) are CANN's msprof documentation's; the device times here are the CPU's op times, renamed to Ascend
kernel types.
"""

from __future__ import annotations

VERSIONS = ("2.5.1", "2.13.0", "2.14.0")

# prof_common_func/_csv_headers.py
SHOW_HEADERS = {
    "2.5.1": [
        "Op Name",
        "OP Type",
        "Task Type",
        "Task Start Time(us)",
        "Task Duration(us)",
        "Task Wait Time(us)",
        "Block Dim",
    ],
    "2.13.0": [
        "Device_id",
        "Op Name",
        "OP Type",
        "Task Type",
        "Task Start Time(us)",
        "Task Duration(us)",
        "Task Wait Time(us)",
        "Block Num",
    ],
}
KERNEL_BASE_HEADERS = {
    "2.5.1": ["Name", "Type", "Accelerator Core", "Start Time(us)", "Duration(us)", "Wait Time(us)", "Block Dim"],
    "2.13.0": [
        "Device_id",
        "Name",
        "Type",
        "Accelerator Core",
        "Start Time(us)",
        "Duration(us)",
        "Wait Time(us)",
        "Block Num",
    ],
}
ADDITIONAL_HEADERS = {  # 2.13.0 only: shape columns kept at Level0 when op_summary has them
    "2.13.0": [
        "Mix Block Num",
        "Input Shapes",
        "Input Data Types",
        "Input Formats",
        "Output Shapes",
        "Output Data Types",
        "Output Formats",
    ],
}
for _table in (SHOW_HEADERS, KERNEL_BASE_HEADERS, ADDITIONAL_HEADERS):
    _table["2.14.0"] = _table["2.13.0"]
ADDITIONAL_HEADERS["2.5.1"] = []
FILTERED = {"2.5.1": ["Device_id"], "2.13.0": [], "2.14.0": []}  # prof_bean/_common_bean.py FILTER_COL_LIST
OP_STATISTIC_HEADERS = [
    "Device_id",
    "OP Type",
    "Core Type",
    "Count",
    "Total Time(us)",
    "Min Time(us)",
    "Avg Time(us)",
    "Max Time(us)",
    "Ratio(%)",
]
STEP_TRACE_TITLE = {
    "2.5.1": [
        "Step",
        "Computing",
        "Communication(Not Overlapped)",
        "Overlapped",
        "Communication",
        "Free",
        "Stage",
        "Bubble",
        "Communication(Not Overlapped and Exclude Receive)",
        "Preparing",
    ],
}
STEP_TRACE_TITLE["2.13.0"] = STEP_TRACE_TITLE["2.14.0"] = ["Device_id"] + STEP_TRACE_TITLE["2.5.1"]
OPERATOR_HEADERS = [
    "Name",
    "Input Shapes",
    "Call Stack",
    "Host Self Duration(us)",
    "Host Total Duration(us)",
    "Device Self Duration(us)",
    "Device Total Duration(us)",
    "Device Self Duration With AICore(us)",
    "Device Total Duration With AICore(us)",
]


def op_summary_columns(version: str) -> list[str]:
    """CANN's op_summary columns (task_time l1), with the block-count names the wheel's own headers use."""
    block, mix = ("Block Dim", "Mix Block Dim") if version == "2.5.1" else ("Block Num", "Mix Block Num")
    return [
        "Device_id",
        "Model ID",
        "Task ID",
        "Stream ID",
        "Op Name",
        "OP Type",
        "OP State",
        "Task Type",
        "Task Start Time(us)",
        "Task Duration(us)",
        "Task Wait Time(us)",
        block,
        mix,
        "HF32 Eligible",
        "Input Shapes",
        "Input Data Types",
        "Input Formats",
        "Output Shapes",
        "Output Data Types",
        "Output Formats",
        "Context ID",
        "aicore_time(us)",
        "aic_total_cycles",
    ]


def variant(version: str) -> str:
    """The wheel whose formats a version writes: 2.5.1's before 2.13, 2.13.0's from it (2.14.0 writes the same)."""
    if version in VERSIONS:
        return version
    return "2.13.0" if tuple(map(int, version.split(".")[:2])) >= (2, 13) else "2.5.1"


def all_kernel_headers(version: str, level: str, aic_metrics: str) -> bool:
    if version == "2.5.1":
        return aic_metrics != "ACL_AICORE_NONE"
    return level != "Level0"


def kernel_details_header(version: str, level: str, aic_metrics: str, steps: bool) -> tuple[list[str], list[str]]:
    """(the header kernel_details.csv gets, the op_summary column each header cell is read from), as the wheel's
    KernelViewParser writes it."""
    columns = [c for c in op_summary_columns(version) if c not in FILTERED[version]]
    show = SHOW_HEADERS[version]
    rename = dict(zip(show, KERNEL_BASE_HEADERS[version]))
    if all_kernel_headers(version, level, aic_metrics):
        read = columns
    else:
        read = show + [h for h in ADDITIONAL_HEADERS[version] if h in columns]
    header = [rename.get(h, h) for h in read]
    return (["Step Id"] + header if steps else header), read


DEFAULTS = {"profiler_fails": False, "aicpu_ops": []}

# aten operator -> (Ascend kernel type, core type)
KERNELS = (
    ("convolution", "Conv2D", "AI_CORE"),
    ("addmm", "MatMulV2", "AI_CORE"),
    ("linear", "MatMulV2", "AI_CORE"),
    ("bmm", "BatchMatMulV2", "AI_CORE"),
    ("matmul", "BatchMatMulV2", "AI_CORE"),
    ("attention", "FlashAttentionScore", "MIX_AIC"),
    ("softmax", "SoftmaxV2", "AI_VECTOR_CORE"),
    ("layer_norm", "LayerNormV3", "AI_VECTOR_CORE"),
    ("batch_norm", "BNInfer", "AI_VECTOR_CORE"),
    ("silu", "Swish", "AI_VECTOR_CORE"),
    ("add", "Add", "AI_VECTOR_CORE"),
    ("mul", "Mul", "AI_VECTOR_CORE"),
    ("copy", "TransData", "AI_VECTOR_CORE"),
    ("cat", "ConcatD", "AI_VECTOR_CORE"),
    ("mean", "ReduceMean", "AI_VECTOR_CORE"),
)

PROFILER = """
import csv, json, os, socket, time
from datetime import datetime, timezone

import torch
import torch_npu

_V = torch_npu.OPTIONS["version"]
_NEW = tuple(int(x) for x in _V.split(".")[:2]) >= (2, 13)
_P = torch_npu.OPTIONS


class ProfilerLevel:
    Level0 = "Level0"
    Level1 = "Level1"
    Level2 = "Level2"
    Level_none = "Level_none"


class AiCMetrics:
    PipeUtilization = "ACL_AICORE_PIPE_UTILIZATION"
    ArithmeticUtilization = "ACL_AICORE_ARITHMETIC_UTILIZATION"
    Memory = "ACL_AICORE_MEMORY_BANDWIDTH"
    MemoryL0 = "ACL_AICORE_L0B_AND_WIDTH"
    MemoryUB = "ACL_AICORE_MEMORY_UB"
    ResourceConflictRatio = "ACL_AICORE_RESOURCE_CONFLICT_RATIO"
    L2Cache = "ACL_AICORE_L2_CACHE"
    MemoryAccess = "ACL_AICORE_MEMORY_ACCESS"
    AiCoreNone = "ACL_AICORE_NONE"


class ExportType:
    Db = "db"
    Text = "text"


_UNSET = object()


class _ExperimentalConfig:
    def __init__(self, profiler_level=ProfilerLevel.Level0, aic_metrics=_UNSET, l2_cache=False, msprof_tx=False,
                 data_simplification=True, record_op_args=False, op_attr=False, gc_detect_threshold=None,
                 export_type=_UNSET):
        if aic_metrics is _UNSET:
            aic_metrics = AiCMetrics.PipeUtilization if _NEW else AiCMetrics.AiCoreNone
        if export_type is _UNSET:
            export_type = ExportType.Text if _NEW else None
        self._profiler_level = profiler_level
        self._aic_metrics = aic_metrics
        if not _NEW and profiler_level not in (ProfilerLevel.Level_none, ProfilerLevel.Level0) \\
                and aic_metrics == AiCMetrics.AiCoreNone:
            self._aic_metrics = AiCMetrics.PipeUtilization
        if profiler_level in (ProfilerLevel.Level0, ProfilerLevel.Level_none):
            self._aic_metrics = AiCMetrics.AiCoreNone
        if not export_type:
            self._export_type = [ExportType.Text]
        else:
            self._export_type = [export_type] if isinstance(export_type, str) else list(set(export_type))
        torch_npu.CALLS.append(f"profiler config level={self._profiler_level} aic={self._aic_metrics} "
                               f"export={self._export_type}")

    @property
    def export_type(self):
        return self._export_type


class ProfilerAction:
    NONE, WARMUP, RECORD, RECORD_AND_SAVE = range(4)


class Schedule:
    def __init__(self, wait, active, warmup=0, repeat=0, skip_first=0):
        self.wait, self.active, self.warmup, self.repeat, self.skip_first = wait, active, warmup, repeat, skip_first

    def __call__(self, step):
        if step < self.skip_first:
            return ProfilerAction.NONE
        step -= self.skip_first
        cycle = self.wait + self.warmup + self.active
        if self.repeat > 0 and step // cycle >= self.repeat:
            return ProfilerAction.NONE
        mod = step % cycle
        if mod < self.wait:
            return ProfilerAction.NONE
        if mod < self.wait + self.warmup:
            return ProfilerAction.WARMUP
        return ProfilerAction.RECORD if mod < cycle - 1 else ProfilerAction.RECORD_AND_SAVE


schedule = Schedule


def tensorboard_trace_handler(dir_name=None, worker_name=None, analyse_flag=True, async_mode=False):
    worker = "{}_{}".format(worker_name or socket.gethostname(), os.getpid())
    stamp = datetime.now(tz=timezone.utc).astimezone().strftime("%Y%m%d%H%M%S%f")[:-3]
    path = os.path.join(dir_name or os.getcwd(), f"{worker}_{stamp}_ascend_pt")

    def handler_fn(prof_inst):
        if analyse_flag:
            prof_inst._write(path)

    return handler_fn


class profile:
    def __init__(self, *, activities=None, schedule=None, on_trace_ready=None, record_shapes=False,
                 profile_memory=False, with_stack=False, with_flops=False, with_modules=False,
                 experimental_config=None, use_cuda=None):
        self.schedule = schedule or (lambda step: ProfilerAction.RECORD)
        self.record_steps = schedule is not None
        self.on_trace_ready = on_trace_ready
        self.config = experimental_config or _ExperimentalConfig()
        self.step_num = 0
        self.steps = []  # [(step id, key_averages)]
        self._torch = None

    def _begin(self):
        if self.schedule(self.step_num) in (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE):
            self._torch = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._torch.__enter__()

    def _end(self):
        if self._torch is not None:
            self._torch.__exit__(None, None, None)
            self.steps.append((self.step_num, self._torch.key_averages()))
            self._torch = None

    def __enter__(self):
        torch_npu.CALLS.append("profiler start")
        self._begin()
        return self

    def step(self):
        self._end()
        action = self.schedule(self.step_num)
        self.step_num += 1
        if action == ProfilerAction.RECORD_AND_SAVE and self.on_trace_ready:
            self.on_trace_ready(self)
        self._begin()

    def __exit__(self, *exc):
        self._end()
        torch_npu.CALLS.append("profiler stop")

    # the output folder, as the wheel being imitated writes it
    def _write(self, path):
        import npu_profiler_standin as spec

        version = spec.variant(_V)

        torch_npu.CALLS.append(f"profiler analysed {os.path.basename(path)}")
        if _P["profiler_fails"]:  # torch_npu logs its own failure and writes no CSV (no_exception_func)
            os.makedirs(path, exist_ok=True)
            return
        out = os.path.join(path, "ASCEND_PROFILER_OUTPUT")
        os.makedirs(out, exist_ok=True)
        level, aic = self.config._profiler_level, self.config._aic_metrics
        header, read = spec.kernel_details_header(version, level, aic, self.record_steps)
        hf32_conv = torch.npu.conv.allow_hf32
        hf32_matmul = torch.npu.matmul.allow_hf32
        kernels, stats, operators, steps = [], {}, [], []
        clock = 0.0
        for step_id, events in self.steps:
            busy = 0.0
            for evt in events:
                if evt.self_cpu_time_total <= 0 or not evt.count:
                    continue
                kernel = next(((t, c) for key, t, c in spec.KERNELS if key in evt.key), None)
                if kernel is None:
                    continue
                ktype, core = kernel
                if evt.key in _P["aicpu_ops"]:
                    core = "AI_CPU"
                us = evt.self_cpu_time_total / evt.count
                hf32 = "YES" if (ktype == "Conv2D" and hf32_conv) or (ktype.startswith(("MatMul", "BatchMatMul"))
                                                                       and hf32_matmul) else "NO"
                for _ in range(evt.count):
                    values = {"Device_id": "0", "Model ID": "4294967295", "Task ID": "1", "Stream ID": "2",
                              "Op Name": f"{ktype}_{len(kernels)}", "OP Type": ktype, "OP State": "dynamic",
                              "Task Type": core, "Task Start Time(us)": f"{clock:.3f}",
                              "Task Duration(us)": f"{us:.3f}", "Task Wait Time(us)": "0.5", "Block Dim": "8",
                              "Block Num": "8", "Mix Block Dim": "0", "Mix Block Num": "0", "HF32 Eligible": hf32,
                              "Input Shapes": '"1,2"', "Input Data Types": "FLOAT", "Input Formats": "NCHW",
                              "Output Shapes": '"1,2"', "Output Data Types": "FLOAT", "Output Formats": "NCHW",
                              "Context ID": "N/A", "aicore_time(us)": f"{us:.3f}", "aic_total_cycles": "100"}
                    row = [values.get(c, "") for c in read]
                    kernels.append(([str(step_id)] if self.record_steps else []) + row)
                    clock += us
                    busy += us
                    entry = stats.setdefault((ktype, core), [0, 0.0, us, us])
                    entry[0] += 1
                    entry[1] += us
                    entry[2], entry[3] = min(entry[2], us), max(entry[3], us)
            for op in torch_npu.OPTIONS["fallback_ops"]:  # ran on the host: host time, no device time
                operators.append([op, "", "", "150.0", "150.0", "0", "0", "0", "0"])
            steps.append((step_id, busy, busy * 0.25))
        with open(os.path.join(out, "kernel_details.csv"), "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(kernels)
        if level in ("Level1", "Level2"):  # _profiler_config.py LEVEL_PARSER_CONFIG: op_statistic from Level1
            stat_header = [h for h in spec.OP_STATISTIC_HEADERS if h not in spec.FILTERED[version]]
            total = sum(v[1] for v in stats.values()) or 1.0
            with open(os.path.join(out, "op_statistic.csv"), "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(stat_header)
                for (ktype, core), (n, t, lo, hi) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
                    values = {"Device_id": "0", "OP Type": ktype, "Core Type": core, "Count": n,
                              "Total Time(us)": f"{t:.3f}", "Min Time(us)": f"{lo:.3f}", "Avg Time(us)": f"{t / n:.3f}",
                              "Max Time(us)": f"{hi:.3f}", "Ratio(%)": f"{100 * t / total:.3f}"}
                    writer.writerow([values[h] for h in stat_header])
        title = spec.STEP_TRACE_TITLE[version]
        with open(os.path.join(out, "step_trace_time.csv"), "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(title)
            for step_id, busy, free in steps:
                values = {"Device_id": "0", "Step": step_id, "Computing": f"{busy:.3f}", "Free": f"{free:.3f}",
                          "Stage": f"{busy + free:.3f}"}
                writer.writerow([values.get(h, "0") for h in title])
        with open(os.path.join(out, "operator_details.csv"), "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(spec.OPERATOR_HEADERS)
            writer.writerows(operators)
        with open(os.path.join(out, "trace_view.json"), "w") as fh:
            json.dump([{"ph": "X", "name": row[1 if self.record_steps else 0], "ts": 0, "dur": 1, "pid": 0, "tid": 0}
                       for row in kernels], fh)
"""


def files() -> dict[str, str]:
    """The files the stand-in package gets: torch_npu/profiler/__init__.py."""
    return {"torch_npu/profiler/__init__.py": PROFILER}
