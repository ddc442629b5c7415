"""The card's plots: the latency of every benchmark (bench.latency_figure), the profile's operator classes, and the
per-layer cosine of every --layers run. Needs matplotlib (no plot without it)."""

from __future__ import annotations

import io
from pathlib import Path

from mobilevit_npu import reports
from mobilevit_npu.cardfacts import Facts, LayerFacts, Source, layer_facts, shown_path


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
        ax.axvline(layers.first.order, color="tab:orange", lw=1, label=f"first below: {layers.first.name}")
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


def plot_stems(sources: list[Source]) -> dict[str, str]:
    """{report path: the stem of its plots' names}, unique among the card's reports: the report's file stem
    (reports.file_stem), with its folder where two reports share a file name, and its digest where even that is one
    (two folders outside the working folder): one report's plot never overwrites or stands for another's."""
    plain = {s.path: reports.file_stem(Path(s.path).stem) for s in sources}
    out = {}
    for s in sources:
        stem = plain[s.path]
        if list(plain.values()).count(stem) > 1:
            stem = reports.file_stem(str(Path(shown_path(s.path)).with_suffix("")))
            if sum(1 for o in sources if reports.file_stem(str(Path(shown_path(o.path)).with_suffix(""))) == stem) > 1:
                stem = f"{stem}-{s.digest[:8]}"
        out[s.path] = stem
    return out


def render_plots(facts: Facts, assets: str) -> tuple[dict[str, dict[str, str]], dict[str, bytes]]:
    """({report path: {"latency"|"layers": link relative to the card}}, {link: PNG bytes}): the latency plot of every
    benchmark (bench.latency_figure, the benchmark's own plot) and the per-layer cosine of every --layers run."""
    from mobilevit_npu import bench

    if not bench.matplotlib_available():
        return {}, {}
    links: dict[str, dict[str, str]] = {}
    files: dict[str, bytes] = {}
    stems = plot_stems(facts.sources)
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
        link = f"{assets}/latency-{stems[s.path]}.png"
        where = f"{s.report.device} ({s.report.environment.device_name})"
        files[link] = _png(bench.latency_figure(results, where))
        links.setdefault(s.path, {})["latency"] = link
        prof = getattr(s.report, "profile", None)  # --profile: the share of a step by operator class
        if prof is not None and any(p.status == "ok" and p.step_ms for p in prof.results):
            from mobilevit_npu import profiling

            link = f"{assets}/profile-{stems[s.path]}.png"
            files[link] = _png(profiling.class_figure(prof.results, where))
            links[s.path]["profile"] = link
    for s in facts.accuracy:
        layers = layer_facts(s)
        if layers is None or not layers.curve:
            continue
        link = f"{assets}/layers-{stems[s.path]}.png"
        r = s.report
        title = (
            f"{r.reference.device} {r.reference.dtype} {r.reference.mode} vs {r.target.device} {r.target.dtype} "
            f"{r.target.mode}: {layers.below} of {layers.compared} modules below {layers.threshold:g}"
        )
        files[link] = _png(layer_figure(layers, title))
        links.setdefault(s.path, {})["layers"] = link
    return links, files
