"""The eager autocast modes, `bf16_eager` and `fp16_eager` (issue 30): the Hugging Face model as loaded, uncompiled,
under bfloat16 / float16 autocast over its float32 weights: what `torch.autocast` (torch_npu's amp) runs op by op.
Each is one entry in mobilevit_npu/modes.py; here they are offered, verified with their dtype's thresholds, timed, and
they catch a broken layer. Unlike `bf16` (the compiled fast path, refused on a CPU without native bfloat16) they run on
any CPU whose torch autocasts to the dtype: on one without native bfloat16 the rounding is the same and only slower
(each convolution and matmul rounds its inputs to bfloat16 and accumulates in float32, as oneDNN's native kernels do).
"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import PHOTOS, read_json
from perturb import add_noise_in_forward, perturb_targets

import accuracy_run
import accuracy_run_perf
from mobilevit_npu import bench, devices, execution, metrics, models, modes

CPU = devices.Device("cpu")
EAGER_AUTOCAST = {"bf16_eager": ("bf16", "bfloat16 autocast"), "fp16_eager": ("fp16", "float16 autocast")}


def _verify(model_dir, out, mode, *extra):
    argv = [str(model_dir), str(out), "--device", "cpu", "--target_mode", mode, "--images", *PHOTOS[:2], *extra]
    return accuracy_run.main([*argv, "--reference_cache", "off", "--allocator", "system"])


def test_the_eager_autocast_modes_are_declared_once_and_offered_by_both_scripts():
    choices = accuracy_run.build_parser()._option_string_actions["--target_mode"].choices
    for name, (dtype, shown) in EAGER_AUTOCAST.items():
        mode = modes.mode(name)
        assert (mode.model, mode.compiled, mode.autocast) == ("hf", False, dtype)
        assert mode.judged_by("fp32") == dtype and not mode.exact and not mode.twin
        assert mode.side_dtype("fp32") == shown and mode.bench_dtype("fp32") == f"{dtype} autocast"
        assert mode.side_label("cpu", "fp32") == f"cpu eager {shown} ({name} mode: Hugging Face model, float32 weights)"
        assert name in choices and accuracy_run_perf.parse_modes(f"eager,{name}") == ["eager", name]
        assert name in modes.msprobe_names()  # an eager module: msprobe hooks it under its autocast
    # the compiled bf16 mode keeps its fast model in its label
    assert (
        modes.mode("bf16").side_label("cpu", "fp32") == "cpu bfloat16 autocast (bf16 mode: fast model, float32 weights)"
    )


def test_bf16_eager_runs_where_the_compiled_bf16_mode_is_refused_for_want_of_native_bfloat16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_supported", lambda: False)
    assert "no native bfloat16" in modes.mode("bf16").device_refusal(CPU)
    assert modes.mode("bf16_eager").device_refusal(CPU) is None
    assert "bf16_eager" in execution.available_modes(CPU) and "bf16" not in execution.available_modes(CPU)


@pytest.mark.parametrize(
    "name, folder",
    [
        ("fp16_eager", "tiny_model_dir"),
        # the full-size X-Small (1000 classes): bfloat16's 8-bit significand moves the tiny model's peaked 10-class
        # probabilities past bf16's max|dp| (0.16 here), as it does --dtype bf16's on some full-size families
        pytest.param("bf16_eager", "synthetic_model_dir", marks=pytest.mark.slow),
    ],
)
def test_an_eager_autocast_target_passes_with_its_dtypes_thresholds_and_layers_on_the_model_itself(
    name, folder, tmp_path, capsys, request
):
    dtype, shown = EAGER_AUTOCAST[name]
    model_dir = request.getfixturevalue(folder)
    out = tmp_path / "r.json"
    rc = _verify(model_dir, out, name, "--layers")
    report = read_json(out)
    assert rc == 0 and report["verdict"] == "PASS", report["verdict_reasons"]
    assert report["thresholds"] == dataclasses.asdict(metrics.DEFAULT_THRESHOLDS[dtype])
    target = report["target"]
    assert (target["dtype"], target["mode"]) == (shown, name)
    assert f"eager {shown}: not exact, see agreement" in target["notes"]
    assert 0 < report["aggregate"]["max_abs_logit_diff"]  # the autocast really rounded: not float32 again
    watched = {m["name"].split("#")[0] for m in report["layers"]["modules"]}
    model_modules = {n for n, _ in models.load_model(str(model_dir)).model.named_modules()}
    assert "mobilevit.conv_stem.convolution" in watched and watched <= model_modules
    assert "VERDICT: PASS" in capsys.readouterr().out


def test_a_broken_layer_fails_an_eager_autocast_target_and_layers_and_msprobe_name_it(
    tiny_model_dir, tmp_path, monkeypatch
):
    """fp16_eager PASSes on the tiny model unbroken (above): here the noise inside one layer is what FAILs it, and
    msprobe, dumping the model itself under the same autocast, finds the layer --layers finds."""
    layer = "mobilevit.encoder.layer.2"
    perturb_targets(monkeypatch, add_noise_in_forward(layer))
    out, dumps = tmp_path / "r.json", tmp_path / "probe"
    assert _verify(tiny_model_dir, out, "fp16_eager", "--layers", "--msprobe", str(dumps)) == 1
    report = read_json(out)
    assert report["verdict"] == "FAIL"
    assert report["layers"]["first_divergent"]["name"] == layer, report["layers"]["first_divergent"]
    assert report["msprobe"]["first_failing_module"] == layer and report["msprobe"]["agree"] is True
    # the model itself was dumped, not a twin: the note says what ran
    assert report["msprobe"]["note"] == "the fp16 target was dumped as it runs, under float16 autocast"


def test_a_bf16_eager_benchmark_row_is_bfloat16_autocast_judged_on_its_agreement(tiny_model_dir):
    execution._cache.clear()
    loaded = models.load_model(str(tiny_model_dir), CPU)
    (row,) = bench.run_benchmark(
        loaded, CPU, modes=["bf16_eager"], batch_sizes=[2], iterations=1, warmup=0, images=PHOTOS[:2], progress=False,
        measure_roofline=False,
    )  # fmt: skip
    execution._cache.clear()
    row = row if not isinstance(row, dict) else type("Row", (), row)
    assert row.status == "ok" and row.dtype == "bf16 autocast" and row.compile_s is None, row.reason
    agreement = metrics.Agreement(**row.agreement) if isinstance(row.agreement, dict) else row.agreement
    assert 0 < agreement.max_abs_diff and agreement.cosine >= metrics.DEFAULT_THRESHOLDS["bf16"].min_cosine
    assert row.exact is False
