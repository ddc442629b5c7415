"""The registry of execution modes (mobilevit_npu/modes.py): each mode declared once, and everything that offers,
builds, verifies, dumps or times a mode reads it. `fp16` (float16 autocast over the fast path) is the proof: one
registry entry, benchmarked (--modes fp16) and verified (--target_mode fp16) with fp16's own thresholds.

The compiler is stubbed where a test judges the mode around it (its autocast, its thresholds, its refusals): the real
CPU build (AOTInductor) of the autocast modes runs in the slow tests here and in test_bench.py."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import PHOTOS, read_json
from npu_standin import npu_standin_fixture  # noqa: F401  (the npu_standin fixture)

import accuracy_run
import accuracy_run_perf
from mobilevit_npu import (
    bench,
    compilers,
    devices,
    execution,
    fastpath,
    metrics,
    models,
    modes,
    probe,
    refcache,
    verify,
)
from mobilevit_npu.errors import Unavailable, UserError

CPU = devices.Device("cpu")
SYSTEM = ["--allocator", "system"]  # in-process script runs leave malloc alone (mallopt is process-wide)


def _no_compile(fn, device, name, example, cpp_wrapper=False, **graph):
    """compilers.compile_for without the compiler: the module itself runs (its autocast included)."""
    return fn, 0.0, ["not compiled (test)"]


@pytest.fixture
def uncompiled(monkeypatch):
    """Modes built exactly as on this CPU except the compile step (AOTInductor off, torch.compile stubbed)."""
    monkeypatch.setattr(compilers, "aoti_available", lambda: False)
    monkeypatch.setattr(compilers, "compile_for", _no_compile)
    execution._cache.clear()
    yield
    execution._cache.clear()


class _BfloatOnlyCpuAutocast(torch.autocast):
    """torch.autocast as older torch releases have it on the CPU: bfloat16 only. For float16 it warns and disables
    itself, with their words ("In CPU autocast, but the target dtype is not supported. Disabling autocast.\\nCPU
    Autocast only supports dtype of torch.bfloat16 currently.", torch/amp/autocast_mode.py of those releases)."""

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        if device_type == "cpu" and dtype == torch.float16 and enabled:
            warnings.warn(
                "In CPU autocast, but the target dtype is not supported. Disabling autocast.\n"
                "CPU Autocast only supports dtype of torch.bfloat16 currently.",
                stacklevel=2,
            )
            enabled = False
        super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


# --------------------------------------------------------------------------------------------------------------------
# the registry drives the scripts, the benchmark and the verifier
# --------------------------------------------------------------------------------------------------------------------


def test_a_mode_added_to_the_registry_is_offered_timed_and_verifiable(monkeypatch, tiny_model_dir, uncompiled):
    twin = dataclasses.replace(modes.mode("eager"), name="eager_again", summary="a test's second eager")
    monkeypatch.setitem(modes.REGISTRY, "eager_again", twin)
    target_mode = accuracy_run.build_parser()._option_string_actions["--target_mode"]
    assert "eager_again" in target_mode.choices and "a test's second eager" in target_mode.help
    assert "eager_again (a test's second eager)" in _help(accuracy_run_perf, "--modes")
    assert accuracy_run_perf.parse_modes("eager,eager_again") == ["eager", "eager_again"]
    assert "eager_again" in execution.available_modes(CPU)
    verify.check(verify.Settings(report="r.json", argv=[], model_path="m", target_mode="eager_again"))
    loaded = models.load_model(str(tiny_model_dir), CPU)
    rows = bench.run_benchmark(
        loaded, CPU, modes=["eager", "eager_again"], iterations=1, warmup=0, images=PHOTOS[:1], progress=False,
        measure_roofline=False,
    )  # fmt: skip
    assert [(r.mode, r.status, r.exact, r.dtype) for r in map(_row, rows)] == [
        ("eager", "ok", True, "fp32"),
        ("eager_again", "ok", True, "fp32"),
    ]
    # a mode the benchmark does not offer is refused there, and still verifiable
    monkeypatch.setitem(modes.REGISTRY, "eager_again", dataclasses.replace(twin, benchmark=False))
    with pytest.raises(UserError, match="unknown mode"):
        accuracy_run_perf.parse_modes("eager_again")
    assert "eager_again" in accuracy_run.build_parser()._option_string_actions["--target_mode"].choices


def _help(script, flag: str) -> str:
    return script.build_parser()._option_string_actions[flag].help


def _row(r):
    """A benchmark row as attributes, whether the benchmark returns dicts or schema.BenchResult."""
    return r if not isinstance(r, dict) else type("Row", (), r)


def test_each_mode_is_declared_once_with_what_judges_and_names_it():
    for mode in modes.REGISTRY.values():
        judged = mode.judged_by("fp32")
        assert judged in metrics.DEFAULT_THRESHOLDS, mode.name  # named thresholds judge every mode
        assert all(mode.label) and len(mode.label) == len(modes.LANGUAGES), mode.name
        assert mode.exact is (judged == "fp32")
    bf16, fp16 = modes.mode("bf16"), modes.mode("fp16")
    # the report spellings of bf16 come from its one declaration, in each report's dtype vocabulary
    assert (bf16.bench_dtype("fp32"), bf16.side_dtype("bf16")) == ("bf16 autocast", "bfloat16 autocast")
    assert bf16.weights_text("fp32") == "float32 (bfloat16 autocast inside the model)"
    assert bf16.side_label("cpu", "bf16") == "cpu bfloat16 autocast (bf16 mode: fast model, float32 weights)"
    assert (fp16.bench_dtype("fp32"), fp16.side_dtype("fp16")) == ("fp16 autocast", "float16 autocast")
    assert (fp16.weights("fp32"), fp16.judged_by("fp32")) == ("fp32", "fp16")
    assert (
        modes.label("fp16", "zh") == "float16 自动混合精度"
        and modes.label("onnxruntime CPU", "zh") == "onnxruntime CPU"
    )
    assert modes.msprobe_names() == ("eager", "channels_last", "bf16", "fp16", "bf16_eager", "fp16_eager")
    assert [m for m in modes.mode_names() if modes.mode(m).twin] == ["compiled", "fast", "bf16", "fp16", "npugraph"]


def test_the_scripts_offer_fp16():
    assert "fp16" in accuracy_run.build_parser()._option_string_actions["--target_mode"].choices
    assert accuracy_run_perf.parse_modes("eager,fp16") == ["eager", "fp16"]
    assert "fp16 (fast under float16 autocast" in _help(accuracy_run_perf, "--modes")
    assert "fp16 (fast under float16 autocast" in _help(accuracy_run, "--target_mode")


# --------------------------------------------------------------------------------------------------------------------
# fp16: benchmarked and verified on healthy weights
# --------------------------------------------------------------------------------------------------------------------


def test_fp16_benchmark_row_is_float16_autocast_judged_on_its_agreement(tiny_model_dir, uncompiled, monkeypatch):
    ceilings = []

    def ceiling(device, dtype, repeats=3):
        ceilings.append(dtype)
        return 1e11

    monkeypatch.setattr(bench.flops, "matmul_ceiling", ceiling)
    loaded = models.load_model(str(tiny_model_dir), CPU)
    (r,) = map(
        _row,
        bench.run_benchmark(
            loaded, CPU, modes=["fp16"], batch_sizes=[2], iterations=1, warmup=0, images=PHOTOS[:2], progress=False
        ),
    )
    assert r.status == "ok" and r.dtype == "fp16 autocast", r.reason
    assert "float16 autocast: not exact, see agreement" in r.notes
    agreement = metrics.Agreement(**r.agreement) if isinstance(r.agreement, dict) else r.agreement
    # float16 really ran (the logits moved) and stayed within fp16's thresholds
    assert 0 < agreement.max_abs_diff and agreement.cosine >= metrics.DEFAULT_THRESHOLDS["fp16"].min_cosine
    assert agreement.top1_agreement == 1.0 and r.exact is metrics.is_exact(agreement)
    assert ceilings == [torch.float16]  # the roofline's ceiling is float16's, the dtype it computes in


def test_fp16_verification_passes_with_fp16_thresholds_and_layers_on_its_autocast_twin(
    tmp_path, tiny_model_dir, uncompiled, capsys
):
    out = tmp_path / "r.json"
    argv = [*SYSTEM, str(tiny_model_dir), str(out), "--device", "cpu", "--target_mode", "fp16", "--layers"]
    rc = accuracy_run.main([*argv, "--images", *PHOTOS[:2], "--reference_cache", "off"])
    report = read_json(out)
    assert rc == 0 and report["verdict"] == "PASS", report["verdict_reasons"]
    assert report["thresholds"] == dataclasses.asdict(metrics.DEFAULT_THRESHOLDS["fp16"])
    target = report["target"]
    assert (target["dtype"], target["mode"]) == ("float16 autocast", "fp16")
    assert target["label"] == "cpu float16 autocast (fp16 mode: fast model, float32 weights)"
    assert "float16 autocast: not exact, see agreement" in target["notes"]
    assert "under the same float16 autocast" in report["layers"]["note"]
    assert 0 < report["aggregate"]["max_abs_logit_diff"]  # float16 rounding, not the float32 model again
    assert "VERDICT: PASS" in capsys.readouterr().out


@pytest.mark.parametrize("dtype, allowed", [("fp32", True), ("fp16", True), ("bf16", False)])
def test_fp16_mode_takes_float32_weights(dtype, allowed):
    settings = verify.Settings(report="r.json", argv=[], model_path="m", target_mode="fp16", dtype=dtype)
    if allowed:
        verify.check(settings)
        assert (settings.weights_dtype, settings.verdict_dtype) == ("fp32", "fp16")
    else:
        with pytest.raises(UserError, match="--target_mode fp16 is float16 autocast over the float32 weights"):
            verify.check(settings)
    with pytest.raises(Unavailable, match="fp16 is autocast over float32 weights: run it with --dtype fp32"):
        execution.prepare_mode("fp16", torch.nn.Identity(), CPU, "bf16", torch.zeros(1))


def test_fp16_and_bf16_builds_never_share_a_compile_cache_entry(tiny_model_dir):
    model = models.load_model(str(tiny_model_dir), CPU).model
    fast = fastpath.build_fast_model(model, channels_last=True)
    x = torch.zeros(1, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    keys = {
        dtype: compilers.aoti_key(execution.Autocast(fast, "cpu", dtype), CPU, x)["structure_sha256"]
        for dtype in ("bf16", "fp16")
    }
    assert keys["bf16"] != keys["fp16"]
    assert refcache.structure_digest(execution.Autocast(fast, "cpu")) == keys["bf16"]  # bf16: the default


def test_msprobe_dumps_fp16_through_its_twin_and_names_it_among_the_dumpable(monkeypatch):
    monkeypatch.setattr(probe, "msprobe_version", lambda: "26.2.0")
    assert probe.check_dumpable("fp16") == "26.2.0"
    with pytest.raises(UserError, match=r"use eager, channels_last, bf16, fp16, bf16_eager or fp16_eager$"):
        probe.check_dumpable("fast")


# --------------------------------------------------------------------------------------------------------------------
# where torch has no float16 autocast: refused, one line
# --------------------------------------------------------------------------------------------------------------------


def test_fp16_is_refused_in_one_line_where_torch_has_no_float16_autocast(
    monkeypatch, tmp_path, tiny_model_dir, uncompiled, capsys
):
    monkeypatch.setattr(torch, "autocast", _BfloatOnlyCpuAutocast)
    why = modes.autocast_refusal("cpu", "fp16")
    assert why.startswith("not on this device: torch ") and "no float16 autocast on cpu" in why and "\n" not in why
    assert modes.autocast_refusal("cpu", "bf16") is None
    assert "fp16" not in execution.available_modes(CPU)  # --modes all leaves it out
    loaded = models.load_model(str(tiny_model_dir), CPU)
    (r,) = map(
        _row,
        bench.run_benchmark(loaded, CPU, modes=["fp16"], iterations=1, warmup=0, images=PHOTOS[:1], progress=False),
    )
    assert (r.status, r.reason) == ("unavailable", why)
    out = tmp_path / "r.json"
    rc = accuracy_run.main([*SYSTEM, str(tiny_model_dir), str(out), "--device", "cpu", "--target_mode", "fp16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert err == [f"error: --target_mode fp16 cannot run on cpu: {why}"]


def test_a_device_type_without_autocast_refuses_every_autocast_mode():
    why = modes.autocast_refusal("no_such_device", "fp16")
    assert why and why.startswith("not on this device") and "\n" not in why


def test_fp16_on_the_npu_keeps_float16_autocast_through_the_math_attention_fallback(
    npu_standin, tiny_model_dir, monkeypatch
):
    """torch_npu's autocast lists float16 on every NPU (torch_npu/npu/autocast_utils.py l.8-11, 2.5.1: float16, and
    bfloat16 where torch.npu.is_bf16_supported()); the stand-in's autocast("npu") is the CPU's."""
    npu_standin()

    def torchair_without_sdpa(fn, device, name, example, cpp_wrapper=False, **graph):
        fast = fn.inner if isinstance(fn, execution.Autocast) else fn
        if any(not m.math_attention for m in fast.modules() if isinstance(m, fastpath.TransformerLayer)):
            raise Unavailable("torch.compile failed (NotImplementedError: no converter for the flash SDPA)")
        return fn, 0.5, ["torchair GE graph (test)"]

    monkeypatch.setattr(compilers, "compile_for", torchair_without_sdpa)
    device = devices.resolve_device("npu")
    assert {"fp16", "bf16", "npugraph"} <= set(execution.available_modes(device))
    model = models.load_model(str(tiny_model_dir), CPU).model
    prepared = execution.prepare_mode("fp16", model, device, "fp32", torch.zeros(1, 3, 256, 256))
    assert isinstance(prepared.call, execution.Autocast) and prepared.call.autocast_dtype == "fp16"
    assert any("fell back to math attention" in n for n in prepared.notes), prepared.notes


@pytest.mark.slow
def test_fp16_built_for_real_agrees_with_eager_within_fp16s_thresholds(tiny_model_dir):
    """The real CPU build (AOTInductor where torch has it, else inductor) of the fast path under float16 autocast."""
    execution._cache.clear()
    loaded = models.load_model(str(tiny_model_dir), CPU)
    (r,) = map(
        _row,
        bench.run_benchmark(
            loaded, CPU, modes=["fp16"], batch_sizes=[2], iterations=1, warmup=0, images=PHOTOS[:2], progress=False,
            measure_roofline=False,
        ),
    )  # fmt: skip
    execution._cache.clear()
    assert r.status == "ok" and r.dtype == "fp16 autocast", r.reason
    assert r.compile_s > 0 and any("AOTInductor" in note for note in r.notes) == compilers.aoti_available()
    agreement = metrics.Agreement(**r.agreement) if isinstance(r.agreement, dict) else r.agreement
    assert agreement.cosine >= metrics.DEFAULT_THRESHOLDS["fp16"].min_cosine and agreement.top1_agreement == 1.0
