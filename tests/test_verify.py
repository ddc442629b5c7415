"""mobilevit_npu/verify.py: the command line resolved once into Settings, every benchmarked mode a verification
target (fast and bf16 included), judged with its own dtype's thresholds."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import PHOTOS, read_json

import accuracy_run
from mobilevit_npu import compilers, devices, execution, metrics, models, targets, verify
from mobilevit_npu.errors import UserError


def test_every_flag_reaches_the_settings_by_its_own_name():
    """settings_from copies each flag by name: a flag without a Settings field would be silently ignored."""
    parser = accuracy_run.build_parser()
    fields = {f.name for f in dataclasses.fields(verify.Settings)}
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    script_only = {"verbose", *metrics.THRESHOLD_FLAGS}  # logging; thresholds travel as threshold_overrides
    assert dests - fields - script_only == set()
    args = accuracy_run.parse_args(["m", "r.json", "--target_mode", "bf16", "--min_cosine", "0.5", "--layers"])
    settings = accuracy_run.settings_from(args, ["m", "r.json"])
    assert (settings.target_mode, settings.layers, settings.model_path) == ("bf16", True, "m")
    assert settings.thresholds().min_cosine == 0.5  # the override, on bf16's defaults otherwise
    assert settings.thresholds().max_prob_diff == metrics.DEFAULT_THRESHOLDS["bf16"].max_prob_diff


def test_the_benchmarks_modes_are_the_targets_modes():
    assert set(targets.MODES) == set(execution.MODES)
    assert {"fast", "bf16"} <= set(accuracy_run.build_parser()._option_string_actions["--target_mode"].choices)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target_mode": "bf16", "dtype": "fp16"}, "bfloat16 autocast over the float32 weights"),
        ({"resume": True}, "go with --dataset or --labels"),
        ({"dataset": "d", "layers": True}, "do not go with --dataset"),
    ],
)
def test_impossible_combinations_are_refused_before_any_work(change, message):
    settings = dataclasses.replace(verify.Settings(report="r.json", argv=[], model_path="m"), **change)
    with pytest.raises(UserError, match=message):
        verify.check(settings)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, dtype_shown, thresholds",
    [
        ("fast", "float32", "fp32"),
        pytest.param(
            "bf16",
            "bfloat16 autocast",
            "bf16",
            # the mode is refused up front on a CPU without native bf16 (an AMD EPYC before Zen 4: no AVX512-BF16)
            marks=pytest.mark.skipif(not devices.cpu_bf16_supported(), reason="this CPU has no native bfloat16"),
        ),
    ],
)
def test_fast_and_bf16_are_verification_targets(
    tmp_path, tiny_model_dir, tiny_compile_cache, mode, dtype_shown, thresholds
):
    """Built by the benchmark's own builder: over a copy of the compile cache the benchmark filled
    (conftest.compiled_tiny), the target loads the very package the benchmark built and timed (the same
    compilers.aoti_key: module, code, weights, build options), judged against CPU float32 eager with the thresholds
    of the dtype they compute in; --layers watches an eager twin named as the model's modules."""
    out = tmp_path / "r.json"
    code = accuracy_run.main(
        [
            str(tiny_model_dir),
            str(out),
            "--device",
            "cpu",
            "--target_mode",
            mode,
            "--layers",
            "--images",
            *PHOTOS[:2],
            "--allocator",
            "system",
            "--reference_cache",
            "off",
        ]
    )
    report = read_json(out)
    assert code == (0 if report["verdict"] == "PASS" else 1)
    assert report["verdict"] == "PASS", report["verdict_reasons"]
    assert (report["target"]["mode"], report["target"]["dtype"]) == (mode, dtype_shown)
    if compilers.aoti_available():  # the benchmark's own package, not another build
        assert any("compile cache hit" in note for note in report["target"]["notes"]), report["target"]["notes"]
    assert report["thresholds"] == dataclasses.asdict(metrics.DEFAULT_THRESHOLDS[thresholds])
    model_modules = {name for name, _ in models.load_model(str(tiny_model_dir)).model.named_modules()}
    watched = {m["name"].split("#")[0] for m in report["layers"]["modules"]}
    assert "mobilevit.conv_stem.convolution" in watched and watched <= model_modules  # not fastpath's names
    assert "eager twin" in report["layers"]["note"]
