"""Model cards from measured reports: the writing half (mobilevit_npu/cardfacts.py reads and checks the reports).

`build_card(paths, lang)` gathers the facts (cardfacts.gather: every report through schema.load, duplicates and mixed
weights refused, config.json read), refuses what the card could not tell truly (cardfacts.refuse_untellable), fills
templates/model_card.<lang>.md one section at a time (a unit per section: card_intro's title, intro, model, reproduce
and sources; card_known's environment and known issues; card_accuracy; card_performance) and renders the plots the
card embeds (card_plots). The template files hold every word of the card, the Chinese one also the translation of the
English prose reports carry (its `phrases` block); these modules only fill them. Nothing is written here:
port_report.py writes the card and its PNGs once everything has been built, so a refusal leaves no file behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mobilevit_npu import flags, reports
from mobilevit_npu.card_accuracy import AccuracySection
from mobilevit_npu.card_intro import IntroSection, ModelSection, ReproduceSection
from mobilevit_npu.card_known import EnvironmentSection, KnownIssues
from mobilevit_npu.card_performance import PerformanceSection
from mobilevit_npu.card_plots import render_plots
from mobilevit_npu.card_text import LANGS, Section, check_no_holes, cjk_spacing, load_template
from mobilevit_npu.cardfacts import CardError, Facts, gather, refuse_untellable, weights_identity

__all__ = ["CardError", "build_card", "load_template", "Card"]

# Published figures (top-1, parameters, the paper) and licences are the families' (mobilevit_npu/families.py), printed
# only for the checkpoint they belong to. The BibTeX is the MobileViT paper's, cited with them.
BIBTEX = """@inproceedings{mehta2022mobilevit,
  title     = {MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer},
  author    = {Sachin Mehta and Mohammad Rastegari},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2022},
  url       = {https://arxiv.org/abs/2110.02178}
}"""

DEVICE_TAGS = {"npu": ["NPU", "Ascend", "torch_npu"], "cuda": ["CUDA"], "mps": ["MPS"], "cpu": ["CPU"]}
ASSETS_DIR = flags.CARD_ASSETS_DIR  # beside the card: the PNGs it embeds (declared torch-free, for --help)


# -------------------------------------------------------------------------------------------------- the card


class CardWriter(Section):
    """The whole card in one language: each section from its own unit, in the template's order."""

    def card(self) -> str:
        text = self.t.fill(
            "card",
            title=self.unit(IntroSection).title(),
            banners=self.unit(IntroSection).banners(),
            intro=self.unit(IntroSection).intro(),
            quickstart=self.t.fill("quickstart"),
            known=self.unit(KnownIssues).known(),
            environment=self.unit(EnvironmentSection).environment(),
            accuracy="\n\n".join(self.unit(AccuracySection).accuracy(s) for s in self.f.accuracy),
            performance="\n\n".join(self.unit(PerformanceSection).performance(s) for s in self.f.benchmarks),
            model=self.unit(ModelSection).model(),
            reproduce=self.unit(ReproduceSection).reproduce(),
            sources=self.unit(ReproduceSection).sources(),
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

    family = facts.model.family
    tags = ["vision", "image-classification", family.name]
    for kind in facts.platforms:
        tags += DEVICE_TAGS[kind]
    if facts.synthetic:
        tags.append("synthetic-weights")
    meta = {
        **family.license,
        # the hub checkpoint measured, only where a report says the weights came from the hub (cardfacts.Origin)
        **({"base_model": facts.origin.hub_id} if facts.origin.kind == "hub" else {}),
        "pipeline_tag": "image-classification",
        "library_name": "transformers",
        "tags": tags,
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


# ------------------------------------------------------------------------------------------------------ the tool


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
    card_argv: Optional[list[str]] = None,
) -> Card:
    """The card's Markdown (front matter once, then the card in `lang`: zh, en, or both: zh then en) and its PNGs.
    `card_argv`: port_report.py's arguments, shown as the command that makes this card again."""
    facts = gather(paths, model_path, allow_unknown)
    for s in facts.sources:  # the same weights everywhere (checked); reading them here keeps mixed kinds honest
        weights_identity(s)
    langs = LANGS if lang == "both" else (lang,)
    templates = [load_template(code_) for code_ in langs]
    described = set.intersection(*({k[len("rule_") :] for k in t.words if k.startswith("rule_")} for t in templates))
    refuse_untellable(facts, described)
    facts.card_argv = card_argv
    links, files = render_plots(facts, assets)
    bodies = [CardWriter(facts, tpl, links).card() for tpl in templates]
    text = front_matter(facts) + "\n" + "\n---\n\n".join(bodies)
    check_no_holes(text)
    return Card(text, files)


def write_png(path: Path, data: bytes) -> None:
    """A PNG through the reports' atomic writer (a temp file in the same folder and a rename: never half an image; a
    device or FIFO written through, never replaced); a failed write (a full disk, a read-only folder) is a UserError,
    one line naming the path."""
    reports.write_text_atomic(path, data)
