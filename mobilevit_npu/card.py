"""Model cards from measured reports: the writing half (mobilevit_npu/cardfacts.py reads and checks the reports).

`build_card(paths, lang)` gathers the facts (cardfacts.gather: every report through schema.load, duplicates and mixed
weights refused, config.json read), fills templates/model_card.<lang>.md and renders the plots the card embeds. The
template files hold every word of the card, the Chinese one also the translation of the English prose reports carry
(its `phrases` block); this module only fills them. Nothing is written here: port_report.py writes the card and its
PNGs once everything has been built, so a refusal leaves no file behind.
"""

from __future__ import annotations

import io
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mobilevit_npu import metrics, models, reports
from mobilevit_npu.cardfacts import (
    CardError,
    Facts,
    LayerFacts,
    Source,
    ceilings,
    command,
    gather,
    layer_facts,
    platform_kind,
    shown_path,
    throughput_statistic,
    weights_identity,
)

__all__ = ["CardError", "build_card", "load_template", "Card"]

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
LANGS = ("zh", "en")
# Published figures (top-1, parameters, the paper) and licences are the families' (mobilevit_npu/families.py), printed
# only for the checkpoint they belong to. The BibTeX is the MobileViT paper's, cited with them.
BIBTEX = """@inproceedings{mehta2022mobilevit,
  title     = {MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer},
  author    = {Sachin Mehta and Mohammad Rastegari},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2022},
  url       = {https://arxiv.org/abs/2110.02178}
}"""
# config.json fields with a word of their own in the templates (the others are shown as their field name)
CARD_KEY_WORDS = {
    "hidden_sizes": "model_hidden_sizes",
    "neck_hidden_sizes": "model_neck_hidden_sizes",
    "num_attention_heads": "model_heads",
    "patch_size": "model_patch_size",
    "hidden_act": "model_activation",
}
DEVICE_TAGS = {"npu": ["NPU", "Ascend", "torch_npu"], "cuda": ["CUDA"], "mps": ["MPS"], "cpu": ["CPU"]}
ASSETS_DIR = "card_assets"  # beside the card: the PNGs it embeds, linked relatively


# ----------------------------------------------------------------------------------------------------- templates


@dataclass
class Template:
    """One language's template file: named blocks (`<!-- block: NAME -->`), its `words` (key: text) and its
    `phrases` (regex => replacement: the translation of the English prose that reports carry)."""

    lang: str
    blocks: dict[str, str]
    words: dict[str, str]
    phrases: list[tuple[re.Pattern, str]] = field(default_factory=list)

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
    phrases = []
    for line in blocks.pop("phrases", "").splitlines():
        if line.strip() and not line.startswith("#"):
            pattern, _, replacement = line.partition(" => ")
            phrases.append((re.compile(pattern.strip()), replacement.strip()))
    return Template(lang, blocks, words, phrases)


# ---------------------------------------------------------------------------------------------------- formatting


def num(x: Any, spec: str) -> str:
    """A report number in the card's format (callers check NaN first)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise CardError(f"internal error: not a finite number: {x!r}")
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


_ABS_PATH_RE = re.compile(r"(?<![\w.:/])/(?:[\w.+@-]+/)*[\w.+@-]+")


def scrub_paths(text: str) -> str:
    """Absolute paths in report prose (a compile-cache file, a JSON-lines file) as the card shows paths."""
    return _ABS_PATH_RE.sub(lambda m: shown_path(m.group(0)), text)


_CJK = "\u4e00-\u9fff\u3000-\u303f\uff00-\uffef"  # CJK ideographs, CJK punctuation, full-width forms
_CJK_SPACE_RE = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")


def cjk_spacing(text: str) -> str:
    """Chinese text as it is typeset: no space between two Chinese characters (a filled value such as 昇腾 NPU after
    在 leaves one), spaces kept beside Latin letters and digits; code blocks and spans untouched."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        if fenced or line.startswith("```"):
            out.append(line)
            continue
        parts = re.split(r"(`[^`]*`)", line)
        out.append("".join(p if p.startswith("`") else _CJK_SPACE_RE.sub("", p) for p in parts))
    return "\n".join(out)


def shown_list(values: list[Any]) -> str:
    """A list from config.json as text: 96, 120, 144 (never a Python list rendering)."""
    return ", ".join(str(v) for v in values)


# -------------------------------------------------------------------------------------------------- the sections


class CardWriter:
    def __init__(self, facts: Facts, tpl: Template, plots: dict[str, dict[str, str]]):
        self.f, self.t, self.plots = facts, tpl, plots

    # -------------------------------------------------------------------------------------------------- words
    def w(self, key: str, **values: Any) -> str:
        return self.t.word(key, **values)

    def value(self, x: float, spec: str) -> str:
        return self.w("not_finite") if isinstance(x, float) and not math.isfinite(x) else num(x, spec)

    def yes_no(self, x: Optional[bool]) -> str:
        return self.w("na") if x is None else (self.w("yes") if x else self.w("no"))

    def phrase(self, text: str) -> str:
        """Report prose in the card's language: English as written, or its Chinese from the template's phrases.
        Prose the phrase table does not know is quoted as it is, in code, never passed off as a translation."""
        text = scrub_paths(text)
        if self.t.lang == "en":
            return text
        for pattern, replacement in self.t.phrases:
            if pattern.fullmatch(text):
                return pattern.sub(replacement, text)
        parts = text.split("; ")  # notes joined into one ("a; b"): each part translated, or none
        if len(parts) > 1:
            shown = [self.phrase(part) for part in parts]
            if not any(self.w("untranslated", text="") in part for part in shown):
                return "；".join(shown)
        return self.w("untranslated", text=code(text)) if "untranslated" in self.t.words else code(text)

    def platforms(self) -> str:
        return self.w("joiner").join(self.w(f"platform_{k}") for k in self.f.platforms)

    def side(self, side: Any) -> str:
        return self.w("side", device=code(side.device), dtype=code(side.dtype), mode=code(side.mode))

    def report_ref(self, s: Source) -> str:
        return code(shown_path(s.path))

    # ----------------------------------------------------------------------------------------------- environment
    ENV_ROWS = (
        ("device", "env_device"),
        ("device_name", "env_device_name"),
        ("cpu", "env_cpu"),
        ("cpu_count", "env_cpu_count"),
        ("platform", "env_platform"),
        ("python", "env_python"),
        ("torch", "env_torch"),
        ("torch_npu", "env_torch_npu"),
        ("torch_npu_mismatch", "env_mismatch"),
        ("cann", "env_cann"),
        ("cuda", "env_cuda"),
        ("transformers", "env_transformers"),
        ("pillow", "env_pillow"),
        ("torch_threads", "env_threads"),
    )
    OPTIONAL_ENV = {"torch_npu", "torch_npu_mismatch", "cann", "cuda", "pillow"}  # a row only where some report has one

    def environment(self) -> str:
        sources = self.f.sources
        lines = [row(self.w("env_field"), *(code(s.name) for s in sources)), row(*["---"] * (len(sources) + 1))]
        for key, label in self.ENV_ROWS:
            values = [getattr(s.report.environment, key) for s in sources]
            if key in self.OPTIONAL_ENV and all(v is None for v in values):
                continue
            cells = [code(v) if v is not None else self.w(f"env_null_{key}") for v in values]
            lines.append(row(self.w(label), *cells))
        lines.append(row(self.w("env_allocator"), *(self.allocator(s) for s in sources)))
        if any(s.report.environment.load_average for s in sources):
            lines.append(row(self.w("env_load"), *(self.load(s) for s in sources)))
        lines.append(row(self.w("env_fp32"), *(self.precision(s) for s in sources)))
        lines.append(row(self.w("env_commit"), *(self.commit_cell(s) for s in sources)))
        lines.append(row(self.w("env_packages"), *(code(s.report.provenance.packages_sha256[:16]) for s in sources)))
        return "\n".join(lines)

    def commit_cell(self, s: Source) -> str:
        commit = s.report.provenance.commit
        return (
            self.w("not_git")
            if commit == "not a git checkout"
            else code(commit[:12] + ("+dirty" * commit.endswith("+dirty")))
        )

    def load(self, s: Source) -> str:
        load = s.report.environment.load_average
        return " / ".join(num(x, ".2f") for x in load) if load else self.w("not_recorded")

    def allocator(self, s: Source) -> str:
        allocator = s.report.environment.allocator
        name, tuned = allocator.get("name"), allocator.get("tuned")
        if name is None:
            return self.w("not_recorded")
        return (
            f"{code(name)}（{self.w('tuned') if tuned else self.w('untuned')}）"
            if self.t.lang == "zh"
            else (f"{code(name)} ({self.w('tuned') if tuned else self.w('untuned')})")
        )

    @staticmethod
    def precision_state(s: Source) -> list[str]:
        state = s.report.environment.fp32_precision
        return [f"{k}={v}" for k, v in state.items() if v is not None and not isinstance(v, (dict, list))]

    def precision(self, s: Source) -> str:
        parts = self.precision_state(s)
        return code(", ".join(parts)) if parts else self.w("not_recorded")

    # ---------------------------------------------------------------------------------------------- fallbacks
    def fallback(self, s: Source) -> Optional[str]:
        """The CPU-fallback line of an npu target, or of any report that records operators; None otherwise."""
        fb = s.report.cpu_fallbacks
        device = s.report.device if s.kind == "benchmark" else s.report.target.device
        if fb is None:
            return self.w("fallback_not_recorded") if platform_kind(device) == "npu" else None
        if fb.status == "not an npu" and not fb.operators:
            return None
        head = self.w("fallback_head", device=code(fb.device))
        if fb.status == "observed":
            body = (
                self.w("fallback_observed", count=len(fb.operators), operators=", ".join(map(code, fb.operators)))
                if fb.operators
                else self.w("fallback_observed_none")
            )
        elif fb.status == "silenced":
            body = self.w("fallback_silenced")
        elif fb.status == "not observable on this rank":
            body = self.w("fallback_other_rank")
        else:
            body = self.w("fallback_observed", count=len(fb.operators), operators=", ".join(map(code, fb.operators)))
        if fb.error_switch:
            body += " " + self.w("fallback_error_switch", switch=code(fb.error_switch))
        return f"{head} {body}"

    # --------------------------------------------------------------------------------------------- known issues
    def known(self) -> str:
        lines = []
        for s in self.f.sources:
            r, ref = s.report, self.report_ref(s)
            device = r.device if s.kind == "benchmark" else r.target.device
            if s.kind != "benchmark" and r.verdict != "PASS":
                lines.append(self.w("known_verdict", report=ref, verdict=f"**{r.verdict}**"))
            if platform_kind(device) == "npu":
                line = self.fallback(s)
                if r.cpu_fallbacks is None:
                    lines.append(self.w("known_fallbacks_missing", report=ref))
                elif line and (r.cpu_fallbacks.operators or r.cpu_fallbacks.status != "observed"):
                    lines.append(self.w("known_fallbacks", report=ref, line=line))
            state = self.precision_state(s)
            reduced = [p for p in state if re.search(r"(hf32|tf32)\w*=True", p, re.IGNORECASE)]
            if platform_kind(device) in ("npu", "cuda") and reduced:
                lines.append(self.w("known_hf32", report=ref, device=code(device), state=code(", ".join(reduced))))
            if s.kind == "benchmark":
                for res in r.results:
                    if res.status != "ok":
                        lines.append(
                            self.w(
                                "known_unavailable",
                                report=ref,
                                mode=code(res.mode),
                                batch=res.batch_size,
                                reason=self.phrase(res.reason or res.status),
                            )
                        )
                lines += self.profile_issues(s)  # npu: AI CPU share and what the CPU fallbacks cost
                continue
            if r.skipped.count:
                images = ", ".join(code(shown_path(e.image)) for e in r.errors) or self.w("not_recorded")
                lines.append(self.w("known_skipped", report=ref, count=r.skipped.count, of=r.skipped.of, images=images))
            layers = layer_facts(s)
            if layers is not None and layers.below:
                lines.append(
                    self.w(
                        "known_layers",
                        report=ref,
                        below=layers.below,
                        modules=layers.compared,
                        threshold=num(layers.threshold, "g"),
                        first=code(layers.first["name"]),
                        worst=code(layers.worst.name),
                        worst_cosine=self.value(layers.worst.cosine_min, ".6f"),
                    )
                )
            probe = r.msprobe
            if probe is not None and probe.first_failing_module:
                failing = sum(n for k, n in probe.counts.items() if k.lower() not in ("pass", "n/a"))
                failing -= probe.dtype_only
                lines.append(
                    self.w("known_msprobe", report=ref, failing=failing, module=code(probe.first_failing_module))
                )
        return bullets(lines) if lines else self.w("known_none")

    # ---------------------------------------------------------------------------------------------- accuracy
    METRICS = (
        ("cosine_min", ".6f"),
        ("cosine_mean", ".6f"),
        ("top1_agreement", "%3"),
        ("top1_near_tie_flips", "d"),
        ("top5_overlap_mean", ".4f"),
        ("max_abs_prob_diff", ".6f"),
        ("max_abs_logit_diff", ".6f"),
        ("rmse", ".6f"),
        ("mean_relative_error", ".4f"),
        ("mean_relative_error_above_error_floor", ".4f"),
        ("share_rel_err_below_0_001", "%"),
        ("reference_logit_std_min", ".4f"),
    )

    def rule(self, s: Source, check: Any) -> str:
        """A check's rule in the card's language, from the thresholds it was judged by (its definition in metrics)."""
        key = f"rule_{check.name}"
        if key not in self.t.words:
            raise CardError(
                f"{s.path}: field `checks` has a check {check.name!r} the card cannot describe "
                "(a newer report: update mobilevit-npu)"
            )
        th, sk = s.report.thresholds, s.report.skipped
        # the thresholds as metrics writes them into each rule (str of the float), so both definitions read alike
        return self.w(
            key,
            min_cosine=th.min_cosine,
            min_top1_agreement=th.min_top1_agreement,
            top1_tie_margin=th.top1_tie_margin,
            max_prob_diff=th.max_prob_diff,
            min_reference_logit_std=th.min_reference_logit_std,
            allowed=sk.allowed,
            of=sk.of,
            max_skipped=f"{sk.max_skipped:g}",
        )

    def reasons(self, s: Source) -> str:
        r = s.report
        failed = [c for c in [*r.reference_checks, *r.checks] if not c.passed]
        lines = [
            self.w("reason_check", name=code(c.name), value=self.check_value(c), rule=self.rule(s, c)) for c in failed
        ]
        fb = r.cpu_fallbacks
        if r.verdict == "FAIL" and not failed and fb is not None and fb.operators:
            lines.append(self.w("reason_fallback"))
        if r.verdict != "PASS" and not lines:
            raise CardError(f"{s.path}: field `verdict` is {r.verdict} with no failed check: the card cannot say why")
        return self.w("verdict_reasons") + "\n\n" + bullets(lines) if lines else self.w("verdict_no_reasons")

    def check_value(self, check: Any) -> str:
        return self.w("na") if check.value is None else self.value(check.value, ".6g")

    def per_image(self, s: Source) -> str:
        model = self.f.model
        rows = [
            row(
                self.w("image_col"),
                self.w("ref_top1_col"),
                self.w("tgt_top1_col"),
                self.w("agree_col"),
                self.w("margin_col"),
                self.w("cosine_col"),
            ),
            row("---", "---", "---", "---", "---:", "---:"),
        ]
        for m in s.report.per_image:
            agree = self.yes_no(m.top1_agree)
            if m.top1_near_tie:
                agree += f"（{self.w('near_tie')}）" if self.t.lang == "zh" else f" ({self.w('near_tie')})"
            target = code(f"{m.top1_target} {model.label(m.top1_target)}") if m.top1_target >= 0 else self.w("na")
            rows.append(
                row(
                    code(shown_path(m.image)),
                    code(f"{m.top1_reference} {model.label(m.top1_reference)}"),
                    target,
                    agree,
                    self.value(m.top1_reference_margin, ".4f"),
                    self.value(m.cosine, ".6f"),
                )
            )
        return "\n".join(rows)

    def layers(self, s: Source) -> str:
        layers = layer_facts(s)
        if layers is None:
            return self.w("layers_not_run")
        text = self.w("layers_ran", modules=layers.compared, threshold=num(layers.threshold, "g"))
        if layers.first is None and not layers.below:
            text += self.w("layers_none_divergent")
        else:
            first = layers.first
            text += self.w(
                "layers_below",
                below=layers.below,
                modules=layers.compared,
                first=code(first["name"]),
                first_cosine=self.value(float(first["cosine_min"]), ".6f"),
                first_error=self.value(float(first["max_abs_error"]), ".6g"),
                first_image=code(shown_path(str(first["worst_image"]))),
                worst=code(layers.worst.name),
                worst_cosine=self.value(layers.worst.cosine_min, ".6f"),
            )
        if layers.first_nonfinite is not None:
            text += self.w("layers_first_nonfinite", name=code(layers.first_nonfinite["name"]))
        plot = self.plots.get(s.path, {}).get("layers")
        if plot:
            text += "\n\n" + self.t.fill("layers_plot", alt=self.w("layers_plot_alt"), plot=plot)
        return text

    def msprobe(self, s: Source) -> Optional[str]:
        probe = s.report.msprobe
        if probe is None:
            return None
        counts = self.w("list_sep").join(f"{code(k)} {n}" for k, n in probe.counts.items())
        counts = counts or self.w("msprobe_counts_none")
        dtype_only = (
            self.w(
                "msprobe_dtype_only",
                count=probe.dtype_only,
                note=self.phrase(probe.dtype_note) if probe.dtype_note else self.w("na"),
            )
            if probe.dtype_only
            else ""
        )
        agree = ""
        if probe.first_failing_module and probe.project_first_divergent and probe.agree is not None:
            agree = self.w(
                "msprobe_agree" if probe.agree else "msprobe_disagree",
                msprobe=code(probe.first_failing_module),
                project=code(probe.project_first_divergent),
            )
        first = ""
        if probe.first_failing:
            rows = [
                f"{code(row_.get('name', ''))}: {code(row_.get('result', ''))} {code(row_.get('message', ''))}"
                for row_ in probe.first_failing
            ]
            first = self.w("msprobe_first") + "\n\n" + bullets(rows)
        if probe.note:
            first += ("\n\n" if first else "") + self.w("msprobe_note", note=self.phrase(probe.note))
        sep = " " if self.t.lang == "en" else ""
        text = self.t.fill(
            "msprobe",
            version=code(probe.version),
            level=code(probe.level),
            task=code(probe.task),
            images=probe.images_dumped,
            counts=counts,
            dtype_only=dtype_only + (sep if agree else ""),
            agree=agree,
            first_failing=first,
        )
        return text.strip()

    def accuracy(self, s: Source) -> str:
        r = s.report
        metric_rows = [row(self.w("metric"), self.w("field"), self.w("value")), row("---", "---", "---:")]
        for key, spec in self.METRICS:
            metric_rows.append(row(self.w(f"metric_{key}"), code(key), self.value(getattr(r.aggregate, key), spec)))
        threshold_rows = [row(self.w("threshold"), self.w("field"), self.w("value")), row("---", "---", "---:")]
        for key in (
            "min_cosine",
            "min_top1_agreement",
            "max_prob_diff",
            "top1_tie_margin",
            "layer_min_cosine",
            "min_reference_logit_std",
        ):
            threshold_rows.append(
                row(self.w(f"threshold_{key}"), code(key), self.value(getattr(r.thresholds, key), "g"))
            )
        check_rows = [row(self.w("check"), self.w("rule"), self.w("value"), self.w("passed")), row(*["---"] * 4)]
        for check in [*r.checks, *r.reference_checks]:
            check_rows.append(
                row(code(check.name), self.rule(s, check), self.check_value(check), self.yes_no(check.passed))
            )
        reference, target = self.side(r.reference), self.side(r.target)
        parts = [
            self.t.fill(
                "accuracy",
                heading=self.w("heading", reference=reference, target=target),
                name=s.name,
                command=command(s),
                report=self.report_ref(s),
                reference=reference,
                target=target,
                images=r.aggregate.images,
                skipped=r.skipped.count,
                of=r.skipped.of,
                allowed=r.skipped.allowed,
                input=self.phrase(r.input),
                verdict=r.verdict,
                reasons=self.reasons(s),
                metrics="\n".join(metric_rows),
                thresholds="\n".join(threshold_rows),
                checks="\n".join(check_rows),
                per_image=self.per_image(s),
                layers=self.layers(s),
            )
        ]
        if s.kind == "labelled" and r.dataset is not None:
            parts.append(self.labelled(s))
        probe = self.msprobe(s)
        if probe:
            parts.append(probe)
        extra = [line for line in (self.fallback(s),) if line]
        notes = [self.phrase(n) for n in [*r.target.notes, *r.notes]]
        if r.layers is not None and r.layers.note:
            notes.append(self.phrase(r.layers.note))
        if extra or notes:
            parts.append(self.t.fill("report_notes", notes=bullets(extra + notes)))
        return "\n\n".join(parts)

    def labelled(self, s: Source) -> str:
        ds = s.report.dataset
        rows = [row(self.w("side_col"), "top-1", "top-5"), row("---", "---:", "---:")]
        for which, side in (("reference", s.report.reference), ("target", s.report.target)):
            figures = getattr(ds, which)
            rows.append(
                row(
                    self.w(which) + " " + self.side(side),
                    self.optional(figures.get("top1"), "%3"),
                    self.optional(figures.get("top5"), "%3"),
                )
            )
        return self.t.fill(
            "labelled",
            table="\n".join(rows),
            images=ds.images,
            skipped=ds.skipped,
            agreement=self.optional(ds.agreement_top1, "%3"),
            differ=len(ds.disagreements),
        )

    def optional(self, x: Optional[float], spec: str) -> str:
        return self.w("na") if x is None else self.value(x, spec)

    # ------------------------------------------------------------------------------------------------ performance
    def build(self, res: Any) -> str:
        if res.compile_s is None or (isinstance(res.compile_s, float) and math.isnan(res.compile_s)):
            return self.w("build_none")
        seconds = num(res.compile_s, ".2f")
        key = {"hit": "build_hit", "miss": "build_miss", "off": "build_off"}.get(res.compile_cache or "", "build_plain")
        return self.w(key, seconds=seconds)

    def performance(self, s: Source) -> str:
        r = s.report
        settings = r.settings
        ok = [(i, res) for i, res in enumerate(r.results) if res.status == "ok"]
        if not ok:
            raise CardError(f"{s.path}: field `results` has no mode with status ok; the card has no latency to show")
        stats = {throughput_statistic(res) for _, res in ok}
        if len(stats) != 1 or None in stats:
            bad = next(i for i, res in ok if throughput_statistic(res) is None) if None in stats else ok[0][0]
            raise CardError(
                f"{s.path}: field `results[{bad}].throughput_images_per_s` is not the batch size over one "
                "latency statistic (p50 or mean) like the other rows; the card cannot say what it is"
            )
        stat = stats.pop()
        exact = f"{metrics.EXACT_COSINE:g}"
        said = settings.get("exact")
        if said is not None and f">= {metrics.EXACT_COSINE}" not in said:
            raise CardError(
                f"{s.path}: field `settings.exact` ({said!r}) names another agreement threshold than "
                f"this code's cosine >= {metrics.EXACT_COSINE}; use the version that wrote it"
            )
        others = [k for k in ("p50", "p90", "p99", "mean", "min", "max") if k != stat]
        stat_word = self.w(f"stat_{stat}")
        header = [
            self.w("col_mode"),
            self.w("col_dtype"),
            self.w("col_batch"),
            self.w("col_stat", stat=stat_word),
            self.w("col_images_per_s", stat=stat_word),
            *(self.w(f"stat_{k}") for k in others),
            self.w("col_build"),
            self.w("col_cosine"),
            self.w("col_top1"),
            self.w("col_agrees", exact_cosine=exact),
            self.w("col_ceiling"),
        ]
        table = [
            row(*header),
            row("---", "---", "---:", "---:", "---:", *["---:"] * len(others), "---", "---:", "---:", "---", "---:"),
        ]
        unavailable, notes = [], []
        for res in r.results:
            if res.status != "ok":
                unavailable.append(
                    self.w(
                        "perf_unavailable",
                        mode=code(res.mode),
                        batch=res.batch_size,
                        status=code(res.status),
                        reason=self.phrase(res.reason or ""),
                    )
                )
                continue
            lat = res.latency_ms
            agreement = res.agreement
            roof = res.roofline
            table.append(
                row(
                    code(res.mode),
                    code(res.dtype),
                    res.batch_size,
                    num(getattr(lat, stat), ".2f"),
                    num(res.throughput_images_per_s, ".2f"),
                    *(num(getattr(lat, k), ".2f") for k in others),
                    self.build(res),
                    self.w("na") if agreement is None else self.value(agreement.cosine, ".7f"),
                    self.w("na") if agreement is None else self.value(agreement.top1_agreement, "%3"),
                    self.yes_no(res.exact),
                    self.w("na") if roof is None else num(float(roof["fraction_of_ceiling"]), "%1"),
                )
            )
            for note in res.notes:
                notes.append(self.w("note_where", mode=code(res.mode), batch=res.batch_size, note=self.phrase(note)))
        ceiling_lines = [
            self.w("ceiling_line", dtype=code(dtype), gflop=num(flop / 1e9, ".2f"), ceiling=num(gf, ".1f"))
            for dtype, (gf, flop) in ceilings(s).items()
        ]
        plot = self.plots.get(s.path, {}).get("latency")
        body = self.t.fill(
            "performance",
            name=s.name,
            device=code(r.device),
            device_name=code(r.environment.device_name),
            command=command(s),
            report=self.report_ref(s),
            synchronized=self.phrase(settings["synchronized"]),
            iterations=settings["iterations"],
            warmup=settings["warmup"],
            percentiles=self.phrase(settings["percentiles"]),
            scope=self.w("scope_e2e") if settings["end_to_end"] else self.w("scope_model"),
            interleaved=self.w("interleaved") if settings["interleaved"] else self.w("not_interleaved"),
            stat=stat_word,
            exact_cosine=exact,
            table="\n".join(table),
            ceilings="\n\n".join(ceiling_lines),
            plot=plot or "",
            plot_alt=self.w("latency_plot_alt"),
        )
        if not plot:
            body = "\n".join(line for line in body.splitlines() if not line.startswith("![")).rstrip()
        extra = [line for line in (self.fallback(s),) if line]
        if unavailable:
            body += "\n\n" + self.t.fill("perf_unavailable_list", items=bullets(unavailable))
        if notes or extra:
            body += "\n\n" + self.t.fill("report_notes", notes=bullets(extra + notes))
        where = self.where_time_goes(s)
        if where:
            body += "\n\n" + where
        return body

    def where_time_goes(self, s: Source) -> str:
        """The report's `profile` (--profile DIR) as a table, one row per profiled mode and batch size, and its plot."""
        from mobilevit_npu import profiling

        prof = getattr(s.report, "profile", None)
        rows = [p for p in (prof.results if prof else []) if p.status == "ok" and p.step_ms]
        if not rows:
            return ""
        npu = any(p.npu is not None for p in rows)
        classes = [c for c in profiling.CLASSES if any(p.classes_share.get(c, 0.0) > 0 for p in rows)]
        header = [self.w("col_mode"), self.w("col_batch"), self.w("profile_col_step")]
        header += [self.w(f"profile_class_{c}") for c in classes]
        header += [self.w("profile_col_outside"), self.w("profile_col_top")]
        header += [self.w("profile_col_aicpu")] if npu else []
        table = [row(*header), row("---", "---:", "---:", *["---:"] * (len(classes) + 1), "---", *["---:"] * npu)]
        for p in rows:
            outside = max(0.0, 1.0 - sum(p.classes_share.values()))
            top = p.top_operators[0] if p.top_operators else None
            cells = [code(p.mode), p.batch_size, num(p.step_ms, ".2f")]
            cells += [num(p.classes_share.get(c, 0.0), "%1") for c in classes]
            cells += [num(outside, "%1")]
            cells += [f"{code(top.name)} ({num(top.share_of_step, '%1')})" if top else self.w("na")]
            if npu:
                cells += [num(p.npu.ai_cpu_share, "%1") if p.npu is not None else self.w("na")]
            table.append(row(*cells))
        plot = self.plots.get(s.path, {}).get("profile")
        body = self.t.fill(
            "perf_profile",
            device=code(s.report.device),
            tool=code(prof.tool),
            steps=rows[0].steps,
            idle=self.w("profile_idle_cpu" if platform_kind(s.report.device) == "cpu" else "profile_idle_device"),
            traces=self.w("profile_traces_npu" if npu else "profile_traces_torch"),
            table="\n".join(table),
            plot=plot or "",
            plot_alt=self.w("profile_plot_alt"),
        )
        if not plot:
            body = "\n".join(line for line in body.splitlines() if not line.startswith("![")).rstrip()
        return body

    def profile_issues(self, s: Source) -> list[str]:
        """Known issues from an NPU profile: the AI CPU's share of device time, and what each CPU fallback cost."""
        prof = getattr(s.report, "profile", None)
        lines = []
        for p in prof.results if prof else []:
            if p.status != "ok" or p.npu is None:
                continue
            ref, device = self.report_ref(s), code(s.report.device)
            if p.npu.ai_cpu_share > 0:
                share = num(p.npu.ai_cpu_share, "%1")
                lines.append(
                    self.w("known_aicpu", report=ref, device=device, share=share, mode=code(p.mode), batch=p.batch_size)
                )
            for fb in p.npu.cpu_fallbacks:
                lines.append(
                    self.w(
                        "known_fallback_cost",
                        report=ref,
                        operator=code(fb.operator),
                        mode=code(p.mode),
                        batch=p.batch_size,
                        calls=num(fb.calls, "g"),
                        ms=num(fb.host_ms, ".3f"),
                    )
                )
        return lines

    # ------------------------------------------------------------------------------------------------------ model
    def model(self) -> str:
        m, cfg, pre = self.f.model, self.f.model.config, self.f.model.preprocess

        def need(key):
            if key not in cfg:
                raise CardError(f"{m.folder / 'config.json'}: field `{key}` is missing, and the model section needs it")
            return cfg[key]

        from mobilevit_npu import onnx_export

        architecture = (cfg.get("architectures") or [f"{m.family.title}ForImageClassification"])[0]
        pixels = onnx_export.pixel_map(pre)
        if all(o == 0 for o in pixels.offset) and all(abs(k - 1 / 255) < 1e-9 for k in pixels.scale):
            preprocess = self.w("preprocess_bgr") if pixels.swap else self.w("preprocess_rgb")
        else:  # mean/std, or another scale: the arithmetic as AIPP states it, (pixel - min) x scale per channel
            mins = shown_list([round(-o / k, 4) for o, k in zip(pixels.offset, pixels.scale)])
            scales = shown_list([float(f"{k:.6g}") for k in pixels.scale])
            preprocess = self.w("preprocess_affine", order="BGR" if pixels.swap else "RGB", mins=mins, scales=scales)
        edge = getattr(pre, "shortest_edge", None)
        if isinstance(edge, int) and getattr(pre, "do_center_crop", False):
            size = self.w("input_size", height=pixels.height, width=pixels.width, edge=edge)
        else:
            size = self.w("input_size_fixed", height=pixels.height, width=pixels.width)
        rows = [row(self.w("field"), self.w("value")), row("---", "---")]
        rows += [
            row(self.w("model_architecture"), code(architecture)),
            row(self.w("model_parameters"), num(m.parameters, ",")),
            row(self.w("model_input"), size),
            row(self.w("model_preprocess"), preprocess),
        ]
        for key in m.family.card_keys:  # the family's shape fields; a generic family's only where config.json has them
            if key not in cfg and not m.family.known:
                continue
            value = need(key)
            label = self.w(CARD_KEY_WORDS[key]) if key in CARD_KEY_WORDS else code(key)
            shown = code(shown_list(value)) if isinstance(value, list) else value
            shown = code(value) if isinstance(value, str) else shown
            rows.append(row(label, shown))
        rows.append(row(self.w("model_labels"), len(cfg["id2label"])))
        return self.t.fill("model", table="\n".join(rows), folder=shown_path(str(m.folder)))

    def model_name(self) -> str:
        """MobileViT-X-Small for its checkpoint's architecture (the published figures' model), else the family."""
        return "MobileViT-X-Small" if self.f.model.published is not None else self.f.model.family.title

    def intro(self) -> str:
        from mobilevit_npu import onnx_export

        m = self.f.model
        what = self.w("what_port" if self.f.port_result else "what_stack", platforms=self.platforms())
        if m.published is None:  # published figures only for the checkpoint they are known and cited for
            return self.t.fill(
                "intro_family",
                model=m.family.title,
                architecture=(m.config.get("architectures") or ["?"])[0],
                parameters=num(m.parameters, ","),
                parameters_m=f"{m.parameters / 1e6:.2f}",
                height=onnx_export.pixel_map(m.preprocess).height,
                width=onnx_export.pixel_map(m.preprocess).width,
                labels=len(m.config["id2label"]),
                what=what,
            )
        return self.t.fill(
            "intro",
            base_model=m.published.checkpoint,
            parameters=num(m.parameters, ","),
            parameters_m=f"{m.parameters / 1e6:.2f}",
            height=m.preprocess.crop_height,
            width=m.preprocess.crop_width,
            labels=len(m.config["id2label"]),
            published_top1=m.published.top1,
            published_params=m.published.params,
            what=what,
        )

    def reproduce(self) -> str:
        first = self.f.sources[0].report.provenance
        commit = first.commit
        differ = {(s.report.provenance.commit, s.report.provenance.packages_sha256) for s in self.f.sources}
        git = commit not in ("not a git checkout", "git unavailable")
        packages = self.w("list_sep").join(code(f"{n} {v}") for n, v in first.packages.items() if v)
        steps = [self.w("step_install")]
        if git:
            steps.insert(0, self.w("step_checkout", commit=commit.removesuffix("+dirty")))
        kind, value = self.f.ident
        if kind == "synthetic":
            steps.append(self.w("step_weights_synthetic", seed=value))
        else:
            folder = shown_path(str(self.f.model.folder))
            weights = self.f.sources[0].report.model_source.weights or "model.safetensors"
            if self.f.model.published is not None:  # the hub id is known only for the published checkpoint
                steps.append(models.download_command(self.f.model.published.checkpoint, folder))
            steps.append(self.w("step_weights_check", file=f"{folder}/{weights}", sha256=value))
        steps += [command(s) for s in self.f.sources]
        steps.append(self.w("step_regenerate", reports=" ".join(shown_path(s.path) for s in self.f.sources)))
        shown_commit = self.w("commit_git", commit=code(commit)) if git else self.w("commit_none")
        if git and commit.endswith("+dirty"):
            shown_commit += self.w("commit_dirty")
        text = self.t.fill(
            "reproduce",
            commit=shown_commit,
            packages_sha256=first.packages_sha256,
            packages=packages,
            steps="\n".join(steps),
        )
        if len(differ) > 1:
            listed = self.w("list_sep").join(
                f"{code(s.name)} {code(s.report.provenance.commit[:12])} "
                f"{code(s.report.provenance.packages_sha256[:12])}"
                for s in self.f.sources
            )
            text += "\n\n" + self.w("commits_differ", list=listed)
        return text

    def banners(self) -> str:
        """Warnings at the top, in the card's language: synthetic weights, a CPU-only measurement."""
        out = []
        if self.f.synthetic:
            out.append(self.t.fill("synthetic_banner", seed=self.f.ident[1]))
        if set(self.f.platforms) == {"cpu"}:
            out.append(self.t.fill("cpu_banner", platforms=self.platforms()))
        return "\n\n".join(out)

    def title(self) -> str:
        key = "title_port" if self.f.port_result else ("title_synthetic" if self.f.synthetic else "title_stack")
        return self.w(key, platforms=self.platforms(), model=self.model_name())

    def card(self) -> str:
        sources = bullets(
            [
                self.w("source_line", report=self.report_ref(s), sha256=code(s.digest[:16]), command=code(command(s)))
                for s in self.f.sources
            ]
        )
        text = self.t.fill(
            "card",
            title=self.title(),
            banners=self.banners(),
            intro=self.intro(),
            quickstart=self.t.fill("quickstart"),
            known=self.known(),
            environment=self.environment(),
            accuracy="\n\n".join(self.accuracy(s) for s in self.f.accuracy),
            performance="\n\n".join(self.performance(s) for s in self.f.benchmarks),
            model=self.model(),
            reproduce=self.reproduce(),
            sources=sources,
            bibtex=BIBTEX if self.f.model.published is not None else self.w("no_bibtex"),
        )
        text = "\n".join(line.rstrip() for line in text.splitlines())
        if self.t.lang == "zh":
            text = cjk_spacing(text)
        return re.sub(r"\n{3,}", "\n\n", text) + "\n"


# ------------------------------------------------------------------------------------------------- front matter


def front_matter(facts: Facts) -> str:
    """YAML front matter a hub reads: license, base_model, pipeline_tag, library_name, tags. No model-index and no
    `datasets`: the hub wants a dataset id for every model-index result, and no report here ran on a hub dataset (the
    photos and labelled folders are local), so there is no id to give; synthetic weights get none in any case.
    Written with yaml in a fixed key order; the tests read it back with huggingface_hub."""
    import yaml

    family, published = facts.model.family, facts.model.published
    tags = ["vision", "image-classification", family.name]
    for kind in facts.platforms:
        tags += DEVICE_TAGS[kind]
    if facts.synthetic:
        tags.append("synthetic-weights")
    meta = {
        **family.license,
        **({"base_model": published.checkpoint} if published is not None else {}),
        "pipeline_tag": "image-classification",
        "library_name": "transformers",
        "tags": tags,
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


# ------------------------------------------------------------------------------------------------------ plots


def layer_figure(layers: LayerFacts, title: str):
    """The per-layer cosine along the network (execution order), the threshold as a line, the first divergent and the
    worst module marked. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [o for o, _ in layers.curve]
    cosine = [c for _, c in layers.curve]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(order, cosine, lw=1, marker=".", ms=3, label="worst-image cosine per module")
    ax.axhline(layers.threshold, color="tab:red", ls="--", lw=1, label=f"threshold {layers.threshold:g}")
    if layers.first is not None:
        ax.axvline(layers.first["order"], color="tab:orange", lw=1, label=f"first below: {layers.first['name']}")
    if layers.worst is not None:
        ax.plot(
            [layers.worst.order],
            [layers.worst.cosine_min],
            "v",
            color="black",
            label=f"worst: {layers.worst.name} ({layers.worst.cosine_min:.4f})",
        )
    ax.set_xlabel("module, in execution order")
    ax.set_ylabel("cosine similarity vs CPU float32")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})  # no version stamp: the same PNG each time
    plt.close(fig)
    return buffer.getvalue()


def render_plots(facts: Facts, assets: str) -> tuple[dict[str, dict[str, str]], dict[str, bytes]]:
    """({report path: {"latency"|"layers": link relative to the card}}, {link: PNG bytes}): the latency plot of every
    benchmark (bench.latency_figure, the benchmark's own plot) and the per-layer cosine of every --layers run."""
    from mobilevit_npu import bench

    if not bench.matplotlib_available():
        return {}, {}
    links: dict[str, dict[str, str]] = {}
    files: dict[str, bytes] = {}
    for s in facts.benchmarks:
        results = [
            {
                "mode": res.mode,
                "batch_size": res.batch_size,
                "dtype": res.dtype,
                "end_to_end": res.end_to_end,
                "samples_ms": list(res.samples_ms),
            }
            for res in s.report.results
            if res.status == "ok"
        ]
        if not any(r["samples_ms"] for r in results):
            continue
        link = f"{assets}/latency-{reports.file_stem(Path(s.path).stem)}.png"
        where = f"{s.report.device} ({s.report.environment.device_name})"
        files[link] = _png(bench.latency_figure(results, where))
        links.setdefault(s.path, {})["latency"] = link
        prof = getattr(s.report, "profile", None)  # --profile: the share of a step by operator class
        if prof is not None and any(p.status == "ok" and p.step_ms for p in prof.results):
            from mobilevit_npu import profiling

            link = f"{assets}/profile-{reports.file_stem(Path(s.path).stem)}.png"
            files[link] = _png(profiling.class_figure(prof.results, where))
            links[s.path]["profile"] = link
    for s in facts.accuracy:
        layers = layer_facts(s)
        if layers is None or not layers.curve:
            continue
        link = f"{assets}/layers-{reports.file_stem(Path(s.path).stem)}.png"
        r = s.report
        title = (
            f"{r.reference.device} {r.reference.dtype} {r.reference.mode} vs {r.target.device} {r.target.dtype} "
            f"{r.target.mode}: {layers.below} of {layers.compared} modules below {layers.threshold:g}"
        )
        files[link] = _png(layer_figure(layers, title))
        links.setdefault(s.path, {})["layers"] = link
    return links, files


# ------------------------------------------------------------------------------------------------------ the tool

_HOLE_RE = re.compile(r"\$\{|\$[A-Za-z_]|\|\s*(?:None|nan|null|)\s*\|(?!-)|[:：]\s*[。.]\s*$|(?<!\w)\(\s*\)|（\s*）")
# What a Python value looks like when it is printed instead of formatted: a dict, a list, None, NaN, a dataclass.
_REPR_RE = re.compile(
    r"\{'[^']*':|\{\"[^\"]*\":|\['[^']*'[,\]]|\[\d+(?:\.\d+)?,|(?<![\w.`/-])(?:None|nan|NaN|inf)(?![\w.`/])|\w+\(\w+="
)


def check_no_holes(text: str) -> None:
    """A last guard: no placeholder left, no empty cell, no Python rendering (dict, list, None, NaN) outside code
    blocks. A failure here is a bug in this module."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for pattern in (_HOLE_RE, _REPR_RE):
            match = pattern.search(line)
            if match:
                raise CardError(f"internal error: the card would show {match.group(0)!r} on line {number}: {line}")


@dataclass
class Card:
    text: str
    files: dict[str, bytes]  # PNGs, by path relative to the card's folder


def build_card(
    paths: list[str],
    lang: str = "both",
    model_path: Optional[str] = None,
    allow_unknown: bool = False,
    assets: str = ASSETS_DIR,
) -> Card:
    """The card's Markdown (front matter once, then the card in `lang`: zh, en, or both: zh then en) and its PNGs."""
    facts = gather(paths, model_path, allow_unknown)
    for s in facts.sources:  # the same weights everywhere (checked); reading them here keeps mixed kinds honest
        weights_identity(s)
    links, files = render_plots(facts, assets)
    langs = LANGS if lang == "both" else (lang,)
    bodies = [CardWriter(facts, load_template(code_), links).card() for code_ in langs]
    text = front_matter(facts) + "\n" + "\n---\n\n".join(bodies)
    check_no_holes(text)
    return Card(text, files)


def write_png(path: Path, data: bytes) -> None:
    """A PNG through the reports' atomic writer (a temp file in the same folder and a rename: never half an image; a
    device or FIFO written through, never replaced); a failed write (a full disk, a read-only folder) is a UserError,
    one line naming the path."""
    reports.write_text_atomic(path, data)
