"""The offline route: export_onnx.py (export, ONNX Runtime check, JSON, ATC command, AIPP), and --runtime
onnxruntime | om in accuracy_run.py and accuracy_run_perf.py.

The ONNX path runs for real on the CPU. The CANN execution provider and ais_bench's InferSession run as stand-ins
(tests/offline_standins.py, modelled on their sources) that compute with the real CPU ONNX Runtime.

What the ATC command and the AIPP file are checked against: the CANN 8.0.0 ATC guide,
hiascend.com/document/detail/en/canncommercial/800/devaids/atc/ -- atlasatcparam_16_0010 (--framework: 5 = ONNX),
atlasatcparam_16_0068 (--precision_mode values), atlasatc_16_0025 (AIPP configuration template: keys, static mode
needs input_format), atlasatc_16_0029 (RGB888_U8 sample: rbuv_swap_switch true for a BGR model), atlasatc_16_0022
(normalisation: pixel_out = (pixel_in - mean_chn_i - min_chn_i) * var_reci_chn_i); and ais_bench's interface.py value
ranges for the same keys (mean 0..255, var_reci within +-65504).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import PHOTOS, ROOT, read_json
from offline_standins import (
    CANN_OPTIONS_MAIN,
    apply_aipp,
    fake_ais_bench,
    fake_onnxruntime,
    om_spec,
    parse_aipp,
)

import accuracy_run
import accuracy_run_perf
import export_onnx
from mobilevit_npu import devices, models, onnx_export, preprocessing, runtimes

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason='onnx / onnxruntime not installed (pip install -e ".[bench]")',
)

CURRENT = "dynamo" if importlib.util.find_spec("onnxscript") else "torchscript"  # the dynamo exporter needs onnxscript
ATC_PRECISION_MODES = {  # atlasatcparam_16_0068
    "force_fp32", "cube_fp16in_fp32out", "force_fp16", "allow_fp32_to_fp16", "must_keep_origin_dtype",
    "allow_mix_precision", "allow_mix_precision_fp16", "allow_mix_precision_bf16", "allow_fp32_to_bf16",
}  # fmt: skip
AIPP_TEMPLATE_KEYS = {  # atlasatc_16_0025 (static AIPP)
    "aipp_mode", "related_input_rank", "input_format", "src_image_size_w", "src_image_size_h", "crop",
    "load_start_pos_w", "load_start_pos_h", "crop_size_w", "crop_size_h", "csc_switch", "rbuv_swap_switch",
    "ax_swap_switch", "padding", "left_padding_size", "right_padding_size", "top_padding_size", "bottom_padding_size",
    *(f"matrix_r{r}c{c}" for r in range(3) for c in range(3)), *(f"output_bias_{i}" for i in range(3)),
    *(f"input_bias_{i}" for i in range(3)), *(f"mean_chn_{i}" for i in range(4)), *(f"min_chn_{i}" for i in range(4)),
    *(f"var_reci_chn_{i}" for i in range(4)), "support_rotation",
}  # fmt: skip


@pytest.fixture(scope="module")
def real_ort():
    import onnxruntime

    return onnxruntime


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_model_dir):
    """The tiny model exported once with a dynamic batch, as the runtimes' artefact, with export_onnx.py's JSON."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert export_onnx.main([str(tiny_model_dir), str(out), "--dynamic_batch", "--soc_version", "Ascend910B4"]) == 0
    return out


# ------------------------------------------------------------------------------------------------------ export


def test_export_batch1_passes_quietly_and_writes_the_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = export_onnx.main([str(tiny_model_dir), str(out), "--soc_version", "Ascend910B4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert out.is_file() and not list(tmp_path.glob(".*.tmp"))
    # one summary line about the exporter, none of its own chatter
    assert captured.out.startswith(f"exporter: {CURRENT} (")
    for noise in ("TracerWarning", "DeprecationWarning", "[torch.onnx]", "torchvision is not installed. Skipping"):
        assert noise not in captured.out and noise not in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("VERDICT: PASS")
    data = read_json(out.with_suffix(".json"))
    assert data["verdict"] == "PASS" and data["check"]["top1_agree"] == 5
    assert data["onnx"]["inputs"] == [{"name": "pixel_values", "shape": [1, 3, 256, 256], "dtype": "float32"}]
    assert data["onnx"]["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    assert data["onnx"]["opset"] == 18 and data["onnx"]["exporter"] == CURRENT
    assert data["onnx"]["sha256"] == onnx_export.sha256_file(out)
    assert data["weights_sha256"] == models.sha256_file(tiny_model_dir / "model.safetensors")
    assert data["check"]["thresholds"]["min_cosine"] == 0.999  # fp32 thresholds
    assert data["atc"]["command"] in captured.out
    assert data["atc"]["precision_mode"] == "must_keep_origin_dtype" and data["atc"]["judge_with"] == "fp32"


def test_dynamic_batch_export_runs_any_batch(tiny_onnx, tiny_model_dir, real_ort):
    data = read_json(tiny_onnx.with_suffix(".json"))
    assert data["verdict"] == "PASS" and data["onnx"]["dynamic_batch"] is True
    assert data["onnx"]["inputs"][0]["shape"][0] == "batch"
    loaded = models.load_model(str(tiny_model_dir))
    session = real_ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = torch.stack([torch.from_numpy(preprocessing.preprocess(p, loaded.preprocess)) for p in PHOTOS[:n]])
        got = session.run(["logits"], {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            want = loaded.model(pixel_values=x).logits.numpy()
        assert got.shape == want.shape == (n, 10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    cmd = data["atc"]["command"]
    assert '--input_shape="pixel_values:-1,3,256,256"' in cmd and '--dynamic_batch_size="1,2,4,8,16,32"' in cmd


def test_a_broken_export_fails(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """An export whose file lost the sign of one convolution's weights: the ONNX Runtime check must catch it."""
    real_export = onnx_export.export_onnx

    def broken(model, path, **kwargs):
        exported = real_export(model, path, **kwargs)
        proto = onnx.load(str(path))
        init = max((i for i in proto.graph.initializer if len(i.dims) == 4), key=lambda i: np.prod(i.dims))
        array = onnx.numpy_helper.to_array(init)
        init.CopyFrom(onnx.numpy_helper.from_array(-array, init.name))
        onnx.save(proto, str(path))
        return exported

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    out = tmp_path / "broken.onnx"
    assert export_onnx.main([str(tiny_model_dir), str(out)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("VERDICT: FAIL")
    assert read_json(out.with_suffix(".json"))["verdict"] == "FAIL"


def test_opset_below_18_falls_back_to_torchscript_and_says_why(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m17.onnx"
    assert export_onnx.main([str(tiny_model_dir), str(out), "--opset", "17", "--batch_size", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("exporter: torchscript (the torch.export-based exporter was not used: it emits opset 18+")
    assert "TracerWarning" not in text
    data = read_json(out.with_suffix(".json"))
    assert data["onnx"]["opset"] == 17 and data["onnx"]["inputs"][0]["shape"] == [2, 3, 256, 256]
    assert data["verdict"] == "PASS"


def test_export_usage_errors(tiny_model_dir, tmp_path, capsys):
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path / "no" / "m.onnx")]) == 2
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path)]) == 2
    both = ["--dynamic_batch", "--batch_size", "2"]
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path / "m.onnx"), *both]) == 2
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path / "m.onnx"), "--precision_mode", "fp8"]) == 2


@pytest.mark.slow
def test_full_size_export_subprocess(tmp_path):
    """As a user runs it, on the synthetic full-size X-Small."""
    out = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), "./model", str(out), "--synthetic", "--aipp"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "VERDICT: PASS" in proc.stdout and out.with_suffix(".aipp.cfg").is_file()
    data = read_json(out.with_suffix(".json"))
    assert data["onnx"]["outputs"][0]["shape"] == [1, 1000] and data["check"]["cosine_min"] > 0.9999


# ----------------------------------------------------------------------------------------------- ATC and AIPP


def test_atc_command_as_the_cann_guide_specifies():
    cmd = onnx_export.atc_command("out/m.onnx", [1, 3, 256, 256], "Ascend910B4", "must_keep_origin_dtype")
    assert cmd.split() == ["atc", "--framework=5", "--model=out/m.onnx", "--output=out/m", "--input_format=NCHW",
                           '--input_shape="pixel_values:1,3,256,256"', "--soc_version=Ascend910B4",
                           "--precision_mode=must_keep_origin_dtype"]  # fmt: skip
    with_aipp = onnx_export.atc_command("m.onnx", [4, 3, 256, 256], "Ascend310P3", "force_fp16", "m.aipp.cfg")
    assert with_aipp.endswith("--precision_mode=force_fp16 --insert_op_conf=m.aipp.cfg")
    assert '"pixel_values:4,3,256,256"' in with_aipp
    placeholder = onnx_export.atc_command("m.onnx", [1, 3, 256, 256], onnx_export.SOC_PLACEHOLDER,
                                          "must_keep_origin_dtype")  # fmt: skip
    assert "--soc_version='<SOC_VERSION>'" in placeholder  # quoted: no shell redirection when pasted
    assert set(onnx_export.PRECISION_MODES) <= ATC_PRECISION_MODES
    with pytest.raises(Exception, match="unknown precision mode"):
        onnx_export.atc_command("m.onnx", [1, 3, 256, 256], "Ascend910B4", "fp32")


def test_precision_modes_pick_the_thresholds():
    assert onnx_export.verdict_dtype("must_keep_origin_dtype") == "fp32"
    for mode in ("force_fp16", "allow_mix_precision", "allow_fp32_to_fp16", "force_fp32"):
        assert onnx_export.verdict_dtype(mode) == "fp16"
    assert onnx_export.verdict_dtype("allow_mix_precision_bf16") == "bf16"


def test_aipp_file_follows_the_template_and_reproduces_the_preprocessing():
    cfg = preprocessing.PreprocessConfig.from_folder(ROOT / "model")
    config = parse_aipp(onnx_export.aipp_config(cfg))
    assert set(config) <= AIPP_TEMPLATE_KEYS
    assert config["aipp_mode"] == "static" and config["input_format"] == "RGB888_U8"
    assert (config["src_image_size_w"], config["src_image_size_h"]) == ("256", "256")
    assert config["rbuv_swap_switch"] == "true" and config["csc_switch"] == "false"  # RGB in, BGR to the model
    for c in range(3):
        assert 0 <= float(config[f"mean_chn_{c}"]) <= 255 and float(config[f"min_chn_{c}"]) == 0
        assert abs(float(config[f"var_reci_chn_{c}"]) - 1 / 255) < 1e-12
    for photo in PHOTOS:  # host: decode, resize, crop to uint8 RGB; AIPP: the rest, by the guide's formula
        image = preprocessing.load_image(photo)
        size = preprocessing.resize_shape(image.width, image.height, cfg.shortest_edge)
        rgb = preprocessing.center_crop(np.asarray(image.resize(size, resample=cfg.resample)), 256, 256)
        got = apply_aipp(config, rgb[None])[0]
        np.testing.assert_allclose(got, preprocessing.preprocess(photo, cfg), rtol=0, atol=1e-7)
        # and the host's float batch maps back to exactly that uint8 input
        back = onnx_export.aipp_host_input(torch.from_numpy(preprocessing.preprocess(photo, cfg))[None], cfg)
        assert back.dtype == np.uint8 and np.array_equal(back[0], rgb)


def test_soc_version_from_the_flag_the_npu_or_a_placeholder(monkeypatch):
    assert onnx_export.soc_version("Ascend910B4") == ("Ascend910B4", "--soc_version")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    value, why = onnx_export.soc_version(None)
    assert value == onnx_export.SOC_PLACEHOLDER and "npu-smi info" in why

    class Npu:
        is_available = staticmethod(lambda: True)
        device_count = staticmethod(lambda: 1)
        get_device_name = staticmethod(lambda index=None: "Ascend910B3")

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(onnx_export.devices, "npu_api", lambda: Npu)
    assert onnx_export.soc_version(None)[0] == "Ascend910B3"


# ------------------------------------------------------------------------------------- runtimes in accuracy_run


def run_accuracy(tmp_path, model_dir, *extra):
    report = tmp_path / "r.json"
    rc = accuracy_run.main([str(model_dir), str(report), *extra])
    return rc, (read_json(report) if report.exists() else None)


def test_accuracy_run_onnxruntime_cpu_exports_on_the_fly_and_passes(tmp_path, tiny_model_dir):
    rc, report = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "onnxruntime", "--device", "cpu",
                              "--images", *PHOTOS[:3])  # fmt: skip
    assert rc == 0, report
    assert report["verdict"] == "PASS" and report["target"]["device"] == "cpu"
    runtime = report["runtime"]
    assert runtime["name"] == "onnxruntime" and runtime["providers_used"] == ["CPUExecutionProvider"]
    assert runtime["precision_mode"] is None and runtime["model"] == "exported now (dynamic batch)"
    assert report["thresholds"]["max_prob_diff"] == 0.01  # fp32
    assert not any("determinism only" in n for n in report["notes"])


@pytest.mark.parametrize("device, provider", [("cuda", "CUDAExecutionProvider"), ("npu:0", "CANNExecutionProvider")])
def test_a_provider_that_is_absent_is_an_error(tmp_path, tiny_model_dir, tiny_onnx, device, provider, real_ort,
                                               monkeypatch, capsys):  # fmt: skip
    cpu_only = fake_onnxruntime(real_ort, available=("CPUExecutionProvider",))
    monkeypatch.setitem(sys.modules, "onnxruntime", cpu_only)
    rc, report = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "onnxruntime", "--onnx", str(tiny_onnx),
                              "--device", device)  # fmt: skip
    assert rc == 2 and report is None
    assert f"{provider} is not in this onnxruntime build" in capsys.readouterr().err
    assert cpu_only.calls == []  # never opened a session, so never ran on the CPU instead


def test_cann_provider_gets_its_options_and_the_providers_are_recorded(tmp_path, tiny_model_dir, tiny_onnx,
                                                                       real_ort, monkeypatch):  # fmt: skip
    cann = fake_onnxruntime(real_ort)
    monkeypatch.setitem(sys.modules, "onnxruntime", cann)
    rc, report = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "onnxruntime", "--onnx", str(tiny_onnx),
                              "--device", "npu:1", "--images", *PHOTOS[:2])  # fmt: skip
    assert rc == 0, report
    (providers,) = cann.calls
    assert providers == [("CANNExecutionProvider", {"device_id": "1", "precision_mode": "must_keep_origin_dtype",
                                                    "enable_cann_graph": "1"}), "CPUExecutionProvider"]  # fmt: skip
    runtime = report["runtime"]
    assert runtime["providers_used"] == ["CANNExecutionProvider", "CPUExecutionProvider"]
    assert runtime["precision_mode"] == "must_keep_origin_dtype" and runtime["verdict_dtype"] == "fp32"
    assert report["target"]["device"] == "npu:1" and report["thresholds"]["max_prob_diff"] == 0.01


def test_cann_mixed_precision_is_judged_with_fp16_thresholds(tmp_path, tiny_model_dir, tiny_onnx, real_ort,
                                                              monkeypatch):  # fmt: skip
    cann = fake_onnxruntime(real_ort)
    monkeypatch.setitem(sys.modules, "onnxruntime", cann)
    rc, report = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "onnxruntime", "--onnx", str(tiny_onnx),
                              "--device", "npu", "--precision_mode", "allow_mix_precision", "--cann_graph", "0",
                              "--images", PHOTOS[0])  # fmt: skip
    assert rc == 0
    assert cann.calls[0][0][1] == {"device_id": "0", "precision_mode": "allow_mix_precision", "enable_cann_graph": "0"}
    assert report["target"]["dtype"] == "float16" and report["thresholds"]["max_prob_diff"] == 0.02
    assert report["runtime"]["precision_mode"] == "allow_mix_precision"


def test_cann_build_with_precision_mode_v2_gets_the_renamed_option(tmp_path, tiny_model_dir, tiny_onnx, real_ort,
                                                                   monkeypatch):  # fmt: skip
    cann = fake_onnxruntime(real_ort, cann_options=CANN_OPTIONS_MAIN)
    monkeypatch.setitem(sys.modules, "onnxruntime", cann)
    rc, report = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "onnxruntime", "--onnx", str(tiny_onnx),
                              "--device", "npu", "--images", PHOTOS[0])  # fmt: skip
    assert rc == 0
    assert [c[0][1] for c in cann.calls] == [
        {"device_id": "0", "precision_mode": "must_keep_origin_dtype", "enable_cann_graph": "1"},
        {"device_id": "0", "enable_cann_graph": "1", "precision_mode_v2": "origin"},
    ]
    assert report["runtime"]["provider_options"]["precision_mode_v2"] == "origin"


def test_a_session_that_ends_up_on_the_cpu_is_refused(tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch,
                                                      capsys):  # fmt: skip
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_onnxruntime(real_ort, silent_cpu=True))
    rc, _ = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "onnxruntime", "--onnx", str(tiny_onnx),
                         "--device", "npu")  # fmt: skip
    assert rc == 2 and "refusing a silent CPU run" in capsys.readouterr().err


def install_ais_bench(monkeypatch, interface):
    import types

    monkeypatch.setitem(sys.modules, "ais_bench", types.ModuleType("ais_bench"))
    monkeypatch.setitem(sys.modules, "ais_bench.infer", types.ModuleType("ais_bench.infer"))
    monkeypatch.setitem(sys.modules, "ais_bench.infer.interface", interface)


def test_om_without_ais_bench_says_how_to_install(tmp_path, tiny_model_dir, monkeypatch, capsys):
    om = tmp_path / "m.om"
    om.write_bytes(b"om")
    monkeypatch.setitem(sys.modules, "ais_bench", None)  # import ais_bench -> ModuleNotFoundError
    rc, _ = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "om", "--om", str(om), "--device", "npu")
    err = capsys.readouterr().err
    assert rc == 2 and "ais_bench is not installed" in err and "pip install" in err


def test_om_runs_through_infer_session_with_the_export_precision(tmp_path, tiny_model_dir, tiny_onnx, real_ort,
                                                                 monkeypatch):  # fmt: skip
    om = tiny_onnx.with_suffix(".om")  # beside export_onnx.py's JSON, as ATC's --output puts it
    om.write_bytes(b"om")
    interface = fake_ais_bench(real_ort, {str(om): om_spec(tiny_onnx, 1)})
    install_ais_bench(monkeypatch, interface)
    rc, report = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "om", "--om", str(om), "--device", "npu:2",
                              "--images", *PHOTOS[:2])  # fmt: skip
    assert rc == 0, report
    assert interface.sessions == [(2, str(om))]
    assert interface.infers == [("static", (1, 3, 256, 256), "float32")] * 2
    runtime = report["runtime"]
    assert runtime["precision_mode"] == "must_keep_origin_dtype" and runtime["aipp"] is False
    assert runtime["precision_mode_source"].endswith("tiny.json") and report["target"]["device"] == "npu:2"


def test_om_with_aipp_takes_uint8_rgb_and_passes(tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch):
    om = tmp_path / "aipp.om"
    om.write_bytes(b"om")
    cfg = preprocessing.PreprocessConfig.from_folder(tiny_model_dir)
    interface = fake_ais_bench(real_ort, {str(om): om_spec(tiny_onnx, 1, onnx_export.aipp_config(cfg))})
    install_ais_bench(monkeypatch, interface)
    rc, report = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "om", "--om", str(om), "--device", "npu",
                              "--precision_mode", "force_fp16", "--images", *PHOTOS[:2])  # fmt: skip
    assert rc == 0, report
    assert interface.infers == [("static", (1, 256, 256, 3), "uint8")] * 2
    assert report["runtime"]["aipp"] is True and report["thresholds"]["max_prob_diff"] == 0.02  # judged as fp16
    assert report["aggregate"]["cosine_min"] > 0.99999  # the AIPP + host uint8 path loses nothing


def test_runtime_usage_errors(tmp_path, tiny_model_dir, capsys):
    cases = [
        (["--runtime", "om"], "--runtime om needs --om"),
        (["--runtime", "onnxruntime", "--dtype", "fp16"], "its precision is --precision_mode"),
        (["--onnx", "x.onnx"], "--onnx goes with --runtime onnxruntime"),
        (["--runtime", "onnxruntime", "--layers"], "--layers needs the torch modules"),
        (["--runtime", "om", "--om", str(tmp_path / "missing.om")], "is not a file"),
    ]
    for extra, message in cases:
        rc, _ = run_accuracy(tmp_path, tiny_model_dir, *extra)
        assert rc == 2 and message in capsys.readouterr().err, extra
    om = tmp_path / "m.om"
    om.write_bytes(b"om")
    rc, _ = run_accuracy(tmp_path, tiny_model_dir, "--runtime", "om", "--om", str(om), "--device", "cpu")
    assert rc == 2 and "--device npu" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- benchmark


def test_perf_onnxruntime_beside_eager(tmp_path, tiny_model_dir):
    out = tmp_path / "p.json"
    argv = [str(tiny_model_dir), "2", str(out), "--runtime", "onnxruntime", "--device", "cpu", "--warmup", "1",
            "--batch_sizes", "1,2", "--allocator", "system"]  # fmt: skip
    assert accuracy_run_perf.main(argv) == 0
    data = read_json(out)
    assert [(r["mode"], r["batch_size"]) for r in data["results"]] == [
        ("eager", 1), ("onnxruntime", 1), ("eager", 2), ("onnxruntime", 2)]  # fmt: skip
    for r in data["results"]:
        assert r["status"] == "ok" and len(r["samples_ms"]) == 2 and r["exact"] is True, r
    assert data["settings"]["runtime"]["providers_used"] == ["CPUExecutionProvider"]


def test_perf_om_reports_npu_compute_apart(tmp_path, tiny_model_dir, tiny_onnx, real_ort, monkeypatch):
    om = tmp_path / "m.om"
    om.write_bytes(b"om")
    interface = fake_ais_bench(real_ort, {str(om): om_spec(tiny_onnx, 1)})
    install_ais_bench(monkeypatch, interface)
    out = tmp_path / "p.json"
    argv = [str(tiny_model_dir), "3", str(out), "--runtime", "om", "--om", str(om), "--device", "npu", "--warmup",
            "1", "--batch_sizes", "2", "--allocator", "system"]  # fmt: skip
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
    runner = runtimes.OmRunner(om, devices.Device("npu", 0), loaded.preprocess)
    x = torch.stack([torch.from_numpy(preprocessing.preprocess(p, loaded.preprocess)) for p in PHOTOS[:3]])
    prepared = runner(loaded.model, devices.Device("cpu"), "fp32", x)
    got = prepared.call(prepared.to_input(x))
    assert interface.infers == [("dymbatch", (4, 3, 256, 256), "float32")]  # 3 rows padded to the gear 4
    with torch.no_grad():
        want = loaded.model(pixel_values=x).logits
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    assert runner.compute_ms == [[0.5]]


def test_given_static_onnx_at_another_batch_is_unavailable(tmp_path, tiny_model_dir):
    static = tmp_path / "b1.onnx"
    assert export_onnx.main([str(tiny_model_dir), str(static)]) == 0
    out = tmp_path / "p.json"
    argv = [str(tiny_model_dir), "1", str(out), "--runtime", "onnxruntime", "--onnx", str(static), "--device", "cpu",
            "--warmup", "0", "--batch_sizes", "1,2", "--modes", "eager"]  # fmt: skip
    assert accuracy_run_perf.main(argv) == 0
    rows = {(r["mode"], r["batch_size"]): r for r in read_json(out)["results"]}
    assert rows[("onnxruntime", 1)]["status"] == "ok"
    assert rows[("onnxruntime", 2)]["status"] == "unavailable"
    assert "takes batch 1 only" in rows[("onnxruntime", 2)]["reason"]


def test_json_is_strict(tiny_onnx):
    json.loads(tiny_onnx.with_suffix(".json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert runtimes.sidecar(tiny_onnx.with_suffix(".om"))["atc"]["soc_version"] == "Ascend910B4"
