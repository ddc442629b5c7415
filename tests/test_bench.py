"""Tests for accuracy_run_perf.py, benchmark.py and fastpath.py. Nothing here judges speed (machines are noisy)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import PHOTOS, ROOT, read_json

import accuracy_run_perf
from mobilevit_npu import (
    bench,
    compilers,
    devices,
    execution,
    fastpath,
    flops,
    metrics,
    models,
    preprocessing,
    schema,
    timing,
)
from mobilevit_npu.errors import Unavailable

# --------------------------------------------------------------------------------------------------------------------
# Statistics and agreement
# --------------------------------------------------------------------------------------------------------------------


def test_latency_stats_from_known_samples():
    samples = [10.0, 1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0]
    stats = timing.latency_stats(samples)
    assert stats.mean == pytest.approx(5.5)
    assert stats.p50 == pytest.approx(5.5)
    assert stats.p90 == pytest.approx(9.1)  # rank 0.9 * 9 = 8.1: 9 + 0.1 * (10 - 9)
    assert stats.p99 == pytest.approx(9.91)
    assert (stats.min, stats.max) == (1.0, 10.0)
    assert stats.stdev == pytest.approx(math.sqrt(82.5 / 9))
    for q, value in ((50, stats.p50), (90, stats.p90), (99, stats.p99)):
        assert value == pytest.approx(np.percentile(samples, q))


def test_latency_stats_single_sample_and_empty():
    stats = timing.latency_stats([4.0])
    assert (stats.mean, stats.p50, stats.p99, stats.min, stats.max, stats.stdev) == (4.0, 4.0, 4.0, 4.0, 4.0, None)
    with pytest.raises(ValueError):
        timing.latency_stats([])


def test_compare_identical_and_different():
    ref = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    same = metrics.agreement(ref, ref.clone())
    assert same.cosine == pytest.approx(1.0) and same.max_abs_diff == 0.0 and same.top1_agreement == 1.0
    assert metrics.is_exact(same)
    other = metrics.agreement(ref, torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    assert other.top1_agreement == 0.5 and other.max_abs_diff == 2.0
    assert not metrics.is_exact(other)


# --------------------------------------------------------------------------------------------------------------------
# Synchronization before every clock read, for every device kind
# --------------------------------------------------------------------------------------------------------------------


class FakeBackend:
    def __init__(self, events: list, name: str):
        self.events, self.name = events, name

    def synchronize(self, index=None):
        self.events.append(f"{self.name}.synchronize")


@pytest.fixture
def recorder(monkeypatch):
    """Record every common.synchronize call and every benchmark clock read, in order."""
    events: list[str] = []
    real_sync = devices.synchronize

    def sync(device):
        events.append("sync")
        real_sync(device)

    def clock():
        events.append("clock")
        return len(events) * 1e-3

    monkeypatch.setattr(devices, "synchronize", sync)
    monkeypatch.setattr(timing, "_clock", clock)
    return events


@pytest.mark.parametrize("kind", ["npu", "cuda", "mps", "cpu"])
def test_timed_call_synchronizes_before_each_clock_read(kind, recorder, monkeypatch):
    if kind == "npu":  # a stand-in torch_npu: common.npu_api() takes it from sys.modules
        monkeypatch.setitem(sys.modules, "torch_npu", types.SimpleNamespace(npu=FakeBackend(recorder, "npu")))
    elif kind == "cuda":
        monkeypatch.setattr(torch.cuda, "synchronize", FakeBackend(recorder, "cuda").synchronize)
    elif kind == "mps":
        monkeypatch.setattr(torch.mps, "synchronize", FakeBackend(recorder, "mps").synchronize)
    device = devices.Device(kind, 0 if kind in ("npu", "cuda") else None)
    _, ms = timing.timed_call(lambda: recorder.append("call"), device)
    backend = [] if kind == "cpu" else [f"{kind}.synchronize"]
    assert recorder == ["sync", *backend, "clock", "call", "sync", *backend, "clock"]
    # the fake clock reads (its event number) ms: the result is the second read minus the first, in milliseconds
    first, second = (i + 1 for i, event in enumerate(recorder) if event == "clock")
    assert ms == pytest.approx(second - first)


def test_run_benchmark_synchronizes_before_every_clock_read(tiny_model_dir, recorder):
    loaded = models.load_model(str(tiny_model_dir), devices.Device("cpu"))
    results = bench.run_benchmark(
        loaded,
        devices.Device("cpu"),
        modes=["eager", "channels_last"],
        iterations=3,
        warmup=1,
        images=PHOTOS[:2],
        progress=False,
        measure_roofline=False,  # its matmul timing adds clock reads, tested apart
    )
    assert [len(r["samples_ms"]) for r in results] == [3, 3]
    clock_reads = [i for i, e in enumerate(recorder) if e == "clock"]
    assert len(clock_reads) == 2 * (3 + 1) * 2  # (timed + peak-memory call) per mode, two reads each
    assert all(recorder[i - 1] == "sync" for i in clock_reads)


# --------------------------------------------------------------------------------------------------------------------
# Modes: every mode agrees with eager within its bound
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fast_model_is_exact_on_full_size_x_small(synthetic_model_dir):
    loaded = models.load_model(str(synthetic_model_dir))
    batch = torch.stack([torch.from_numpy(preprocessing.preprocess(p, loaded.preprocess)) for p in PHOTOS])
    with torch.no_grad():
        reference = loaded.model(pixel_values=batch).logits
        variants = ((True, None), (True, 10**9), (True, execution.FAST_LINEAR_MAX_PIXELS), (False, None))
        for channels_last, linear in variants:
            fast = fastpath.build_fast_model(loaded.model, channels_last=channels_last, linear_max_pixels=linear)
            x = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
            agreement = metrics.agreement(reference, fast(x))
            assert agreement.cosine >= metrics.EXACT_COSINE and agreement.top1_agreement == 1.0
            assert agreement.max_abs_diff < 1e-3


@pytest.mark.parametrize("limit", [10**9, 32 * 32])
def test_linear_max_pixels_rewrites_exactly_the_small_1x1_convolutions(tiny_model_dir, monkeypatch, limit):
    loaded = models.load_model(str(tiny_model_dir))
    x = torch.rand(2, 3, 64, 64)
    fast = fastpath.build_fast_model(loaded.model, linear_max_pixels=limit)
    convs = [m for m in fast.modules() if isinstance(m, fastpath.FusedConv)]
    assert all(m.pointwise == (m.conv.kernel_size == (1, 1)) for m in convs) and 0 < sum(m.pointwise for m in convs)
    seen = []  # (pixels, ran as a linear) per 1x1 convolution
    linear, conv2d = torch.nn.functional.linear, torch.nn.functional.conv2d

    def record_linear(x, *args):
        if x.dim() == 4:  # (batch, height, width, channels): a 1x1 convolution run as a linear
            seen.append((x.shape[0] * x.shape[1] * x.shape[2], True))
        return linear(x, *args)

    def record_conv(x, weight, *args):
        if weight.shape[-2:] == (1, 1):
            seen.append((x.shape[0] * x.shape[2] * x.shape[3], False))
        return conv2d(x, weight, *args)

    with torch.no_grad():
        reference = loaded.model(pixel_values=x).logits
        monkeypatch.setattr(fastpath.F, "linear", record_linear)
        monkeypatch.setattr(fastpath.F, "conv2d", record_conv)
        out = fast(x.contiguous(memory_format=torch.channels_last))
        ran = list(seen)
        plain = fastpath.build_fast_model(loaded.model, channels_last=False, linear_max_pixels=limit)
        nchw = plain(x)  # NCHW memory: the rewrite is off, the convolutions run as convolutions
    assert len(ran) == sum(m.pointwise for m in convs)
    assert all(as_linear == (pixels <= limit) for pixels, as_linear in ran)
    assert any(as_linear for _, as_linear in ran) and (limit > 64 * 64 * 2) == all(a for _, a in ran)
    assert not any(as_linear for _, as_linear in seen[len(ran) :])
    for got in (out, nchw):
        agreement = metrics.agreement(reference, got)
        assert agreement.cosine >= metrics.EXACT_COSINE and agreement.top1_agreement == 1.0


def test_fast_model_handles_sizes_that_need_interpolation(tiny_model_dir):
    loaded = models.load_model(str(tiny_model_dir))
    x = torch.rand(2, 3, 200, 232)  # feature maps of odd size: transformers interpolates inside the block
    with torch.no_grad():
        agreement = metrics.agreement(loaded.model(pixel_values=x).logits, fastpath.build_fast_model(loaded.model)(x))
    assert agreement.cosine >= metrics.EXACT_COSINE and agreement.top1_agreement == 1.0


SYSTEM = ["--allocator", "system"]  # in-process script runs leave malloc alone (mallopt is process-wide)


@torch.no_grad()
def test_lower_precision_agreement_counts_the_rounding_of_the_weights(tiny_model_dir):
    """bf16 agreement is against the float32 weights, not an upcast copy of the rounded ones (which would hide the
    weight-rounding error)."""
    loaded = models.load_model(str(tiny_model_dir), devices.Device("cpu"))
    (r,) = bench.run_benchmark(
        loaded,
        devices.Device("cpu"),
        modes=["eager"],
        iterations=1,
        warmup=0,
        dtype="bf16",
        images=PHOTOS,
        progress=False,
        measure_roofline=False,
    )
    batches = bench.photo_batches(PHOTOS, loaded.preprocess, 1)
    rounded = copy.deepcopy(loaded.model).to(torch.bfloat16)
    target = torch.cat([rounded(pixel_values=b.to(torch.bfloat16)).logits.float() for b in batches])
    honest = metrics.agreement(torch.cat([loaded.model(pixel_values=b).logits for b in batches]), target)
    upcast = copy.deepcopy(rounded).float()
    flattering = metrics.agreement(torch.cat([upcast(pixel_values=b).logits for b in batches]), target)
    assert r["agreement"]["cosine"] == pytest.approx(honest.cosine, abs=1e-12)
    assert honest.cosine < flattering.cosine - 1e-4  # the two differ: the test can tell them apart
    assert next(loaded.model.parameters()).dtype == torch.float32  # the caller's model is left as it was


def _no_compile(fn, device, name, example, cpp_wrapper=False):
    """Stand-in for compilers.compile_for where a test judges what happens around the compiler (the AOTInductor
    fallback); the real compiler runs in the slow tests (test_compiled_and_bf16_modes_built_for_real_agree_with_eager,
    test_fast_mode_with_inductor_freezing_is_exact)."""
    return fn, timing.timed_call(lambda: fn(example), device)[1] / 1000.0, ["not compiled (test)"]


def test_uncompiled_modes_agree_with_eager(tiny_model_dir):
    """eager and channels_last, built for real, against float32 eager: `exact` is metrics.is_exact of the agreement
    the benchmark measured, and both are exact."""
    execution._cache.clear()
    loaded = models.load_model(str(tiny_model_dir), devices.Device("cpu"))
    results = bench.run_benchmark(
        loaded,
        devices.Device("cpu"),
        modes=["eager", "channels_last"],
        batch_sizes=[2],
        iterations=2,
        warmup=1,
        images=PHOTOS,
        progress=False,
    )
    execution._cache.clear()
    for r in results:
        assert r["status"] == "ok", (r["mode"], r["reason"])
        assert r["exact"] is metrics.is_exact(metrics.Agreement(**r["agreement"])) is True, r["agreement"]
        assert r["compile_s"] is None and r["compile_cache"] is None  # nothing was built


@pytest.mark.slow
def test_compiled_and_bf16_modes_built_for_real_agree_with_eager(compiled_tiny):
    """The real CPU builds (AOTInductor where torch has it, else inductor), made by accuracy_run_perf.py once per
    session (conftest.compiled_tiny, batch 1): compiled is exact against eager float32; bf16 autocast is close but
    judged by metrics.is_exact on its own agreement, never assumed."""
    _, by_mode = compiled_tiny
    assert by_mode["compiled"]["status"] == "ok", by_mode["compiled"]["reason"]
    assert by_mode["compiled"]["exact"] is True, by_mode["compiled"]["agreement"]
    assert by_mode["compiled"]["compile_s"] > 0 and by_mode["compiled"]["compile_cache"] in ("miss", "off")
    if "bf16" in by_mode:
        r = by_mode["bf16"]
        assert r["status"] == "ok" and r["dtype"] == "bf16 autocast", r["reason"]
        assert r["agreement"]["cosine"] >= 0.99
        assert r["exact"] is metrics.is_exact(metrics.Agreement(**r["agreement"]))


@pytest.mark.slow
def test_fast_mode_with_inductor_freezing_is_exact(compiled_tiny):
    """The real CPU build (AOTInductor with autotuned GEMMs where torch has it, else inductor + freezing) for the mode
    that matters, built for real (a miss) by the session's one accuracy_run_perf.py run (conftest.compiled_tiny)."""
    r = compiled_tiny[1]["fast"]
    assert r["status"] == "ok", r["reason"]
    assert r["exact"] and r["agreement"]["top1_agreement"] == 1.0, r["agreement"]
    assert r["compile_cache"] == ("miss" if compilers.aoti_available() else None) and r["compile_s"] > 0  # built
    assert any("freezing" in note for note in r["notes"])
    assert any("AOTInductor:" in note for note in r["notes"]) == compilers.aoti_available()
    assert any("max_autotune" in note for note in r["notes"]) == compilers.aoti_available()


def test_fast_mode_falls_back_to_torch_compile_when_aoti_fails(tiny_model_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nmore")

    monkeypatch.setattr(compilers, "aoti_available", lambda: True)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail, raising=False)
    monkeypatch.setattr(compilers, "compile_for", _no_compile)
    execution._cache.clear()
    loaded = models.load_model(str(tiny_model_dir), devices.Device("cpu"))
    (r,) = bench.run_benchmark(
        loaded, devices.Device("cpu"), modes=["fast"], iterations=1, warmup=0, images=PHOTOS, progress=False
    )
    execution._cache.clear()
    assert r["status"] == "ok" and r["exact"], r
    assert "AOTInductor failed (RuntimeError: no C++ compiler); torch.compile instead" in r["notes"]
    assert "not compiled (test)" in r["notes"]


def test_every_cpu_compiled_mode_is_an_aoti_package(tiny_model_dir, monkeypatch):
    """compiled, fast and bf16 on CPU are built by build_aoti (so the compile cache covers them all), each from an
    nn.Module that computes that mode's logits; the cache state reaches the Prepared."""
    built = []

    def record(module, device, example, autotune=False):
        built.append((type(module).__name__, autotune))
        return module, 0.0, ["recorded"], "hit"

    monkeypatch.setattr(compilers, "aoti_available", lambda: True)
    monkeypatch.setattr(compilers, "build_aoti", record)
    monkeypatch.setattr(compilers, "compile_for", lambda *a, **k: pytest.fail("torch.compile used on CPU"))
    # which builder makes each mode, not the CPU's bf16 support: a CPU without native bf16 (no AVX512-BF16/AMX, e.g.
    # an AMD EPYC before Zen 4) still computes bf16 autocast, emulated, and the mode is otherwise refused up front
    monkeypatch.setattr(devices, "cpu_bf16_supported", lambda: True)
    execution._cache.clear()
    cpu = devices.Device("cpu")
    loaded = models.load_model(str(tiny_model_dir), cpu)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        eager = loaded.model(pixel_values=x).logits
        for mode in ("compiled", "fast", "bf16"):
            prepared = execution.prepare_mode(mode, loaded.model, cpu, "fp32", x)
            out = prepared.call(prepared.to_input(x))
            if mode == "bf16":
                assert out.dtype == torch.float32 and metrics.agreement(eager, out).cosine > 0.99
            else:
                assert torch.allclose(out, eager, atol=1e-4), mode
    execution._cache.clear()
    # only `fast` autotunes its GEMMs (with its small 1x1 convolutions as linears)
    assert built == [("Logits", False), ("FastMobileViT", True), ("Autocast", False)]
    limits = [m.linear_max_pixels for m in prepared.module.modules() if isinstance(m, fastpath.FusedConv)]
    assert limits and not any(limits)  # bf16's fast model keeps its convolutions


def test_aoti_available_needs_torch_2_6(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    assert compilers.aoti_available() is False


def test_compiled_callables_are_distinct_and_cached(tiny_model_dir, monkeypatch):
    loaded = models.load_model(str(tiny_model_dir))

    def f(x):
        return x

    a, b = compilers._unique_function(f, "a"), compilers._unique_function(f, "b")
    assert a.__code__ is not b.__code__ and a(3) == 3
    monkeypatch.setattr(execution, "COMPILE_CACHE_SIZE", 2)
    execution._cache.clear()
    device = devices.Device("cpu")
    first = execution.prepare_mode("eager", loaded.model, device, "fp32", torch.zeros(1, 3, 8, 8))
    assert execution.prepare_mode("eager", loaded.model, device, "fp32", torch.zeros(1, 3, 8, 8)) is first
    for n in (2, 3, 4):
        execution.prepare_mode("eager", loaded.model, device, "fp32", torch.zeros(n, 3, 8, 8))
    assert len(execution._cache) == 2
    execution._cache.clear()


def test_npu_modes_without_torchair(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchair", None)  # import torchair raises ImportError
    with pytest.raises(Unavailable, match="torchair"):
        compilers.compile_for(lambda x: x, devices.Device("npu", 0), "f", torch.zeros(1))
    assert "channels_last" not in execution.available_modes(devices.Device("npu", 0))


ALLOCATOR_PROBE = """
import json, sys
from mobilevit_npu import malloc
first = malloc.select(sys.argv[1])
print(json.dumps({"first": first, "again": malloc.select(sys.argv[1]), "current": malloc.current()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
@pytest.mark.parametrize("choice", ["tuned", "system"])
def test_allocator_choice_is_applied_and_reported(choice):
    """In a subprocess: mallopt is process-wide and irreversible, so the pytest process never calls it."""
    out = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_PROBE, choice],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "LD_PRELOAD": ""},
    )
    info = json.loads(out.stdout)
    assert info["first"]["name"] == "glibc malloc"
    assert info["first"]["tuned"] is (choice == "tuned")
    assert info["again"] == info["first"] == info["current"]  # applied once, and what every report records
    if choice == "tuned":
        assert info["first"]["mallopt"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 1 << 30}


# --------------------------------------------------------------------------------------------------------------------
# CLI and report
# --------------------------------------------------------------------------------------------------------------------


def test_report_schema(tiny_model_dir, tmp_path, capsys):
    report = tmp_path / "perf.json"
    argv = [str(tiny_model_dir), "3", str(report), "--warmup", "1", "--batch-sizes", "1,2", "--device", "cpu", *SYSTEM]
    assert accuracy_run_perf.main(argv + ["--modes", "eager,channels_last"]) == 0
    data = read_json(report)  # checked against schema.BenchmarkReport: every field present and of its type
    assert data["kind"] == "benchmark" and data["schema_version"] == schema.SCHEMA_VERSION
    assert data["tool"] == "accuracy_run_perf.py" and data["argv"] == argv + ["--modes", "eager,channels_last"]
    assert data["device"] == "cpu" and data["synthetic"] is False
    assert data["model_source"]["sha256"] and data["environment"]["allocator"]["tuned"] is False
    assert data["environment"]["torch"] == torch.__version__
    assert [(r["mode"], r["batch_size"]) for r in data["results"]] == [
        ("eager", 1),
        ("channels_last", 1),
        ("eager", 2),
        ("channels_last", 2),
    ]
    for r in data["results"]:
        assert r["status"] == "ok" and r["reason"] is None
        assert set(r["latency_ms"]) == {"mean", "p50", "p90", "p99", "min", "max", "stdev"}
        assert len(r["samples_ms"]) == 3 and all(s > 0 for s in r["samples_ms"])
        assert r["latency_ms"]["min"] <= r["latency_ms"]["p50"] <= r["latency_ms"]["max"]
        # throughput from the same statistic as the latency shown beside it (p50), not the mean
        assert r["throughput_images_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["latency_ms"]["p50"])
        assert r["exact"] is metrics.is_exact(metrics.Agreement(**r["agreement"]))
        assert r["peak_memory_bytes"] > 0
        roof = r["roofline"]
        assert roof["flop_per_image"] > 0 and roof["ceiling_gflop_per_s"] > 0
        assert roof["achieved_gflop_per_s"] * 1e9 == pytest.approx(
            roof["flop_per_image"] * r["batch_size"] / (r["latency_ms"]["p50"] / 1000)
        )
    out = capsys.readouterr().out
    assert "p50 ms" in out and "channels_last" in out
    assert "% ceiling" in out and "GFLOP per image" in out


# --------------------------------------------------------------------------------------------------------------------
# Roofline
# --------------------------------------------------------------------------------------------------------------------


def test_roofline_arithmetic():
    roof = flops.roofline(flop_per_image=2e9, batch_size=2, p50_ms=20.0, ceiling=400e9)
    assert roof.achieved_gflop_per_s == pytest.approx(200.0)  # a typed flops.Roofline
    assert roof.fraction_of_ceiling == pytest.approx(0.5)
    assert roof.floor_ms == pytest.approx(10.0)  # 4 GFLOP at 400 GFLOP/s
    assert flops.roofline(2e9, 1, 20.0, None).fraction_of_ceiling is None
    assert flops.roofline(None, 1, 20.0, 400e9) is None


def test_the_console_says_why_a_share_of_the_ceiling_reads_over_100_percent():
    """A row over the ceiling is flagged where it is printed, as the card flags it (cardfacts.over_ceiling)."""

    def row(mode, p50_ms):
        roof = dataclasses.asdict(flops.roofline(flop_per_image=2e9, batch_size=1, p50_ms=p50_ms, ceiling=400e9))
        latency = {"p50": p50_ms, "p90": p50_ms, "mean": p50_ms}
        return {"mode": mode, "batch_size": 1, "status": "ok", "latency_ms": latency, "roofline": roof,
                "throughput_images_per_s": 1e3 / p50_ms, "dtype": "fp32"}  # fmt: skip

    fine = bench.format_table([row("eager", 20.0), row("compiled", 10.0)])
    assert " 50%" in fine and "over 100%" not in fine
    over = bench.format_table([row("eager", 20.0), row("fast", 4.0)])  # 2 GFLOP in 4 ms: 500 GFLOP/s, 125%
    assert "125%" in over
    assert over.splitlines()[-1] == (
        "% ceiling over 100% (fast at batch 1): the ceiling was measured too low (one dense matmul, timed once at the "
        "start of the run), not the hardware outrun"
    )


def test_model_flop_counts_a_convolution():
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)

        def forward(self, pixel_values):
            return self.conv(pixel_values)

    flop = flops.model_flop(Conv(), torch.zeros(1, 3, 16, 16))
    assert flop == 2 * 8 * 3 * 3 * 3 * 16 * 16  # one multiply and one add per weight per output pixel


def test_matmul_ceiling_is_timed_synchronized_and_cached(monkeypatch):
    calls = []

    def timed_call(fn, device):
        calls.append(device.type)
        return fn(), 10.0  # every matmul "takes" 10 ms

    monkeypatch.setattr(timing, "timed_call", timed_call)
    monkeypatch.setattr(flops, "CEILING_SIZE", {"cpu": 64})
    monkeypatch.setattr(flops, "_ceilings", {})
    device = devices.Device("cpu")
    ceiling = flops.matmul_ceiling(device, torch.float32, repeats=3)
    assert ceiling == pytest.approx(2 * 64**3 / 0.010)
    assert calls == ["cpu"] * 4  # one warm-up and three timed, each through timed_call
    assert flops.matmul_ceiling(device, torch.float32) == ceiling and len(calls) == 4


def test_end_to_end_runs_on_the_photos(tiny_model_dir, tmp_path):
    report = tmp_path / "e2e.json"
    argv = [str(tiny_model_dir), "2", str(report), "--warmup", "0", "--end_to_end", "--device", "cpu", *SYSTEM]
    assert accuracy_run_perf.main(argv) == 0
    (r,) = read_json(report)["results"]
    assert r["end_to_end"] is True and r["status"] == "ok" and len(r["samples_ms"]) == 2


def test_plot(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "lat.png"
    argv = [str(tiny_model_dir), "2", str(tmp_path / "r.json"), "--warmup", "0", "--plot", str(plot), *SYSTEM]
    assert accuracy_run_perf.main(argv + ["--device", "cpu"]) == 0
    assert plot.stat().st_size > 0


@pytest.mark.parametrize(
    "extra",
    [
        ["--modes", "warp"],
        ["--batch_sizes", "0"],
        ["--batch_sizes", "1,x"],
        ["--warmup", "-1"],
        ["--device", "cuda:7"],
        ["--device", "tpu"],
        ["--dtype", "fp64"],
    ],
)
def test_cli_usage_errors_exit_2(tiny_model_dir, tmp_path, extra):
    assert accuracy_run_perf.main([str(tiny_model_dir), "1", str(tmp_path / "r.json"), *extra, *SYSTEM]) == 2
    assert not (tmp_path / "r.json").exists()


def test_cli_bad_model_and_iterations_exit_2(tmp_path):
    absent = [str(tmp_path / "absent"), "1", str(tmp_path / "r.json"), "--device", "cpu", *SYSTEM]
    assert accuracy_run_perf.main(absent) == 2
    assert accuracy_run_perf.main([str(tmp_path), "0", str(tmp_path / "r.json"), *SYSTEM]) == 2
    assert accuracy_run_perf.main(["--help"]) == 0


def test_plot_without_matplotlib_exits_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "matplotlib_available", lambda: False)
    argv = [str(tiny_model_dir), "1", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png"), *SYSTEM]
    assert accuracy_run_perf.main(argv) == 2
    assert "matplotlib" in capsys.readouterr().err


def test_script_runs_as_a_subprocess(tiny_model_dir, tmp_path):
    report = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "accuracy_run_perf.py"), str(tiny_model_dir), "2", str(report), "--warmup", "0"]
    proc = subprocess.run(cmd + ["--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["results"][0]["mode"] == "eager"
    assert "eager" in proc.stdout
