"""The NPU path against a stand-in torch_npu that behaves like the real one where it matters (tests/npu_standin.py):
autoload at `import torch`, the lazy torchair, transfer_to_npu, HF32 defaults, CPU fallbacks, channels_last, flash
attention under torchair, graph mode, version pairing, and the order of the start-up steps in each script."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import warnings

import npu_standin as standin
import pytest
import torch
from conftest import PHOTOS, ROOT, read_json
from npu_standin import npu_standin_fixture  # noqa: F401  (the npu_standin fixture)

import accuracy_run
import accuracy_run_perf
import inference
from mobilevit_npu import bench, compilers, devices, execution, fastpath, models, npu, startup
from mobilevit_npu.errors import Unavailable, UserError

NPU = devices.Device("npu", 0)


def _tiny(tiny_model_dir, device=NPU):
    return models.load_model(str(tiny_model_dir), device, "fp32")


# --- 1. autoload: `import torch` fails before any project code runs ---------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [  # each command parses, then fails right after `import torch` (a usage check that needs the run's modules), so
        # the autoload's failure is what it meets first; --help imports no torch (tests/test_first_hour.py)
        ["inference.py", "--benchmark", "--profile", "readme.md"],
        ["accuracy_run.py", "./model", "r.json", "--onnx", "x.onnx"],
        ["accuracy_run_perf.py", "./model", "1", "r.json", "--modes", "no_such_mode"],
        ["port_report.py", "r.json", "--assets", "/card_assets"],
        ["export_onnx.py", "./model", "x.onnx", "--soc_version", "not-a-soc"],
        ["-m", "benchmarks.bench_peers", "--help"],
    ],
)
def test_failed_torch_npu_autoload_is_one_line_naming_both_ways_out(tmp_path, script):
    folder = standin.build(tmp_path / "site", autoload_fails=True)
    env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    args = [sys.executable, *script]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "set_env.sh" in lines[0] and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in lines[0] and "libhccl.so" in lines[0]
    # the second way out works: the autoload off, the same command gets past `import torch` to its own answer
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == (0 if "--help" in script else 2), out.stderr
    assert "set_env.sh" not in out.stderr and "Traceback" not in out.stderr, out.stderr


# --- 2. torchair never fails to import; its failure comes at first use ------------------------------------------------


def test_broken_torchair_makes_compiled_modes_unavailable_not_the_run(npu_standin, tiny_model_dir):
    npu_standin(torchair_broken=True)
    device = devices.resolve_device("npu")
    import torchair  # the lazy placeholder torch_npu installed: the import itself succeeds

    with pytest.raises(Exception) as info:
        torchair.CompilerConfig()
    assert not isinstance(info.value, ImportError)  # _TorchairImportError, as in torch_npu 2.5.1
    results = bench.run_benchmark(
        _tiny(tiny_model_dir),
        device,
        modes=["eager", "compiled", "npugraph"],
        iterations=1,
        warmup=0,
        progress=False,
        measure_roofline=False,
    )
    rows = {r["mode"]: r for r in results}
    assert rows["eager"]["status"] == "ok"
    for mode in ("compiled", "npugraph"):
        assert rows[mode]["status"] == "unavailable"
        assert "_TorchairImportError" in rows[mode]["reason"] and "google.protobuf" in rows[mode]["reason"]


def test_broken_torchair_is_a_one_line_error_in_accuracy_run(npu_standin, tiny_model_dir, tmp_path, capsys):
    npu_standin(torchair_broken=True)
    argv = [str(tiny_model_dir), str(tmp_path / "r.json"), "--device", "npu", "--target_mode", "compiled"]
    assert accuracy_run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchair" in err[0] and "google.protobuf" in err[0]
    assert not (tmp_path / "r.json").exists()


# --- 3. fp32 means fp32 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "expected"), [([], (False, False)), (["--allow_hf32"], (True, False))])
def test_accuracy_run_fp32_on_npu_turns_hf32_off_unless_asked(npu_standin, tiny_model_dir, tmp_path, extra, expected):
    npu_standin()
    report = tmp_path / "r.json"
    argv = [str(tiny_model_dir), str(report), "--device", "npu", "--images", PHOTOS[0], *extra]
    assert accuracy_run.main(argv) == 0
    precision = read_json(report)["environment"]["fp32_precision"]
    assert (precision["conv_hf32"], precision["matmul_hf32"]) == expected
    assert read_json(report)["reference_environment"]["fp32_precision"] == {"float32_matmul_precision": "highest"}


def test_benchmark_leaves_the_npu_default_and_records_it(npu_standin, tiny_model_dir, tmp_path):
    npu_standin()
    report = tmp_path / "perf.json"
    argv = [str(tiny_model_dir), "1", str(report), "--device", "npu", "--warmup", "0"]
    assert accuracy_run_perf.main(argv) == 0
    assert read_json(report)["environment"]["fp32_precision"] == {"conv_hf32": True, "matmul_hf32": False}


# --- 4/5. channels_last refused; BatchNorm folding --------------------------------------------------------------------


def test_channels_last_target_on_npu_is_refused(npu_standin, tiny_model_dir, tmp_path, capsys):
    npu_standin()
    argv = [str(tiny_model_dir), str(tmp_path / "r.json"), "--device", "npu", "--target_mode", "channels_last"]
    assert accuracy_run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "channels" in err[0] and "npu" in err[0]


def test_batchnorm_folding_never_makes_float64_on_the_device(tiny_model_dir, monkeypatch):
    """The folding reads each tensor once onto the CPU in float64 (Tensor.to("cpu", float64)); no float64 arithmetic
    is asked of the tensor's own device (spied: .double() on a parameter is what the old code did)."""
    model = _tiny(tiny_model_dir, devices.Device("cpu")).model
    calls = []
    original = torch.Tensor.double
    monkeypatch.setattr(torch.Tensor, "double", lambda self, *a, **k: calls.append(self.device) or original(self))
    fast = fastpath.build_fast_model(model, channels_last=False)
    assert calls == []
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(pixel_values=x).logits, atol=1e-4)


# --- 6. flash attention under torchair -------------------------------------------------------------------------------


def test_math_attention_matches_sdpa(tiny_model_dir):
    model = _tiny(tiny_model_dir, devices.Device("cpu")).model
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        sdpa = fastpath.build_fast_model(model, channels_last=False)(x)
        math_ = fastpath.build_fast_model(model, channels_last=False, math_attention=True)(x)
    assert torch.allclose(sdpa, math_, atol=1e-5)


def _torchair_without_sdpa_converter(fn, device, name, example, cpp_wrapper=False, npu_mode="max-autotune"):
    """compilers.compile_for as torchair 7.0.0 behaves: no converter for the flash SDPA (NotImplementedError)."""
    module = fn if hasattr(fn, "modules") else (fn.__defaults__ or [None])[0]  # bf16: the autocast wrapper's _fast
    layers = [m for m in module.modules() if isinstance(m, fastpath.TransformerLayer)]
    if any(not layer.math_attention for layer in layers):
        raise Unavailable(
            "torch.compile failed (NotImplementedError: no converter for aten._scaled_dot_product_flash_attention)"
        )
    return fn, 0.5, ["torchair GE graph (CompilerConfig defaults)"]


def test_fast_falls_back_to_math_attention_when_torchair_rejects_sdpa(npu_standin, tiny_model_dir):
    """Through torch.compile and the stand-in torchair, whose backend refuses the SDPA as torchair 7.0.0 does."""
    s = npu_standin(reject_flash_attention=True)
    device = devices.resolve_device("npu")
    model = _tiny(tiny_model_dir).model
    prepared = execution.prepare_mode("fast", model, device, "fp32", torch.zeros(1, 3, 256, 256))
    assert any("fell back to math attention" in n for n in prepared.notes), prepared.notes
    assert any("scaled_dot_product_flash_attention" in n for n in prepared.notes), prepared.notes
    assert "torchair compiled a graph (mode=max-autotune)" in s.calls
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(prepared.call(x), model(pixel_values=x).logits, atol=1e-4)


def test_fast_fallback_keeps_bf16_autocast(npu_standin, tiny_model_dir, monkeypatch):
    npu_standin()
    monkeypatch.setattr(compilers, "compile_for", _torchair_without_sdpa_converter)
    device = devices.resolve_device("npu")
    model = _tiny(tiny_model_dir).model
    prepared = execution.prepare_mode("bf16", model, device, "fp32", torch.zeros(1, 3, 256, 256))
    assert any("fell back to math attention" in n for n in prepared.notes), prepared.notes
    assert prepared.compile_s == 0.5
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        out = prepared.call(x)
    assert out.dtype == torch.float32  # bf16 autocast inside, float logits out, as the SDPA version
    assert torch.nn.functional.cosine_similarity(out, model(pixel_values=x).logits).min() > 0.99


def test_fast_runs_uncompiled_when_torchair_cannot_compile_it_at_all(npu_standin, tiny_model_dir, monkeypatch):
    npu_standin()

    def refuse(*args, **kwargs):
        raise Unavailable("torch.compile failed (RuntimeError: GE graph build failed)")

    monkeypatch.setattr(compilers, "compile_for", refuse)
    device = devices.resolve_device("npu")  # torch_npu first, as in the scripts
    prepared = execution.prepare_mode("fast", _tiny(tiny_model_dir).model, device, "fp32", torch.zeros(1, 3, 256, 256))
    assert prepared.compile_s is None and any("fell back to fast uncompiled" in n for n in prepared.notes)


# --- 7. transfer_to_npu repoints torch.cuda --------------------------------------------------------------------------


def test_after_transfer_to_npu_cuda_is_the_npu_and_is_refused(npu_standin):
    npu_standin()
    devices.resolve_device("npu")
    assert torch.cuda.is_available()  # what the real transfer_to_npu does
    with pytest.raises(UserError, match="transfer_to_npu"):
        devices.resolve_device("cuda")


# --- 8. CPU fallbacks: seen where torch_npu prints them (file descriptor 2, from C++) ---------------------------------


@pytest.fixture(autouse=True)
def _fallback_environment(monkeypatch):
    """Each test starts without torch_npu's switches and gets back whatever it set (arm_fallback_error writes
    os.environ): a leaked TORCH_NPU_FALLBACK_CPU_DISABLE=1 would turn later tests' fallbacks into errors."""
    for name in ("TORCH_NPU_FALLBACK_CPU_DISABLE", "TORCH_NPU_DISABLED_WARNING", "TORCH_NPU_WARNING_DISABLE", "RANK"):
        monkeypatch.delenv(name, raising=False)


ALL_WORDING_OPERATORS = sorted(op for ops in standin.WORDING_OPERATORS.values() for op in ops)


def test_every_wording_written_natively_is_captured_and_other_lines_pass(capfd):
    with npu.CpuFallbacks(NPU) as fb:
        for text in standin.WORDINGS.values():
            standin.emit_c10_warning(text)
        standin.native_write(b"an ordinary native line\n")
        print("an ordinary Python line", file=sys.stderr)
    assert fb.operators == ALL_WORDING_OPERATORS
    assert fb.summary() == {
        "device": "npu:0",
        "status": "observed",
        "operators": ALL_WORDING_OPERATORS,
        "note": npu.NOTE,
        "error_switch": None,
    }
    assert "once per operator per process" in fb.summary()["note"]
    err = capfd.readouterr().err
    assert "an ordinary native line\n" in err and "an ordinary Python line\n" in err
    assert "CAUTION" not in err and "fall back" not in err  # the fallback lines are in the report, not on the console
    assert "7 operator(s) ran on the CPU: aten::_fused_adam_, " in fb.line()


@pytest.mark.parametrize("name", list(standin.WORDINGS))
def test_each_wording_names_its_operators(name):
    line = standin.c10_warning_line(standin.WORDINGS[name]).decode()
    assert npu.fallback_operators(line) == standin.WORDING_OPERATORS[name]
    assert npu.fallback_operators(line.replace("aten::", "aten:")) == []  # the operator is read, not assumed


def test_a_python_warning_with_the_same_text_is_not_counted_twice(capfd):
    """The same text shown as Python's default warnings.showwarning shows it (formatwarning, on stderr: fd 2 outside
    pytest, whose capfd sends sys.stderr elsewhere) as well as by C++."""
    text = standin.WORDINGS["dispatcher"]
    with npu.CpuFallbacks(NPU) as fb:
        standin.emit_c10_warning(text)
        os.write(2, warnings.formatwarning(text, UserWarning, "model.py", 7).encode())
    assert fb.operators == ["aten::_fused_adam_"]
    assert "CAUTION" not in capfd.readouterr().err


def test_the_standin_warns_natively_once_per_operator_not_through_python_warnings(npu_standin, tiny_model_dir):
    npu_standin(fallback_ops=["aten::_foo_op", "aten::_bar_op.out"])
    model = _tiny(tiny_model_dir, devices.resolve_device("npu")).model
    lines = []
    with warnings.catch_warnings(record=True) as hooked:
        warnings.simplefilter("always")
        tap = npu.StderrTap(lines.append, is_match=lambda line: True).start()
        try:
            with torch.no_grad():
                for _ in range(3):
                    model(pixel_values=torch.zeros(1, 3, 256, 256))
        finally:
            tap.stop()
    assert [w for w in hooked if "NPU backend" in str(w.message)] == []  # Python's warnings see nothing
    caution = [line for line in lines if "CAUTION" in line]
    assert len(caution) == 2, lines  # once per operator, not per forward
    assert caution[0].startswith("[W") and "] Warning: CAUTION: The operator 'aten::_foo_op'" in caution[0]
    assert caution[0].endswith("(function npu_cpu_fallback)")


@pytest.mark.parametrize(
    ("env", "status", "line"),
    [
        ({"TORCH_NPU_DISABLED_WARNING": "1"}, "silenced", "silenced"),
        ({"RANK": "1"}, "not observable on this rank", "rank 0 only"),
        ({"RANK": "0"}, "observed", "aten::_foo_op"),
    ],
)
def test_what_torch_npu_prints_decides_what_the_report_can_say(
    npu_standin, tiny_model_dir, monkeypatch, capfd, env, status, line
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    npu_standin(fallback_ops=["aten::_foo_op"])
    model = _tiny(tiny_model_dir, devices.resolve_device("npu")).model
    before = os.fstat(2)
    with npu.CpuFallbacks(NPU) as fb, torch.no_grad():
        redirected = _identity(os.fstat(2)) != _identity(before)
        model(pixel_values=torch.zeros(1, 3, 256, 256))
    assert fb.summary()["status"] == status and line in fb.line()
    assert redirected == (status == "observed")  # nothing to capture: fd 2 left alone
    assert fb.operators == (["aten::_foo_op"] if status == "observed" else [])
    assert "CAUTION" not in capfd.readouterr().err  # silenced and other ranks print nothing, as torch_npu


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_ino, stat.st_dev


def test_off_npu_nothing_is_captured():
    fb = npu.CpuFallbacks(devices.Device("cpu"))
    with fb:
        pass
    assert fb.line() is None and fb.summary()["status"] == "not an npu" and fb.fail_reason() is None


def test_stderr_is_restored_after_an_exception():
    before = _identity(os.fstat(2))
    with pytest.raises(ValueError), npu.CpuFallbacks(NPU):
        assert _identity(os.fstat(2)) != before
        raise ValueError("boom")
    assert _identity(os.fstat(2)) == before


def test_a_partial_line_reaches_the_original_promptly():
    """A progress bar without its newline is not held until the end of the run (at most HOLD_S)."""
    read_end, write_end = os.pipe()
    tap = npu.StderrTap(npu.fallback_operators, fd=write_end).start()
    try:
        os.write(write_end, b"progress 50%")
        ready, _, _ = select.select([read_end], [], [], 2.0)
        assert ready and os.read(read_end, 100) == b"progress 50%"
        os.write(write_end, b" done\n")
        ready, _, _ = select.select([read_end], [], [], 2.0)
        assert ready and os.read(read_end, 100) == b" done\n"
    finally:
        tap.stop()
        os.close(write_end)
        os.close(read_end)


CRASH = r"""
import faulthandler, os, sys
sys.path[:0] = [{tests!r}]
import npu_standin
from mobilevit_npu import devices, npu
faulthandler.enable()
fb = npu.CpuFallbacks(devices.Device("npu", 0)).__enter__()
npu_standin.native_write(b"before the end\n")
{ending}
"""


@pytest.mark.parametrize(
    ("ending", "expected"),
    [
        ("faulthandler._sigsegv()", "Fatal Python error"),  # a crash: faulthandler writes to the real stderr
        ("raise SystemExit('left without __exit__')", "left without __exit__"),  # atexit restores fd 2 first
        ("raise KeyError('unhandled')", "KeyError: 'unhandled'"),
    ],
)
def test_stderr_survives_a_crash_or_an_exit_inside_the_capture(tmp_path, ending, expected):
    script = tmp_path / "crash.py"
    script.write_text(CRASH.format(tests=str(ROOT / "tests"), ending=ending))
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert "before the end" in out.stderr and expected in out.stderr, out.stderr


def test_inference_reports_cpu_fallbacks(npu_standin, tiny_model_dir, tmp_path, capsys):
    npu_standin(fallback_ops=["aten::_foo_op"])
    out = tmp_path / "out.json"
    assert (
        inference.main(
            ["--model_path", str(tiny_model_dir), "--device", "npu", "--image", PHOTOS[0], "--output", str(out)]
        )
        == 0
    )
    fallbacks = read_json(out)["cpu_fallbacks"]
    assert fallbacks["operators"] == ["aten::_foo_op"] and fallbacks["status"] == "observed"
    assert "CPU fallbacks on npu:0: 1 operator(s) ran on the CPU: aten::_foo_op" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "code", "verdict"), [([], 0, "PASS"), (["--fail_on_cpu_fallback"], 1, "FAIL")])
def test_accuracy_run_lists_fallbacks_beside_the_verdict(
    npu_standin, tiny_model_dir, tmp_path, capsys, extra, code, verdict
):
    npu_standin(fallback_ops=["aten::_foo_op"], fallback_switch=False)  # as 2.5.1: no switch, judged from the capture
    report = tmp_path / "r.json"
    argv = [str(tiny_model_dir), str(report), "--device", "npu", "--images", PHOTOS[0], *extra]
    assert accuracy_run.main(argv) == code
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(f"VERDICT: {verdict}") and "aten::_foo_op" in lines[-2]
    data = read_json(report)
    assert data["verdict"] == verdict and data["cpu_fallbacks"]["operators"] == ["aten::_foo_op"]
    if extra:
        assert any("fell back to the CPU" in r for r in data["verdict_reasons"])


def test_the_fallback_switch_is_armed_where_torch_npu_reads_it(npu_standin, tiny_model_dir):
    npu_standin(fallback_ops=["aten::_foo_op"])  # 2.13.0 (this torch's version): reads TORCH_NPU_FALLBACK_CPU_DISABLE
    assert npu.arm_fallback_error(False) is None and "TORCH_NPU_FALLBACK_CPU_DISABLE" not in os.environ
    assert npu.arm_fallback_error(True) == "TORCH_NPU_FALLBACK_CPU_DISABLE=1"
    model = _tiny(tiny_model_dir, devices.resolve_device("npu")).model
    with pytest.raises(RuntimeError, match="aten::_foo_op") as info, npu.CpuFallbacks(NPU) as fb, torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, 256, 256))
    assert fb.refused == ["aten::_foo_op"] and fb.summary()["error_switch"] == "TORCH_NPU_FALLBACK_CPU_DISABLE=1"
    assert "aten::_foo_op" in fb.fail_reason() and fb.operators == []
    assert npu.refusal(info.value).startswith("aten::_foo_op has no NPU kernel and TORCH_NPU_FALLBACK_CPU_DISABLE=1")
    assert npu.refusal(RuntimeError("something else")) is None


def test_without_the_switch_arming_leaves_the_environment_alone(npu_standin):
    npu_standin(version="2.5.1")  # torch-npu 2.5.1's library has no TORCH_NPU_FALLBACK_CPU_DISABLE
    assert npu.arm_fallback_error(True) is None and "TORCH_NPU_FALLBACK_CPU_DISABLE" not in os.environ
    fb = npu.CpuFallbacks(NPU)
    assert fb.fail_reason() is None and fb.summary()["error_switch"] is None


def test_silenced_warnings_without_a_switch_cannot_pass_fail_on_cpu_fallback(npu_standin, monkeypatch):
    npu_standin(version="2.5.1")
    monkeypatch.setenv("TORCH_NPU_DISABLED_WARNING", "1")
    with npu.CpuFallbacks(NPU) as fb:
        pass
    assert "cannot be checked" in fb.fail_reason()


def test_startup_sets_the_switch_before_torch_autoloads_torch_npu(tmp_path):
    folder = standin.build(tmp_path / "site", autoload=True)
    env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    env.pop("TORCH_NPU_FALLBACK_CPU_DISABLE", None)
    code = "import sys; import mobilevit_npu.startup; print(sys.modules['torch_npu'].AUTOLOAD_SWITCH)"
    for flag, expected in (("--fail_on_cpu_fallback", "1"), ("--fail-on-cpu-fallback", "1"), ("--other", "unset")):
        out = subprocess.run(
            [sys.executable, "-c", code, flag], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr


def test_a_cuda_torch_beside_torch_npu_gets_its_own_advice():
    cause = RuntimeError(
        "Two accelerators cannot be used at the same time in PyTorch: npu and cuda. You can install "
        "the cpu version of PyTorch to use your npu device, or use the cuda device with 'export "
        "TORCH_DEVICE_BACKEND_AUTOLOAD=0'."
    )
    exc = RuntimeError(
        "Failed to load the backend extension: torch_npu. You can disable extension auto-loading with "
        "TORCH_DEVICE_BACKEND_AUTOLOAD=0."
    )
    exc.__cause__ = cause
    message = startup.autoload_failure(exc)
    assert "CUDA build" in message and "download.pytorch.org/whl/cpu" in message and "set_env.sh" not in message
    exc.__cause__ = ImportError("libhccl.so: cannot open shared object file")
    assert "set_env.sh" in startup.autoload_failure(exc)


# --- graph mode ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "mode"), [("2.13.0", "npugraph_ex"), ("2.5.1", "reduce-overhead")])
def test_npugraph_uses_npugraph_ex_where_torchair_offers_it(npu_standin, version, mode):
    s = npu_standin(version=version)
    kwargs, _, notes = compilers._backend(devices.resolve_device("npu"), False, "reduce-overhead")
    assert callable(kwargs["backend"]) and f'mode="{mode}"' in notes[0] and "aclgraph" in notes[0]
    assert f"torchair backend mode={mode}" in s.calls
    assert "npugraph" in execution.available_modes(NPU)
    assert "npugraph" not in execution.available_modes(devices.Device("cpu"))


@pytest.mark.parametrize("miscompile", [False, True])
def test_npugraph_is_a_benchmark_mode_with_its_own_agreement(npu_standin, tiny_model_dir, miscompile):
    """The agreement is measured on what the graph returns: a graph engine that gets the numbers wrong (the stand-in
    torchair's `miscompile`) is reported as not exact, never assumed to agree."""
    s = npu_standin(miscompile=miscompile)
    device = devices.resolve_device("npu")
    results = bench.run_benchmark(
        _tiny(tiny_model_dir),
        device,
        modes=["eager", "npugraph"],
        iterations=1,
        warmup=0,
        progress=False,
        measure_roofline=False,
    )
    row = {r["mode"]: r for r in results}["npugraph"]
    assert row["status"] == "ok" and row["exact"] is (not miscompile), row["agreement"]
    assert (row["agreement"]["max_abs_diff"] > 0.09) is miscompile
    assert any('mode="npugraph_ex"' in n for n in row["notes"]), row["notes"]  # the report says which mode ran
    assert "torchair compiled a graph (mode=npugraph_ex)" in s.calls


def test_npugraph_is_unavailable_where_torchair_lacks_the_mode(npu_standin):
    npu_standin(torchair_modes=["max-autotune"])
    with pytest.raises(Unavailable, match="reduce-overhead"):
        compilers._backend(devices.resolve_device("npu"), False, "reduce-overhead")


def test_npugraph_target_off_npu_is_refused(tiny_model_dir, tmp_path):
    argv = [str(tiny_model_dir), str(tmp_path / "r.json"), "--device", "cpu", "--target_mode", "npugraph"]
    assert accuracy_run.main(argv) == 2


# --- versions --------------------------------------------------------------------------------------------------------


def test_mismatched_torch_npu_is_a_loud_warning_and_a_report_field(npu_standin, caplog):
    npu_standin(version="2.5.1")
    with caplog.at_level(logging.WARNING):
        device = devices.resolve_device("npu")
    assert "torch_npu 2.5.1 is built for torch 2.5.1" in caplog.text
    env = devices.environment(device)
    assert env.torch_npu == "2.5.1" and "2.5.1" in env.torch_npu_mismatch and env.cann == "8.0.RC3"


def test_paired_torch_npu_has_no_mismatch(npu_standin):
    npu_standin()
    assert devices.environment(devices.resolve_device("npu")).torch_npu_mismatch is None


@pytest.mark.parametrize(
    ("options", "expected", "source"),
    [
        ({"cann": "8.2.RC1"}, "8.2.RC1", "torch_npu.npu.utils.get_cann_version"),
        ({"cann": "", "torch_version_cann": "8.0.RC2"}, "8.0.RC2", "torch.version.cann"),  # no aclsysGetCANNVersion
    ],
)
def test_cann_version_falls_back_to_torch_version_cann(npu_standin, options, expected, source):
    npu_standin(**options)
    env = devices.environment(devices.resolve_device("npu"))
    assert env.cann == expected and env.ascend["cann_in_use"] == {"version": expected, "read_from": source}


def test_cann_version_falls_back_to_the_install_info(npu_standin, tmp_path, monkeypatch):
    from test_preflight import fake_ascend

    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(fake_ascend(tmp_path / "Ascend", cann="8.1.RC1")))
    npu_standin(cann="", torch_version_cann="not known")
    env = devices.environment(devices.resolve_device("npu"))
    assert env.cann == "8.1.RC1" and env.ascend["cann_in_use"]["read_from"].endswith("ascend_toolkit_install.info")


def test_transfer_to_npu_leaves_the_warning_filters_and_says_what_it_patched(npu_standin):
    npu_standin()
    before = list(warnings.filters)
    device = devices.resolve_device("npu")
    assert warnings.filters == before  # its filterwarnings("once") is undone
    effects = devices.environment(device).ascend["transfer_to_npu"]
    assert effects["warnings_filters_restored"] == ["once"]
    assert {"torch.cuda.is_available", "torch.jit.script"} <= set(effects["patched"]), effects
    assert "torch.Tensor.cuda" not in effects["patched"]  # the stand-in leaves it: the list is observed, not assumed


# --- the order of the start-up steps, per script ---------------------------------------------------------------------


def _spy_model_build(monkeypatch):
    original = models.load_model  # every script builds its model through it (models.load_named)

    def load_model(*args, **kwargs):
        sys.modules["torch_npu"].CALLS.append("model built")
        return original(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)


@pytest.mark.parametrize("script", ["inference", "accuracy_run", "accuracy_run_perf"])
def test_each_script_on_npu_follows_the_start_up_order(npu_standin, tiny_model_dir, tmp_path, monkeypatch, script):
    s = npu_standin(fallback_ops=["aten::_foo_op"])
    _spy_model_build(monkeypatch)
    report = tmp_path / "r.json"
    if script == "inference":
        code = inference.main(
            ["--model_path", str(tiny_model_dir), "--device", "npu:1", "--image", PHOTOS[0], "--output", str(report)]
        )
    elif script == "accuracy_run":
        code = accuracy_run.main([str(tiny_model_dir), str(report), "--device", "npu:1", "--images", PHOTOS[0]])
    else:
        code = accuracy_run_perf.main([str(tiny_model_dir), "1", str(report), "--device", "npu:1", "--warmup", "0"])
    assert code == 0
    steps = [
        "import torch_npu",
        "transfer_to_npu applied",
        "set_compile_mode(jit_compile=False)",
        "set_device(1)",
        "model built",
        "model moved to npu",
    ]
    positions = [s.index(step) for step in steps]
    assert positions == sorted(positions), s.calls
    data = json.loads(report.read_text())
    assert data["environment"]["device"] == "npu:1"
    assert data["cpu_fallbacks"]["operators"] == ["aten::_foo_op"]


def test_the_stand_in_leaves_torch_as_it_found_it():
    """Runs after the stand-in tests (file order): nothing of the stand-in survives its fixture, and torch.accelerator
    (which torch.compile consults) still works; a renamed PrivateUse1 backend would break it for the whole process."""
    assert "torch_npu" not in sys.modules and "torchair" not in sys.modules and not hasattr(torch, "npu")
    assert not torch.cuda.is_available() or not hasattr(torch.cuda, "set_compile_mode")
    assert torch.accelerator.current_accelerator() in (None, torch.device("cuda"), torch.device("mps"))
    assert devices.Device.torch.fget.__module__ == "mobilevit_npu.devices"
    assert torch.Tensor.to is torch._C.TensorBase.to
