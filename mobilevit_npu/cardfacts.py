"""The model card's facts: the reports read through schema.load, checked against each other, and what the card derives.

This module reads and refuses; mobilevit_npu/card.py only writes. Every report is read by `schema.load` (the one
definition of the format): a missing or mistyped field, an unknown kind or schema version, or an unknown field (unless
`allow_unknown`) is schema's one-line error naming the file and the field. Then, before any card is written:

- the same file given twice (by resolved path or by inode) is a usage error;
- two files with the same content, or two reports of the same kind from the same run (the same tool, argv, weights,
  environment (its start load average included) and provenance), are refused as duplicates;
- the reports must have measured one model (the same weights sha256, or the same synthetic seed);
- only `accuracy`, `labelled` and `benchmark` reports make a card, at least one accuracy or labelled report and one
  benchmark.

Besides the reports, the model section reads config.json and preprocessor_config.json from the measured model folder
(the package's X-Small config for synthetic weights) and counts the parameters of the model config.json builds.
"""

from __future__ import annotations

import hashlib
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mobilevit_npu import PROJECT_DIR, metrics, models, reports, schema, synthetic
from mobilevit_npu.errors import UserError

CARD_KINDS = ("accuracy", "labelled", "benchmark")
ACCURACY_KINDS = ("accuracy", "labelled")
SYNTHETIC_MODEL_DIR = synthetic.X_SMALL_DIR  # the config the synthetic weights are built from (package data)


class CardError(Exception):
    """The reports cannot make a true card (duplicates, mixed weights, a kind the card does not take): exit 1."""


# ------------------------------------------------------------------------------------------------------ sources


@dataclass
class Source:
    """One report file: where it is, what it holds (typed by schema), and the command that wrote it."""

    path: str  # as given on the command line
    report: Any  # schema.AccuracyReport | schema.LabelledReport | schema.BenchmarkReport
    kind: str
    digest: str  # sha256 of the file's bytes

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def argv(self) -> list[str]:
        return [self.report.tool, *self.report.argv]


def check_distinct_files(paths: list[str]) -> None:
    """The same report file named twice (the same resolved path, or a hard link to it): a usage error (exit 2)."""
    seen: list[tuple[str, tuple[str, Optional[tuple[int, int]]]]] = []
    for path in paths:
        ident = reports.file_identity(path)
        for other, other_ident in seen:
            if ident[0] == other_ident[0] or (ident[1] is not None and ident[1] == other_ident[1]):
                raise UserError(f"{path}: the same report file as {other}, given twice; give each report once")
        seen.append((path, ident))


def _run_identity(source: Source) -> tuple:
    """What makes two reports one run: the script and its arguments, the weights, where and when it ran (the
    environment, whose load average is sampled at the start) and the setup (provenance)."""
    r = source.report
    return (source.kind, r.tool, tuple(r.argv), repr(r.model_source), repr(r.environment), repr(r.provenance))


def read_sources(paths: list[str], allow_unknown: bool = False) -> list[Source]:
    """Every report read through schema.load and checked to make one card: see the module docstring."""
    if not paths:
        raise UserError("no report given")
    check_distinct_files(paths)
    out: list[Source] = []
    for path in paths:
        # schema.load: a regular file within its size bound (a FIFO or /dev/zero is refused unread), its format, the
        # ranges of its figures and its verdict against its checks (schema.check_figures)
        report = schema.load(path, allow_unknown=allow_unknown)
        kind = report.KIND
        if kind not in CARD_KINDS:
            raise CardError(f"{path}: field `kind` is {kind!r}; the card is made of {', '.join(CARD_KINDS)} reports")
        digest = hashlib.sha256(schema.read(path)).hexdigest()
        out.append(Source(path, report, kind, digest))
    for i, source in enumerate(out):
        for other in out[:i]:
            if source.digest == other.digest:
                raise CardError(
                    f"{source.path}: the same report as {other.path} (identical content, sha256 "
                    f"{source.digest[:12]}); give each report once"
                )
            if _run_identity(source) == _run_identity(other):
                raise CardError(
                    f"{source.path}: a {source.kind} report of the same run as {other.path} (the same "
                    "`argv`, `environment` and `provenance`); give each run once"
                )
    if not any(s.kind in ACCURACY_KINDS for s in out):
        raise CardError(f"no accuracy_run.py report among {', '.join(paths)}: the card needs one")
    if not any(s.kind == "benchmark" for s in out):
        raise CardError(f"no benchmark report (accuracy_run_perf.py) among {', '.join(paths)}: the card needs one")
    return out


def weights_identity(source: Source) -> tuple[str, str]:
    """('synthetic', seed) or ('sha256', digest): what makes two reports measurements of the same weights."""
    ms = source.report.model_source
    if source.report.synthetic:
        return "synthetic", str(ms.seed)
    if ms.sha256 is None:
        raise CardError(f"{source.path}: field `model_source.sha256` is null; the card names the weights it measured")
    return "sha256", ms.sha256


def check_one_model(sources: list[Source]) -> tuple[str, str]:
    first = sources[0]
    ident = weights_identity(first)

    def shown(s: Source) -> str:
        kind, value = weights_identity(s)
        return f"synthetic weights, seed {value}" if kind == "synthetic" else f"weights sha256 {value}"

    for other in sources[1:]:
        if weights_identity(other) != ident:
            raise CardError(
                f"{first.path} ({shown(first)}) and {other.path} ({shown(other)}) measured different "
                "weights: one card describes one model; give reports of the same weights"
            )
    return ident


# --------------------------------------------------------------------------------------------------------- model


@dataclass
class ModelFacts:
    folder: Path
    config: dict[str, Any]  # config.json as read
    preprocessor: dict[str, Any]  # preprocessor_config.json as read
    parameters: int  # of the model config.json builds (on the meta device)
    preprocess: Any = field(repr=False)  # preprocessing.PreprocessConfig
    family: Any = None  # families.Family of config.json

    @property
    def published(self) -> Any:
        """The family's published figures for this checkpoint (families.Published), or None: never guessed."""
        return self.family.published_for(self.config) if self.family is not None else None

    def label(self, class_id: int) -> str:
        labels = self.config.get("id2label") or {}
        return str(labels.get(str(class_id), labels.get(class_id, "")))


def model_folder(sources: list[Source], override: Optional[str]) -> Path:
    first = sources[0]
    if override:
        folder = Path(override)
    elif first.report.synthetic:
        folder = SYNTHETIC_MODEL_DIR
    else:
        path = first.report.model_source.path
        if path is None:
            raise CardError(f"{first.path}: field `model_source.path` is null; pass the model folder with --model_path")
        folder = Path(path)
    if not os.path.lexists(folder / "config.json"):  # one that is there but no regular file: read_json refuses it
        raise CardError(
            f"{folder / 'config.json'} not found (the model folder of {first.path}); the model section "
            "needs it: pass --model_path FOLDER"
        )
    return folder


def model_folders(paths: list[str], override: Optional[str], allow_unknown: bool = False) -> list[str]:
    """Every model folder the card's inputs name and that exists here: each report's model_source.path, the package's
    X-Small config folder for synthetic weights, and --model_path. port_report.py guards them against its outputs
    (nothing may be written into a model folder) before it reads anything else."""
    named = [override] if override else []
    for path in paths:
        report = schema.load(path, allow_unknown=allow_unknown)
        named.append(str(SYNTHETIC_MODEL_DIR) if report.synthetic else report.model_source.path)
    out: list[str] = []
    for folder in named:
        if folder and os.path.isdir(folder) and folder not in out:
            out.append(folder)
    return out


def read_model(folder: Path, ident: tuple[str, str], first: Source) -> ModelFacts:
    import torch
    from transformers import AutoModelForImageClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from mobilevit_npu import families
    from mobilevit_npu.preprocessing import PreprocessConfig

    config = reports.read_json(folder / "config.json", "config.json")
    if not os.path.lexists(folder / "preprocessor_config.json"):
        raise CardError(f"{folder / 'preprocessor_config.json'} not found; the model section needs the input size")
    preprocessor = reports.read_json(folder / "preprocessor_config.json", "preprocessor_config.json")
    try:
        family = families.resolve(config, str(folder / "config.json"))
    except UserError as exc:
        raise CardError(str(exc)) from None
    if not isinstance(config.get("id2label"), dict) or not config["id2label"]:
        raise CardError(f"{folder / 'config.json'}: field `id2label` is missing; the card names the classes")
    if ident[0] == "sha256":
        weights = models._weights_file(folder)
        if weights is not None and (digest := models.sha256_file(weights)) != ident[1]:
            raise CardError(
                f"{weights} (sha256 {digest}) and {first.path} (weights sha256 {ident[1]}) are different "
                "weights: pass the folder the reports measured with --model_path"
            )
    model_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = AutoModelForImageClassification.from_config(model_config)
    except (RuntimeError, NotImplementedError):
        # an __init__ that reads a tensor's value cannot run on meta (transformers 4.47.1's Swin: its drop-path
        # schedule calls .item(), modeling_swin.py:827): built for real, once, for its parameter count
        model = AutoModelForImageClassification.from_config(model_config)
    parameters = sum(p.numel() for p in model.parameters())
    return ModelFacts(folder, config, preprocessor, parameters, PreprocessConfig.from_dict(preprocessor), family)


# ------------------------------------------------------------------------------------------------- derived facts


def platform_kind(device: str) -> str:
    return device.split(":", 1)[0]


def target_device(source: Source) -> str:
    r = source.report
    return r.device if source.kind == "benchmark" else r.target.device


def target_platforms(sources: list[Source]) -> list[str]:
    """Every platform a target ran on (npu, cuda, mps, cpu), in first-seen order."""
    seen: list[str] = []
    for s in sources:
        kind = platform_kind(target_device(s))
        if kind not in seen:
            seen.append(kind)
    return seen


def is_port_result(sources: list[Source]) -> bool:
    """A port result only with real weights and every target on an accelerator; otherwise a measurement of the stack."""
    return not sources[0].report.synthetic and all(p in ("npu", "cuda", "mps") for p in target_platforms(sources))


@dataclass
class LayerFacts:
    threshold: float
    compared: int
    below: int  # modules whose worst-image cosine is under the threshold
    first: Optional[Any]  # first divergent module (execution order): layerwise.LayerRow
    worst: Optional[Any]  # the module with the lowest cosine (layerwise.LayerStat)
    first_nonfinite: Optional[Any]  # layerwise.LayerRow
    curve: list[tuple[int, float]]  # (execution order, cosine_min) of every module compared


def layer_facts(source: Source) -> Optional[LayerFacts]:
    layers = source.report.layers
    if layers is None:
        return None
    modules = list(layers.modules)
    finite = [m for m in modules if not math.isnan(m.cosine_min)]
    below = sum(1 for m in modules if math.isnan(m.cosine_min) or m.cosine_min < layers.threshold)
    worst = min(finite, key=lambda m: m.cosine_min) if finite else None
    first = layers.first_divergent  # a typed layerwise.LayerRow: schema.load checked its fields
    return LayerFacts(
        threshold=layers.threshold,
        compared=layers.modules_compared,
        below=below,
        first=first,
        worst=worst,
        first_nonfinite=layers.first_nonfinite,
        curve=[(m.order, m.cosine_min) for m in modules],
    )


def throughput_statistic(result: Any) -> Optional[str]:
    """Which latency statistic images/s was computed from (batch_size * 1000 / statistic): 'p50' or 'mean', checked by
    recomputing it; None when neither gives the reported figure."""
    images_per_s = result.throughput_images_per_s
    for stat in ("p50", "mean"):
        ms = getattr(result.latency_ms, stat)
        if ms and math.isclose(result.batch_size * 1000.0 / ms, images_per_s, rel_tol=1e-9):
            return stat
    return None


def ceilings(source: Source) -> dict[str, tuple[float, float]]:
    """{row dtype: (matmul ceiling GFLOP/s, FLOP per image)} of a benchmark: each ceiling and the rows it applies to."""
    out: dict[str, tuple[float, float]] = {}
    for res in source.report.results:
        roof = res.roofline
        if res.status == "ok" and roof is not None and roof.ceiling_gflop_per_s is not None:
            out.setdefault(res.dtype, (float(roof.ceiling_gflop_per_s), float(roof.flop_per_image)))
    return out


@dataclass
class Origin:
    """Where the measured weights came from, as the reports record it (schema.ModelSource): the hub (`hub_id`, and
    the commit when known), a local folder (its path as the runs gave it, the file and its sha256), or synthetic."""

    kind: str  # "hub" | "local" | "synthetic"
    folder: Optional[str] = None  # model_source.path, as recorded
    file: Optional[str] = None  # the weights file's name
    sha256: Optional[str] = None
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    seed: Optional[str] = None


def weights_origin(sources: list[Source], ident: tuple[str, str]) -> Origin:
    """The weights' origin: a hub checkpoint only where a report says so (model_source.hub_id, models.hub_origin);
    the reports measured the same bytes (check_one_model), so one report that downloaded them names them for all."""
    if ident[0] == "synthetic":
        return Origin("synthetic", seed=ident[1])
    first = sources[0].report.model_source
    hub = next((s.report.model_source for s in sources if getattr(s.report.model_source, "hub_id", None)), None)
    return Origin(
        "hub" if hub is not None else "local",
        folder=first.path,
        file=first.weights or "model.safetensors",
        sha256=ident[1],
        hub_id=hub.hub_id if hub is not None else None,
        revision=hub.revision if hub is not None else None,
    )


def short_commit(commit: str) -> str:
    """A commit as the card lists it beside others: 12 hex digits, its `+dirty` mark kept (a dirty and a clean
    checkout of one commit are different code)."""
    dirty = commit.endswith("+dirty")
    return commit.removesuffix("+dirty")[:12] + ("+dirty" if dirty else "")


@dataclass
class Facts:
    """Everything the card shows, read and checked."""

    sources: list[Source]
    model: ModelFacts
    ident: tuple[str, str]
    synthetic: bool
    platforms: list[str]
    port_result: bool
    origin: Origin = field(default_factory=lambda: Origin("local"))
    card_argv: Optional[list[str]] = None  # port_report.py's own arguments, for the Reproduce block

    @property
    def accuracy(self) -> list[Source]:
        return [s for s in self.sources if s.kind in ACCURACY_KINDS]

    @property
    def benchmarks(self) -> list[Source]:
        return [s for s in self.sources if s.kind == "benchmark"]


def gather(paths: list[str], model_path: Optional[str] = None, allow_unknown: bool = False) -> Facts:
    sources = read_sources(paths, allow_unknown)
    ident = check_one_model(sources)
    model = read_model(model_folder(sources, model_path), ident, sources[0])
    return Facts(
        sources,
        model,
        ident,
        bool(sources[0].report.synthetic),
        target_platforms(sources),
        is_port_result(sources),
        weights_origin(sources, ident),
    )


# ------------------------------------------------------------------------------------------------------ refusals


def refuse_untellable(facts: Facts, described_checks: set[str]) -> None:
    """Reports schema.load accepts that the card still cannot tell truly, refused (CardError) before anything is
    written: a check the card's templates do not describe (`described_checks`: the names with a rule in every
    language), a verdict no failed check explains, a benchmark with no measured row or whose images/s are not one
    latency statistic, an agreement threshold this code does not use, and a config.json without a field the model
    section shows."""
    for s in facts.accuracy:
        r = s.report
        for check in [*r.checks, *r.reference_checks]:
            if check.name not in described_checks:
                raise CardError(
                    f"{s.path}: field `checks` has a check {check.name!r} the card cannot describe "
                    "(a newer report: update mobilevit-npu)"
                )
        failed = [c for c in [*r.reference_checks, *r.checks] if not c.passed]
        fb = r.cpu_fallbacks
        fallback = r.verdict == "FAIL" and fb is not None and bool(fb.operators)
        if r.verdict != "PASS" and not failed and not fallback:
            raise CardError(f"{s.path}: field `verdict` is {r.verdict} with no failed check: the card cannot say why")
    for s in facts.benchmarks:
        benchmark_statistic(s)
        said = s.report.settings.exact
        if said is not None and f">= {metrics.EXACT_COSINE}" not in said:
            raise CardError(
                f"{s.path}: field `settings.exact` ({said!r}) names another agreement threshold than "
                f"this code's cosine >= {metrics.EXACT_COSINE}; use the version that wrote it"
            )
    m = facts.model
    for key in m.family.card_keys:  # the family's shape fields; a generic family's only where config.json has them
        if key not in m.config and m.family.known:
            raise CardError(f"{m.folder / 'config.json'}: field `{key}` is missing, and the model section needs it")


def benchmark_statistic(source: Source) -> str:
    """The one latency statistic ('p50' or 'mean') every measured row's images/s comes from; a benchmark with no
    measured row, or whose rows disagree or match neither, is refused."""
    ok = [(i, res) for i, res in enumerate(source.report.results) if res.status == "ok"]
    if not ok:
        raise CardError(f"{source.path}: field `results` has no mode with status ok; the card has no latency to show")
    stats = {throughput_statistic(res) for _, res in ok}
    if len(stats) != 1 or None in stats:
        bad = next(i for i, res in ok if throughput_statistic(res) is None) if None in stats else ok[0][0]
        raise CardError(
            f"{source.path}: field `results[{bad}].throughput_images_per_s` is not the batch size over one "
            "latency statistic (p50 or mean) like the other rows; the card cannot say what it is"
        )
    return stats.pop()


def overloaded(source: Source) -> Optional[tuple[float, int]]:
    """(1-minute load average, CPU cores) when the run started on a machine with more runnable work than cores: its
    timings, and a ceiling measured then, are of a contended machine. None otherwise (or when not recorded)."""
    env = source.report.environment
    load, cores = env.load_average, env.cpu_count
    if load and cores and load[0] > cores:
        return float(load[0]), int(cores)
    return None


def over_ceiling(source: Source) -> list[Any]:
    """The measured rows of a benchmark whose share of the matmul ceiling is over 1: the ceiling was measured too low
    for them (one dense matmul, timed once at the start), never the hardware outrun."""
    return [
        res
        for res in source.report.results
        if res.status == "ok"
        and res.roofline is not None
        and res.roofline.fraction_of_ceiling is not None
        and res.roofline.fraction_of_ceiling > 1
    ]


def command(source: Source) -> str:
    """The command that wrote the report, its argv as recorded (paths shown as the card shows paths)."""
    return "python " + shlex.join([shown_path(a) if os.path.isabs(a) else a for a in source.argv])


def shown_path(path: str) -> str:
    """A path as the card shows it: relative to the working folder or the project when inside them, else its name
    alone: no folder of the machine that made the report (home folders, caches) reaches a card."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    for base in (Path.cwd(), PROJECT_DIR):
        try:
            return p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return p.name
