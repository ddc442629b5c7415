"""Model cards from measured reports: every figure from a report, every command its argv, no holes.

`build_card(paths, lang)` reads accuracy_run.py reports (consistency or labelled) and accuracy_run_perf.py reports,
checks that they measured one model (the same sha256, or the same synthetic seed), reads the model's config.json and
preprocessor_config.json, and fills templates/model_card.<lang>.md. The template files hold every word of the card;
this module only fills them. A field the card needs that a report lacks raises CardError (exit 1) naming the report and
the field: the card never shows an empty cell or an unfilled placeholder.

Fields read, besides the required ones (a missing one stops the tool):
- environment: device, device_name, cpu, cpu_count, platform, python, torch, transformers, torch_npu, cann, cuda,
  torch_threads, allocator.name / allocator.tuned; when present: pillow, load_average, torch_npu_mismatch,
  fp32_precision (conv_hf32 / matmul_hf32 on npu, conv_tf32 / matmul_tf32 on cuda, float32_matmul_precision
  elsewhere), hf32, tf32. torch_npu and cann are required in the report of an npu target.
- report (accuracy) or result (perf): cpu_fallbacks when present ({"operators": {op: count}, ...}, or a list of
  operator names); for an npu target without it the card says the report does not record fallbacks.
- accuracy: skipped (a count) when present, else the length of errors (dataset.skipped for a labelled set).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobilevit_npu import PROJECT_DIR, models, reports

TEMPLATES_DIR = PROJECT_DIR / "templates"
LANGS = ("zh", "en")
BASE_MODEL = models.HUB_MODEL_ID
LICENSE = {"license": "other", "license_name": "apple-sample-code-license",
           "license_link": "https://github.com/apple/ml-cvnets/blob/main/LICENSE"}  # fmt: skip
ACCURACY_TOOL, PERF_TOOL = "accuracy_run.py", "accuracy_run_perf.py"
_MISSING = object()


class CardError(Exception):
    """The reports cannot make a card (a missing field, mixed weights): exit 1, never a card with a hole."""


# ----------------------------------------------------------------------------------------------------- templates


@dataclass
class Template:
    """One language's template file: named blocks (`<!-- block: NAME -->`) and its `words` (key: text)."""

    lang: str
    blocks: dict[str, str]
    words: dict[str, str]

    def fill(self, block: str, **values: Any) -> str:
        text = string.Template(self.blocks[block]).substitute({k: str(v) for k, v in values.items()})
        return text.strip("\n")

    def word(self, key: str, **values: Any) -> str:
        return string.Template(self.words[key]).substitute({k: str(v) for k, v in values.items()})


_BLOCK_RE = re.compile(r"^<!-- block: (\w+) -->[ \t]*$", re.MULTILINE)


def load_template(lang: str, folder: Path = TEMPLATES_DIR) -> Template:
    path = folder / f"model_card.{lang}.md"
    text = path.read_text(encoding="utf-8")
    parts = _BLOCK_RE.split(text)
    blocks = {parts[i]: parts[i + 1].strip("\n") + "\n" for i in range(1, len(parts) - 1, 2)}
    words = {}
    for line in blocks.pop("words", "").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(":")
            value = value.strip()
            words[key.strip()] = json.loads(value) if value.startswith('"') else value  # "..." keeps spaces
    return Template(lang, blocks, words)


# ------------------------------------------------------------------------------------------------------- reports


@dataclass
class Report:
    path: str
    data: dict[str, Any]
    kind: str = ""  # accuracy | labelled | perf

    def need(self, *keys: str, null: bool = False) -> Any:
        """The value at keys (a path into the report); CardError when absent, or null where null is not allowed."""
        value: Any = self.data
        for i, key in enumerate(keys):
            if not isinstance(value, dict) or key not in value:
                raise CardError(f"{self.path}: the report has no field {'.'.join(keys[: i + 1])}, which the card needs "
                                "(regenerate the report with the current scripts)")  # fmt: skip
            value = value[key]
        if value is None and not null:
            raise CardError(f"{self.path}: field {'.'.join(keys)} is null, and the card needs a value")
        return value

    def get(self, *keys: str, default: Any = None) -> Any:
        """An optional field (read defensively: absent or null gives `default`)."""
        value: Any = self.data
        for key in keys:
            if not isinstance(value, dict) or value.get(key) is None:
                return default
            value = value[key]
        return value

    @property
    def command(self) -> str:
        return "python " + shlex.join([self.need("tool"), *map(str, self.need("argv"))])

    @property
    def name(self) -> str:
        return Path(self.path).name


def read_reports(paths: list[str]) -> list[Report]:
    out = []
    for path in paths:
        report = Report(path, reports.read_json(Path(path), f"report {path}"))
        tool = report.need("tool")
        if tool == ACCURACY_TOOL:
            report.kind = "labelled" if report.get("dataset") is not None else "accuracy"
        elif tool == PERF_TOOL:
            report.kind = "perf"
        else:
            raise CardError(f"{path}: tool {tool!r} is neither {ACCURACY_TOOL} nor {PERF_TOOL}")
        out.append(report)
    if not any(r.kind in ("accuracy", "labelled") for r in out):
        raise CardError(f"no {ACCURACY_TOOL} report among {', '.join(paths)}: the card needs one")
    if not any(r.kind == "perf" for r in out):
        raise CardError(f"no {PERF_TOOL} report among {', '.join(paths)}: the card needs one")
    return out


def weights_identity(report: Report) -> tuple[str, str]:
    """('synthetic', seed) or ('sha256', digest): what makes two reports measurements of the same weights."""
    if report.need("synthetic"):
        return "synthetic", str(report.need("model_source", "seed"))
    return "sha256", str(report.need("model_source", "sha256"))


def check_one_model(items: list[Report]) -> tuple[str, str]:
    first = items[0]
    ident = weights_identity(first)
    for other in items[1:]:
        if weights_identity(other) != ident:

            def show(r):
                kind, value = weights_identity(r)
                return f"synthetic weights, seed {value}" if kind == "synthetic" else f"weights sha256 {value}"

            raise CardError(f"{first.path} ({show(first)}) and {other.path} ({show(other)}) measured different "
                            "weights: one card describes one model; give reports of the same weights")  # fmt: skip
    return ident


# --------------------------------------------------------------------------------------------------------- model


@dataclass
class ModelFacts:
    folder: Path
    config: dict[str, Any]
    preprocessor: dict[str, Any]
    parameters: int
    preprocess: Any = field(repr=False)


def model_folder(items: list[Report], override: str | None) -> Path:
    first = items[0]
    if override:
        folder = Path(override)
    elif first.need("synthetic"):
        folder = PROJECT_DIR / "model"  # synthetic.x_small_config() reads the committed model/config.json
    else:
        folder = Path(first.need("model_source", "path"))
    if not (folder / "config.json").is_file():
        raise CardError(f"{folder / 'config.json'} not found (the model folder of {first.path}); the model section "
                        "needs it: pass --model_path FOLDER")  # fmt: skip
    return folder


def read_model(folder: Path, ident: tuple[str, str], first: Report) -> ModelFacts:
    import torch
    from transformers import MobileViTConfig, MobileViTForImageClassification

    from mobilevit_npu.preprocessing import PreprocessConfig

    config = reports.read_json(folder / "config.json", "config.json")
    if not (folder / "preprocessor_config.json").is_file():
        raise CardError(f"{folder / 'preprocessor_config.json'} not found; the model section needs the input size")
    preprocessor = reports.read_json(folder / "preprocessor_config.json", "preprocessor_config.json")
    if config.get("model_type") != "mobilevit":
        raise CardError(f"{folder}/config.json is not a MobileViT config (model_type={config.get('model_type')!r})")
    if ident[0] == "sha256":
        weights = models._weights_file(folder)
        if weights is not None and (digest := models.sha256_file(weights)) != ident[1]:
            raise CardError(f"{weights} (sha256 {digest}) and {first.path} (weights sha256 {ident[1]}) are different "
                            "weights: pass the folder the reports measured with --model_path")  # fmt: skip
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = MobileViTForImageClassification(MobileViTConfig.from_dict(config))
    parameters = sum(p.numel() for p in model.parameters())
    return ModelFacts(folder, config, preprocessor, parameters, PreprocessConfig.from_dict(preprocessor))


# ---------------------------------------------------------------------------------------------------- formatting


def num(x: Any, spec: str) -> str:
    """A report number in the card's format; CardError-free: callers check null first."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise TypeError(f"not a finite number: {x!r}")
    if spec == "%":
        return f"{100 * x:.2f}%"
    if spec == "%3":  # agreement and accuracy: one image in 50,000 is 0.002%
        return f"{100 * x:.3f}%"
    if spec == "%1":
        return f"{100 * x:.1f}%"
    if spec == ",":
        return f"{int(x):,}"
    return format(x, spec)


def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def bullets(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def code(text: Any) -> str:
    text = str(text)
    return f"`{text}`" if "`" not in text else f"`` {text} ``"


def shown_path(path: Path) -> str:
    """A path as the card shows it: relative to the working folder when inside it (no home folders in a card)."""
    relative = os.path.relpath(path.resolve(), Path.cwd().resolve())
    return str(path) if relative.startswith("..") else Path(relative).as_posix()


def platform_kind(device: str) -> str:
    return device.split(":", 1)[0]


def target_devices(items: list[Report]) -> list[str]:
    """Every device a target ran on (accuracy target.device, perf device), in first-seen order."""
    seen: list[str] = []
    for r in items:
        kind = platform_kind(str(r.need("target", "device") if r.kind != "perf" else r.need("device")))
        if kind not in seen:
            seen.append(kind)
    return seen


# -------------------------------------------------------------------------------------------------- the sections


class CardWriter:
    def __init__(self, items: list[Report], facts: ModelFacts, tpl: Template):
        self.items, self.facts, self.t = items, facts, tpl
        self.synthetic = bool(items[0].need("synthetic"))

    def w(self, key: str, **values: Any) -> str:
        return self.t.word(key, **values)

    def value(self, x: Any, spec: str) -> str:
        """A number, or the template's word for a null (NaN/inf written as null by the scripts)."""
        return self.w("not_finite") if x is None else num(x, spec)

    def yes_no(self, x: bool) -> str:
        return self.w("yes") if x else self.w("no")

    def platforms(self) -> str:
        return self.w("joiner").join(self.w(f"platform_{k}") for k in target_devices(self.items))

    # ----------------------------------------------------------------------------------------------- environment
    ENV_ROWS = (
        ("device", "env_device"), ("device_name", "env_device_name"), ("cpu", "env_cpu"),
        ("cpu_count", "env_cpu_count"), ("platform", "env_platform"), ("python", "env_python"),
        ("torch", "env_torch"), ("torch_npu", "env_torch_npu"), ("cann", "env_cann"), ("cuda", "env_cuda"),
        ("transformers", "env_transformers"), ("pillow", "env_pillow"), ("torch_threads", "env_threads"),
    )  # fmt: skip
    OPTIONAL_ENV = {"torch_npu", "cann", "cuda", "pillow"}  # shown when any report has a value

    def environment(self) -> str:
        items = self.items
        lines = [row(self.w("env_field"), *(code(r.name) for r in items)), row(*["---"] * (len(items) + 1))]
        for key, label in self.ENV_ROWS:
            if key in self.OPTIONAL_ENV:
                for r in items:  # an NPU target's report must say which torch_npu and CANN it ran with
                    if key in ("torch_npu", "cann") and platform_kind(str(r.need("environment", "device"))) == "npu":
                        r.need("environment", key, null=key == "cann")
                if all(r.get("environment", key) is None for r in items):
                    continue  # not applicable anywhere (no torch_npu on a CPU run): no row, rather than a blank one
                cells = [self.optional_env(r, key) for r in items]
            else:
                cells = [code(r.need("environment", key)) for r in items]
            lines.append(row(self.w(label), *cells))
        lines.append(row(self.w("env_allocator"), *(self.allocator(r) for r in items)))
        if any(r.get("environment", "load_average") for r in items):
            lines.append(row(self.w("env_load"), *(self.load(r) for r in items)))
        if any(self.precision(r) for r in items):
            lines.append(row(self.w("env_fp32"), *(self.precision(r) or self.w("not_recorded") for r in items)))
        if any(r.get("environment", "torch_npu_mismatch") for r in items):
            lines.append(row(self.w("env_mismatch"), *(r.get("environment", "torch_npu_mismatch")
                                                       or self.w("no") for r in items)))  # fmt: skip
        return "\n".join(lines)

    def optional_env(self, r: Report, key: str) -> str:
        environment = r.need("environment")
        if key not in environment:
            return self.w("not_recorded")
        value = environment[key]
        return code(value) if value is not None else self.w(f"env_null_{key}")

    def load(self, r: Report) -> str:
        load = r.get("environment", "load_average")
        return " / ".join(num(x, ".2f") for x in load) if load else self.w("not_recorded")

    def allocator(self, r: Report) -> str:
        name = r.need("environment", "allocator", "name")
        tuned = r.need("environment", "allocator", "tuned")
        return f"{name} ({self.w('tuned') if tuned else self.w('untuned')})"

    @staticmethod
    def precision(r: Report) -> str:
        """HF32/TF32 state as the report records it: environment.fp32_precision, or hf32 / tf32 keys."""
        parts = []
        state = r.get("environment", "fp32_precision")
        if isinstance(state, dict):
            parts += [f"{k}={v}" for k, v in state.items() if v is not None]
        for key in ("hf32", "tf32"):
            value = r.get("environment", key)
            if isinstance(value, dict):
                parts += [f"{key}.{k}={v}" for k, v in value.items() if v is not None]
            elif value is not None:
                parts.append(f"{key}={value}")
        return code(", ".join(parts)) if parts else ""

    def fallback(self, r: Report, where: dict[str, Any] | None = None) -> str | None:
        """The CPU-fallback line for an npu target: the operators, none, or that the report does not record them."""
        source = where if where is not None else r.data
        device = r.need("target", "device") if r.kind != "perf" else r.need("device")
        value = source.get("cpu_fallbacks")
        if platform_kind(str(device)) != "npu" and not value:
            return None
        if "cpu_fallbacks" not in source:
            return self.w("fallback_not_recorded")
        if isinstance(value, dict):
            ops = value.get("operators") or {}
        elif isinstance(value, list):
            ops = {str(op): None for op in value}
        else:
            ops = {}
        if not ops:
            return self.w("fallback_none")
        listed = ", ".join(code(op) + (f" x{n}" if n is not None else "") for op, n in ops.items())
        return self.w("fallback_some", count=len(ops), operators=listed)

    # --------------------------------------------------------------------------------------------------- accuracy
    METRICS = (
        ("cosine_min", ".6f"), ("cosine_mean", ".6f"), ("top1_agreement", "%3"), ("top1_near_tie_flips", "d"),
        ("top5_overlap_mean", ".4f"), ("max_abs_prob_diff", ".6f"), ("max_abs_logit_diff", ".6f"), ("rmse", ".6f"),
        ("mean_relative_error", ".4f"), ("mean_relative_error_above_error_floor", ".4f"),
        ("share_rel_err_below_0_001", "%"), ("reference_logit_std_min", ".4f"),
    )  # fmt: skip

    def accuracy(self, r: Report) -> str:
        agg = r.need("aggregate")
        images = r.need("aggregate", "images")
        metric_rows = [row(self.w("metric"), self.w("field"), self.w("value")), row("---", "---", "---:")]
        for key, spec in self.METRICS:
            r.need("aggregate", key, null=True)
            metric_rows.append(row(self.w(f"metric_{key}"), code(key), self.value(agg[key], spec)))
        thresholds = r.need("thresholds")
        threshold_rows = [row(self.w("threshold"), self.w("field"), self.w("value")), row("---", "---", "---:")]
        for key, value in thresholds.items():
            label = self.w(f"threshold_{key}") if f"threshold_{key}" in self.t.words else code(key)
            threshold_rows.append(row(label, code(key), self.value(value, "g")))
        check_rows = [row(self.w("check"), self.w("rule"), self.w("value"), self.w("passed")), row(*["---"] * 4)]
        for check in [*r.need("checks"), *(r.get("reference_checks") or [])]:
            value = check.get("value")
            shown = self.w("na") if value is None else num(value, "g")
            check_rows.append(row(code(check["name"]), check["rule"], shown, self.yes_no(check["passed"])))
        verdict = r.need("verdict")
        reasons = r.need("verdict_reasons")
        if verdict != "PASS" and not reasons:
            raise CardError(f"{r.path}: verdict {verdict} with no verdict_reasons; the card would not say why")
        reason_text = self.w("verdict_reasons") + "\n\n" + bullets(reasons) if reasons else self.w("verdict_no_reasons")
        skipped = r.get("skipped")
        if skipped is None:
            skipped = r.need("dataset", "skipped") if r.kind == "labelled" else len(r.need("errors"))
        parts = [self.t.fill(
            "accuracy", compared=r.need("compared"), command=r.command, report=code(r.path), name=r.name, images=images,
            skipped=skipped, input=r.need("input"), reference=self.side(r, "reference"), target=self.side(r, "target"),
            metrics="\n".join(metric_rows), thresholds="\n".join(threshold_rows), checks="\n".join(check_rows),
            verdict=verdict, reasons=reason_text, layers=self.layers(r),
        )]  # fmt: skip
        if r.kind == "labelled":
            parts.append(self.labelled(r))
        extra = [line for line in (self.fallback(r),) if line]
        notes = [*r.need("target", "notes"), *r.need("notes")]
        if extra or notes:
            parts.append(self.t.fill("report_notes", notes=bullets(extra + notes)))
        return "\n\n".join(parts)

    def side(self, r: Report, which: str) -> str:
        return self.w("side", device=code(r.need(which, "device")), dtype=code(r.need(which, "dtype")),
                      mode=code(r.need(which, "mode")))  # fmt: skip

    def layers(self, r: Report) -> str:
        layers = r.need("layers", null=True)
        if layers is None:
            return self.w("layers_not_run")
        first = r.need("layers", "first_divergent", null=True)
        nonfinite = r.need("layers", "first_nonfinite", null=True)
        head = self.w("layers_ran", modules=r.need("layers", "modules_compared"),
                      threshold=num(r.need("layers", "threshold"), "g"))  # fmt: skip
        if first is None:
            lines = [head + self.w("layers_none_divergent")]
        else:
            lines = [head + self.w("layers_first_divergent", name=code(first["name"]),
                                         cosine=self.value(first["cosine_min"], ".6f"),
                                         error=self.value(first["max_abs_error"], ".6g"),
                                         image=code(first["worst_image"]))]  # fmt: skip
        if nonfinite is not None:
            lines.append(self.w("layers_first_nonfinite", name=code(nonfinite["name"])))
        return " ".join(lines)

    def labelled(self, r: Report) -> str:
        rows = [row(self.w("side_col"), "top-1", "top-5"), row("---", "---:", "---:")]
        for which in ("reference", "target"):
            rows.append(row(self.w(which) + " " + self.side(r, which), num(r.need("dataset", which, "top1"), "%3"),
                            num(r.need("dataset", which, "top5"), "%3")))  # fmt: skip
        return self.t.fill("labelled", table="\n".join(rows), images=r.need("dataset", "images"),
                           skipped=r.need("dataset", "skipped"),
                           agreement=num(r.need("dataset", "agreement_top1"), "%3"),
                           differ=len(r.need("dataset", "disagreements")))  # fmt: skip

    # ------------------------------------------------------------------------------------------------ performance
    def performance(self, r: Report) -> str:
        settings = r.need("settings")
        synchronized = r.need("settings", "synchronized")
        scope = self.w("scope_e2e") if r.need("settings", "end_to_end") else self.w("scope_model")
        interleaved = self.w("interleaved") if r.get("settings", "interleaved") else self.w("not_interleaved")
        results = r.need("results")
        if not results:
            raise CardError(f"{r.path}: results is empty; the card needs at least one measured mode")
        table = [self.t.blocks["perf_header"].strip("\n")]
        unavailable, notes, ceilings = [], [], {}
        for i, res in enumerate(results):
            where = f"results[{i}]"

            def need(*keys, null=False, res=res, where=where):
                return Report(r.path, {where: res}).need(where, *keys, null=null)

            mode, batch, status = need("mode"), need("batch_size"), need("status")
            if status != "ok":
                unavailable.append(self.w("perf_unavailable", mode=code(mode), batch=batch, status=status,
                                          reason=need("reason")))  # fmt: skip
                continue
            lat = [num(need("latency_ms", k), ".2f") for k in ("p50", "p90", "p99", "mean", "min", "max")]
            compile_s = need("compile_s", null=True)
            agreement = need("agreement", null=True)
            roofline = need("roofline", null=True)
            if roofline is not None:
                ceilings[float(roofline["ceiling_gflop_per_s"])] = roofline["flop_per_image"]
            table.append(row(
                code(mode), batch, *lat, num(need("throughput_images_per_s"), ".2f"),
                self.w("not_compiled") if compile_s is None else num(compile_s, ".2f"),
                self.w("na") if agreement is None else self.value(agreement["cosine"], ".7f"),
                self.w("na") if agreement is None else self.value(agreement["top1_agreement"], "%3"),
                self.yes_no(need("exact")),
                self.w("na") if roofline is None else num(roofline["fraction_of_ceiling"], "%1"),
            ))  # fmt: skip
            for note in need("notes"):
                notes.append(f"{code(mode)} / {batch}: {note}")
            if "cpu_fallbacks" in res and "cpu_fallbacks" not in r.data:
                line = self.fallback(r, res)
                if line:
                    notes.append(f"{code(mode)} / {batch}: {line}")
        if len(table) == 1:
            raise CardError(f"{r.path}: no mode has status ok; the card has no latency to show")
        ceiling_text = self.w("na") if not ceilings else self.w(
            "ceiling", ceilings=", ".join(num(c, ".1f") for c in ceilings),
            gflop=", ".join(sorted({num(f / 1e9, ".2f") for f in ceilings.values()})))  # fmt: skip
        body = self.t.fill(
            "performance", name=r.name, device=code(r.need("device")), device_name=r.need("environment", "device_name"),
            dtype=code(r.need("settings", "dtype")), command=r.command, report=code(r.path),
            iterations=r.need("settings", "iterations"), warmup=r.need("settings", "warmup"), synchronized=synchronized,
            percentiles=settings.get("percentiles") or self.w("na"), scope=scope, interleaved=interleaved,
            table="\n".join(table), ceiling=ceiling_text,
        )  # fmt: skip
        per_result = "cpu_fallbacks" not in r.data and any("cpu_fallbacks" in res for res in results)
        extra = [] if per_result else [line for line in (self.fallback(r),) if line]
        if unavailable:
            body += "\n\n" + self.t.fill("perf_unavailable_list", items=bullets(unavailable))
        if notes or extra:
            body += "\n\n" + self.t.fill("report_notes", notes=bullets(extra + notes))
        return body

    # ------------------------------------------------------------------------------------------------------ model
    def model(self) -> str:
        f, cfg, pre = self.facts, self.facts.config, self.facts.preprocess

        def cfg_need(key):
            if key not in cfg:
                raise CardError(f"{f.folder / 'config.json'}: no field {key}, which the model section needs")
            return cfg[key]

        architecture = (cfg.get("architectures") or ["MobileViTForImageClassification"])[0]
        labels = cfg.get("id2label")
        if not labels:
            raise CardError(f"{f.folder / 'config.json'}: no id2label; the model section needs the number of labels")
        rows = [row(self.w("field"), self.w("value")), row("---", "---")]
        rows += [
            row(self.w("model_architecture"), code(architecture)),
            row(self.w("model_parameters"), num(f.parameters, ",")),
            row(self.w("model_input"), self.w("input_size", height=pre.crop_height, width=pre.crop_width,
                                              edge=pre.shortest_edge)),
            row(self.w("model_preprocess"), self.w("preprocess_bgr") if pre.do_flip_channel_order
                else self.w("preprocess_rgb")),
            row(self.w("model_hidden_sizes"), code(cfg_need("hidden_sizes"))),
            row(self.w("model_neck_hidden_sizes"), code(cfg_need("neck_hidden_sizes"))),
            row(self.w("model_heads"), cfg_need("num_attention_heads")),
            row(self.w("model_patch_size"), cfg_need("patch_size")),
            row(self.w("model_activation"), code(cfg_need("hidden_act"))),
            row(self.w("model_labels"), len(labels)),
        ]  # fmt: skip
        return self.t.fill("model", table="\n".join(rows), folder=shown_path(f.folder))

    # ------------------------------------------------------------------------------------------------------- card
    def banners(self, templates: dict[str, Template]) -> str:
        """Warnings at the top. Synthetic weights are said in both languages in every card."""
        out = []
        order = [self.t.lang] + [lang for lang in LANGS if lang != self.t.lang]
        if self.synthetic:
            seed = weights_identity(self.items[0])[1]
            out += [templates[lang].fill("synthetic_banner", seed=seed) for lang in order]
        if set(target_devices(self.items)) == {"cpu"}:
            out.append(self.t.fill("cpu_banner", platforms=self.platforms()))
        return "\n\n".join(out)

    def card(self, templates: dict[str, Template]) -> str:
        acc = [r for r in self.items if r.kind != "perf"]
        perf = [r for r in self.items if r.kind == "perf"]
        ident = weights_identity(self.items[0])
        weights = (
            self.w("weights_synthetic", seed=ident[1])
            if ident[0] == "synthetic"
            else self.w("weights_real", name=code(self.items[0].need("model_source", "name")), sha256=code(ident[1]))
        )
        sources = bullets([self.w("source_line", report=code(r.path), command=code(r.command)) for r in self.items])
        text = self.t.fill(
            "card", title=self.w("title", platforms=self.platforms()), banners=self.banners(templates),
            platforms=self.platforms(), base_model=BASE_MODEL, weights=weights, environment=self.environment(),
            accuracy="\n\n".join(self.accuracy(r) for r in acc), model=self.model(), sources=sources,
            performance="\n\n".join(self.performance(r) for r in perf),
        )  # fmt: skip
        text = "\n".join(line.rstrip() for line in text.splitlines())
        return re.sub(r"\n{3,}", "\n\n", text) + "\n"


# ------------------------------------------------------------------------------------------------- front matter


DEVICE_TAGS = {"npu": ["NPU", "Ascend", "torch_npu"], "cuda": ["CUDA"], "mps": ["MPS"], "cpu": ["CPU"]}


def _result(r: Report, dataset: str, metrics: list[tuple[str, str, float]]) -> dict[str, Any]:
    """One model-index result (the hub's layout: task, dataset, metrics), one per report."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(r.path).stem)
    return {
        "task": {"type": "image-classification", "name": "Image Classification"},
        "dataset": {"name": dataset, "type": f"report/{stem}"},
        "metrics": [{"type": kind, "value": value, "name": name} for kind, name, value in metrics],
    }


def front_matter(items: list[Report]) -> str:
    """YAML front matter a hub reads: license, base_model, pipeline_tag, tags, and a model-index of the measured
    results. Written with yaml in a fixed key order (not huggingface_hub's card writer, whose order varies by
    version); tests read it back with huggingface_hub's own model-index parser."""
    import yaml

    synthetic = bool(items[0].need("synthetic"))
    tags = ["vision", "image-classification", "mobilevit"]
    for kind in target_devices(items):
        tags += DEVICE_TAGS[kind]
    if synthetic:
        tags.append("synthetic-weights")
    results = []
    for r in items:
        if r.kind == "perf":
            metrics = []
            for res in r.need("results"):
                if res.get("status") != "ok":
                    continue
                label = f"{res['mode']}, batch {res['batch_size']}"
                metrics.append(("latency_p50_ms", f"p50 latency (ms), {label}", round(res["latency_ms"]["p50"], 2)))
                metrics.append(("throughput_images_per_s", f"images/s, {label}",
                                round(res["throughput_images_per_s"], 2)))  # fmt: skip
            device = f"{r.need('device')} ({r.need('environment', 'device_name')})"
            results.append(_result(r, f"latency on {device}, {r.need('settings', 'dtype')}", metrics))
            continue
        agg, metrics = r.need("aggregate"), []
        if r.kind == "labelled":
            dataset = f"labelled set ({r.need('dataset', 'images')} images): {r.need('compared')}"
            for k in ("top1", "top5"):
                metrics.append(("accuracy", f"{k} accuracy (target)", round(r.need("dataset", "target", k), 6)))
        else:
            dataset = f"{r.need('compared')} ({r.need('aggregate', 'images')} images)"
        for key, name in (
            ("cosine_min", "cosine similarity, worst image"),
            ("top1_agreement", "top-1 agreement"),
            ("max_abs_prob_diff", "max |probability diff|"),
        ):
            if agg.get(key) is not None:
                metrics.append((key, name, round(agg[key], 6)))
        results.append(_result(r, dataset, metrics))
    model_name = "mobilevit-x-small" + (" (synthetic weights, not a port result)" if synthetic else "")
    meta = {
        **LICENSE,
        "base_model": BASE_MODEL,
        "pipeline_tag": "image-classification",
        "library_name": "transformers",
        "datasets": ["imagenet-1k"],
        "tags": tags,
        "model-index": [{"name": model_name, "results": results}],
    }
    text = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return "---\n" + text + "---\n"


# ------------------------------------------------------------------------------------------------------ the tool

_HOLE_RE = re.compile(
    r"\$\{|\$[A-Za-z_]|\|\s*(?:None|nan|null|)\s*\|(?!-)|(?<![\w.])(?:None|nan)(?![\w.])|[:：]\s*[。.]\s*$|(?<!\w)\(\s*\)|（\s*）"
)


def check_no_holes(text: str) -> None:
    """A last guard: no placeholder left, no empty cell, no None/NaN. A failure here is a bug in this module."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        if fenced or line.startswith("```"):
            continue
        match = _HOLE_RE.search(line)
        if match:
            raise CardError(f"internal error: the card would have a hole on line {number} ({match.group(0)!r}): {line}")


def build_card(paths: list[str], lang: str = "both", model_path: str | None = None) -> str:
    """The card's Markdown: front matter once, then the card in `lang` (zh, en, or both: zh then en)."""
    items = read_reports(paths)
    ident = check_one_model(items)
    facts = read_model(model_folder(items, model_path), ident, items[0])
    templates = {code_: load_template(code_) for code_ in LANGS}
    langs = LANGS if lang == "both" else (lang,)
    bodies = [CardWriter(items, facts, templates[code_]).card(templates) for code_ in langs]
    text = front_matter(items) + "\n" + "\n---\n\n".join(bodies)
    check_no_holes(text)
    return text
