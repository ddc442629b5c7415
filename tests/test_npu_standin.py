"""The NPU path against a stand-in torch_npu that behaves like the real one where it matters (tests/npu_standin.py):
autoload at `import torch`, the lazy torchair, transfer_to_npu, HF32 defaults, CPU fallbacks, channels_last, flash
attention under torchair, graph mode, version pairing, and the order of the start-up steps in each script."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import npu_standin as standin
import pytest
import torch
from conftest import PHOTOS, ROOT, read_json
from npu_standin import npu_standin_fixture  # noqa: F401  (the npu_standin fixture)

import accuracy_run
import accuracy_run_perf
import common
import inference
from mobilevit_npu import bench, compilers, devices, execution, fastpath, models
from mobilevit_npu.errors import Unavailable, UserError

NPU = devices.Device("npu", 0)


def _tiny(tiny_model_dir, device=NPU):
    return models.load_model(str(tiny_model_dir), device, "fp32")


# --- 1. autoload: `import torch` fails before any project code runs ---------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [
        ["inference.py"],
        ["accuracy_run.py"],
        ["accuracy_run_perf.py"],
        ["port_report.py"],
        ["export_onnx.py"],
        ["-m", "benchmarks.bench_peers"],
    ],
)
def test_failed_torch_npu_autoload_is_one_line_naming_both_ways_out(tmp_path, script):
    folder = standin.build(tmp_path / "site", autoload_fails=True)
    env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    args = [sys.executable, *script, "--help"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "set_env.sh" in lines[0] and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in lines[0] and "libhccl.so" in lines[0]
    # the second way out works: the autoload off, the same command runs
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


# --- 2. torchair never fails to import; its failure comes at first use ------------------------------------------------


def test_broken_torchair_makes_compiled_modes_unavailable_not_the_run(npu_standin, tiny_model_dir):
    npu_standin(torchair_broken=True)
    device = devices.resolve_device("npu")
    import torchair  # the lazy placeholder torch_npu installed: the import itself succeeds

    with pytest.raises(Exception) as info:
        torchair.CompilerConfig()
    assert not isinstance(info.value, ImportError)  # _TorchairImportError, as in torch_npu 2.5.1
    results = bench.run_benchmark(_tiny(tiny_model_dir), device, modes=["eager", "compiled", "npugraph"],
                                  iterations=1, warmup=0, progress=False, measure_roofline=False)  # fmt: skip
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
        raise Unavailable("torch.compile failed (NotImplementedError: no converter for "
                          "aten._scaled_dot_product_flash_attention)")  # fmt: skip
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


# --- 8. CPU fallbacks ------------------------------------------------------------------------------------------------


def test_inference_reports_cpu_fallbacks(npu_standin, tiny_model_dir, tmp_path, capsys):
    npu_standin(fallback_ops=["aten::_foo_op"])
    out = tmp_path / "out.json"
    assert inference.main(["--model_path", str(tiny_model_dir), "--device", "npu", "--image", PHOTOS[0],
                           "--output", str(out)]) == 0  # fmt: skip
    fallbacks = read_json(out)["cpu_fallbacks"]
    assert list(fallbacks["operators"]) == ["aten::_foo_op"] and fallbacks["operators"]["aten::_foo_op"] >= 2
    assert "CPU fallbacks on npu:0: 1 operator(s) ran on the CPU: aten::_foo_op" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "code", "verdict"), [([], 0, "PASS"), (["--fail_on_cpu_fallback"], 1, "FAIL")])
def test_accuracy_run_lists_fallbacks_beside_the_verdict(npu_standin, tiny_model_dir, tmp_path, capsys, extra, code,
                                                         verdict):  # fmt: skip
    npu_standin(fallback_ops=["aten::_foo_op"])
    report = tmp_path / "r.json"
    argv = [str(tiny_model_dir), str(report), "--device", "npu", "--images", PHOTOS[0], *extra]
    assert accuracy_run.main(argv) == code
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(f"VERDICT: {verdict}") and "aten::_foo_op" in lines[-2]
    data = read_json(report)
    assert data["verdict"] == verdict and "aten::_foo_op" in data["cpu_fallbacks"]["operators"]
    if extra:
        assert any("fell back to the CPU" in r for r in data["verdict_reasons"])


# --- graph mode ------------------------------------------------------------------------------------------------------


def test_npugraph_uses_torchair_reduce_overhead(npu_standin):
    s = npu_standin()
    kwargs, _, notes = compilers._backend(devices.resolve_device("npu"), False, "reduce-overhead")
    assert callable(kwargs["backend"]) and "aclgraph" in notes[0]
    assert "torchair backend mode=reduce-overhead" in s.calls
    assert "npugraph" in execution.available_modes(NPU)
    assert "npugraph" not in execution.available_modes(devices.Device("cpu"))


def test_npugraph_is_a_benchmark_mode_with_its_own_agreement(npu_standin, tiny_model_dir):
    s = npu_standin()
    device = devices.resolve_device("npu")
    results = bench.run_benchmark(_tiny(tiny_model_dir), device, modes=["eager", "npugraph"], iterations=1, warmup=0,
                                  progress=False, measure_roofline=False)  # fmt: skip
    row = {r["mode"]: r for r in results}["npugraph"]
    assert row["status"] == "ok" and row["agreement"]["top1_agreement"] == 1.0, row
    assert any("aclgraph" in n for n in row["notes"])
    assert "torchair compiled a graph (mode=reduce-overhead)" in s.calls


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
    assert env["torch_npu"] == "2.5.1" and "2.5.1" in env["torch_npu_mismatch"] and env["cann"] == "8.0.RC3"


def test_paired_torch_npu_has_no_mismatch(npu_standin):
    npu_standin()
    assert devices.environment(devices.resolve_device("npu"))["torch_npu_mismatch"] is None


# --- the order of the start-up steps, per script ---------------------------------------------------------------------


def _spy_model_build(monkeypatch):
    original = common.load

    def load(*args, **kwargs):
        sys.modules["torch_npu"].CALLS.append("model built")
        return original(*args, **kwargs)

    monkeypatch.setattr(common, "load", load)


@pytest.mark.parametrize("script", ["inference", "accuracy_run", "accuracy_run_perf"])
def test_each_script_on_npu_follows_the_start_up_order(npu_standin, tiny_model_dir, tmp_path, monkeypatch, script):
    s = npu_standin(fallback_ops=["aten::_foo_op"])
    _spy_model_build(monkeypatch)
    report = tmp_path / "r.json"
    if script == "inference":
        code = inference.main(["--model_path", str(tiny_model_dir), "--device", "npu:1", "--image", PHOTOS[0],
                               "--output", str(report)])  # fmt: skip
    elif script == "accuracy_run":
        code = accuracy_run.main([str(tiny_model_dir), str(report), "--device", "npu:1", "--images", PHOTOS[0]])
    else:
        code = accuracy_run_perf.main([str(tiny_model_dir), "1", str(report), "--device", "npu:1", "--warmup", "0"])
    assert code == 0
    steps = ["import torch_npu", "transfer_to_npu applied", "set_compile_mode(jit_compile=False)", "set_device(1)",
             "model built", "model moved to npu"]  # fmt: skip
    positions = [s.index(step) for step in steps]
    assert positions == sorted(positions), s.calls
    data = json.loads(report.read_text())
    assert data["environment"]["device"] == "npu:1"
    assert data["cpu_fallbacks"]["operators"].get("aten::_foo_op", 0) >= 1


def test_the_stand_in_leaves_torch_as_it_found_it():
    """Runs after the stand-in tests (file order): nothing of the stand-in survives its fixture, and torch.accelerator
    (which torch.compile consults) still works; a renamed PrivateUse1 backend would break it for the whole process."""
    assert "torch_npu" not in sys.modules and "torchair" not in sys.modules and not hasattr(torch, "npu")
    assert not torch.cuda.is_available() or not hasattr(torch.cuda, "set_compile_mode")
    assert torch.accelerator.current_accelerator() in (None, torch.device("cuda"), torch.device("mps"))
    assert devices.Device.torch.fget.__module__ == "mobilevit_npu.devices"
    assert torch.Tensor.to is torch._C.TensorBase.to
