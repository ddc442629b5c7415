"""mobilevit_npu.runtime_om: an ATC .om through ais_bench's InferSession (a stand-in modelled on msit's
ais_bench/infer/interface.py that computes with the real CPU ONNX Runtime: tests/offline_standins.py), in
accuracy_run.py and accuracy_run_perf.py."""

# ruff: noqa: F811  (the fixtures imported from offline_standins are test parameters by name)
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from conftest import PHOTOS, read_json
from offline_standins import (  # noqa: F401  (pytest fixtures)
    fake_ais_bench,
    install_ais_bench,
    om_spec,
    real_ort,
    run_accuracy,
    tiny_onnx,
)

import accuracy_run_perf
from mobilevit_npu import devices, models, onnx_export, preprocessing, runtime_om, runtimes

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason='onnx / onnxruntime not installed (pip install -e ".[bench]")',
)


@pytest.fixture
def om_beside(tiny_onnx, tmp_path):
    """An .om beside a copy of the export's JSON, as ATC's --output=OUT puts it next to OUT.json."""
    om = tmp_path / "tiny.om"
    om.write_bytes(b"om")
    (tmp_path / "tiny.json").write_bytes(tiny_onnx.with_suffix(".json").read_bytes())
    return om


def test_om_without_ais_bench_says_how_to_install(tmp_path, tiny_model_dir, monkeypatch, capsys):
    om = tmp_path / "m.om"
    om.write_bytes(b"om")
    monkeypatch.setitem(sys.modules, "ais_bench", None)  # import ais_bench -> ModuleNotFoundError
    rc, _ = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "om", "--om", str(om), "--device", "npu")
    err = capsys.readouterr().err
    assert rc == 2 and "ais_bench is not installed" in err and "pip install" in err


def test_om_runs_through_infer_session_with_the_export_precision(
    tmp_path, tiny_model_dir, tiny_onnx, om_beside, real_ort, monkeypatch
):
    interface = fake_ais_bench(real_ort, {str(om_beside): om_spec(tiny_onnx, 1)})
    install_ais_bench(monkeypatch, interface)
    rc, report = run_accuracy(
        tmp_path, tiny_model_dir, *f"--runtime om --om {om_beside} --device npu:2".split(), "--images", *PHOTOS[:2]
    )
    assert rc == 0, report
    assert interface.sessions == [(2, str(om_beside))]
    assert interface.infers == [("static", (1, 3, 256, 256), "float32")] * 2
    runtime = report["runtime"]
    assert runtime["precision_mode"] == "must_keep_origin_dtype" and runtime["aipp"] is False
    assert runtime["precision_mode_source"].endswith("tiny.json") and report["target"]["device"] == "npu:2"
    assert report["target"]["mode"] == "om ais_bench" and runtime["weights"].startswith("match")


def test_om_with_aipp_takes_uint8_rgb_and_passes(tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch):
    om = tmp_path / "aipp.om"
    om.write_bytes(b"om")
    cfg = preprocessing.PreprocessConfig.from_folder(tiny_model_dir)
    interface = fake_ais_bench(real_ort, {str(om): om_spec(tiny_onnx, 1, onnx_export.aipp_config(cfg))})
    install_ais_bench(monkeypatch, interface)
    flags = f"--runtime om --om {om} --device npu --precision_mode force_fp16".split()
    rc, report = run_accuracy(tmp_path, tiny_model_dir, *flags, "--images", *PHOTOS[:2])
    assert rc == 0, report
    assert interface.infers == [("static", (1, 256, 256, 3), "uint8")] * 2
    assert report["runtime"]["aipp"] is True and report["thresholds"]["max_prob_diff"] == 0.02  # judged as fp16
    assert report["aggregate"]["cosine_min"] > 0.99999  # the AIPP + host uint8 path loses nothing
    assert report["runtime"]["weights"].startswith("unchecked")  # no export JSON beside this .om


def test_perf_om_reports_npu_compute_apart(tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch):
    om = tmp_path / "m.om"
    om.write_bytes(b"om")
    interface = fake_ais_bench(real_ort, {str(om): om_spec(tiny_onnx, 1)})
    install_ais_bench(monkeypatch, interface)
    out = tmp_path / "p.json"
    argv = [str(tiny_model_dir), "3", str(out), *f"--runtime om --om {om} --device npu --warmup 1".split()]
    argv += "--batch_sizes 2 --allocator system".split()
    assert accuracy_run_perf.main(argv) == 0
    (row,) = read_json(out)["results"]  # an NPU runtime: no CPU torch modes beside it
    assert row["mode"] == "om" and row["status"] == "ok" and row["exact"] is True
    # batch 2 on a batch-1 .om: two InferSession runs per call, 0.5 ms of NPU time each in the stand-in
    assert row["compute_ms"]["samples_ms"] == [1.0, 1.0, 1.0] and len(row["samples_ms"]) == 3
    assert {i[1] for i in interface.infers} == {(1, 3, 256, 256)}
    assert read_json(out)["settings"]["runtime"]["name"] == "om"


def test_dynamic_batch_om_pads_to_the_atc_gears(tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch):
    om = tmp_path / "dyn.om"
    om.write_bytes(b"om")
    interface = fake_ais_bench(real_ort, {str(om): om_spec(tiny_onnx, -1)})
    install_ais_bench(monkeypatch, interface)
    loaded = models.load_model(str(tiny_model_dir))
    mode, source = runtimes.om_precision_mode(om, None)
    runner = runtime_om.OmRunner(om, devices.Device("npu", 0), loaded.preprocess, mode, source)
    x = torch.stack([torch.from_numpy(preprocessing.preprocess(p, loaded.preprocess)) for p in PHOTOS[:3]])
    prepared = runner(loaded.model, devices.Device("cpu"), "fp32", x)
    got = prepared.call(prepared.to_input(x))
    assert interface.infers == [("dymbatch", (4, 3, 256, 256), "float32")]  # 3 rows padded to the gear 4
    with torch.no_grad():
        want = loaded.model(pixel_values=x).logits
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    assert runner.compute_ms == [[0.5]]
