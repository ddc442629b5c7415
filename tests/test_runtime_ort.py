"""mobilevit_npu.runtime_ort: the one ONNX Runtime session opener, against onnxruntime's own CPU fallback; --runtime
onnxruntime in accuracy_run.py and accuracy_run_perf.py on the CPU for real, and on CANN through the stand-in whose
InferenceSession is the installed onnxruntime's (tests/offline_standins.py), so the fallback that runs is the real one.
"""

# ruff: noqa: F811  (the fixtures imported from offline_standins are test parameters by name)
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from conftest import PHOTOS, read_json
from offline_standins import (  # noqa: F401  (pytest fixtures)
    CANN_NOT_SOURCED,
    CANN_OPTIONS_MAIN,
    cann_onnxruntime,
    real_ort,
    run_accuracy,
    shared_export,
    tiny_onnx,
)

import accuracy_run_perf
from mobilevit_npu import devices, models, preprocessing, runtime_ort
from mobilevit_npu.errors import UserError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason='onnx / onnxruntime not installed (pip install -e ".[bench]")',
)
CHAIN = [  # the CPU EP is never listed beside CANN: with its fallback disabled, onnxruntime refuses an explicit one
    ("CANNExecutionProvider", {"device_id": "0", "precision_mode": "must_keep_origin_dtype", "enable_cann_graph": "1"}),
]


@pytest.fixture
def static_b2_onnx(tmp_path_factory, tiny_model_dir):
    return shared_export(tmp_path_factory, tiny_model_dir, "tiny_b2", "--batch_size", "2")


def ort(onnx, device: str, *extra: str) -> list[str]:
    """accuracy_run.py's flags for --runtime onnxruntime on `device` (with --onnx FILE when given)."""
    return ["--runtime", "onnxruntime", *(["--onnx", str(onnx)] if onnx else []), "--device", device, *extra]


# ------------------------------------------------------------------------ the opener and onnxruntime's fallback


def test_the_real_fallback_would_run_on_the_cpu_and_the_opener_refuses_it(tiny_onnx, real_ort, capsys):
    """A provider that fails while the session is created: onnxruntime's own InferenceSession retries on the CPU
    (this installed build, no stand-in), the opener raises the provider's own error instead."""
    fallen = real_ort.InferenceSession(str(tiny_onnx), providers=["NoSuchExecutionProvider"])
    assert fallen.get_providers() == ["CPUExecutionProvider"]
    assert "Falling back to ['CPUExecutionProvider']" in capsys.readouterr().out
    with pytest.raises(UserError) as refused:
        runtime_ort.inference_session(tiny_onnx, ["NoSuchExecutionProvider"])
    assert str(refused.value) == (
        f"onnxruntime could not open {tiny_onnx} on NoSuchExecutionProvider: Unknown "
        "Provider Type: NoSuchExecutionProvider"
    )
    assert "EP Error" not in capsys.readouterr().out  # the fallback never ran: nothing printed, no CPU session


def test_a_build_that_ignores_enable_fallback_is_caught_after_the_fact(tiny_onnx, real_ort, monkeypatch, capsys):
    """onnxruntime builds before the enable_fallback keyword always fall back: the real fallback runs (it prints its
    EP Error lines and makes a CPU session), and the opener reads the error back and refuses the session."""

    class OldSession(real_ort.InferenceSession):
        def __init__(self, *args, **kwargs):
            kwargs.pop("enable_fallback", None)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(runtime_ort, "_ort", lambda: types.SimpleNamespace(InferenceSession=OldSession))
    with pytest.raises(UserError) as refused:
        runtime_ort.inference_session(tiny_onnx, ["NoSuchExecutionProvider"])
    message = str(refused.value)
    assert "Unknown Provider Type: NoSuchExecutionProvider" in message and "refusing a CPU run" in message
    assert "EP Error" not in capsys.readouterr().out  # read back, not passed on to the console


def test_cann_precision_option_is_named_from_the_installed_build():
    assert runtime_ort.cann_precision_key("1.24.4") == "precision_mode"
    assert runtime_ort.cann_precision_key("1.22.1") == "precision_mode"
    assert runtime_ort.cann_precision_key("1.25.0") == "precision_mode_v2"
    assert runtime_ort.cann_precision_key("1.32.0-cann") == "precision_mode_v2"
    npu = devices.Device("npu", 3)
    assert runtime_ort.provider_options(npu, "allow_mix_precision", False, "1.24.4") == (
        "CANNExecutionProvider",
        {"device_id": "3", "precision_mode": "allow_mix_precision", "enable_cann_graph": "0"},
    )
    assert runtime_ort.provider_options(npu, "allow_mix_precision", True, "1.25.0")[1]["precision_mode_v2"] == (
        "mixed_float16"
    )
    with pytest.raises(UserError, match="no equivalent of allow_fp32_to_fp16"):
        runtime_ort.provider_options(npu, "allow_fp32_to_fp16", True, "1.25.0")


def test_a_static_graph_runs_a_short_last_batch(static_b2_onnx, tiny_model_dir):
    session = runtime_ort.open_session(static_b2_onnx)
    assert session.fixed_batch == 2 and session.providers_used == ["CPUExecutionProvider"]
    loaded = models.load_model(str(tiny_model_dir))
    x = torch.from_numpy(preprocessing.preprocess(PHOTOS[0], loaded.preprocess))[None]
    got = session.run(x.numpy())
    with torch.no_grad():
        want = loaded.model(pixel_values=x).logits.numpy()
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ CPU, for real


def test_accuracy_run_onnxruntime_cpu_exports_on_the_fly_and_passes(tmp_path, tiny_model_dir):
    rc, report = run_accuracy(tmp_path, tiny_model_dir, *ort(None, "cpu", "--images", *PHOTOS[:3]))
    assert rc == 0, report
    assert report["verdict"] == "PASS" and report["target"]["device"] == "cpu"
    # the target is named by its runtime and provider, in the report and so in the card
    assert report["target"]["mode"] == "onnxruntime CPUExecutionProvider"
    assert "cpu onnxruntime CPUExecutionProvider" in report["compared"]
    runtime = report["runtime"]
    assert runtime["name"] == "onnxruntime" and runtime["providers_used"] == ["CPUExecutionProvider"]
    assert runtime["precision_mode"] is None and runtime["model"] == "exported now (dynamic batch)"
    assert report["thresholds"]["max_prob_diff"] == 0.01  # fp32
    assert not any("determinism only" in n for n in report["notes"])


def test_an_onnx_for_another_batch_is_one_line(tmp_path, tiny_model_dir, static_b2_onnx, capsys):
    rc, report = run_accuracy(tmp_path, tiny_model_dir, *ort(str(static_b2_onnx), "cpu", "--images", PHOTOS[0]))
    captured = capsys.readouterr()
    assert rc == 2 and report is None
    (line,) = [x for x in captured.err.splitlines() if x.strip()]
    assert line == f"error: {static_b2_onnx} takes batch 2 only (export it with --dynamic_batch for others)"


def test_perf_onnxruntime_beside_eager(tmp_path, tiny_model_dir):
    out = tmp_path / "p.json"
    argv = [
        str(tiny_model_dir),
        "2",
        str(out),
        *ort(None, "cpu", *"--warmup 1 --batch_sizes 1,2 --allocator system".split()),
    ]
    assert accuracy_run_perf.main(argv) == 0
    data = read_json(out)
    assert [(r["mode"], r["batch_size"]) for r in data["results"]] == [
        ("eager", 1),
        ("onnxruntime", 1),
        ("eager", 2),
        ("onnxruntime", 2),
    ]
    for r in data["results"]:
        assert r["status"] == "ok" and len(r["samples_ms"]) == 2 and r["exact"] is True, r
    assert data["settings"]["runtime"]["providers_used"] == ["CPUExecutionProvider"]


def test_a_static_onnx_at_another_batch_is_unavailable_in_the_benchmark(tmp_path, tiny_model_dir, static_b2_onnx):
    out = tmp_path / "p.json"
    argv = [
        str(tiny_model_dir),
        "1",
        str(out),
        *ort(static_b2_onnx, "cpu", *"--warmup 0 --batch_sizes 2,1 --modes eager".split()),
    ]
    assert accuracy_run_perf.main(argv) == 0
    rows = {(r["mode"], r["batch_size"]): r for r in read_json(out)["results"]}
    assert rows[("onnxruntime", 2)]["status"] == "ok"
    assert rows[("onnxruntime", 1)]["status"] == "unavailable"
    assert "takes batch 2 only" in rows[("onnxruntime", 1)]["reason"]


# ------------------------------------------------------------------------ CANN, through the real session class


@pytest.mark.parametrize("device, provider", [("cuda", "CUDAExecutionProvider"), ("npu:0", "CANNExecutionProvider")])
def test_a_provider_that_is_absent_is_an_error(
    tmp_path, tiny_model_dir, tiny_onnx, device, provider, real_ort, monkeypatch, capsys
):
    cpu_only = cann_onnxruntime(real_ort, available=("CPUExecutionProvider",))
    monkeypatch.setitem(sys.modules, "onnxruntime", cpu_only)
    rc, report = run_accuracy(tmp_path, tiny_model_dir, *ort(str(tiny_onnx), device))
    assert rc == 2 and report is None
    assert f"{provider} is not in this onnxruntime build" in capsys.readouterr().err
    assert cpu_only.calls == []  # never opened a session, so never ran on the CPU instead


@pytest.mark.parametrize("honours", [True, False], ids=["enable_fallback-honoured", "enable_fallback-ignored"])
def test_a_cann_provider_that_cannot_start_is_its_own_one_line_error(
    tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch, capsys, honours
):
    """CANN's set_env.sh not sourced: the provider library does not load. onnxruntime's fallback would run the check
    on the CPU; instead the run stops with CANN's own message, one line, exit 2, and no report."""
    cann = cann_onnxruntime(real_ort, fail=CANN_NOT_SOURCED, ignores_enable_fallback=not honours)
    monkeypatch.setitem(sys.modules, "onnxruntime", cann)
    rc, report = run_accuracy(tmp_path, tiny_model_dir, *ort(str(tiny_onnx), "npu", "--images", PHOTOS[0]))
    captured = capsys.readouterr()
    assert rc == 2 and report is None
    (line,) = [x for x in captured.err.splitlines() if x.strip()]
    assert line.startswith(f"error: onnxruntime could not open {tiny_onnx} on CANNExecutionProvider: ")
    assert "Failed to load library libonnxruntime_providers_cann.so with error: libascendcl.so" in line
    assert "EP Error" not in captured.out
    # the real fallback's CPU retry: only where the build ignores enable_fallback, and its session is refused
    assert cann.calls == ([CHAIN] if honours else [CHAIN, ["CPUExecutionProvider"]])


def test_an_option_this_cann_build_does_not_take_is_its_own_error(
    tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch, capsys
):
    """A build whose provider takes precision_mode_v2 but whose version says precision_mode: the provider's own
    'Unknown provider option' message, not a CPU session (before, the fallback hid it and a provider check failed)."""
    cann = cann_onnxruntime(real_ort, cann_options=CANN_OPTIONS_MAIN, version="1.24.4")
    monkeypatch.setitem(sys.modules, "onnxruntime", cann)
    rc, _ = run_accuracy(tmp_path, tiny_model_dir, *ort(str(tiny_onnx), "npu", "--images", PHOTOS[0]))
    assert rc == 2
    assert 'CANNExecutionProvider: Unknown provider option: "precision_mode".' in capsys.readouterr().err
    assert cann.calls == [CHAIN]


def test_cann_provider_gets_its_options_and_the_run_is_judged_on_it(
    tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch
):
    cann = cann_onnxruntime(real_ort)
    monkeypatch.setitem(sys.modules, "onnxruntime", cann)
    rc, report = run_accuracy(tmp_path, tiny_model_dir, *ort(str(tiny_onnx), "npu:1", "--images", *PHOTOS[:2]))
    assert rc == 0, report
    (providers,) = cann.calls  # one session, on the options the CANN provider parses
    assert providers == [
        (
            "CANNExecutionProvider",
            {"device_id": "1", "precision_mode": "must_keep_origin_dtype", "enable_cann_graph": "1"},
        ),
    ]
    assert report["target"] == {**report["target"], "device": "npu:1", "mode": "onnxruntime CANNExecutionProvider"}
    runtime = report["runtime"]
    assert runtime["precision_mode"] == "must_keep_origin_dtype" and runtime["verdict_dtype"] == "fp32"
    assert report["thresholds"]["max_prob_diff"] == 0.01 and report["verdict"] == "PASS"
    assert runtime["weights"].startswith("match")


def test_cann_mixed_precision_is_judged_with_fp16_thresholds(
    tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch
):
    cann = cann_onnxruntime(real_ort)
    monkeypatch.setitem(sys.modules, "onnxruntime", cann)
    rc, report = run_accuracy(
        tmp_path,
        tiny_model_dir,
        *ort(
            str(tiny_onnx), "npu", "--precision_mode", "allow_mix_precision", "--cann_graph", "0", "--images", PHOTOS[0]
        ),
    )
    assert rc == 0
    assert cann.calls[0][0][1] == {"device_id": "0", "precision_mode": "allow_mix_precision", "enable_cann_graph": "0"}
    assert report["target"]["dtype"] == "float16" and report["thresholds"]["max_prob_diff"] == 0.02
    assert report["runtime"]["precision_mode"] == "allow_mix_precision"


def test_a_later_cann_build_gets_precision_mode_v2_up_front(tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch):
    cann = cann_onnxruntime(real_ort, cann_options=CANN_OPTIONS_MAIN, version="1.25.0")
    monkeypatch.setitem(sys.modules, "onnxruntime", cann)
    rc, report = run_accuracy(tmp_path, tiny_model_dir, *ort(str(tiny_onnx), "npu", "--images", PHOTOS[0]))
    assert rc == 0
    # one session: the name chosen from the build, not retried after an error
    (providers,) = cann.calls
    assert providers[0][1] == {"device_id": "0", "precision_mode_v2": "origin", "enable_cann_graph": "1"}
    assert report["runtime"]["provider_options"]["precision_mode_v2"] == "origin"


def test_the_real_onnxruntime_refuses_an_explicit_cpu_ep_when_its_fallback_is_disabled(tiny_onnx, real_ort):
    """Why the CANN chain lists no CPU EP, and what the stand-in reproduces: the installed onnxruntime itself refuses a
    session that names the CPU EP while session.disable_cpu_ep_fallback is 1 (inference_session.cc, Initialize)."""
    options = real_ort.SessionOptions()
    options.add_session_config_entry(runtime_ort.DISABLE_CPU_EP_FALLBACK, "1")
    with pytest.raises(Exception, match="Conflicting session configuration: explicitly added the CPU EP"):
        real_ort.InferenceSession(str(tiny_onnx), options, providers=["CPUExecutionProvider"])
