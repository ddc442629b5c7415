"""The card's accuracy sections: one per accuracy_run.py report (its metrics, thresholds, checks, verdict, per-image
table, layers, labelled-set top-1/top-5) and its msprobe summary."""

from __future__ import annotations

from typing import Any, Optional

from mobilevit_npu.card_text import Section, bullets, code, num, row
from mobilevit_npu.cardfacts import Source, command, layer_facts, shown_path


class AccuracySection(Section):
    """One accuracy report's section."""

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
        probe = self.unit(MsprobeSection).msprobe(s)
        if probe:
            parts.append(probe)
        extra = [line for line in (self.fallback(s),) if line]
        notes = [self.phrase(n) for n in [*r.target.notes, *r.notes]]
        if r.layers is not None and r.layers.note:
            notes.append(self.phrase(r.layers.note))
        if extra or notes:
            parts.append(self.t.fill("report_notes", notes=bullets(extra + notes)))
        return "\n\n".join(parts)

    def rule(self, s: Source, check: Any) -> str:
        """A check's rule in the card's language, from the thresholds it was judged by (its definition in metrics)."""
        key = f"rule_{check.name}"  # every check has one: cardfacts.refuse_untellable
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
                first=code(first.name),
                first_cosine=self.value(float(first.cosine_min), ".6f"),
                first_error=self.value(float(first.max_abs_error), ".6g"),
                first_image=code(shown_path(str(first.worst_image))),
                worst=code(layers.worst.name),
                worst_cosine=self.value(layers.worst.cosine_min, ".6f"),
            )
        if layers.first_nonfinite is not None:
            text += self.w("layers_first_nonfinite", name=code(layers.first_nonfinite.name))
        plot = self.plots.get(s.path, {}).get("layers")
        if plot:
            text += "\n\n" + self.t.fill("layers_plot", alt=self.w("layers_plot_alt"), plot=plot)
        return text

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


class MsprobeSection(Section):
    """msprobe's dump-and-compare summary of one accuracy report."""

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
