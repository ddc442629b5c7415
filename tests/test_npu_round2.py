"""Issue 31, the real torch_npu and msprobe, round two: op-plugin's second fallback family and its Python route,
c10's TORCH_CPP_LOG_LEVEL, strict --fail_on_cpu_fallback, the stand-in's real import order, the preflight on a bare
Python and on an unreadable or CANN 8.5 install, the pairing table's suggestions, warning filters torchair leaves
behind, the ONNX Runtime CANN provider's CPU nodes, and a torch_npu that fails when transformers imports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import npu_standin as standin
import pytest
import torch
from conftest import PHOTOS, ROOT
from npu_standin import npu_standin_fixture  # noqa: F401  (the npu_standin fixture)

import preflight as preflight_script
from mobilevit_npu import compilers, devices, models, npu, preflight, runtime_ort

# transformers 5 imports torch_npu when it loads a model (npu_fusion_attention, integrations/npu_flash_attention.py);
# 4.47.1, the Ascend stack's, has no such integration and never imports torch_npu on that path
TRANSFORMERS_IMPORTS_TORCH_NPU = pytest.mark.skipif(
    int(__import__("transformers").__version__.split(".")[0]) < 5,
    reason="transformers < 5 has no npu_flash_attention integration: it does not import torch_npu to load a model",
)

NPU = devices.Device("npu", 0)

SECOND_FAMILY = standin.SECOND_FAMILY


def _tiny_on_npu(tiny_model_dir):
    return models.load_model(str(tiny_model_dir), devices.resolve_device("npu"), "fp32").model


# --- CPU fallbacks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", sorted(SECOND_FAMILY))
def test_every_second_family_string_names_its_operator(text):
    """Printed as c10 logs it ("Warning: Warning: ..." included), each names one aten operator."""
    line = standin.c10_warning_line(f"Warning: {text}", function="f", where="SincKernelNpu.cpp:22").decode()
    assert npu.fallback_operators(line) == [f"aten::{SECOND_FAMILY[text]}"]


def test_both_routes_are_captured_and_kept_off_the_console(npu_standin, tiny_model_dir, capfd, monkeypatch):
    """sinc (TORCH_NPU_WARN_ONCE: fd 2) and polar, nanmedian.dim (TORCH_WARN_ONCE: a Python UserWarning) are in the
    report; neither the line nor the warning reaches the user, whatever the user's warning filters."""
    monkeypatch.delenv("RANK", raising=False)
    npu_standin(kernel_fallbacks=["sinc", "polar", "nanmedian.dim"])
    model = _tiny_on_npu(tiny_model_dir)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("ignore")  # a user who ignores warnings: the fallbacks are still seen
        with npu.CpuFallbacks(NPU) as fb, torch.no_grad():
            model(pixel_values=torch.zeros(1, 3, 256, 256))
    assert fb.operators == ["aten::nanmedian.dim", "aten::polar", "aten::sinc"]
    assert "3 operator(s) ran on the CPU" in fb.line()
    assert not [w for w in seen if "NPU currently" in str(w.message)]
    assert "NPU currently" not in capfd.readouterr().err


@pytest.mark.parametrize("level", ["ERROR", "fatal", "2", "3"])
def test_cpp_log_level_error_or_fatal_is_silenced_not_none_seen(npu_standin, tiny_model_dir, monkeypatch, level):
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", level)
    monkeypatch.delenv("TORCH_NPU_FALLBACK_CPU_DISABLE", raising=False)
    npu_standin(kernel_fallbacks=["sinc"], fallback_ops=["aten::_foo_op"])
    model = _tiny_on_npu(tiny_model_dir)
    with npu.CpuFallbacks(NPU) as fb, torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, 256, 256))
    assert fb.summary()["status"] == "silenced" and fb.operators == []  # c10 printed nothing
    assert f"TORCH_CPP_LOG_LEVEL={level}" in fb.line() and "none seen" not in fb.line()
    assert "cannot be checked" in fb.fail_reason()


@pytest.mark.parametrize("level", ["WARNING", "1", "INFO", ""])
def test_lower_log_levels_still_print(monkeypatch, level):
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", level)
    for name in ("TORCH_NPU_DISABLED_WARNING", "TORCH_NPU_WARNING_DISABLE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert npu.observability(NPU) == "observed"


def test_the_python_route_is_seen_even_when_the_c10_lines_are_silenced(npu_standin, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "ERROR")
    npu_standin(kernel_fallbacks=["polar"])
    model = _tiny_on_npu(tiny_model_dir)
    with npu.CpuFallbacks(NPU) as fb, torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, 256, 256))
    assert fb.operators == ["aten::polar"] and "aten::polar" in fb.line()
    assert "aten::polar" in fb.fail_reason()


def test_strict_cannot_pass_silenced_even_with_the_switch_armed(npu_standin, monkeypatch):
    """TORCH_NPU_FALLBACK_CPU_DISABLE gates only the dispatcher's fallback; op-plugin never consults it, so a silenced
    run could still have run kernels on the CPU."""
    npu_standin(version="2.13.0")
    monkeypatch.setenv("TORCH_NPU_FALLBACK_CPU_DISABLE", "1")
    monkeypatch.setenv("TORCH_NPU_DISABLED_WARNING", "1")
    with npu.CpuFallbacks(NPU) as fb:
        pass
    assert fb.error_switch == "TORCH_NPU_FALLBACK_CPU_DISABLE=1"
    reason = fb.fail_reason()
    assert reason and "cannot be checked" in reason and "op-plugin" in reason


def test_an_op_plugin_fallback_fails_strict_under_the_switch(npu_standin, tiny_model_dir, monkeypatch):
    """The switch armed, an op-plugin CPU kernel runs anyway (no CheckCpuFallbackAllowed there): captured, it fails."""
    monkeypatch.setenv("TORCH_NPU_FALLBACK_CPU_DISABLE", "1")
    monkeypatch.delenv("RANK", raising=False)
    npu_standin(version="2.13.0", kernel_fallbacks=["sinc"])
    model = _tiny_on_npu(tiny_model_dir)
    with npu.CpuFallbacks(NPU) as fb, torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, 256, 256))
    assert fb.refused == [] and "aten::sinc" in fb.fail_reason()


def test_torchair_once_filter_is_put_back(npu_standin):
    """torchair 2.13/2.14's get_npu_backend adds warnings.filterwarnings("once", UserWarning) for the process."""
    npu_standin(version="2.13.0")
    devices.resolve_device("npu")  # imports torch_npu, which installs torchair
    before = list(warnings.filters)
    backend, used = compilers._torchair_backend("max-autotune")
    assert callable(backend) and used == "max-autotune"
    assert warnings.filters == before


def test_filters_added_during_the_model_work_are_put_back(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    before = list(warnings.filters)
    with npu.CpuFallbacks(NPU) as fb:
        warnings.filterwarnings("once", category=UserWarning)  # as torchair does when it compiles (l.949)
    assert warnings.filters == before and fb.filters_restored == ["once (UserWarning)"]


# --- the stand-in in the real order ---------------------------------------------------------------------------------


@TRANSFORMERS_IMPORTS_TORCH_NPU
def test_torch_autoloads_the_standin_before_transformers_imports_npu_fusion_attention(tmp_path):
    """On an Ascend host `import torch` loads torch_npu (its torch.backends entry point) before transformers, which
    then imports npu_fusion_attention from it (transformers/integrations/npu_flash_attention.py:21-22)."""
    folder = standin.build(tmp_path / "site", autoload=True)
    env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    code = (
        "import sys; import mobilevit_npu.startup; loaded = 'torch_npu' in sys.modules; "
        "assert 'transformers' not in sys.modules; "
        "from transformers.integrations import npu_flash_attention as f; "
        "print(loaded, f.npu_fusion_attention is sys.modules['torch_npu'].npu_fusion_attention)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]


@TRANSFORMERS_IMPORTS_TORCH_NPU
def test_a_torch_npu_failing_when_transformers_imports_it_is_one_line(tmp_path, tiny_model_dir):
    """Autoload off (TORCH_DEVICE_BACKEND_AUTOLOAD=0): transformers' unguarded import of torch_npu, when it loads the
    model, is the first; a torch_npu that fails there is one line naming the fix, exit 2."""
    folder = standin.build(tmp_path / "site", autoload=True, import_fails=True)
    env = {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    cmd = [sys.executable, "inference.py", "--model_path", str(tiny_model_dir), "--image", str(PHOTOS[0])]
    out = subprocess.run(cmd + ["--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: torch_npu is installed but fails to import (ImportError: libhccl.so")
    assert "imported by transformers" in lines[-1] and "set_env.sh" in lines[-1]


# --- the stack --------------------------------------------------------------------------------------------------------


def test_preflight_runs_on_a_bare_python(tmp_path):
    """No site-packages at all (python -S): no torch, numpy or packaging. Its own rows say torch is missing."""
    out = subprocess.run(
        [sys.executable, "-S", "preflight.py", "--ascend_root", str(tmp_path), "--json", str(tmp_path / "p.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "torch            missing" in out.stdout
    assert "import torch     missing   not run: torch is not installed" in out.stdout
    assert "torch==None" not in out.stdout
    assert json.loads((tmp_path / "p.json").read_text())["exit_code"] == 2


def test_ascend_root_empty_is_a_usage_error(capsys):
    assert preflight_script.main(["--ascend_root", "", "--skip_import_check"]) == 2
    assert "must name a folder" in capsys.readouterr().err


def _stack(root: Path, driver: str = "Version=24.1.rc2\ncompatible_version_fw=[7.0.0,7.5.99]\n") -> None:
    toolkit = root / "ascend-toolkit" / "latest"
    (toolkit / "x86_64-linux").mkdir(parents=True)
    (toolkit / "x86_64-linux" / "ascend_toolkit_install.info").write_text("version=8.1.RC1\n")
    (root / "driver").mkdir()
    (root / "driver" / "version.info").write_text(driver)
    (root / "firmware").mkdir()
    (root / "firmware" / "version.info").write_text("Version=7.5.0.1.129\n")


def _clean_env(monkeypatch):
    for name in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_OPP_PATH", "LD_LIBRARY_PATH"):
        monkeypatch.delenv(name, raising=False)


def test_an_unreadable_version_file_is_a_row_with_its_fix(tmp_path, monkeypatch, capsys):
    """Ascend's non-root install: <root> mode 750, this user outside its group. The tests run as root (which reads
    anything), so the kernel's refusal is made by os.stat and open for the files under <root>/driver."""
    _clean_env(monkeypatch)
    _stack(tmp_path)
    denied = str(tmp_path / "driver")
    real_stat, real_open = os.stat, open

    def stat(path, *args, **kwargs):
        if str(path).startswith(denied + os.sep):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    def fake_open(path, *args, **kwargs):
        if str(path).startswith(denied + os.sep):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr("builtins.open", fake_open)
    facts = preflight.stack_facts({}, str(tmp_path))  # as every NPU report's environment reads them
    assert facts["driver"]["version"] is None and "permission denied" in facts["driver"]["error"]
    code = preflight_script.main(["--ascend_root", str(tmp_path), "--skip_import_check"])
    out = capsys.readouterr().out
    assert code == 2 and "driver           mismatch  unreadable:" in out
    assert "sudo usermod -aG" in out


def test_a_fifo_version_file_is_not_read(tmp_path, monkeypatch):
    _clean_env(monkeypatch)
    _stack(tmp_path)
    (tmp_path / "firmware" / "version.info").unlink()
    os.mkfifo(tmp_path / "firmware" / "version.info")  # a read would block forever
    facts = preflight.stack_facts({}, str(tmp_path))
    assert "not a regular file" in facts["firmware"]["error"]
    rows = {r.check: r for r in preflight.stack_rows(facts, str(tmp_path))}
    assert rows["firmware"].status == "mismatch"


def test_an_oversized_version_file_is_refused(tmp_path, monkeypatch):
    _clean_env(monkeypatch)
    _stack(tmp_path)
    with open(tmp_path / "driver" / "version.info", "a") as fh:
        fh.write("#" * (preflight.MAX_INFO_BYTES + 10))
    facts = preflight.stack_facts({}, str(tmp_path))
    assert "larger than" in facts["driver"]["error"]


@pytest.mark.parametrize("version", ["garbage", "", "24.x;rm", "..."])
def test_a_garbage_driver_version_is_not_ok(tmp_path, monkeypatch, version):
    _clean_env(monkeypatch)
    _stack(tmp_path, driver=f"Version={version}\n")
    rows = {r.check: r for r in preflight.stack_rows(preflight.stack_facts({}, str(tmp_path)), str(tmp_path))}
    assert rows["driver"].status == "mismatch" and rows["driver"].blocking


def test_cann_85_layout_names_its_own_set_env(tmp_path, monkeypatch):
    """CANN 8.5: <root>/cann/ holds the toolkit and set_env.sh; the fix names <root>/cann/set_env.sh."""
    _clean_env(monkeypatch)
    cann = tmp_path / "cann"
    (cann / "x86_64-linux").mkdir(parents=True)
    (cann / "x86_64-linux" / "ascend_toolkit_install.info").write_text("version=8.5.0\n")
    (cann / "set_env.sh").write_text("# CANN 8.5\n")
    facts = preflight.stack_facts({}, str(tmp_path))
    assert facts["cann"]["version"] == "8.5.0"
    rows = {r.check: r for r in preflight.stack_rows(facts, str(tmp_path))}
    assert rows["set_env.sh"].fix == f"source {cann}/set_env.sh"
    assert "ascend-toolkit" not in rows["HCCL (torchrun)"].fix


def _facts(torch_version, npu_version, requires=None):
    facts = preflight.stack_facts({}, "/nonexistent-ascend-root")
    facts["torch"] = {"version": torch_version, "build": "cpu"} if torch_version else None
    facts["torch_npu"] = {"version": npu_version, "requires_torch": requires, "folder": None} if npu_version else None
    return facts


def _fixes(facts) -> str:
    return "\n".join(r.fix or "" for r in preflight.stack_rows(facts, "/nonexistent-ascend-root"))


def test_suggestions_come_from_the_pairing_table_only():
    # torch 2.13.0: the table lists no torch-npu for it (2.13.0 is on PyPI, not in the table)
    fixes = _fixes(_facts("2.13.0+cpu", None))
    assert "torch-npu==2.13.0" not in fixes and "lists no torch-npu for torch 2.13.0" in fixes
    # torch 2.5.1: the two packages the table lists, with their CANN
    fixes = _fixes(_facts("2.5.1+cpu", None))
    assert "2.5.1 (CANN 8.1.RC1)" in fixes and "2.5.1.post1 (CANN 8.2.RC1)" in fixes
    # no torch, a torch-npu the table lacks: its METADATA's requirement, never torch==None or a guessed pair
    fixes = _fixes(_facts(None, "2.13.0", requires="==2.13.0.*"))
    assert "torch==None" not in fixes and "requires torch ==2.13.0.*" in fixes
    fixes = _fixes(_facts(None, "weird"))
    assert "None" not in fixes and "torch==" not in fixes.replace("torch==2.12.0", "")
    # a mismatch names the table's torch for the torch-npu, and the table's torch-npu for the torch
    fixes = _fixes(_facts("2.6.0+cpu", "2.5.1.post1"))
    assert "pip install torch==2.5.1 " in fixes and "2.6.0.post5 (CANN 8.5.0)" in fixes


# --- ONNX Runtime's CANN provider -------------------------------------------------------------------------------------


def test_the_cann_session_disables_cpu_node_placement(tmp_path, monkeypatch):
    """The session's CPU retry is off already; single nodes on the CPU EP are stopped by the session option, whose
    key and refusal are strings of the installed onnxruntime library."""
    import onnxruntime as ort

    library = next(Path(ort.__file__).parent.glob("capi/onnxruntime_pybind11_state*"))
    data = library.read_bytes()
    assert runtime_ort.DISABLE_CPU_EP_FALLBACK.encode() + b"\0" in data
    assert runtime_ort.CPU_NODES_REFUSED.encode() in data
    seen = {}

    def session(path, chain, sess_options):
        seen["value"] = sess_options.get_session_config_entry(runtime_ort.DISABLE_CPU_EP_FALLBACK)
        raise runtime_ort.UserError(
            f"onnxruntime could not open {path} on CANNExecutionProvider: This session contains graph nodes that "
            "are assigned to the default CPU EP, but fallback to CPU EP has been explicitly disabled by the user."
        )

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CANNExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime_ort, "inference_session", session)
    with pytest.raises(runtime_ort.UserError, match="no CANN kernel and would run on the CPU"):
        runtime_ort.open_session(tmp_path / "m.onnx", NPU, "force_fp16")
    assert seen["value"] == "1"
