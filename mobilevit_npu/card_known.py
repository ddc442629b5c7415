"""The card's environment table and its known issues (every report's verdict, fallbacks, HF32, skipped images,
layers, msprobe, unmeasured modes and NPU profile findings)."""

from __future__ import annotations

import re

from mobilevit_npu.card_text import Section, bullets, code, num, row
from mobilevit_npu.cardfacts import Source, layer_facts, over_ceiling, overloaded, platform_kind, shown_path


class EnvironmentSection(Section):
    """The environment table: one column per report."""

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

    def precision(self, s: Source) -> str:
        parts = self.precision_state(s)
        return code(", ".join(parts)) if parts else self.w("not_recorded")


class KnownIssues(Section):
    """Known issues: what each report says went wrong or could not be seen."""

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
                lines += self.ceiling_issues(s)
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
                        first=code(layers.first.name),
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

    def ceiling_issues(self, s: Source) -> list[str]:
        """A benchmark that started on a machine busier than its cores, and rows over 100 % of the ceiling."""
        ref, lines = self.report_ref(s), []
        busy = overloaded(s)
        if busy is not None:
            lines.append(self.w("known_load", report=ref, load=num(busy[0], ".2f"), cores=busy[1]))
        for res in over_ceiling(s):
            share = num(res.roofline.fraction_of_ceiling, "%1")
            lines.append(
                self.w("known_ceiling_over", report=ref, mode=code(res.mode), batch=res.batch_size, share=share)
            )
        return lines

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
