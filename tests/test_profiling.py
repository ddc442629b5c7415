"""Where the time goes (--profile DIR) and the change since an earlier run (--baseline OLD.json).

The CPU path runs the real scripts on the tiny model (torch.profiler, Chrome-trace JSON); the NPU path runs on the
stand-in torch_npu, whose profiler writes each wheel's CSV formats (tests/npu_profiler_standin.py); the names and
defaults the project relies on are checked against the real wheels' source (marked npu_contract, like
tests/test_npu_contract.py).
"""

from __future__ import annotations

import ast
import csv
import json
import re
import shutil

import npu_contract as contract
import npu_profiler_standin as prof_standin
import pytest
import torch
from card_fixtures import make_reports, working_folder
from conftest import read_json
from npu_standin import npu_standin_fixture  # noqa: F401  (the fixture)

from mobilevit_npu import baseline, devices, profiling, schema, timing
from mobilevit_npu.errors import UserError

PROFILED = {
    "accuracy.json": ("accuracy_run", ["model", "accuracy.json", "--device", "cpu", "--reference_cache", "off"]),
    "perf_a.json": (
        "accuracy_run_perf",
        ["model", "2", "perf_a.json", "--device", "cpu", "--warmup", "0", "--profile", "prof", "--profile_steps", "1"],
    ),
}


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, tiny_model_dir):
    """The tiny model benchmarked with --profile by the real script; every timed call checked for a profiler."""
    folder = tmp_path_factory.mktemp("profiled")
    under_profiler = []
    original = timing.interleaved_samples

    def watched(calls, *args, **kwargs):
        def wrap(fn):
            def call():
                under_profiler.append(torch.autograd._profiler_enabled())
                return fn()

            return call

        return original({k: wrap(f) for k, f in calls.items()}, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(timing, "interleaved_samples", watched)
    try:
        make_reports(folder, tiny_model_dir, PROFILED)
    finally:
        mp.undo()
    return folder, under_profiler


# ------------------------------------------------------------------------------------------------ classes


@pytest.mark.parametrize(
    "name, cls",
    [
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::_slow_conv2d_forward", "convolution"),
        ("Conv2D", "convolution"),
        ("aten::addmm", "matmul"),
        ("MatMulV2", "matmul"),
        ("aten::bmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("FlashAttentionScore", "attention"),
        ("aten::_softmax", "attention"),
        ("aten::native_layer_norm", "normalisation"),
        ("BNInfer", "normalisation"),
        ("aten::silu_", "elementwise"),
        ("Add", "elementwise"),
        ("aten::copy_", "data movement"),
        ("TransData", "data movement"),
        ("aten::_convert_indices_from_coo_to_csr", "data movement"),
        ("aten::linear", "matmul"),
        ("SomethingNew", "other"),
    ],
)
def test_operator_classes(name, cls):
    assert profiling.op_class(name) == cls


# ------------------------------------------------------------------------------------------------ the CPU, for real


def test_profile_writes_chrome_traces_and_a_profile_section(profiled):
    folder, under_profiler = profiled
    data = read_json(folder / "perf_a.json")  # checked against the schema
    section = data["profile"]
    assert section["tool"] == "torch.profiler"
    (result,) = section["results"]
    assert result["status"] == "ok" and result["mode"] == "eager"
    trace = folder / result["trace"]
    assert trace.parent == folder / "prof" and trace.name == "eager-batch1.pt.trace.json"
    assert profiling.check_chrome_trace(str(trace)) > 10  # Perfetto's JSON importer reads these events
    top = result["top_operators"]
    assert top and sum(op["self_ms"] for op in top) <= result["step_ms"]
    assert result["operators_ms"] <= result["step_ms"] * 1.0001
    assert all(op["op_class"] in profiling.CLASSES for op in top)
    ranked = sorted(result["classes_ms"], key=result["classes_ms"].get, reverse=True)
    assert "convolution" in ranked[:3]  # MobileViT's eager forward: the convolutions lead
    assert result["host_device"]["device_idle_ms"] >= 0


def test_time_the_profiler_cannot_see_is_named(tmp_path):
    """Compiled code (AOTInductor) runs kernels no operator records: the profile says so instead of a silent 0%."""
    profiler = profiling.Profiler(str(tmp_path / "prof"), devices.Device("cpu"), steps=1)
    result = profiler.profile(lambda: sum(i * i for i in range(20000)), "fast", 1)
    assert result.status == "ok" and result.operators_ms < 0.5 * result.step_ms
    assert result.notes and "does not see" in result.notes[0]
    assert "note: operators cover" in profiling.format_profile(profiler.section())


def test_no_timed_sample_runs_under_the_profiler(profiled):
    _, under_profiler = profiled
    assert under_profiler and not any(under_profiler)


def test_profile_dir_that_is_not_empty_is_refused(tmp_path, tiny_model_dir, capsys):
    import accuracy_run_perf

    (tmp_path / "prof").mkdir()
    (tmp_path / "prof" / "mine.txt").write_text("keep")
    code = accuracy_run_perf.main(
        [str(tiny_model_dir), "1", str(tmp_path / "r.json"), "--device", "cpu", "--profile", str(tmp_path / "prof")]
    )
    assert code == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "prof" / "mine.txt").read_text() == "keep" and not (tmp_path / "r.json").exists()


def test_baseline_prints_and_keeps_the_change_table(profiled, tiny_model_dir, capsys):
    import accuracy_run_perf

    folder, _ = profiled
    with working_folder(folder):
        code = accuracy_run_perf.main(
            ["model", "2", "perf_b.json", "--device", "cpu", "--warmup", "0", "--baseline", "perf_a.json"]
        )
    assert code == 0
    out = capsys.readouterr().out
    assert "against the baseline perf_a.json" in out and "old p50" in out
    data = read_json(folder / "perf_b.json")
    (row,) = data["baseline"]["rows"]
    old = read_json(folder / "perf_a.json")["results"][0]
    assert row["old_p50_ms"] == pytest.approx(old["latency_ms"]["p50"])
    assert row["new_p50_ms"] == pytest.approx(data["results"][0]["latency_ms"]["p50"])
    assert row["verdict"] in ("regression", "improvement", "within spread")
    assert data["profile"] is None


def test_baseline_of_other_weights_is_refused_before_the_run(profiled, capsys, monkeypatch):
    import accuracy_run_perf
    from mobilevit_npu import bench

    folder, _ = profiled
    old = json.loads((folder / "perf_a.json").read_text())
    old["model_source"]["sha256"] = "0" * 64
    (folder / "other.json").write_text(json.dumps(old))
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("the benchmark ran"))
    with working_folder(folder):
        code = accuracy_run_perf.main(["model", "1", "refused.json", "--device", "cpu", "--baseline", "other.json"])
    assert code == 2
    err = capsys.readouterr().err
    assert "other weights" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "refused.json").exists()


def test_card_shows_where_the_time_goes(profiled):
    from mobilevit_npu import card

    folder, _ = profiled
    with working_folder(folder):
        built = card.build_card(["accuracy.json", "perf_a.json"], "both", model_path="model")
    assert "#### Where the time goes on `cpu`" in built.text and "#### `cpu` 上的耗时分布" in built.text
    assert "| convolution |" in built.text.split("Where the time goes on")[1].split("\n\n")[2]
    assert any(name.startswith("card_assets/profile-") for name in built.files)


# ------------------------------------------------------------------------------------------------ baseline rules


def _result(mode, p50, spread, batch=1):
    samples = [p50 - spread / 2, p50 - spread / 4, p50, p50 + spread / 4, p50 + spread / 2]
    return {
        "mode": mode,
        "batch_size": batch,
        "dtype": "fp32",
        "end_to_end": False,
        "status": "ok",
        "latency_ms": {"p50": p50},
        "throughput_images_per_s": batch * 1000 / p50,
        "samples_ms": samples,
    }


def test_a_change_counts_only_beyond_both_runs_spread():
    rows = baseline.compare(
        [_result("eager", 10.0, 1.0), _result("fast", 10.0, 4.0), _result("compiled", 10.0, 0.4)],
        [_result("eager", 12.0, 1.0), _result("fast", 11.5, 1.0), _result("compiled", 9.0, 0.4), _result("bf16", 5, 1)],
    )
    verdict = {r.mode: r.verdict for r in rows}
    assert verdict == {
        "eager": "regression",  # +2 ms against spreads of 0.5 ms
        "fast": "within spread",  # +1.5 ms, but the baseline's own spread is 2 ms
        "compiled": "improvement",
        "bf16": "only in this run",
    }
    eager = next(r for r in rows if r.mode == "eager")
    assert eager.p50_change == pytest.approx(0.2) and eager.images_per_s_change == pytest.approx(10 / 12 - 1)


@pytest.mark.parametrize(
    "change, word",
    [
        ({"model_source": {"sha256": "b" * 64}}, "weights"),
        ({"device": "cuda:0"}, "device"),
        ({"environment": {"device_name": "cpu", "torch": "2.5.1"}}, "stack (torch)"),
    ],
)
def test_other_weights_devices_or_stacks_are_refused(change, word):
    old = {
        "model_source": {"sha256": "a" * 64},
        "device": "cpu",
        "environment": {"device_name": "cpu", "torch": "2.13.0"},
    }
    new = {**old, **change}
    baseline.check_comparable(old, old, "old.json")
    with pytest.raises(UserError, match=re.escape(f"other {word}")):
        baseline.check_comparable(old, new, "old.json")


# ------------------------------------------------------------------------------------------------ the NPU (stand-in)


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10), torch.nn.Softmax(-1)
    ).eval()


@pytest.mark.parametrize("version", prof_standin.VERSIONS)
def test_npu_profile_reads_each_wheels_output(npu_standin, tmp_path, version):  # noqa: F811
    npu_standin(version=version, aicpu_ops=["aten::_softmax"], fallback_ops=["aten::sinc"])
    net, x = _tiny_net(), torch.randn(2, 3, 8, 8)
    profiler = profiling.Profiler(str(tmp_path / "prof"), devices.Device("npu", 0), steps=2)
    with torch.no_grad():
        result = profiler.profile(lambda: net(x), "eager", 2)
    assert result.status == "ok", result.reason
    section = profiler.section()
    # as used, read back from the config: the same whatever the wheel's defaults
    assert section.settings["profiler_level"] == "Level1"
    assert section.settings["aic_metrics"] == "ACL_AICORE_PIPE_UTILIZATION"
    assert section.settings["export_type"] == ["text"]
    columns = result.npu.kernel_details_columns
    assert ("Device_id" in columns) is (version != "2.5.1")
    assert columns[0] == "Step Id" and "HF32 Eligible" in columns
    names = {op.name for op in result.top_operators}
    assert {"Conv2D", "MatMulV2"} <= names
    assert result.classes_ms["convolution"] > 0 and result.classes_ms["matmul"] > 0
    assert "Conv2D" in result.npu.hf32_eligible and "MatMulV2" not in result.npu.hf32_eligible  # conv HF32 on
    assert 0 < result.npu.ai_cpu_share < 1 and result.npu.core_types_ms["AI_CPU"] > 0
    assert result.host_device.basis.startswith("step_trace_time.csv")
    # the stand-in's Free is a quarter of busy (the CSV's microseconds carry float32 rounding)
    assert result.host_device.device_idle_share == pytest.approx(0.2, rel=1e-5)
    profiling.add_fallbacks(section, ["aten::sinc"])
    (cost,) = result.npu.cpu_fallbacks
    assert cost.operator == "aten::sinc" and cost.calls == 1 and cost.host_ms == pytest.approx(0.15)
    schema.validate(_benchmark_json(section), "a report with an NPU profile")


def test_npu_profiler_that_writes_nothing_is_unavailable(npu_standin, tmp_path):  # noqa: F811
    npu_standin(version="2.13.0", profiler_fails=True)
    net, x = _tiny_net(), torch.randn(1, 3, 8, 8)
    profiler = profiling.Profiler(str(tmp_path / "prof"), devices.Device("npu", 0), steps=1)
    with torch.no_grad():
        result = profiler.profile(lambda: net(x), "eager", 1)
    assert result.status == "unavailable" and "no kernel_details.csv" in result.reason


def _benchmark_json(section) -> dict:
    """The smallest benchmark report around a profile section, through the schema."""
    from mobilevit_npu import reports

    return {
        "schema_version": schema.SCHEMA_VERSION,
        "kind": "benchmark",
        "tool": "t",
        "argv": [],
        "model_source": {"name": "m"},
        "synthetic": False,
        "preprocessing": None,
        "environment": {f.name: None for f in schema.dataclasses.fields(schema.Environment)}
        | {
            "device": "npu:0",
            "device_name": "x",
            "cpu": "x",
            "python": "3",
            "platform": "p",
            "torch": "2",
            "transformers": "5",
            "fp32_precision": {},
            "torch_threads": 1,
            "torch_interop_threads": 1,
            "mkldnn": True,
            "allocator": {},
        },
        "provenance": {"commit": "c", "packages_sha256": "0", "packages": {}},
        "device": "npu:0",
        "settings": {"iterations": 1, "warmup": 0, "batch_sizes": [1], "modes": ["eager"], "dtype": "fp32"}
        | {key: "x" for key in ("percentiles", "synchronized", "throughput", "exact")}
        | {"end_to_end": False, "interleaved": True},
        "results": [],
        "profile": reports.json_safe(section),
    }


@pytest.mark.parametrize("version", prof_standin.VERSIONS)
@pytest.mark.parametrize("level, aic", [("Level0", "ACL_AICORE_NONE"), ("Level1", "ACL_AICORE_PIPE_UTILIZATION")])
@pytest.mark.parametrize("steps", [True, False])
def test_kernel_details_read_by_header_name_in_every_variant(tmp_path, version, level, aic, steps):
    header, read = prof_standin.kernel_details_header(version, level, aic, steps)
    values = {"Op Name": "conv_1", "OP Type": "Conv2D", "Task Type": "AI_CORE", "Task Duration(us)": "250.0",
              "HF32 Eligible": "YES", "Device_id": "0"}  # fmt: skip
    path = tmp_path / "kernel_details.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for step in ("1", "2"):
            writer.writerow(([step] if steps else []) + [values.get(c, "0") for c in read])
            aicpu = {
                **values,
                "OP Type": "AI_CPU_Op",
                "Task Type": "AI_CPU",
                "Task Duration(us)": "50",
                "HF32 Eligible": "NO",
            }
            writer.writerow(([step] if steps else []) + [aicpu.get(c, "0") for c in read])
    parsed = profiling.parse_kernel_details(str(path), steps=2)
    assert parsed["ops"]["Conv2D"] == (1.0, 0.25)
    assert parsed["by_core"] == {"AI_CORE": 0.25, "AI_CPU": 0.05}
    assert (parsed["hf32"] == {"Conv2D"}) is ("HF32 Eligible" in header)


# ------------------------------------------------------------------------------------------------ the real wheels

PROFILER_NAMES = [
    "torch_npu.profiler._ExperimentalConfig",
    "torch_npu.profiler.ProfilerLevel.Level1",
    "torch_npu.profiler.AiCMetrics.PipeUtilization",
    "torch_npu.profiler.ExportType.Text",
    "torch_npu.profiler.schedule",
    "torch_npu.profiler.tensorboard_trace_handler",
    "torch_npu.profiler.profile",
    "torch_npu.profiler._ExperimentalConfig()._aic_metrics",
    "torch_npu.profiler._ExperimentalConfig()._profiler_level",
    "torch_npu.profiler._ExperimentalConfig().export_type",
]


@pytest.fixture(scope="module", params=contract.VERSIONS)
def wheel_source(request) -> contract.Source:
    try:
        wheel = contract.fetch_wheel(request.param)
    except contract.WheelUnavailable as exc:
        if contract.required():
            pytest.fail(f"CI must check the NPU contract, but the wheel could not be fetched: {exc}")
        pytest.skip(f"torch-npu {request.param} wheel not reachable here ({exc}); CI runs this")
    source = contract.Source(contract.unpack_sources(wheel))
    source.version = request.param
    return source


@pytest.mark.npu_contract
def test_the_profiler_names_hold_in_the_real_wheel(wheel_source):
    uses = [u for u in contract.collect_uses() if u.where.startswith("mobilevit_npu/profiling.py")]
    dotted = {u.dotted() for u in uses}
    missing = [n for n in PROFILER_NAMES if n not in dotted]
    assert not missing, f"not collected from profiling.py: {missing}"
    problems = [p for u in uses if (p := contract.check_use(wheel_source, u))]
    assert not problems, f"torch-npu {wheel_source.version}:\n" + "\n".join(problems)


def _module_tree(source: contract.Source, name: str) -> ast.Module:
    return ast.parse(source.files[name].read_text(encoding="utf-8"))


def _constant_lists(tree: ast.Module) -> dict[str, list]:
    """NAME = [literal strings] assignments anywhere in a module (class bodies included)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    items = [
                        e.value if isinstance(e, ast.Constant) else getattr(e, "id", None) for e in node.value.elts
                    ]
                    out[target.id] = items
    return out


@pytest.mark.npu_contract
def test_the_stand_in_writes_the_wheels_headers(wheel_source):
    v = wheel_source.version
    analysis = "torch_npu.profiler.analysis."
    headers = _constant_lists(_module_tree(wheel_source, analysis + "prof_common_func._csv_headers"))
    start = {"TASK_START_TIME": "Task Start Time(us)"}
    assert [start.get(h, h) for h in headers["OP_SUMMARY_SHOW_HEADERS"]] == prof_standin.SHOW_HEADERS[v]
    assert headers["OP_SUMMARY_KERNEL_BASE_HEADERS"] == prof_standin.KERNEL_BASE_HEADERS[v]
    assert headers.get("OP_SUMMARY_ADDITIONAL_HEADERS", []) == prof_standin.ADDITIONAL_HEADERS[v]
    common = _constant_lists(_module_tree(wheel_source, analysis + "prof_bean._common_bean"))
    assert common.get("FILTER_COL_LIST", []) == prof_standin.FILTERED[v]
    step = _constant_lists(_module_tree(wheel_source, analysis + "prof_view._trace_step_time_parser"))
    assert step["title"] == prof_standin.STEP_TRACE_TITLE[v]
    operator = _constant_lists(_module_tree(wheel_source, analysis + "prof_view._operator_view_parser"))
    assert operator["OPERATOR_HEADERS"] == prof_standin.OPERATOR_HEADERS


@pytest.mark.npu_contract
def test_the_profiler_defaults_moved_between_wheels(wheel_source, npu_standin):  # noqa: F811
    """aic_metrics AicMetricsNone then PipeUtilization, export_type None then Text: read from the wheel, imitated by
    the stand-in, and made irrelevant by passing them explicitly (profiling.py)."""
    tree = _module_tree(wheel_source, "torch_npu.profiler.experimental_config")
    init = next(
        fn
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef) and cls.name == "_ExperimentalConfig"
        for fn in cls.body
        if isinstance(fn, ast.FunctionDef) and fn.name == "__init__"
    )
    args = init.args.args[1:]
    defaults = dict(zip([a.arg for a in args][-len(init.args.defaults) :], init.args.defaults))
    aic, export = ast.unparse(defaults["aic_metrics"]), ast.unparse(defaults["export_type"])
    old = wheel_source.version == "2.5.1"
    assert aic == ("Constant.AicMetricsNone" if old else "Constant.AicPipeUtilization")
    assert export == ("None" if old else "ExportType.Text")
    npu_standin(version=wheel_source.version)
    import torch_npu.profiler as standin_profiler

    config = standin_profiler._ExperimentalConfig(profiler_level=standin_profiler.ProfilerLevel.Level1)
    assert config._aic_metrics == "ACL_AICORE_PIPE_UTILIZATION"  # 2.5.1 turns None into it above Level0 (l.70-72)
    assert config.export_type == ["text"]  # 2.5.1 turns None into [text] (_conver_export_type_to_list)


def test_inference_profile_needs_benchmark(capsys):
    import inference

    with pytest.raises(SystemExit) as exit_:
        inference.main(["--image", "x.png", "--profile", "prof"])
    assert exit_.value.code == 2
    assert "--profile goes with --benchmark" in capsys.readouterr().err


def test_profile_folder_inside_the_model_is_refused(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    with pytest.raises(UserError, match="inside the model folder"):
        profiling.check_profile_dir(str(copy / "prof"), str(copy))
