"""mobilevit_npu.runtimes: the --runtime flags and their usage errors, the export JSON beside an artefact, and the
artefact's identity: an ONNX / .om exported from other weights is refused before it runs."""

# ruff: noqa: F811  (the fixtures imported from offline_standins are test parameters by name)
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from conftest import PHOTOS
from offline_standins import (
    run_accuracy,
    tiny_onnx,  # noqa: F401  (pytest fixtures)
)

import accuracy_run_perf
from mobilevit_npu import models, runtimes
from mobilevit_npu.errors import UserError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason='onnx / onnxruntime not installed (pip install -e ".[bench]")',
)


def one_line(capsys) -> str:
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    return line


def test_runtime_usage_errors(tmp_path, tiny_model_dir, capsys):
    cases = [
        (["--runtime", "om"], "--runtime om needs --om"),
        (["--runtime", "onnxruntime", "--dtype", "fp16"], "its precision is --precision_mode"),
        (["--onnx", "x.onnx"], "--onnx goes with --runtime onnxruntime"),
        (["--runtime", "onnxruntime", "--layers"], "--layers needs the torch modules"),
        (["--runtime", "om", "--om", str(tmp_path / "missing.om")], "is not a file"),
        (["--allow_foreign_weights"], "--allow_foreign_weights goes with --runtime onnxruntime --onnx"),
    ]
    for extra, message in cases:
        rc, _ = run_accuracy(tmp_path, tiny_model_dir, *extra)
        assert rc == 2 and message in capsys.readouterr().err, extra
    om = tmp_path / "m.om"
    om.write_bytes(b"om")
    rc, _ = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "om", "--om", str(om), "--device", "cpu")
    assert rc == 2 and "--device npu" in capsys.readouterr().err


def test_an_onnx_of_other_weights_is_refused_before_it_runs(
    tmp_path, tiny_model_dir, default_init_model_dir, tiny_onnx, capsys
):
    """The ONNX is the tiny model's; the model loaded has other weights (same architecture, so the file would run and
    its FAIL would blame ONNX Runtime)."""
    ours = models.weights_digest(models.load_model(str(default_init_model_dir)).model)
    theirs = json.loads(tiny_onnx.with_suffix(".json").read_text())["weights_sha256"]
    assert ours != theirs
    argv = ["--runtime", "onnxruntime", "--onnx", str(tiny_onnx), "--device", "cpu", "--images", PHOTOS[0]]
    rc, report = run_accuracy(tmp_path, default_init_model_dir, *argv)
    assert rc == 2 and report is None
    line = one_line(capsys)
    assert theirs in line and ours in line and "--allow_foreign_weights" in line
    rc, report = run_accuracy(tmp_path, default_init_model_dir, *argv, "--allow_foreign_weights")
    assert report is not None and report["runtime"]["weights"].startswith("foreign, allowed")


def test_an_om_of_other_weights_is_refused_before_ais_bench_is_loaded(
    tmp_path, default_init_model_dir, tiny_onnx, capsys
):
    om = tmp_path / "tiny.om"  # ATC's output beside a copy of the export's JSON, no ais_bench installed here
    om.write_bytes(b"om")
    shutil.copy(tiny_onnx.with_suffix(".json"), tmp_path / "tiny.json")
    rc, _ = run_accuracy(tmp_path, default_init_model_dir, "--runtime", "om", "--om", str(om), "--device", "npu")
    line = one_line(capsys)
    assert rc == 2 and "was exported from other weights" in line and "ais_bench" not in line


def test_the_benchmark_refuses_foreign_weights_too(tmp_path, default_init_model_dir, tiny_onnx, capsys):
    out = tmp_path / "p.json"
    argv = [
        str(default_init_model_dir),
        "1",
        str(out),
        "--runtime",
        "onnxruntime",
        "--onnx",
        str(tiny_onnx),
        "--device",
        "cpu",
        "--warmup",
        "0",
    ]
    assert accuracy_run_perf.main(argv) == 2
    assert "was exported from other weights" in one_line(capsys) and not out.exists()


def test_weights_check_reads_the_export_json(tmp_path, tiny_model_dir, tiny_onnx):
    loaded = models.load_model(str(tiny_model_dir))
    assert runtimes.check_weights(tiny_onnx, loaded).startswith("match")
    copy = tmp_path / "old.onnx"
    copy.write_bytes(b"onnx")
    data = json.loads(tiny_onnx.with_suffix(".json").read_text())
    data["weights_sha256"] = loaded.source["sha256"]  # exports before models.weights_digest named the file's sha256
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert runtimes.check_weights(copy, loaded).startswith("match")
    data["weights_sha256"] = "0" * 64
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="refusing to judge it against this model"):
        runtimes.check_weights(copy, loaded)
    assert runtimes.check_weights(copy, loaded, allow_foreign=True).startswith("foreign, allowed")
    (tmp_path / "old.json").unlink()
    assert runtimes.check_weights(copy, loaded).startswith("unchecked")


def test_the_export_json_is_found_beside_the_om(tiny_onnx):
    assert runtimes.sidecar(tiny_onnx.with_suffix(".om"))["atc"]["soc_version"] == "Ascend910B4"
    assert runtimes.om_precision_mode(tiny_onnx.with_suffix(".om"), None)[0] == "must_keep_origin_dtype"


def test_runtime_settings_pick_the_flags_only():
    picked = runtimes.RuntimeSettings.pick({"runtime": "om", "om": "m.om", "iterations": 3, "device": "npu:1"})
    assert picked == runtimes.RuntimeSettings(runtime="om", om="m.om", device="npu:1")
