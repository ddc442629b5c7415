"""accuracy.py and accuracy_run.py: metrics, verdicts, layer localisation, bad input and exit codes."""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from conftest import PHOTOS, ROOT, read_json
from perturb import add_noise, inject_nan, perturb_targets

import accuracy_run
from mobilevit_npu import bench, compilers, devices, execution, layerwise, metrics, models, targets

PERTURBED = "mobilevit.encoder.layer.1.layer.0.conv_3x3.convolution"
COFFEE = str(
    ROOT / "mobilevit_npu" / "data" / "images" / "coffee.png"
)  # a clear top-1 on the synthetic X-Small (no near tie)

EXAMPLE = torch.zeros(1, 3, 256, 256)  # the batch shape compiled targets are built for


def run(tmp_path, model_dir, *extra: str) -> tuple[int, dict | None]:
    report = tmp_path / "report.json"
    rc = accuracy_run.main(["--allocator", "system", str(model_dir), str(report), "--device", "cpu", *extra])
    return rc, (read_json(report) if report.exists() else None)


# --------------------------------------------------------------------------------------------------------------------
# compare(): pure tensors
# --------------------------------------------------------------------------------------------------------------------


def healthy_logits(n: int = 3, classes: int = 20) -> torch.Tensor:
    return torch.randn(n, classes, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3


def test_compare_identical_is_pass_with_cosine_exactly_one():
    logits = healthy_logits()
    result = metrics.compare_logits(logits, logits.clone(), "fp32")
    assert result.verdict == "PASS"
    assert result.aggregate.cosine_min == 1.0
    assert result.aggregate.max_abs_logit_diff == 0.0
    assert result.aggregate.share_rel_err_below_0_001 == 1.0
    assert [m.top5_overlap for m in result.per_image] == [1.0] * 3


def test_compare_metrics_match_hand_computation():
    ref = torch.tensor([[4.0, -2.0, 1e-6, 0.5, 1.0, -1.0]], dtype=torch.float64)
    tgt = ref + torch.tensor([[0.002, 0.0, 1e-6, 0.5, 0.0, 0.004]], dtype=torch.float64)
    result = metrics.compare_logits(ref, tgt, "fp16")
    m = result.per_image[0]
    rel = [0.0005, 0.0, 1.0, 1.0, 0.0, 0.004]
    assert m.mean_relative_error == pytest.approx(sum(rel) / 6)
    # 1e-6 is under fp16's minimum-error floor (2^-11), so it leaves the second mean
    assert m.logits_above_error_floor == 5
    assert m.mean_relative_error_above_error_floor == pytest.approx((0.0005 + 1.0 + 0.004) / 5)
    assert m.share_rel_err_below_0_001 == pytest.approx(3 / 6)
    assert m.share_rel_err_below_0_005 == pytest.approx(4 / 6)
    assert m.max_abs_logit_diff == pytest.approx(0.5)
    expected_cos = float((ref * tgt).sum() / (ref.norm() * tgt.norm()))
    assert m.cosine == pytest.approx(expected_cos, abs=1e-12)


def test_compare_flat_or_nonfinite_reference_is_invalid():
    flat = torch.zeros(2, 10)
    assert metrics.compare_logits(flat, flat, "fp32").verdict == "INVALID"
    nan_ref = healthy_logits()
    nan_ref[0, 0] = math.nan
    assert metrics.compare_logits(nan_ref, healthy_logits(), "fp32").verdict == "INVALID"
    # spread across classes on each image, the same for every input: each image's reference can judge (the verdict
    # rests on per-image properties only, whatever the number of images); the spread across images is information
    same = healthy_logits(1).repeat(3, 1)
    result = metrics.compare_logits(same, same, "fp32")
    assert result.verdict == "PASS" and result.aggregate.reference_logit_std_across_images == 0.0
    assert metrics.compare_logits(same, same + 1.0, "fp32").verdict == "FAIL"
    assert (
        metrics.compare_logits(same, same, "fp32", distinct_inputs=False).aggregate.reference_logit_std_across_images
        is None
    )


def test_compare_nonfinite_target_fails():
    ref = healthy_logits()
    tgt = ref.clone()
    tgt[1, 3] = math.inf
    result = metrics.compare_logits(ref, tgt, "fp32")
    assert result.verdict == "FAIL"
    assert result.aggregate.target_nonfinite_images == 1
    assert any("target_logits_finite" in r for r in result.reasons)


def test_near_tie_flips_are_forgiven_only_where_the_dtype_allows():
    ref = torch.tensor([[2.00, 1.99, -3.0, 0.0, -1.0, 1.0]])
    tgt = torch.tensor([[1.99, 2.00, -3.0, 0.0, -1.0, 1.0]])
    assert metrics.compare_logits(ref, tgt, "bf16", distinct_inputs=False).verdict == "PASS"
    fp32 = metrics.compare_logits(ref, tgt, "fp32", distinct_inputs=False)
    assert fp32.verdict == "FAIL"
    assert fp32.per_image[0].top1_near_tie is False


# --------------------------------------------------------------------------------------------------------------------
# Layer comparison machinery
# --------------------------------------------------------------------------------------------------------------------


class TwiceAndTuple(torch.nn.Module):
    """A module called twice per forward, and one returning a tuple."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(4, 4)
        self.pair = Pair()

    def forward(self, x):
        y = self.shared(self.shared(x))
        return self.pair(y)[0]


class Pair(torch.nn.Module):
    def forward(self, x):
        return x * 2, torch.ones(1, dtype=torch.long)


def test_layer_comparator_handles_repeated_calls_and_tuples():
    ref = TwiceAndTuple().eval()
    tgt = copy.deepcopy(ref)
    comparator = layerwise.LayerComparator(ref, tgt, threshold=0.999)
    with torch.no_grad():
        x = torch.randn(2, 4)
        comparator.begin("x", "reference")
        ref(x)
        comparator.begin("x", "target")
        tgt.shared.weight.add_(0.5)  # diverge in the target from the first call of `shared` on
        tgt(x)
        comparator.end_image()
    comparator.close()
    report = comparator.report()
    assert [s.name for s in report.modules] == ["shared", "shared#2", "pair"]
    assert report.first_divergent.name == "shared"
    assert report.missing_in_target == []
    assert not ref.shared._forward_hooks  # close() removed the hooks


def test_target_is_a_copy_never_an_alias(tiny_model_dir):
    loaded = models.load_model(str(tiny_model_dir))
    target = targets.prepare_target(loaded.model, devices.Device("cpu"), "bf16", "channels_last", EXAMPLE)
    ref_ptrs = {p.data_ptr() for p in loaded.model.parameters()}
    assert not ref_ptrs & {p.data_ptr() for p in target.hook_model.parameters()}
    assert target.hook_model.mobilevit.conv_stem.convolution.weight.is_contiguous(memory_format=torch.channels_last)
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert target.label == "cpu bfloat16 channels_last"


def record_compiles(monkeypatch) -> list[dict]:
    """compilers.compile_for and compilers.build_aoti (the CPU's compiled modes where torch has AOTInductor) replaced
    by recorders that return the function uncompiled."""
    calls = []

    def fake(fn, device, name, example, cpp_wrapper=False):
        calls.append({"device": str(device), "shape": tuple(example.shape), "cpp_wrapper": cpp_wrapper})
        return fn, 0.0, ["recorded"]

    def fake_aoti(module, device, example, autotune=False):
        calls.append({"aoti": type(module).__name__, "device": str(device), "shape": tuple(example.shape)})
        return module, 0.0, ["recorded"], "off"

    monkeypatch.setattr(compilers, "compile_for", fake)
    monkeypatch.setattr(compilers, "build_aoti", fake_aoti)
    execution._cache.clear()
    return calls


@pytest.mark.parametrize("layers", [False, True])
def test_compiled_target_gets_an_eager_twin_only_for_layers(tiny_model_dir, monkeypatch, layers):
    calls = record_compiles(monkeypatch)
    loaded = models.load_model(str(tiny_model_dir))
    target = targets.prepare_target(loaded.model, devices.Device("cpu"), "fp32", "compiled", EXAMPLE, layers=layers)
    # one build, for the shape the target was asked to compile for (the notes are the recorder's own: not checked)
    assert len(calls) == 1 and calls[0]["shape"] == tuple(EXAMPLE.shape)
    # --layers hooks a separate eager copy, so the compiled graph stays whole; without it no copy is made
    assert (target.hook_model is not target.prepared.module) == layers
    twin_ptrs = {p.data_ptr() for p in target.hook_model.parameters()}
    assert bool(twin_ptrs & {p.data_ptr() for p in target.prepared.module.parameters()}) != layers


def test_compiled_target_is_built_as_the_benchmark_builds_its_compiled_mode(tiny_model_dir, monkeypatch):
    """The verdict must cover the code path whose latency is reported: accuracy_run's compiled target and the
    benchmark's compiled mode go through the same compile call with the same settings."""
    calls = record_compiles(monkeypatch)
    loaded = models.load_model(str(tiny_model_dir))
    targets.prepare_target(loaded.model, devices.Device("cpu"), "fp32", "compiled", EXAMPLE)
    bench.run_benchmark(
        loaded,
        devices.Device("cpu"),
        modes=["compiled"],
        iterations=1,
        warmup=0,
        images=PHOTOS[:1],
        progress=False,
        measure_roofline=False,
    )
    assert len(calls) == 2 and calls[0] == calls[1]


@pytest.mark.slow
def test_compiled_target_report_names_the_benchmark_compile_settings(tmp_path, tiny_model_dir, tiny_compile_cache):
    """Over a copy of the compile cache accuracy_run_perf.py filled (conftest.compiled_tiny), the compiled target is
    the benchmark's own package (a hit: the same compilers.aoti_key), and its report names the benchmark's build."""
    rc, report = run(tmp_path, tiny_model_dir, "--images", PHOTOS[0], "--target_mode", "compiled")
    assert rc == 0 and report["verdict"] == "PASS"
    if compilers.aoti_available():
        assert any("compile cache hit" in note for note in report["target"]["notes"]), report["target"]["notes"]
    build = (
        "AOTInductor: torch.export + aoti_compile_and_package, freezing"
        if compilers.aoti_available()
        else ("inductor, torch._inductor.config.freezing=True (weights constant-folded and prepacked)")
    )
    assert build in report["target"]["notes"]  # the benchmark's CPU compile


# --------------------------------------------------------------------------------------------------------------------
# The script, in-process
# --------------------------------------------------------------------------------------------------------------------


def test_identical_cpu_target_is_invalid_with_cosine_one(tmp_path, tiny_model_dir, capsys):
    """The reference against itself: perfect figures, and no port check (INVALID, exit 1)."""
    rc, report = run(tmp_path, tiny_model_dir, "--images", *PHOTOS[:2])
    assert rc == 1
    assert report["verdict"] == "INVALID"
    assert report["compared"] == "cpu float32 eager  vs  cpu float32 eager"
    assert report["aggregate"]["cosine_min"] == 1.0
    assert [m["cosine"] for m in report["per_image"]] == [1.0, 1.0]
    assert report["model_source"]["sha256"] and report["model_source"]["path"] == str(tiny_model_dir)
    assert report["environment"]["device"] == "cpu" and report["reference_environment"]["device"] == "cpu"
    assert report["tool"] == "accuracy_run.py" and report["synthetic"] is False and report["errors"] == []
    assert report["thresholds"]["min_cosine"] == 0.999
    assert "deterministic" in " ".join(report["verdict_reasons"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("VERDICT: INVALID (not a port check")


def test_perturbed_module_fails_and_layers_name_it(tmp_path, tiny_model_dir, capsys, monkeypatch):
    perturb_targets(monkeypatch, add_noise(PERTURBED, scale=1.0))
    rc, report = run(tmp_path, tiny_model_dir, "--images", *PHOTOS[:2], "--layers")
    assert rc == 1
    assert report["verdict"] == "FAIL"
    layers = report["layers"]
    assert layers["first_divergent"]["name"] == PERTURBED
    assert layers["first_divergent"]["cosine_min"] < 0.999
    assert layers["first_nonfinite"] is None
    order = [m["name"] for m in layers["modules"]]
    assert all(m["cosine_min"] == 1.0 for m in layers["modules"][: order.index(PERTURBED)])
    assert len(layers["worst"]) == 5
    out = capsys.readouterr().out
    assert f"first divergent: {PERTURBED}" in out
    assert out.strip().splitlines()[-1].endswith(f"first divergent layer: {PERTURBED}")


def test_nan_target_fails_and_layers_name_the_first_nan_module(tmp_path, tiny_model_dir, capsys, monkeypatch):
    nan_module = "mobilevit.encoder.layer.2.conv_kxk"
    perturb_targets(monkeypatch, inject_nan(nan_module))
    rc, report = run(tmp_path, tiny_model_dir, "--images", PHOTOS[0], "--layers")
    assert rc == 1
    assert report["verdict"] == "FAIL"
    assert report["aggregate"]["target_nonfinite_images"] == 1
    assert report["per_image"][0]["cosine"] is None  # NaN is written as null
    assert report["layers"]["first_nonfinite"]["name"] == nan_module
    assert f"first NaN/Inf layer: {nan_module}" in capsys.readouterr().out.strip().splitlines()[-1]


def test_default_init_model_is_invalid_not_pass(tmp_path, default_init_model_dir):
    rc, report = run(tmp_path, default_init_model_dir, "--images", PHOTOS[0])  # one: denormals make it slow
    assert rc == 1
    assert report["verdict"] == "INVALID"
    assert report["aggregate"]["reference_logit_std_min"] < 0.1
    assert any("cannot discriminate" in r for r in report["verdict_reasons"])


@pytest.mark.parametrize(
    "dtype, name, floor, model",
    [
        ("fp16", "float16", 0.999, "tiny_model_dir"),  # fp16 convolutions are ~50x slower than fp32 on CPUs
        pytest.param("bf16", "bfloat16", 0.98, "synthetic_model_dir", marks=pytest.mark.slow),
    ],
)
def test_half_precision_cpu_targets_report_sensible_numbers(tmp_path, request, dtype, name, floor, model):
    rc, report = run(tmp_path, request.getfixturevalue(model), "--images", COFFEE, "--dtype", dtype)
    assert report["compared"] == f"cpu float32 eager  vs  cpu {name} eager"
    agg = report["aggregate"]
    assert floor < agg["cosine_min"] < 1.0  # the dtype really changed something, and not much
    assert 0.0 < agg["max_abs_logit_diff"] < 2.0
    assert 0.0 < agg["rmse"] < 1.0
    assert 0.0 <= agg["share_rel_err_below_0_001"] <= agg["share_rel_err_below_0_005"] <= 1.0
    assert agg["min_error_floor"] == metrics.MIN_ERROR_FLOOR[dtype]
    assert agg["top1_agree_count"] == 1
    assert report["thresholds"] == dataclasses.asdict(metrics.DEFAULT_THRESHOLDS[dtype])
    assert (rc, report["verdict"]) == (0, "PASS")


def test_channels_last_target_and_threshold_overrides(tmp_path, tiny_model_dir):
    rc, report = run(tmp_path, tiny_model_dir, "--images", PHOTOS[0], "--target-mode", "channels_last")
    assert rc == 0 and report["compared"].endswith("cpu float32 channels_last")
    rc, report = run(
        tmp_path,
        tiny_model_dir,
        "--images",
        PHOTOS[0],
        "--target-mode",
        "channels_last",
        "--min-cosine",
        "1.5",
        "--max_prob_diff",
        "0.2",
    )
    assert rc == 1 and report["verdict"] == "FAIL"
    assert report["thresholds"]["min_cosine"] == 1.5 and report["thresholds"]["max_prob_diff"] == 0.2


def test_bad_images_are_skipped_and_listed(tmp_path, tiny_model_dir, capsys):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(PHOTOS[0], "rb").read()[:200])
    missing = str(tmp_path / "missing.jpg")
    rc, report = run(
        tmp_path,
        tiny_model_dir,
        "--images",
        missing,
        PHOTOS[0],
        str(truncated),
        "--max_skipped",
        "2",
        "--target_mode",
        "channels_last",
    )
    assert rc == 0
    assert [m["image"] for m in report["per_image"]] == [PHOTOS[0]]
    assert [s["image"] for s in report["errors"]] == [missing, str(truncated)]
    assert all(s["error"] for s in report["errors"])
    assert f"skipped {missing}" in capsys.readouterr().err


def test_no_readable_image_is_exit_2(tmp_path, tiny_model_dir, capsys):
    rc, report = run(tmp_path, tiny_model_dir, "--images", str(tmp_path / "nope.png"))
    assert rc == 2 and report is None
    assert "could be read" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["tpu", "cpu:3"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_absent_or_unknown_device_is_exit_2(tmp_path, tiny_model_dir, capsys, spec):
    report = tmp_path / "r.json"
    assert accuracy_run.main(["--allocator", "system", str(tiny_model_dir), str(report), "--device", spec]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not report.exists()


def test_usage_errors_are_exit_2(tmp_path, tiny_model_dir):
    assert accuracy_run.main(["--allocator", "system", str(tiny_model_dir)]) == 2  # no REPORT.json
    assert (
        accuracy_run.main(["--allocator", "system", str(tiny_model_dir), str(tmp_path / "r.json"), "--dtype", "fp8"])
        == 2
    )
    assert (
        accuracy_run.main(["--allocator", "system", str(tiny_model_dir), str(tmp_path), "--device", "cpu"]) == 2
    )  # a directory
    assert (
        accuracy_run.main(
            ["--allocator", "system", str(tmp_path / "no_model"), str(tmp_path / "r.json"), "--device", "cpu"]
        )
        == 2
    )


def test_synthetic_flag_is_stated_in_the_report(tmp_path):
    """The real synthetic weights (no stand-in): the report names them by seed, says so in the notes, and another
    --seed gives other weights."""
    port = ["--target_mode", "channels_last"]  # float32 eager would be the reference itself: INVALID
    rc, report = run(tmp_path, "./model", "--synthetic", "--images", PHOTOS[0], *port)
    assert rc == 0
    assert report["synthetic"] is True and report["model_source"]["seed"] == 0
    assert any("synthetic weights" in n for n in report["notes"])
    rc, other = run(tmp_path, "./model", "--synthetic", "--seed", "1", "--images", PHOTOS[0], *port)
    assert rc == 0 and other["model_source"]["seed"] == 1
    assert other["per_image"][0]["reference_top1_prob"] != report["per_image"][0]["reference_top1_prob"]


def test_every_flag_has_help_and_a_kebab_twin():
    parser = accuracy_run.build_parser()
    for action in parser._actions:
        assert action.help, action.dest
        long = [o for o in action.option_strings if o.startswith("--")]
        if any("_" in o for o in long):
            assert any(o.replace("_", "-") in long for o in long if "_" in o), long
    assert accuracy_run.main(["--help"]) == 0


def test_script_runs_as_a_subprocess(tmp_path, tiny_model_dir):
    report = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "accuracy_run.py"),
            str(tiny_model_dir),
            str(report),
            "--device",
            "cpu",
            "--images",
            PHOTOS[0],
            "--layers",
            "--target_mode",
            "channels_last",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.strip()
        .splitlines()[-1]
        .startswith("VERDICT: PASS  cpu float32 eager  vs  cpu float32 channels_last")
    )
    data = read_json(report)
    assert data["verdict"] == "PASS"
    assert data["layers"]["modules_compared"] > 50 and data["layers"]["first_divergent"] is None
