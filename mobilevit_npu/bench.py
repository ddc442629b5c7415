"""The benchmark runner: modes interleaved round-robin per batch size, every sample kept, agreement with float32
eager, roofline, the result schema, the console table and the plot.

Timing rules: the device is synchronized (timing.timed_call) before every clock read; warm-up calls are excluded;
within one batch size the modes are interleaved (iteration i runs every mode once, the order rotated by i) so their
ratios hold on a busy machine. Agreement is against float32 eager weights on the same device and inputs (the bundled
photos, tiled to the batch size): the target in another dtype is a cast copy of the float32 model, so rounding the
weights counts against it.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from mobilevit_npu import devices, execution, flops, metrics, models, preprocessing, profiling, reports, schema, timing
from mobilevit_npu import modes as mode_registry
from mobilevit_npu.errors import Unavailable, UserError

Builder = Callable[[torch.nn.Module, devices.Device, str, torch.Tensor], execution.Prepared]

logger = logging.getLogger("mobilevit_npu.bench")


def photo_batches(paths: Sequence[str], cfg: preprocessing.PreprocessConfig, batch_size: int) -> list[torch.Tensor]:
    """The photos, preprocessed, cycled into enough batches of `batch_size` to cover every photo at least once."""
    tensors = []
    for path in paths:
        try:
            tensors.append(torch.from_numpy(preprocessing.preprocess(path, cfg)))
        except OSError as exc:
            raise UserError(f"cannot benchmark on {path}: {exc}") from exc
    if not tensors:
        raise UserError("no photos to benchmark on")
    count = max(1, math.ceil(len(tensors) / batch_size))
    return [
        torch.stack([tensors[(b * batch_size + i) % len(tensors)] for i in range(batch_size)]) for b in range(count)
    ]


def _end_to_end_call(
    prepared: execution.Prepared, paths: Sequence[str], cfg: preprocessing.PreprocessConfig, batch_size: int
):
    """decode + preprocess + copy in + forward + copy out, on `batch_size` photos (cycled)."""
    chosen = [paths[i % len(paths)] for i in range(batch_size)]

    def run() -> torch.Tensor:
        batch = torch.stack([torch.from_numpy(preprocessing.preprocess(p, cfg)) for p in chosen])
        return prepared.call(prepared.to_input(batch)).float().cpu()

    return run


def _result(mode: str, batch_size: int, dtype: str, end_to_end: bool, **extra) -> schema.BenchResult:
    """A row of the report (schema.BenchResult): `extra` sets its other fields (a name it lacks is a TypeError)."""
    row = schema.BenchResult(
        mode=mode,
        batch_size=batch_size,
        dtype=mode_registry.REGISTRY[mode].bench_dtype(dtype) if mode in mode_registry.REGISTRY else dtype,
        end_to_end=end_to_end,
        status="ok",
        reason=None,
        latency_ms=None,
        throughput_images_per_s=None,
        samples_ms=[],
        compile_s=None,
        compile_cache=None,
        peak_memory_bytes=None,
        agreement=None,
        exact=None,
        roofline=None,
        notes=[],
    )
    return replace(row, **extra)


@torch.no_grad()
def run_benchmark(
    loaded: models.LoadedModel,
    device: devices.Device,
    modes: Sequence[str] = ("eager",),
    batch_sizes: Sequence[int] = (1,),
    iterations: int = 50,
    warmup: int = 10,
    dtype: str = "fp32",
    end_to_end: bool = False,
    images: Sequence[str] | None = None,
    progress: bool = True,
    measure_roofline: bool = True,
    runners: dict[str, Builder] | None = None,
    profiler: profiling.Profiler | None = None,
) -> list[dict[str, Any]]:
    """Benchmark `modes` at each batch size on `device`; one result dict per (mode, batch size), report-ready.

    `loaded.model` is the float32 model, already on `device`: it is the agreement reference, and another `dtype` runs
    on a cast copy, so the rounding of the weights counts against the target. `runners` adds named runners beside the
    modes (ONNX Runtime, OpenVINO...): each builder gets (model, device, dtype, first batch) and returns a Prepared,
    or raises Unavailable; they are timed, checked and reported exactly like the modes. Modes run interleaved,
    `warmup` untimed calls each first; the inputs are the bundled photos (or `images`), tiled to the batch size.
    Unavailable modes come back with status "unavailable" and a reason instead of raising. With `measure_roofline`
    each result also gets its "roofline": the model's FLOPs, the device's matmul ceiling in the mode's compute dtype
    (measured here), the fraction of it achieved at p50 and the floor (the FLOPs at the ceiling). With a `profiler`
    (--profile DIR), each mode then gets a separate profiled pass at each batch size, after its timed samples: no timed
    sample is ever taken under the profiler.
    """
    if iterations < 1 or warmup < 0:
        raise ValueError("iterations must be >= 1 and warmup >= 0")
    known = mode_registry.mode_names(benchmark=True)
    unknown = [m for m in modes if m not in known]
    if unknown:
        raise UserError(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    paths = list(images) if images is not None else preprocessing.bundled_images()
    reference_model = loaded.model.eval()
    if next(reference_model.parameters()).dtype != torch.float32:
        raise ValueError("run_benchmark takes the float32 model (the reference); it casts a copy for `dtype`")
    torch_dtype = models.DTYPES[dtype]
    model = reference_model if dtype == "fp32" else copy.deepcopy(reference_model).to(torch_dtype)
    builders: dict[str, Builder] = {mode: functools.partial(execution.prepare_mode, mode) for mode in modes}
    builders.update(runners or {})
    results: list[dict[str, Any]] = []
    for batch_size in batch_sizes:
        batches = photo_batches(paths, loaded.preprocess, batch_size)
        reference = [reference_model(pixel_values=b.to(device.torch)).logits.float().cpu() for b in batches]
        flop = flops.model_flop(reference_model, batches[0][:1].to(device.torch)) if measure_roofline else None
        ready: dict[str, execution.Prepared] = {}
        rows: dict[str, schema.BenchResult] = {}
        for mode, build in builders.items():
            logger.info("preparing %s at batch %d", mode, batch_size)
            try:
                prepared = build(model, device, dtype, batches[0])
            except Unavailable as exc:
                logger.warning("%s unavailable at batch %d: %s", mode, batch_size, exc)
                rows[mode] = _result(mode, batch_size, dtype, end_to_end, status="unavailable", reason=str(exc))
                continue
            outputs = [prepared.call(prepared.to_input(b)).float().cpu() for b in batches]
            agreement = metrics.agreement(torch.cat(reference), torch.cat(outputs))
            rows[mode] = _result(
                mode,
                batch_size,
                dtype,
                end_to_end,
                compile_s=prepared.compile_s,
                compile_cache=prepared.compile_cache,
                agreement=agreement,
                exact=metrics.is_exact(agreement),
                notes=list(prepared.notes),
            )
            ready[mode] = prepared
        calls: dict[str, Callable[[], Any]] = {}
        for mode, prepared in ready.items():
            if end_to_end:
                calls[mode] = _end_to_end_call(prepared, paths, loaded.preprocess, batch_size)
            else:
                x = prepared.to_input(batches[0])
                calls[mode] = lambda p=prepared, x=x: p.call(x)
        for mode, call in calls.items():  # warm-up, untimed; then each mode's own peak memory
            for _ in range(warmup):
                call()
            devices.reset_peak_memory(device)
            timing.timed_call(call, device)
            rows[mode] = replace(rows[mode], peak_memory_bytes=devices.peak_memory_bytes(device))
        samples = timing.interleaved_samples(calls, iterations, device, f"batch {batch_size}", progress)
        for mode in calls:
            stats = timing.latency_stats(samples[mode])
            declared = mode_registry.REGISTRY.get(mode)  # None for a runner (ONNX Runtime, OpenVINO...)
            compute_dtype = models.DTYPES[declared.judged_by(dtype)] if declared else torch_dtype
            ceiling = flops.matmul_ceiling(device, compute_dtype) if flop else None
            rows[mode] = replace(
                rows[mode],
                latency_ms=stats,
                samples_ms=samples[mode],
                throughput_images_per_s=batch_size * 1000.0 / stats.p50,  # the statistic shown beside it
                roofline=flops.roofline(flop, batch_size, stats.p50, ceiling),
            )
        if profiler is not None:  # after every timed sample of this batch size: the profiler never touches one
            for mode, call in calls.items():
                logger.info("profiling %s at batch %d", mode, batch_size)
                profiler.profile(call, mode, batch_size)
        results.extend(asdict(rows[mode]) for mode in builders)  # the rows as their JSON objects
    return results


def build_report(
    tool: str,
    argv: Sequence[str],
    loaded: models.LoadedModel,
    device: devices.Device,
    results: list[dict[str, Any]],
    settings: dict[str, Any],
    environment: schema.Environment,
    cpu_fallbacks: dict[str, Any] | None = None,
    profile: profiling.ProfileSection | None = None,
    baseline: Any = None,
) -> schema.BenchmarkReport:
    """The report of a run (schema.BenchmarkReport): the shared header, then how it ran (`settings`: what the command
    line asked for, by schema.BenchSettings' field names) and every result (run_benchmark's rows)."""
    how = schema.BenchSettings(
        **settings,
        interleaved=True,
        percentiles="linear interpolation between closest ranks",
        synchronized="the device is synchronized before every clock read",
        throughput="batch_size / p50 latency: the same statistic as the latency shown beside it",
        exact=f"agreement with eager float32 on the same photos: cosine >= {metrics.EXACT_COSINE} and the same "
        "top-1 for every image; not bit-exactness",
    )
    return schema.BenchmarkReport(
        **schema.header(tool, argv, loaded, environment),
        device=str(device),
        settings=how,
        results=[schema.typed(schema.BenchResult, r) for r in results],
        cpu_fallbacks=schema.typed(schema.FallbackReport, cpu_fallbacks),
        profile=profile,
        baseline=baseline,
    )


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table: one line per result, ratios against eager at the same batch size."""
    eager_p50 = {
        r["batch_size"]: r["latency_ms"]["p50"] for r in results if r["mode"] == "eager" and r.get("latency_ms")
    }
    eager_tp = {r["batch_size"]: r["throughput_images_per_s"] for r in results if r["mode"] == "eager"}
    header = (
        f"{'mode':<14}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}{'img/s':>9}{'p50 vs eager':>14}"
        f"{'img/s vs eager':>16}{'% ceiling':>11}{'build s':>11}{'cosine':>12}{'top1':>7}  status"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lat = r.get("latency_ms")
        if not lat:
            lines.append(f"{r['mode']:<14}{r['batch_size']:>6}  {r['status']}: {r.get('reason') or ''}")
            continue
        base, tp_base = eager_p50.get(r["batch_size"]), eager_tp.get(r["batch_size"])
        ratio = f"{lat['p50'] / base:.2f}x" if base else "-"
        tp_ratio = f"{r['throughput_images_per_s'] / tp_base:.2f}x" if tp_base else "-"
        agreement = r.get("agreement") or {}
        cosine = f"{agreement['cosine']:.7f}" if agreement else "-"
        top1 = f"{agreement['top1_agreement'] * 100:.0f}%" if agreement else "-"
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        if r.get("compile_cache") == "hit":  # the artefact was loaded from the compile cache, not compiled
            compile_s += " load"
        fraction = (r.get("roofline") or {}).get("fraction_of_ceiling")
        ceiling = f"{fraction * 100:.0f}%" if fraction is not None else "-"
        status = r["status"] + ("" if r.get("exact") in (None, True) else " (not exact)")
        lines.append(
            f"{r['mode']:<14}{r['batch_size']:>6}{lat['p50']:>10.2f}{lat['p90']:>10.2f}{lat['mean']:>10.2f}"
            f"{r['throughput_images_per_s']:>9.1f}{ratio:>14}{tp_ratio:>16}{ceiling:>11}{compile_s:>11}{cosine:>12}{top1:>7}"
            f"  {status}"
        )
    lines.append(
        f'img/s: batch / p50 latency. cosine, top1: against eager float32 on the same photos; "not exact": cosine '
        f'under {metrics.EXACT_COSINE} or another top-1 (exact is not bit-exact). build s: compiling, or "load" '
        "from the compile cache"
    )
    ceilings = {}
    for r in results:
        roof = r.get("roofline") or {}
        if roof.get("ceiling_gflop_per_s"):
            ceilings.setdefault(r["dtype"], (roof["ceiling_gflop_per_s"], roof["flop_per_image"]))
    for dtype, (gflops, flop) in ceilings.items():
        lines.append(
            f"% ceiling: FLOP/s at p50 ({flop / 1e9:.2f} GFLOP per image) over the measured {dtype} matmul ceiling, "
            f"{gflops:.0f} GFLOP/s: at it an image would take {flop / gflops / 1e6:.2f} ms"
        )
    over = [
        f"{r['mode']} at batch {r['batch_size']}"
        for r in results
        if r.get("latency_ms") and ((r.get("roofline") or {}).get("fraction_of_ceiling") or 0) > 1
    ]
    if over:  # the card says the same (cardfacts.over_ceiling)
        lines.append(
            f"% ceiling over 100% ({', '.join(over)}): the ceiling was measured too low (one dense matmul, timed once "
            "at the start of the run), not the hardware outrun"
        )
    return "\n".join(lines)


def _ms(value: float, _position=None) -> str:
    """A tick label in plain milliseconds: 0.5, 2, 300, 1500 (never 3x10^2)."""
    return f"{value:,.3g}" if value < 1000 else f"{value:,.0f}"


def latency_figure(results: Sequence[dict[str, Any]], device: str | None = None):
    """The latency plot as a matplotlib figure: box plots of every mode's samples, one panel per batch size; the title
    says what was timed (model only or end to end), where, in which dtype, at which batch size and over how many
    samples. Needs matplotlib (checked by the caller)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    timed = [r for r in results if r.get("samples_ms")]
    batch_sizes = sorted({r["batch_size"] for r in timed})
    if not batch_sizes:
        raise UserError("nothing to plot: no mode produced samples")
    end_to_end = any(r.get("end_to_end") for r in timed)
    what = (
        "end to end: decode + preprocess + copy in + forward + copy out"
        if end_to_end
        else "model only: forward on an input already on the device"
    )
    dtypes = ", ".join(dict.fromkeys(str(r["dtype"]) for r in timed))
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.5 * len(batch_sizes), 4.5), squeeze=False)
    for ax, batch_size in zip(axes[0], batch_sizes):
        rows = [r for r in timed if r["batch_size"] == batch_size]
        samples = [r["samples_ms"] for r in rows]
        counts = sorted({len(x) for x in samples})
        ax.boxplot(samples, showfliers=True)
        ax.set_xticks(range(1, len(rows) + 1), [r["mode"] for r in rows], rotation=30)
        ax.set_title(f"batch size {batch_size}, {'/'.join(map(str, counts))} samples per mode", fontsize=10)
        low = min(min(x) for x in samples)
        high = max(max(x) for x in samples)
        if low > 0 and high / low > 20:  # contention bursts on shared machines are 10-100x the typical call
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_locator(ticker.NullLocator())
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(_ms))
            ax.set_ylabel(f"latency per call of {batch_size} image(s) (ms, log scale)")
        else:
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(_ms))
            ax.set_ylabel(f"latency per call of {batch_size} image(s) (ms)")
        ax.grid(axis="y", alpha=0.3)
    where = f"{device}, " if device else ""
    fig.suptitle(f"MobileViT latency, {what}\n{where}{dtypes}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_latencies(results: Sequence[dict[str, Any]], path: str, device: str | None = None) -> str:
    """Save latency_figure(results, device) to `path`, in the format its suffix names (PNG without one), through the
    reports' atomic writer: matplotlib's own savefig(path) says nothing when the bytes never land (/dev/full, a full
    disk), so the figure is rendered in memory and written here, and a failed write is a UserError (one line)."""
    import io
    from pathlib import Path

    import matplotlib.pyplot as plt

    fig = latency_figure(results, device)
    try:
        suffix = Path(path).suffix.lower().lstrip(".")
        kinds = fig.canvas.get_supported_filetypes()
        if suffix and suffix not in kinds:
            raise UserError(f"--plot {path}: matplotlib cannot write .{suffix} files (use one of {', '.join(kinds)})")
        buffer = io.BytesIO()
        fig.savefig(buffer, format=suffix or "png", dpi=120)
    finally:
        plt.close(fig)
    reports.write_text_atomic(path, buffer.getvalue())
    return path


def matplotlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
