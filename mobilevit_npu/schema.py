"""The report format, defined once: every report the scripts write, as typed structures, and the one reader.

Each report is a JSON object with `schema_version` and `kind` first, then the header every kind shares (`Header`),
then the kind's own fields. Writers build the dataclass of their kind, sections included, and call `to_json` (the
dataclass is what gets serialised, so a writer cannot write a field these definitions lack); readers call `load`, which
checks every field's presence and type against these definitions and refuses, in one line naming the file and the
field, a missing or mistyped field, an unknown kind, a schema version not in CHANGES, or (unless allowed) an unknown
field. The sections shared with the computing modules are their own dataclasses (metrics.Thresholds,
metrics.ImageMetrics, metrics.Aggregate, metrics.Check, metrics.Agreement, layerwise.LayerReport, layerwise.LayerRow,
flops.Roofline, timing.LatencyStats, profiling.ModeProfile, baseline.BaselineSection): one definition, used to compute
and to read back. `document()` renders this module as the reference page docs/reports.md.

Kinds: `inference` (inference.py --image), `accuracy` (accuracy_run.py on images), `labelled` (accuracy_run.py on
--dataset/--labels), `benchmark` (accuracy_run_perf.py, inference.py --benchmark, benchmarks/bench_peers.py) and
`onnx_export` (export_onnx.py's JSON beside the ONNX).
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from mobilevit_npu import baseline as perf_baseline
from mobilevit_npu import flops, layerwise, metrics, profiling, timing
from mobilevit_npu.errors import UserError

SCHEMA_VERSION = 2

# What each schema version changed: the reader reads every version listed here (an older one upgraded by `_upgrade`)
# and refuses any other in one line. docs/reports.md lists them.
CHANGES: dict[int, str] = {
    1: "the first versioned format",
    2: "typed sections: the benchmark's `settings` (`BenchSettings`), each result's `roofline` (`Roofline`) and the "
    "layer rows of `layers` (`LayerRow`: first_divergent, first_nonfinite, worst) have fixed fields; every section is "
    "written whole, an optional field it lacks as null (`environment.ascend` off Ascend, `model_source.path` of "
    "synthetic weights, the labelled-set fields of an images run's `speed`); the header gains `preprocessing` (the "
    "image processor and the transformers backend the run's pixels matched: null when a version 1 report is read)",
}


class ReportError(UserError):
    """A report that does not match its kind's definition: one line naming the file and the field."""


# ------------------------------------------------------------------------------------------------ shared sections


@dataclass
class ModelSource:
    """Which weights: a model folder (path, weights file, its sha256) or the synthetic weights (seed)."""

    name: str  # the model folder's path, or "synthetic mobilevit-x-small (seed N)"
    synthetic: bool = False
    seed: Optional[int] = None  # synthetic weights only
    path: Optional[str] = None  # the model folder as given
    weights: Optional[str] = None  # the weights file's name in the folder
    sha256: Optional[str] = None  # of the weights file
    weights_digest: Optional[str] = None  # of the weights as loaded (models.weights_digest): names, dtypes, bytes
    hub_id: Optional[str] = None  # the hub repository the weights came from (models.hub_origin); null: a local folder
    revision: Optional[str] = None  # the hub commit of the weights file, when known (models.hub_origin)


@dataclass
class Provenance:
    """What made the report: the project's commit and the installed packages (reports.provenance)."""

    commit: str  # the project's `git rev-parse HEAD` ("+dirty": uncommitted changes), or "not a git checkout"
    packages_sha256: str  # sha256 of the sorted "name==version" lines of every installed distribution
    packages: dict[str, Optional[str]]  # the versions that matter here (torch, transformers, torch_npu, ...)


@dataclass
class Environment:
    """Where it ran (devices.environment)."""

    device: str
    device_name: str
    cpu: str
    cpu_count: Optional[int]
    python: str
    platform: str
    torch: str
    transformers: str
    torch_npu: Optional[str]
    torch_npu_mismatch: Optional[str]  # the torch that torch_npu requires, when it is not the one installed
    cann: Optional[str]
    fp32_precision: dict[str, Any]  # float32 matmul precision; HF32 / TF32 switches on npu / cuda
    cuda: Optional[str]
    torch_threads: int
    torch_interop_threads: int
    omp_num_threads: Optional[str]
    mkldnn: bool
    cpu_bf16: Optional[bool]
    allocator: dict[str, Any]
    load_average: Optional[list[float]]
    pillow: Optional[str]
    ascend: Optional[dict[str, Any]] = None  # the Ascend stack (preflight.stack_facts) where torch_npu is present


@dataclass
class FallbackReport:
    """Operators torch_npu ran on the CPU, as printed by torch_npu (once per operator per process) (npu.py)."""

    device: str
    status: str  # "observed" | "silenced" | "not observable on this rank" | "not an npu"
    operators: list[str]
    note: str
    error_switch: Optional[str] = None  # "TORCH_NPU_FALLBACK_CPU_DISABLE=1" when a fallback is made an error


@dataclass
class ImageError:
    """An input that could not be used, and why."""

    image: str
    error: str


@dataclass
class Preprocessing:
    """How the images became the model's input (preprocessing.PreprocessConfig), as the run matched it."""

    processor: str  # the image-processor class restated (transformers' name, without the backend suffix)
    backend: str  # pil | torchvision: the AutoImageProcessor backend whose pixels the run matched
    pipeline: str  # PreprocessConfig.describe(): resize, crop, rescale, normalize, channel order

    @classmethod
    def of(cls, cfg: Any) -> Optional[Preprocessing]:
        """The section for a preprocessing.PreprocessConfig (None for a model loaded without one)."""
        if cfg is None:
            return None
        return cls(processor=cfg.processor, backend=cfg.backend, pipeline=cfg.describe())


@dataclass
class Header:
    """The fields every report starts with, spelt the same everywhere (header())."""

    KIND: ClassVar[str] = ""
    tool: str  # the script that wrote it
    argv: list[str]  # its arguments
    model_source: ModelSource
    synthetic: bool  # synthetic weights: a measurement of the stack, not of Apple's model
    environment: Environment
    provenance: Provenance
    preprocessing: Optional[Preprocessing]  # null only in a report read from schema_version 1


def header(tool: str, argv: Any, loaded: Any, environment: Environment) -> dict[str, Any]:
    """The header's fields, for a kind's constructor (`Kind(**header(...), ...)`): which script and arguments made it,
    which weights (models.LoadedModel.source: path, file and sha256, or the synthetic seed), where it ran, which
    commit and packages, and how its images became the model's input."""
    from mobilevit_npu import reports

    source = ModelSource(**{"name": loaded.name, **loaded.source})  # a source that names itself (synthetic) wins
    made = Header(
        tool=tool,
        argv=list(argv),
        model_source=source,
        synthetic=source.synthetic,
        environment=environment,
        provenance=reports.provenance(),
        preprocessing=Preprocessing.of(getattr(loaded, "preprocess", None)),
    )
    return {f.name: getattr(made, f.name) for f in dataclasses.fields(Header)}


# ------------------------------------------------------------------------------------------------ inference


@dataclass
class Prediction:
    rank: int
    class_id: int
    label: str
    probability: float


@dataclass
class Classified:
    image: str
    predictions: list[Prediction]
    timing_ms: dict[str, float]  # preprocess, model (per image), model_batch, batch_size


@dataclass
class InferenceReport(Header):
    """inference.py --image ... --output: the top-k classes per image."""

    KIND: ClassVar[str] = "inference"
    device: str
    dtype: str
    results: list[Classified]
    errors: list[ImageError]
    cpu_fallbacks: Optional[FallbackReport] = None
    per_rank_images: Optional[list[int]] = None  # under torchrun: images per rank


# ------------------------------------------------------------------------------------------------ accuracy


@dataclass
class SideInfo:
    """One side of a comparison. The reference is always cpu float32 eager."""

    device: str
    dtype: str  # float32 | float16 | bfloat16
    mode: str  # an execution mode (modes.REGISTRY), or the offline runtime's name
    label: str = ""  # as the console and the card name it: "cpu bfloat16 eager", "onnxruntime CPUExecutionProvider"
    notes: list[str] = field(default_factory=list)


@dataclass
class SkipBudget:
    """Images that could not be read, held against --max_skipped (metrics.skip_budget)."""

    count: int
    of: int
    max_skipped: Union[int, float]  # a count (an integer) or a share (a number below 1)
    allowed: int


@dataclass
class Speed:
    """How long each side took (targets.Pair.summary, merged over ranks for a labelled set)."""

    concurrent: bool  # reference and target ran at the same time (device target)
    reference_cached: int
    reference_computed: int
    reference_images_per_s: Optional[float]
    target_images_per_s: Optional[float]
    target_images_per_s_after_first_batch: Optional[float]
    target_first_batch_s: float
    target_images: int
    reference_s: float
    target_s: float
    cache: Optional[dict[str, Any]]  # the reference cache: folder, cached, computed, invalid, stored, ...
    decode_workers: Optional[int] = None  # labelled sets
    decode_wait_s: Optional[float] = None
    pixel_cache: Optional[dict[str, Any]] = None
    images_per_s: Optional[float] = None
    target_warmup_s: Optional[float] = None


@dataclass
class Msprobe:
    """msprobe's dumps and comparison table (probe.py, --msprobe DIR)."""

    version: str
    level: str  # L0 | L1 | mix
    task: str  # statistics | tensor
    images_dumped: int
    reference_dump: str
    target_dump: str
    compare_table: Optional[str]
    counts: dict[str, int]  # rows by msprobe's Result column
    dtype_only: int  # rows failed only because the two sides' dtypes differ
    dtype_note: Optional[str]
    first_failing: list[dict[str, Any]]  # {name, result, message}, in execution order, dtype-only rows excluded
    first_failing_module: Optional[str]
    project_first_divergent: Optional[str]  # --layers' first divergent module, for comparison
    agree: Optional[bool]
    note: Optional[str] = None


@dataclass
class DatasetSummary:
    """A labelled set's accuracy on both sides (labelsets.summarize_labels)."""

    images: int
    skipped: int
    reference: dict[str, Optional[float]]  # top1, top5 against the labels
    target: dict[str, Optional[float]]
    agreement_top1: Optional[float]
    disagreements: list[Any]
    per_rank_images: list[int]
    resumed_images: int = 0
    elapsed_s: Optional[float] = None
    images_per_s: Optional[float] = None
    unlabelled: Optional[Any] = None
    duplicates: Optional[Any] = None
    stray_files: Optional[Any] = None


@dataclass
class AccuracyReport(Header):
    """accuracy_run.py on images: the target against the CPU float32 reference, and the verdict."""

    KIND: ClassVar[str] = "accuracy"
    reference_environment: Environment
    verdict: str  # PASS | FAIL | INVALID
    verdict_reasons: list[str]
    compared: str  # "REFERENCE  vs  TARGET"
    reference: SideInfo
    target: SideInfo
    runtime: dict[str, Any]  # {"name": "torch"} or the offline runtime: name, version, provider, artefact, ...
    input: str  # what both sides consumed
    thresholds: metrics.Thresholds
    threshold_reasons: dict[str, str]
    checks: list[metrics.Check]
    reference_checks: list[metrics.Check]
    aggregate: metrics.Aggregate
    per_image: list[metrics.ImageMetrics]
    errors: list[ImageError]
    skipped: SkipBudget
    layers: Optional[layerwise.LayerReport]
    notes: list[str]
    speed: Optional[Speed]
    cpu_fallbacks: Optional[FallbackReport] = None
    msprobe: Optional[Msprobe] = None


@dataclass
class LabelledReport(AccuracyReport):
    """accuracy_run.py on a labelled set: as `accuracy`, per_image holds the lowest-cosine images, every image's
    record is in the JSON-lines file named by `images_file`."""

    KIND: ClassVar[str] = "labelled"
    dataset: Optional[DatasetSummary] = None
    images_file: Optional[str] = None


# ------------------------------------------------------------------------------------------------ benchmark


@dataclass
class BenchResult:
    """One (mode, batch size) of a benchmark (bench.run_benchmark)."""

    mode: str  # an execution mode or a peer runtime (onnxruntime, openvino, om)
    batch_size: int
    dtype: str  # fp32 | fp16 | bf16, or an autocast mode's "bf16 autocast" | "fp16 autocast"
    end_to_end: bool
    status: str  # ok | unavailable
    reason: Optional[str]
    latency_ms: Optional[timing.LatencyStats]
    throughput_images_per_s: Optional[float]  # batch_size / p50 latency
    samples_ms: list[float]
    compile_s: Optional[float]  # building the mode; with compile_cache "hit" this is loading, not compiling
    compile_cache: Optional[str]  # hit | miss | off, for artefacts with a disk cache
    peak_memory_bytes: Optional[int]
    agreement: Optional[metrics.Agreement]  # against eager float32 on the same photos
    exact: Optional[bool]  # agreement: cosine >= metrics.EXACT_COSINE and the same top-1 (not bit-exactness)
    roofline: Optional[flops.Roofline]
    notes: list[str]
    compute_ms: Optional[dict[str, Any]] = None  # .om: NPU compute time without host copies


@dataclass
class BenchSettings:
    """How a benchmark ran (bench.build_report): what the command line asked for, and how the timing was done."""

    iterations: int  # timed calls per mode and batch size
    warmup: int  # untimed calls first
    batch_sizes: list[int]
    modes: list[str]
    dtype: str  # the weights' dtype: fp32 | fp16 | bf16
    end_to_end: bool  # decode + preprocess + copies + forward, or the forward alone
    interleaved: bool  # the modes take turns within each batch size
    percentiles: str  # how the percentiles are computed
    synchronized: str  # how the clock reads are made honest
    throughput: str  # which statistic the images/s come from
    exact: str  # what `exact` means
    runtime: Optional[dict[str, Any]] = None  # accuracy_run_perf.py: the runtime (torch, or the offline one's facts)
    peers: Optional[list[str]] = None  # benchmarks/bench_peers.py: the peer runtimes asked for


@dataclass
class BenchmarkReport(Header):
    """accuracy_run_perf.py (and inference.py --benchmark, bench_peers.py): latency and throughput per mode."""

    KIND: ClassVar[str] = "benchmark"
    device: str
    settings: BenchSettings
    results: list[BenchResult]
    cpu_fallbacks: Optional[FallbackReport] = None
    profile: Optional[profiling.ProfileSection] = None  # --profile DIR: where the time goes, per mode and batch size
    baseline: Optional[perf_baseline.BaselineSection] = None  # --baseline OLD.json: the change since that run


# ------------------------------------------------------------------------------------------------ onnx export


@dataclass
class OnnxCheck:
    """The exported graph run by ONNX Runtime on the CPU against the CPU float32 torch model."""

    runtime: str
    reference: str
    images: list[str]
    verdict: str
    verdict_reasons: list[str]
    thresholds: metrics.Thresholds
    cosine_min: float
    top1_agree: int
    max_abs_prob_diff: float
    max_abs_logit_diff: float


@dataclass
class OnnxExportReport(Header):
    """export_onnx.py: the ONNX file, its check, and the ATC command for the Ascend host."""

    KIND: ClassVar[str] = "onnx_export"
    weights_sha256: str  # models.weights_digest of the exported weights
    onnx: dict[str, Any]  # path, sha256, bytes, exporter, opset, inputs, outputs, ...
    check: OnnxCheck
    verdict: str
    atc: dict[str, Any]  # command, soc_version, precision_mode, opset range and its source, ...


KINDS: dict[str, type] = {
    cls.KIND: cls for cls in (InferenceReport, AccuracyReport, LabelledReport, BenchmarkReport, OnnxExportReport)
}
Report = Union[InferenceReport, AccuracyReport, LabelledReport, BenchmarkReport, OnnxExportReport]


# ------------------------------------------------------------------------------------------------ writing


def to_json(report: Header) -> dict[str, Any]:
    """The report as the JSON object a writer writes: schema_version and kind first. The report is checked against
    its own definition first, so a writer can never write what the reader would refuse."""
    from mobilevit_npu import reports

    data = {"schema_version": SCHEMA_VERSION, "kind": report.KIND, **reports.json_safe(dataclasses.asdict(report))}
    validate(data, f"the {report.KIND} report being written")
    return data


# ------------------------------------------------------------------------------------------------ reading


def read(path: str | Path) -> bytes:
    """A report file's bytes: a regular file of at most reports.MAX_REPORT_BYTES (a FIFO or a link to /dev/zero is
    refused before it is opened or read), else a UserError in one line."""
    from mobilevit_npu import reports

    return reports.read_bounded(path, "report", reports.MAX_REPORT_BYTES)


def load(path: str | Path, allow_unknown: bool = False) -> Report:
    """Read and validate one report file; a ReportError (one line naming the file and the field) otherwise."""
    return parse(read(path), str(path), allow_unknown)


def parse(data: bytes, source: str, allow_unknown: bool = False) -> Report:
    """A report file's bytes (as `read` returns them) parsed, validated against its kind and its figures checked
    (check_figures); a ReportError naming `source` and the field otherwise."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: deep nesting
        raise ReportError(
            f"{source}: not a JSON report ({str(exc).splitlines()[0] if str(exc) else 'nested too deep'})"
        ) from exc
    report = validate(parsed, source, allow_unknown)
    check_figures(report, source)
    return report


def validate(data: Any, source: str, allow_unknown: bool = False) -> Report:
    """Check `data` (a parsed JSON report) against its kind and return the typed report."""
    if not isinstance(data, dict):
        raise ReportError(f"{source}: a report is a JSON object, not {_json_type(data)}")
    version = data.get("schema_version")
    if "schema_version" not in data:
        raise ReportError(f"{source}: field `schema_version` is missing (a report from before reports were versioned)")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ReportError(f"{source}: field `schema_version` must be an integer, not {_json_type(version)}")
    if version > SCHEMA_VERSION:
        raise ReportError(
            f"{source}: schema_version {version} is newer than this code reads ({SCHEMA_VERSION}): update mobilevit-npu"
        )
    if version not in CHANGES:
        raise ReportError(f"{source}: field `schema_version` {version} is not a version this code knows")
    kind = data.get("kind")
    if kind not in KINDS:
        raise ReportError(f"{source}: field `kind` {kind!r} is not a report kind ({', '.join(KINDS)})")
    body = _upgrade({k: v for k, v in data.items() if k not in ("schema_version", "kind")}, version)
    return _convert(body, KINDS[kind], source, "", allow_unknown)


def _upgrade(body: dict[str, Any], version: int) -> dict[str, Any]:
    """A report body of an older schema version as the current definitions read it (CHANGES says what changed).
    Version 1's settings, roofline and layer rows were written with the fields their sections now fix, so they are
    checked as those sections; it had no `preprocessing`, which reads as null."""
    if version < 2:
        body = {**body, "preprocessing": body.get("preprocessing")}
    return body


def typed(tp: type, value: Any, source: str = "a section being written") -> Any:
    """`value` (a section as a computing module returns it: a dict of JSON-able values, or already a `tp`) as the
    typed section `tp`, checked as the reader checks it: a key the section lacks is refused (a ReportError)."""
    from mobilevit_npu import reports

    if isinstance(value, tp) or value is None:
        return value
    return _convert(reports.json_safe(value), tp, source, tp.__name__, allow_unknown=False)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _where(prefix: str, name: Any) -> str:
    return f"{prefix}[{name}]" if isinstance(name, int) else (f"{prefix}.{name}" if prefix else str(name))


def _convert(value: Any, tp: Any, source: str, where: str, allow_unknown: bool) -> Any:
    """`value` as type `tp`, or a ReportError naming `where`."""

    def fail(expected: str) -> ReportError:
        return ReportError(f"{source}: field `{where}` must be {expected}, not {_json_type(value)}")

    if tp is dict:  # a bare `dict` / `list` annotation: any JSON object / list
        tp = dict[str, Any]
    elif tp is list:
        tp = list[Any]
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Union:
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            if float in options:
                return math.nan
            raise fail(_expected(tp))
        inner = [o for o in options if o is not type(None)]
        errors = []
        for option in inner:
            try:
                return _convert(value, option, source, where, allow_unknown)
            except ReportError as exc:
                errors.append(exc)
        if len(inner) == 1:
            raise errors[0]
        raise fail(_expected(tp))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail("an object")
        hints = _hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = [k for k in value if k not in fields]
        if unknown and not allow_unknown:
            raise ReportError(
                f"{source}: field `{_where(where, unknown[0])}` is not part of the {_kind_name(tp)} format "
                "(a newer or hand-edited report; --allow_unknown_fields reads it anyway)"
            )
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ReportError(f"{source}: field `{_where(where, name)}` is missing")
                continue
            kwargs[name] = _convert(value[name], hints[name], source, _where(where, name), allow_unknown)
        return tp(**kwargs)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise fail("a list")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(v, item, source, _where(where, i), allow_unknown) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("an object")
        _, item = typing.get_args(tp) or (str, Any)
        return {k: _convert(v, item, source, _where(where, k), allow_unknown) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if value is None:  # reports.json_safe writes a NaN or an infinity as null: the figure was not finite
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise TypeError(f"schema: no rule for {tp!r} at {where}")  # a definition this reader cannot check: a bug here


def _kind_name(tp: type) -> str:
    return f"`{tp.KIND}` report" if getattr(tp, "KIND", "") else tp.__name__


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_expected(o) for o in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "an object"
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "an object"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# Annotations are strings (from __future__ import annotations), some written `X | None`, which Python 3.9 cannot
# evaluate: they are parsed here instead of through typing.get_type_hints.
_HINTS: dict[type, dict[str, Any]] = {}
_TOKEN = re.compile(r"\s*([A-Za-z_][\w.]*|\[|\]|,|\|)")


def _hints(tp: type) -> dict[str, Any]:
    if tp not in _HINTS:
        import sys

        hints: dict[str, Any] = {}
        for klass in reversed(tp.__mro__):
            module = sys.modules.get(klass.__module__)
            namespace = {**vars(builtins), **typing.__dict__, **(vars(module) if module else {})}
            for name, annotation in getattr(klass, "__annotations__", {}).items():
                hints[name] = _parse(annotation, namespace) if isinstance(annotation, str) else annotation
        _HINTS[tp] = hints
    return _HINTS[tp]


def _parse(text: str, namespace: dict[str, Any]) -> Any:
    tokens = [t for t in _TOKEN.findall(text)]
    pos = 0

    def union() -> Any:
        nonlocal pos
        options = [atom()]
        while pos < len(tokens) and tokens[pos] == "|":
            pos += 1
            options.append(atom())
        return options[0] if len(options) == 1 else Union[tuple(options)]

    def atom() -> Any:
        nonlocal pos
        name = tokens[pos]
        pos += 1
        obj: Any = None if name == "None" else namespace
        if name != "None":
            for part in name.split("."):
                obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        if name == "None":
            obj = type(None)
        if pos < len(tokens) and tokens[pos] == "[":
            pos += 1
            args = [union()]
            while tokens[pos] == ",":
                pos += 1
                args.append(union())
            pos += 1  # "]"
            if obj is ClassVar:
                return ClassVar
            return obj[tuple(args)] if len(args) > 1 else obj[args[0]]
        return obj

    return union()


# ------------------------------------------------------------------------------------------------ figures


# The range of every figure a report holds, by field name (a section's name first where a name is generic): a figure
# outside it, or an infinity, is a hand-edited or corrupted report and is refused by `load` (check_figures). A null
# (NaN) figure is allowed where a number may fail to exist (a target that produced NaN logits: a finding), and refused
# where the verdict or the card relies on it (_required_finite). These are the one statement of the ranges.
COSINE = (-1.0, 1.0)
SHARE = (0.0, 1.0)  # shares of images or logits, probabilities and their differences (the card shows them as 0-100 %)
AT_LEAST_0 = (0.0, math.inf)  # counts, sizes, errors, spreads, durations, rates
FIGURE_RANGES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(
        ("cosine", "cosine_min", "cosine_mean", "cosine_all_logits", "min_cosine", "layer_min_cosine"), COSINE
    ),
    "LayerReport.threshold": COSINE,
    **dict.fromkeys(
        (
            "top1_agreement",
            "top1_agreement_outside_ties",
            "top5_overlap",
            "top5_overlap_mean",
            "share_rel_err_below_0_001",
            "share_rel_err_below_0_005",
            "min_top1_agreement",
            "max_abs_prob_diff",
            "max_prob_diff",
            "top1_tie_margin",
            "top1_reference_margin",
            "reference_top1_prob",
            "target_top1_prob",
            "probability",
            "agreement_top1",
            "DatasetSummary.reference",  # its top1 / top5 accuracies
            "DatasetSummary.target",
        ),
        SHARE,
    ),
    **dict.fromkeys(
        (
            "images",
            "top1_agree_count",
            "top1_near_tie_flips",
            "target_nonfinite_images",
            "reference_nonfinite_images",
            "logits_above_error_floor",
            "SkipBudget.count",
            "SkipBudget.of",
            "SkipBudget.max_skipped",
            "SkipBudget.allowed",
            "DatasetSummary.skipped",
            "resumed_images",
            "per_rank_images",
            "modules_compared",
            "numel",
            "batch_size",
            "images_dumped",
            "reference_cached",
            "reference_computed",
            "target_images",
            "max_abs_logit_diff",
            "max_abs_error",
            "max_abs_diff",
            "rmse",
            "mean_relative_error",
            "mean_relative_error_above_error_floor",
            "min_error_floor",
            "reference_logit_std",
            "reference_logit_std_min",
            "reference_logit_std_across_images",
            "min_reference_logit_std",
            "LatencyStats.mean",
            "LatencyStats.p50",
            "LatencyStats.p90",
            "LatencyStats.p99",
            "LatencyStats.min",
            "LatencyStats.max",
            "LatencyStats.stdev",
            "samples_ms",
            "throughput_images_per_s",
            "compile_s",
            "peak_memory_bytes",
            "fraction_of_ceiling",
            "ceiling_gflop_per_s",
            "flop_per_image",
            "elapsed_s",
            "images_per_s",
            "reference_images_per_s",
            "target_images_per_s",
            "target_images_per_s_after_first_batch",
            "target_first_batch_s",
            "reference_s",
            "target_s",
            "decode_wait_s",
            "target_warmup_s",
        ),
        AT_LEAST_0,
    ),
}
# Where a figure must be a finite number: always (thresholds, the skip budget, an `ok` benchmark row's timing), and in
# a PASS verdict every figure it was judged on (the aggregate, each image, each check) except the relative errors,
# which are infinite when a reference logit is exactly 0 and the target's is not.
MAY_BE_INFINITE = ("mean_relative_error", "mean_relative_error_above_error_floor")


def _figures(value: Any, where: str, name: str):
    """(where, rule name, number) for every number in a typed report; the rule name is `Section.field` when the
    table has it, else the field's name (list items and dict entries take their field's)."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield where, name, value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            qualified = f"{type(value).__name__}.{f.name}"
            yield from _figures(
                getattr(value, f.name), _where(where, f.name), qualified if qualified in FIGURE_RANGES else f.name
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _figures(item, _where(where, key), name if name in FIGURE_RANGES else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _figures(item, _where(where, i), name)


def _required_finite(report: Any, where: str, name: str) -> bool:
    if where.startswith(("thresholds.", "skipped.")):
        return True
    if isinstance(report, BenchmarkReport) and re.match(r"results\[\d+\]\.(latency_ms\.(?!stdev)|throughput)", where):
        return report.results[int(where.split("[")[1].split("]")[0])].status == "ok"
    return (
        isinstance(report, AccuracyReport)
        and report.verdict == "PASS"
        and where.startswith(("aggregate.", "per_image[", "checks[", "reference_checks["))
        and name not in MAY_BE_INFINITE
    )


_RULE = re.compile(r"\s*(>=|<=|<|>)\s*(-?[0-9][0-9.]*(?:[eE][-+]?[0-9]+)?)")
_COMPARE = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__, ">": float.__gt__}
CHECK_FIGURES = {"target_logits_finite": "target_nonfinite_images", "skipped_images": "count"}  # else aggregate.NAME


def check_figures(report: Any, source: str) -> None:
    """Refuse (ReportError, one line naming the file and the field) a report whose figures lie outside their range
    (FIGURE_RANGES), are not finite where a number is required, or contradict its verdict: a PASS with a failed check;
    a check that passed although its value fails its own rule; a check's value that is not the aggregate
    figure it names; a benchmark row whose `exact` is not what its agreement says (metrics.is_exact)."""

    def refuse(where: str, why: str) -> ReportError:
        return ReportError(f"{source}: field `{where}` {why}")

    for where, name, value in _figures(report, "", ""):
        finite = math.isfinite(value)
        if name in FIGURE_RANGES and finite:
            lo, hi = FIGURE_RANGES[name]
            if not lo <= value <= hi:
                raise refuse(where, f"is {value!r}, outside its range [{lo:g}, {hi:g}]")
        elif not finite and not math.isnan(value):
            raise refuse(where, f"is {value!r}: a report's figures are finite (null where there was no number)")
        if not finite and _required_finite(report, where, name):
            raise refuse(where, "is not a finite number (null or NaN), and the verdict or the card relies on it")
    if isinstance(report, AccuracyReport):
        if report.verdict not in ("PASS", "FAIL", "INVALID"):
            raise refuse("verdict", f"is {report.verdict!r}, not PASS, FAIL or INVALID")
        for section in ("reference_checks", "checks"):
            for i, check in enumerate(getattr(report, section)):
                where = f"{section}[{i}]"
                if report.verdict == "PASS" and not check.passed:
                    raise refuse(f"{where}.passed", f"is false ({check.name} failed), and the verdict is PASS")
                if check.value is None:
                    continue
                figure = CHECK_FIGURES.get(check.name, check.name)
                holder = report.skipped if check.name == "skipped_images" else report.aggregate
                named = getattr(holder, figure, None)
                if isinstance(named, (int, float)) and not _same(float(named), check.value):
                    shown = "skipped" if holder is report.skipped else "aggregate"
                    raise refuse(f"{where}.value", f"is {check.value!r}, and `{shown}.{figure}` is {named!r}")
                rule = _RULE.match(check.rule)  # a check may fail for more than its figure (a non-finite reference)
                if rule and check.passed and not _COMPARE[rule.group(1)](float(check.value), float(rule.group(2))):
                    raise refuse(
                        f"{where}.passed", f"is true, but its value {check.value!r} fails its own rule {check.rule!r}"
                    )
        if report.skipped.count > report.skipped.of:
            raise refuse("skipped.count", f"is {report.skipped.count}, more than the {report.skipped.of} images")
        if report.aggregate.top1_agree_count > report.aggregate.images:
            raise refuse("aggregate.top1_agree_count", f"is more than the {report.aggregate.images} images")
    if isinstance(report, BenchmarkReport):
        for i, res in enumerate(report.results):
            if res.status == "ok" and (res.latency_ms is None or res.throughput_images_per_s is None):
                raise refuse(f"results[{i}].latency_ms", "is null in a row whose status is ok")
            if res.exact is not None and res.agreement is not None and res.exact != metrics.is_exact(res.agreement):
                raise refuse(
                    f"results[{i}].exact",
                    f"is {str(res.exact).lower()}, and its agreement (cosine {res.agreement.cosine!r}, top-1 "
                    f"{res.agreement.top1_agreement!r}) says {str(metrics.is_exact(res.agreement)).lower()}",
                )


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ------------------------------------------------------------------------------------------------ documentation


def fields_of(tp: type) -> list[tuple[str, str, str]]:
    """(name, type, comment) for each field of a section, in order: the comment is the one beside the field's
    definition in the source."""
    import inspect

    comments: dict[str, str] = {}
    for klass in reversed(tp.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = re.match(r"\s+(\w+): [^=#]+?(?:=[^#]*)?(?:#\s*(.*))?$", line)
            if m and m.group(2):
                comments[m.group(1)] = m.group(2).strip()
    hints = _hints(tp)
    return [(f.name, _type_text(hints[f.name]), comments.get(f.name, "")) for f in dataclasses.fields(tp)]


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        inner = " | ".join(_type_text(a) for a in args if a is not type(None))
        return f"{inner} or null" if type(None) in args else inner
    if origin in (list, tuple):
        return f"list of {_type_text(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"object of {_type_text(typing.get_args(tp)[1])}"
    if tp is Any:
        return "any"
    if tp is dict:
        return "object"
    if tp is list:
        return "list"
    if dataclasses.is_dataclass(tp):
        return f"`{tp.__name__}`"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def _sections(tp: type, seen: list[type]) -> None:
    for hint in _hints(tp).values():
        stack = [hint]
        while stack:
            t = stack.pop()
            if dataclasses.is_dataclass(t) and t not in seen and not getattr(t, "KIND", ""):
                seen.append(t)
                _sections(t, seen)
            stack.extend(typing.get_args(t))


def document() -> str:
    """docs/reports.md: every kind and section with its fields, from these definitions (a test keeps it current)."""

    def table(tp: type) -> list[str]:
        rows = ["| field | type | meaning |", "|---|---|---|"]
        header = {f.name for f in dataclasses.fields(Header)}
        for name, kind, comment in fields_of(tp):
            if getattr(tp, "KIND", "") and name in header:
                continue
            required = "" if _required(tp, name) else " (optional)"
            rows.append(f"| `{name}` | {kind}{required} | {comment.replace('|', '/')} |")
        return rows

    lines = [
        "# Reports",
        "",
        "<!-- generated by mobilevit_npu.schema.document(); tests/test_schema.py checks it is current -->",
        "",
        (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "",
        f"Current `schema_version`: **{SCHEMA_VERSION}**. Every report starts with `schema_version` and `kind`, then "
        "the header, then its kind's fields. A number written as `null` was not finite (NaN or infinity): JSON has no "
        "NaN, and a NaN in a report is a finding, not a value to hide.",
        "",
        "## Versions",
        "",
        "The reader reads every version below (an older report as the current definitions, with what it lacked as "
        "null) and refuses any other in one line.",
        "",
        *[f"- **{version}**: {change}" for version, change in CHANGES.items()],
        "",
        "## Header (every kind)",
        "",
        *table(Header),
        "",
    ]
    for kind, tp in KINDS.items():
        lines += [f"## `{kind}`", "", " ".join((tp.__doc__ or "").split()), "", *table(tp), ""]
    seen: list[type] = []
    for tp in [Header, *KINDS.values()]:
        _sections(tp, seen)
    lines += ["## Sections", ""]
    for tp in seen:
        doc = " ".join((tp.__doc__ or "").split())
        lines += [f"### `{tp.__name__}`", "", doc, "", *table(tp), ""]
    return "\n".join(lines).rstrip() + "\n"


def _required(tp: type, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(tp)}[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
