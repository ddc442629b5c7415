"""msprobe (MindStudio Probe, `pip install mindstudio-probe`) as the layer-by-layer engine: both sides dumped with its
`PrecisionDebugger` and compared by `msprobe compare`, the table Ascend's guides and support engineers read.

    DIR/config.<rank>.reference.json   the msprobe config.json each side was dumped with (task, level, dump_path)
    DIR/config.<rank>.target.json
    DIR/reference/step0/<rank>/        the CPU float32 eager reference: dump.json, stack.json, construct.json
    DIR/target/step0/<rank>/           the target (its device, dtype and mode), the same inputs
    DIR/compare/<rank>/compare_result_*.csv   msprobe's table; compare.log its console output

<rank> is rank{N}, msprobe's own folder for a rank: the torchrun rank, else rank0 (the dump is started with rank_id=0;
without a rank msprobe would write proc{pid}, core/dump/service.py:418-419, which its multi-rank commands do not read:
`msprobe compare -da` lists `rank*` folders, core/compare/utils.py:916-917 check_and_return_dir_contents(..., 'rank'),
and graph_visualize does the same). So every msprobe command runs on DIR/target/step0 and DIR/reference/step0 as they
are, e.g. `msprobe compare -tp DIR/target/step0 -gp DIR/reference/step0 -o OUT -da`.

What msprobe is and does, as read in mindstudio-probe 26.2.0 (site-packages/msprobe) and Ascend/msprobe's docs:
  - PrecisionDebugger is a process-wide singleton (core/dump/debugger/precision_debugger.py:26-38); its config
    (task, level, dump_path) is read once. msprobe applies a changed config mid-run through
    PytorchService.apply_runtime_config (pytorch/dump/pytorch_service.py:44-49; its own hot reload,
    pytorch/dump/debugger/precision_debugger.py:190-227): the same call switches this process's dumps from
    DIR/reference to DIR/target, and lets a later run use another DIR, task or level.
  - L1 and mix wrap torch's APIs (torch.Tensor, torch, torch.nn.functional, torch._VF: pytorch/dump/api_dump/
    api_register.py:48-55) for the whole process; dump_and_compare() restores them when it is done
    (api_registry.py:241).
  - `msprobe compare -tp TARGET -gp GOLDEN -o OUT` is the documented comparison (docs/zh/user_guide/
    accuracy_compare/pytorch_accuracy_compare_instruct.md, "命令格式"); it writes compare_result_*.csv (--xlsx for
    .xlsx). Each row's Result is pass | warning | error, with Err_message saying why (core/compare/
    indicator_analysis/algorithm.py); a dtype that differs from the benchmark's is an error by itself
    (DTypeErrChecker, algorithm.py:229-263), so a bfloat16 target against the float32 reference fails every tensor
    row for that reason. Such a row is counted apart (dtype_only) only when its numbers are within what the dtype
    explains: the project's --layers bound for the dtype (metrics.Thresholds.layer_min_cosine: 0.99 for bf16), as
    msprobe's Cosine in tensor mode, or in statistics mode as the bound that cosine puts on relative L2 error,
    sqrt(2 (1 - cosine)) (14 % for bf16), applied to NormRelativeErr and to the largest of |Max diff| and |Min diff|
    against the benchmark's largest magnitude. A broken layer (37 % off) stays a failing row, and the first one.
  - Dynamo graphs of torch >= 2.7 are not dumped ("The dynamo scenario of PyTorch 2.7 and later versions is not
    supported": docs/en/dump/pytorch_data_dump_instruct.md, Constraints), so a compiled target is refused.
  - Paths may hold only letters, digits and _ . : / - (FileCheckConst.FILE_VALID_PATTERN, core/common/const.py:1060;
    docs/zh/install_guide/msprobe_install_guide.md 6.1).
"""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import importlib
import importlib.metadata
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
from packaging.version import InvalidVersion, Version

from mobilevit_npu import atomic, flags, metrics, models, modes, reports
from mobilevit_npu.errors import UserError, first_line
from mobilevit_npu.profiling import number_cell

logger = logging.getLogger("mobilevit_npu.probe")

LEVELS = flags.MSPROBE_LEVELS
TASKS = flags.MSPROBE_TASKS
INSTALL = flags.MSPROBE_INSTALL
MIN_VERSION = "26.1.0"  # the oldest release tried (docs/msprobe.md, versions tried)
DTYPE_MESSAGE = "The dtype of NPU and Bench are inconsistent."  # algorithm.py DTypeErrChecker.err_msg
PATH_PATTERN = re.compile(r"^[a-zA-Z0-9_.:/-]+$")  # msprobe's FileCheckConst.FILE_VALID_PATTERN
FIRST_FAILING_KEPT = 10
# "Module.{name}.{class}.forward.{call}[.input.0|.output.0|.parameters.weight...]" (dump docs, "dump_tensor_data")
MODULE_ROW = re.compile(
    r"^Module\.(?P<path>.+)\.(?P<cls>[A-Za-z_][A-Za-z0-9_]*)\.(?P<dir>forward|backward)"
    r"\.(?P<call>\d+)(?:\..*)?$"
)


add_args = flags.add_msprobe_args  # --msprobe and its options: declared torch-free, for --help


def _import_msprobe():
    """msprobe's PyTorch package (the import tests make fail to check the refusal). msprobe prints every step of its
    work to stdout at INFO; unless MSPROBE_LOG_LEVEL says otherwise (msprobe's own variable, read when its logger is
    made: core/common/log.py:39-45, const.py:1131-1145), only its warnings and errors come between our lines."""
    os.environ.setdefault("MSPROBE_LOG_LEVEL", "2")  # 0 DEBUG, 1 INFO, 2 WARNING, 3 ERROR
    return importlib.import_module("msprobe.pytorch")


def msprobe_version() -> str:
    """The installed mindstudio-probe's version; UserError (with the install command) when it is absent, broken or
    older than MIN_VERSION (8.x does not import under numpy 2, and lacks the config objects dump_and_compare() uses)."""
    try:
        _import_msprobe()
    except ImportError as exc:
        raise UserError(
            f"--msprobe needs msprobe (MindStudio Probe), which is not importable ({first_line(exc)}): {INSTALL}"
        ) from exc
    except Exception as exc:  # an install that fails on import (8.3.3 under numpy 2: np.unicode_)
        raise UserError(
            f"--msprobe: msprobe fails to import ({type(exc).__name__}: {first_line(exc)}): "
            f"pip install 'mindstudio-probe>={MIN_VERSION}'"
        ) from exc
    try:
        version = importlib.metadata.version("mindstudio-probe")
    except importlib.metadata.PackageNotFoundError:  # msprobe importable without its distribution's metadata
        return "unknown"
    try:
        too_old = Version(version).release < Version(MIN_VERSION).release
    except InvalidVersion:  # not a version packaging reads: let msprobe's own import decide
        too_old = False
    if too_old:
        raise UserError(
            f"--msprobe needs mindstudio-probe >= {MIN_VERSION} (the oldest tried), not {version}: "
            f"pip install 'mindstudio-probe>={MIN_VERSION}'"
        )
    return version


def check_dumpable(mode: str, runtime: str = "torch", out_dir: str | os.PathLike | None = None) -> str:
    """Refuse, before any work, what msprobe cannot dump; returns msprobe's version. One-line UserErrors."""
    if runtime != "torch":
        raise UserError(
            f"--msprobe dumps torch modules and APIs; --runtime {runtime} runs its own graph (ONNX "
            f"Runtime or an ATC .om), with nothing for msprobe's PrecisionDebugger to hook"
        )
    # modes.Mode.msprobe: an eager module msprobe can hook, or (an autocast mode: fastpath compiled under autocast)
    # its eager twin under the same autocast, as --layers watches it (modes.Mode.twin)
    dumpable = modes.msprobe_names()
    declared = modes.REGISTRY.get(mode)
    if declared is not None and declared.compiled and not declared.msprobe:
        why = "msprobe: dynamo graphs of torch >= 2.7 are not dumped"
        raise UserError(
            f"--msprobe cannot dump --target_mode {mode}: a compiled graph has no module or API calls "
            f"to hook ({why}); use {modes.spoken(dumpable)}"
        )
    if mode not in dumpable:
        raise UserError(f"--msprobe dumps eager targets ({', '.join(dumpable)}), not --target_mode {mode}")
    if out_dir is not None:
        check_out_dir(out_dir)
    return msprobe_version()


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """DIR must be a path msprobe accepts, and must not hold an earlier run's dumps (nothing is overwritten)."""
    path = Path(out_dir).expanduser().resolve()
    if not PATH_PATTERN.match(str(path)):
        raise UserError(
            f"--msprobe {out_dir}: msprobe accepts only letters, digits and _ . : / - in its paths ({path} has others)"
        )
    if path.exists() and not path.is_dir():
        raise UserError(f"--msprobe {out_dir} is a file, not a folder")
    taken = [name for name in ("reference", "target", "compare") if (path / name).exists()]
    if taken:
        raise UserError(
            f"--msprobe {out_dir} already holds an msprobe run ({', '.join(taken)}): give a new folder or remove it"
        )


def module_name(msprobe_name: str) -> Optional[str]:
    """The project's module name (as in named_modules; `name#2` for a second call, layerwise's key) of an msprobe
    module row such as `Module.mobilevit.encoder.layer.1.MobileViTMobileNetLayer.forward.0.output.0`; None for an
    API row (`Functional.conv2d.0.forward.output.0`)."""
    match = MODULE_ROW.match(msprobe_name)
    if not match:
        return None
    call = int(match.group("call"))
    return match.group("path") if call == 0 else f"{match.group('path')}#{call + 1}"


def compare_names(msprobe_name: str, project_name: str) -> bool:
    """True when an msprobe row (or module name) and a project module name (layerwise) name the same module call."""
    name = module_name(msprobe_name) if msprobe_name.startswith("Module.") else msprobe_name
    return name is not None and name == project_name


def _config(task: str, level: str, dump_path: Path) -> dict[str, Any]:
    """msprobe's config.json (docs/en/dump/config_json_introduct.md): every rank, every step, forward data only."""
    return {
        "task": task,
        "dump_path": str(dump_path),
        "rank": [],
        "step": [],
        "level": level,
        "async_dump": False,
        "extra_info": True,
        "statistics": {"scope": [], "list": [], "data_mode": ["all"], "summary_mode": "statistics"},
        "tensor": {"scope": [], "list": [], "data_mode": ["all"]},
    }


def _debugger(config_path: Path):
    """This process's PrecisionDebugger, set to `config_path`: made on the first call; later calls apply the new
    config the way msprobe's hot reload does (PrecisionDebugger._apply_reloaded_config, precision_debugger.py:208-227,
    through PytorchService.apply_runtime_config), since the singleton ignores a second constructor's arguments."""
    from msprobe.core.dump.common_config import CommonConfig
    from msprobe.pytorch import PrecisionDebugger
    from msprobe.pytorch.dump.debugger.debugger_config import DebuggerConfig
    from msprobe.pytorch.dump.pt_config import parse_task_config

    fresh = PrecisionDebugger._instance is None
    debugger = PrecisionDebugger(config_path=str(config_path))
    if not fresh:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        common = CommonConfig(raw)
        task_config = parse_task_config(common.task, raw)
        config = DebuggerConfig(common, task_config, None, None, None)
        debugger.common_config, debugger.task_config, debugger.task = common, task_config, common.task
        debugger.config = config
        debugger.service.apply_runtime_config(config)
    PrecisionDebugger.set_init_step(0)  # each dump is step0 of its own folder
    return debugger


@torch.no_grad()
def _dump_side(
    debugger,
    module: torch.nn.Module,
    pixels: torch.Tensor,
    autocast: Optional[str],
    rank: Optional[int],
    autocast_dtype: torch.dtype = torch.bfloat16,
) -> None:
    """One forward of `module` (a Hugging Face model, called as model(pixel_values=...)) between start and stop, under
    autocast to `autocast_dtype` on device type `autocast` when given."""
    debugger.start(model=module, rank_id=rank)  # rank_id: msprobe's own, else it asks torch.distributed
    try:
        with torch.autocast(device_type=autocast, dtype=autocast_dtype) if autocast else nullcontext():
            module(pixel_values=pixels)
    finally:
        debugger.stop()
        debugger.step()


def _restore_apis(debugger) -> None:
    """Unwrap torch's APIs (L1/mix wrapped them for the whole process), so the rest of the run calls torch itself."""
    register = getattr(debugger.service, "api_register", None)
    if register is not None and getattr(register, "all_api_registered", False):
        register.restore_all_api()


def _rank_id(rank: Optional[int]) -> int:
    """The rank the dump is started with: the caller's, else torch.distributed's, else 0 (a single process is rank 0,
    so msprobe writes rank0/ rather than proc{pid}/, the layout its multi-rank commands read)."""
    if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    return 0 if rank is None else int(rank)


def _rank_folder(rank: Optional[int]) -> str:
    """msprobe's per-rank folder (core/dump/service.py:418-419, `rank{N}` for a given rank_id)."""
    return f"rank{_rank_id(rank)}"


def _compare(target_json: Path, reference_json: Path, out: Path) -> Path:
    """`msprobe compare -tp TARGET -gp GOLDEN -o OUT` (the documented CLI), in a child process; the table's path."""
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-c",
        "import sys; from msprobe.msprobe import main; sys.exit(main())",
        "compare",
        "-tp",
        str(target_json),
        "-gp",
        str(reference_json),
        "-o",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    atomic.write(out / "compare.log", done.stdout + done.stderr)
    tables = sorted(out.glob("compare_result_*.csv"))
    if done.returncode != 0 or not tables:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(
            f"msprobe compare wrote no table (exit {done.returncode}): {tail[0]} (see {out}/compare.log)"
        )
    return tables[-1]


def _messages(text: str) -> list[str]:
    """Err_message cells hold a JSON list of strings (`["error: ...", "warning: ..."]`); older builds a plain string."""
    text = (text or "").strip()
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def read_table(path: str | os.PathLike) -> list[dict[str, str]]:
    """msprobe's compare table (csv), rows in its order (the dump's: execution order)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def dtype_bound(dtype: Optional[str]) -> Optional[float]:
    """The relative error (0..1) the dtype explains: sqrt(2 (1 - c)) for --layers' cosine bound c of the dtype (a
    relative L2 error e gives cosine 1 - e^2/2 at most); None for a dtype without one."""
    thresholds = metrics.DEFAULT_THRESHOLDS.get(dtype or "")
    return math.sqrt(2 * (1 - thresholds.layer_min_cosine)) if thresholds else None


def beyond_dtype(row: dict[str, str], dtype: Optional[str]) -> Optional[str]:
    """Why a row's numbers are beyond what `dtype` explains (module docstring), or None when they are within: Cosine
    under --layers' bound in tensor mode; else NormRelativeErr, or max(|Max diff|, |Min diff|) over max(|Bench max|,
    |Bench min|), above dtype_bound. A row with none of these numbers (a non-tensor value) has nothing against it."""
    bound = dtype_bound(dtype)
    if bound is None:
        return "no dtype bound"
    name = models.dtype_name(dtype)
    cosine = number_cell(row.get("Cosine"))
    if cosine is not None:
        least = metrics.DEFAULT_THRESHOLDS[dtype].layer_min_cosine
        return None if cosine >= least else f"beyond {name}: cosine {cosine:.6f} < {least}"
    found = []
    norm = number_cell(row.get("NormRelativeErr"))
    if norm is not None:
        found.append(("L2 norm", norm / 100))
    diffs = [abs(v) for v in (number_cell(row.get("Max diff")), number_cell(row.get("Min diff"))) if v is not None]
    scale = [abs(v) for v in (number_cell(row.get("Bench max")), number_cell(row.get("Bench min"))) if v is not None]
    if diffs and scale:
        ratio = max(diffs) / max(scale) if max(scale) > 0 else (0.0 if max(diffs) == 0 else math.inf)
        found.append(("max/min", ratio))
    over = [f"{what} {value:.1%}" for what, value in found if value > bound]
    return f"beyond {name}: {', '.join(over)} off (bound {bound:.0%})" if over else None


def within_dtype(row: dict[str, str], dtype: Optional[str]) -> bool:
    """Whether a row's numbers are within what `dtype` explains (beyond_dtype says nothing against them)."""
    return beyond_dtype(row, dtype) is None


def summarize_compare(rows: list[dict[str, str]], dtypes_differ: bool, dtype: Optional[str] = None) -> dict[str, Any]:
    """Counts by Result, the dtype-only failures (when the sides' dtypes differ by design) and the first failing rows.

    A row is dtype-only when msprobe's Result is error, its only error is DTYPE_MESSAGE, and its numbers are within
    what the target's `dtype` explains (within_dtype): that row failed for the dtype alone. msprobe's warnings on such
    a row (an output's relative error ten times its input's: RelativeWarnChecker, algorithm.py:356-390) are rounding
    the dtype explains too, judged by the same bound. A row with another error (NaN, shape, an output 50 % off), or
    numbers beyond the dtype, stays among the failing ones, with all of msprobe's messages."""
    counts = Counter((row.get("Result") or "").strip() or "(empty)" for row in rows)
    dtype_only = 0
    failing: list[dict[str, str]] = []
    first_module = None
    for row in rows:
        result = (row.get("Result") or "").strip()
        if result.lower() == "pass":
            continue
        messages = _messages(row.get("Err_message", ""))
        errors = [m for m in messages if m.lower().startswith("error")]
        if (
            dtypes_differ
            and result.lower() == "error"
            and errors
            and all(m.endswith(DTYPE_MESSAGE) for m in errors)
            and within_dtype(row, dtype)
        ):
            dtype_only += 1
            continue
        name = row.get("NPU Name", "")
        if len(failing) < FIRST_FAILING_KEPT:
            why = beyond_dtype(row, dtype) if dtypes_differ and dtype_bound(dtype) is not None else None
            failing.append({"name": name, "result": result, "message": "; ".join(messages + ([why] if why else []))})
        if first_module is None:
            first_module = module_name(name)
    return {
        "counts": dict(sorted(counts.items())),
        "dtype_only": dtype_only,
        "first_failing": failing,
        "first_failing_module": first_module,
    }


def with_project(section: dict[str, Any], project_first_divergent: Optional[str]) -> dict[str, Any]:
    """The section with the project's own first divergent module (--layers) beside msprobe's first failing module,
    and whether they agree (None when either is missing). A disagreement is said in the note."""
    section = dict(section)
    ours, theirs = project_first_divergent, section.get("first_failing_module")
    section["project_first_divergent"] = ours
    section["agree"] = None if ours is None or theirs is None else compare_names(theirs, ours)
    if section["agree"] is False:
        said = f"msprobe's first failing module ({theirs}) is not --layers' first divergent one ({ours})"
        section["note"] = f"{section['note']}; {said}" if section.get("note") else said
    return section


def dump_and_compare(
    out_dir: str | os.PathLike,
    reference_module: torch.nn.Module,
    target_module: torch.nn.Module,
    inputs: torch.Tensor,
    target_dtype: str,
    level: str = "mix",
    task: str = "statistics",
    *,
    to_target: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    autocast: Optional[str] = None,
    images: Optional[int] = None,
    rank: Optional[int] = None,
    project_first_divergent: Optional[str] = None,
    twin: bool = True,
) -> dict[str, Any]:
    """Dump both sides with msprobe on the same images, compare them with `msprobe compare`; the report section.

    `reference_module` runs the float32 CPU batch `inputs` as is; `target_module` runs `to_target(inputs)` (default:
    cast to `target_dtype`), under autocast to `target_dtype` (bf16 | fp16) on device type `autocast` when given:
    the eager twin of a compiled autocast mode (`twin`), or the autocast mode's own model. Both are Hugging Face
    models called as model(pixel_values=x). `images` bounds the images dumped (the first ones); `rank` names the
    dump folder when torch.distributed is not initialised (else msprobe asks torch.distributed)."""
    if level not in LEVELS or task not in TASKS:
        raise UserError(f"msprobe level must be one of {', '.join(LEVELS)} and task one of {', '.join(TASKS)}")
    version = msprobe_version()
    root = Path(out_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    pixels = inputs[:images] if images else inputs
    # msprobe changes the modules it hooks for good (forward pre-hooks, an instance-level forward wrapper whose
    # closure a later deep copy would still call: module_processor.py wrap_forward_with_hook_safety), so it dumps
    # copies and the caller's models stay as they were.
    reference_module, target_module = copy.deepcopy(reference_module), copy.deepcopy(target_module)
    reference_dump, target_dump = root / "reference", root / "target"
    rank_id = _rank_id(rank)
    folder = _rank_folder(rank_id)
    # one per process and side (ranks never write the same file): each is the msprobe config that side was dumped with
    reference_config = root / f"config.{folder}.reference.json"
    target_config = root / f"config.{folder}.target.json"
    debugger = None
    try:
        reports.write_json_atomic(reference_config, _config(task, level, reference_dump))
        debugger = _debugger(reference_config)
        _dump_side(debugger, reference_module, pixels, None, rank_id)
        reports.write_json_atomic(target_config, _config(task, level, target_dump))
        debugger = _debugger(target_config)
        target_input = to_target(pixels) if to_target else pixels.to(models.DTYPES[target_dtype])
        # under autocast the target's dtype is the autocast dtype (targets.Side.dtype: modes.Mode.judged_by)
        _dump_side(debugger, target_module, target_input, autocast, rank_id, models.DTYPES[target_dtype])
    finally:
        if debugger is not None:
            _restore_apis(debugger)
    reference_json = reference_dump / "step0" / folder / "dump.json"
    target_json = target_dump / "step0" / folder / "dump.json"
    for path in (reference_json, target_json):
        if not path.is_file():
            raise RuntimeError(f"msprobe wrote no {path}")
    table = _compare(target_json, reference_json, root / "compare" / folder)
    dtypes_differ = models.DTYPES[target_dtype] != torch.float32 or autocast is not None
    dtype = target_dtype if target_dtype != "fp32" else None
    summary = summarize_compare(read_table(table), dtypes_differ, dtype)
    notes = []
    if level == "L1":
        notes.append("level L1 dumps torch APIs only: no module rows, so no first failing module")
    if autocast and twin:
        notes.append(
            f"the {dtype} target's eager twin was dumped under the same {models.dtype_name(dtype)} autocast (its "
            "compiled graph has no modules to hook)"
        )
    elif autocast:
        notes.append(f"the {dtype} target was dumped as it runs, under {models.dtype_name(dtype)} autocast")
    dtype_note = None
    if dtypes_differ:
        dtype_note = (
            f"msprobe marks every tensor whose dtype differs from the benchmark's as error (\"{DTYPE_MESSAGE}"
            f'"); the target runs in {models.dtype_name(target_dtype)}'
            f"{' autocast' if autocast else ''} against the float32 reference by design, so the "
            f"{summary['dtype_only']} row(s) failed for that reason alone (their error within what "
            f"{models.dtype_name(dtype)} explains: {dtype_bound(dtype):.0%} relative, --layers' cosine "
            f"{metrics.DEFAULT_THRESHOLDS[dtype].layer_min_cosine}) are counted apart, and the failing rows listed are "
            f"the others"
        )
    from mobilevit_npu import schema  # the report's msprobe section, defined once there

    section = schema.Msprobe(
        version=version,
        level=level,
        task=task,
        images_dumped=int(pixels.shape[0]),
        reference_dump=str(reference_dump),
        target_dump=str(target_dump),
        compare_table=str(table),
        counts=summary["counts"],
        dtype_only=summary["dtype_only"],
        dtype_note=dtype_note,
        first_failing=summary["first_failing"],
        first_failing_module=summary["first_failing_module"],
        project_first_divergent=None,
        agree=None,
        note="; ".join(notes) or None,
    )
    return with_project(dataclasses.asdict(section), project_first_divergent)


def run_sides(
    out_dir,
    reference,
    target,
    pixels: torch.Tensor,
    level: str = "mix",
    task: str = "statistics",
    images: Optional[int] = None,
    rank: Optional[int] = None,
    project_first_divergent: Optional[str] = None,
) -> dict[str, Any]:
    """dump_and_compare() for two targets.Side: the reference's model, and the target's hooked module (its eager twin
    for an autocast mode, under the same autocast) fed through the target's own input conversion (dtype, device,
    layout)."""
    return dump_and_compare(
        out_dir,
        reference.hook_model,
        target.hook_model,
        pixels,
        target.dtype,
        level,
        task,
        to_target=target.prepared.to_input,
        autocast=target.device.type if modes.mode(target.mode).autocast else None,
        images=images,
        rank=rank,
        project_first_divergent=project_first_divergent,
        twin=modes.mode(target.mode).twin,
    )


def console_line(section: dict[str, Any]) -> str:
    """One line beside the verdict: msprobe's counts, the dtype-only rows, the first failing module and the table."""
    counts = ", ".join(f"{n} {result}" for result, n in sorted(section["counts"].items()))
    parts = [
        f"msprobe {section['version']} ({section['level']}, {section['task']}, {section['images_dumped']} "
        f"image(s)): {counts}"
    ]
    if section.get("dtype_only"):
        parts.append(f"{section['dtype_only']} of the errors only for the dtype")
    first = section.get("first_failing_module")
    if first is None and section.get("first_failing"):
        first = section["first_failing"][0]["name"]
    parts.append(f"first failing: {first or 'none'}")
    if section.get("agree") is not None:
        parts.append(
            "agrees with --layers" if section["agree"] else f"--layers says {section['project_first_divergent']}"
        )
    parts.append(f"table {section['compare_table']}")
    return "; ".join(parts)
