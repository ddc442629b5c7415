"""The card's performance sections: one per accuracy_run_perf.py report (its latency table, agreement, build, % of
the matmul ceiling, plot) and where the time goes (--profile)."""

from __future__ import annotations

import math
from typing import Any

from mobilevit_npu import metrics
from mobilevit_npu.card_text import Section, bullets, code, num, row
from mobilevit_npu.cardfacts import (
    Source,
    benchmark_statistic,
    ceilings,
    command,
    over_ceiling,
    overloaded,
    platform_kind,
)


class PerformanceSection(Section):
    """One benchmark report's section."""

    def performance(self, s: Source) -> str:
        r = s.report
        settings = r.settings
        stat = benchmark_statistic(s)  # checked by cardfacts.refuse_untellable
        exact = f"{metrics.EXACT_COSINE:g}"
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
                    self.ceiling_share(roof),
                )
            )
            for note in res.notes:
                notes.append(self.w("note_where", mode=code(res.mode), batch=res.batch_size, note=self.phrase(note)))
        ceiling_lines = self.ceiling_lines(s)
        plot = self.plots.get(s.path, {}).get("latency")
        body = self.t.fill(
            "performance",
            name=s.name,
            device=code(r.device),
            device_name=code(r.environment.device_name),
            command=command(s),
            report=self.report_ref(s),
            synchronized=self.phrase(settings.synchronized),
            iterations=settings.iterations,
            warmup=settings.warmup,
            percentiles=self.phrase(settings.percentiles),
            scope=self.w("scope_e2e") if settings.end_to_end else self.w("scope_model"),
            interleaved=self.w("interleaved") if settings.interleaved else self.w("not_interleaved"),
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
        where = self.unit(ProfilingSection).where_time_goes(s)
        if where:
            body += "\n\n" + where
        return body

    def ceiling_share(self, roof: Any) -> str:
        """A row's share of the matmul ceiling (flops.Roofline), n/a where none was measured."""
        if roof is None or roof.fraction_of_ceiling is None:
            return self.w("na")
        return num(roof.fraction_of_ceiling, "%1")

    def ceiling_lines(self, s: Source) -> list[str]:
        """What each ceiling is, and why a share can read over 100 % (flagged, with the rows) or is suspect (a run
        that started on a machine busier than its cores)."""
        lines = [
            self.w("ceiling_line", dtype=code(dtype), gflop=num(flop / 1e9, ".2f"), ceiling=num(gf, ".1f"))
            for dtype, (gf, flop) in ceilings(s).items()
        ]
        over = over_ceiling(s)
        if over:
            rows = self.w("list_sep").join(
                f"{code(res.mode)} {self.w('at_batch', batch=res.batch_size)}" for res in over
            )
            lines.append(self.w("ceiling_over", rows=rows))
        busy = overloaded(s)
        if busy is not None and lines:
            lines.append(self.w("ceiling_loaded", load=num(busy[0], ".2f"), cores=busy[1]))
        return lines

    def build(self, res: Any) -> str:
        if res.compile_s is None or (isinstance(res.compile_s, float) and math.isnan(res.compile_s)):
            return self.w("build_none")
        seconds = num(res.compile_s, ".2f")
        key = {"hit": "build_hit", "miss": "build_miss", "off": "build_off"}.get(res.compile_cache or "", "build_plain")
        return self.w(key, seconds=seconds)


class ProfilingSection(Section):
    """Where the time goes: a benchmark's --profile, as a table and its plot."""

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
