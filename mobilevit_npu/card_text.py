"""The card's words and formats: the language templates (templates/model_card.<lang>.md), number and Markdown
formatting, report prose in the card's language, the last guard against a Python rendering, and `Section`, the base of
every section's unit (card_intro, card_known, card_accuracy, card_performance).
Nothing here reads what a report means."""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mobilevit_npu.cardfacts import CardError, Facts, Source, platform_kind, shown_path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
LANGS = ("zh", "en")


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


_ITEM = r"(?:'[^'\]]*'|-?\d+(?:\.\d+)?)"
_LIST_RE = re.compile(rf"\[({_ITEM}(?:, {_ITEM})*)\]")


def plain_lists(text: str) -> str:
    """A Python list a writer put into report prose, as prose: names joined (`['CPUExecutionProvider']` ->
    CPUExecutionProvider) and numbers as a shape (`[1, 3, 256, 256]` -> 1×3×256×256)."""

    def plain(match: re.Match) -> str:
        items = re.findall(_ITEM, match.group(1))
        if all(i.startswith("'") for i in items):
            return ", ".join(i.strip("'") for i in items)
        return "×".join(items)

    return _LIST_RE.sub(plain, text)


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


# ------------------------------------------------------------------------------------------------- the base unit


class Section:
    """One section of the card in one language: the facts, the template, the plots' links, and the words every
    section shares."""

    def __init__(self, facts: Facts, tpl: Template, plots: dict[str, dict[str, str]]):
        self.f, self.t, self.plots = facts, tpl, plots

    def unit(self, kind: type) -> Any:
        """Another section's unit over the same facts, template and plots."""
        return kind(self.f, self.t, self.plots)

    def w(self, key: str, **values: Any) -> str:
        return self.t.word(key, **values)

    def value(self, x: float, spec: str) -> str:
        return self.w("not_finite") if isinstance(x, float) and not math.isfinite(x) else num(x, spec)

    def yes_no(self, x: Optional[bool]) -> str:
        return self.w("na") if x is None else (self.w("yes") if x else self.w("no"))

    def optional(self, x: Optional[float], spec: str) -> str:
        return self.w("na") if x is None else self.value(x, spec)

    def phrase(self, text: str) -> str:
        """Report prose in the card's language: English as written, or its Chinese from the template's phrases.
        Prose the phrase table does not know is quoted as it is, in code, never passed off as a translation."""
        text = plain_lists(scrub_paths(text))
        if self.t.lang == "en":
            return text
        shown = self.translate(text)
        if shown is not None:
            return shown
        return self.w("untranslated", text=code(text)) if "untranslated" in self.t.words else code(text)

    def translate(self, text: str) -> Optional[str]:
        """`text` through the phrase table (the first pattern that matches it whole), or None. In a replacement,
        \\N is the N-th group as written and «N» the N-th group translated in turn (in code where the table does not
        know it). Notes joined into one ("a; b") are translated part by part, or not at all."""
        for pattern, replacement in self.t.phrases:
            match = pattern.fullmatch(text)
            if match:
                return re.sub(r"\\(\d)|«(\d)»", lambda ref, m=match: self._group(m, ref), replacement)
        parts = text.split("; ")
        if len(parts) > 1:
            shown = [self.translate(part) for part in parts]
            if all(part is not None for part in shown):
                return "；".join(str(part) for part in shown)
        return None

    def _group(self, match: re.Match, ref: re.Match) -> str:
        if ref.group(1):
            return match.group(int(ref.group(1))) or ""
        value = match.group(int(ref.group(2))) or ""
        return self.translate(value) or code(value)

    def platforms(self) -> str:
        return self.w("joiner").join(self.w(f"platform_{k}") for k in self.f.platforms)

    def side(self, side: Any) -> str:
        return self.w("side", device=code(side.device), dtype=code(side.dtype), mode=code(side.mode))

    def report_ref(self, s: Source) -> str:
        return code(shown_path(s.path))

    @staticmethod
    def precision_state(s: Source) -> list[str]:
        state = s.report.environment.fp32_precision
        return [f"{k}={v}" for k, v in state.items() if v is not None and not isinstance(v, (dict, list))]

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
