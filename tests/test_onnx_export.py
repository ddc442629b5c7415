"""export_onnx.py and mobilevit_npu.onnx_export: the export at an opset ATC documents, its ONNX Runtime check, the
export report, the ATC command and AIPP, and the outputs it never overwrites.

What the ATC command and the AIPP file are checked against: the CANN 8.0.0 ATC guide,
hiascend.com/document/detail/{zh,en}/canncommercial/800/devaids/ -- atlasatcparam_16_0014 (--framework: 5 = ONNX,
opsets v11 to v15), atlasatcparam_16_0068 (--precision_mode values), atlasatc_16_0025 (AIPP configuration template:
keys, static mode needs input_format), atlasatc_16_0029 (RGB888_U8 sample: rbuv_swap_switch true for a BGR model),
atlasatc_16_0022 (normalisation: pixel_out = (pixel_in - mean_chn_i - min_chn_i) * var_reci_chn_i); and ais_bench's
interface.py value ranges for the same keys (mean 0..255, var_reci within +-65504).
"""

# ruff: noqa: F811  (the fixtures imported from offline_standins are test parameters by name)
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import PHOTOS, ROOT, read_json
from offline_standins import (
    apply_aipp,
    parse_aipp,
    run_accuracy,
    tiny_onnx,  # noqa: F401  (pytest fixtures)
)

import export_onnx
from mobilevit_npu import execution, models, onnx_export, preprocessing, schema
from mobilevit_npu.errors import UserError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason='onnx / onnxruntime not installed (pip install -e ".[bench]")',
)

ATC_PRECISION_MODES = {  # atlasatcparam_16_0068
    "force_fp32",
    "cube_fp16in_fp32out",
    "force_fp16",
    "allow_fp32_to_fp16",
    "must_keep_origin_dtype",
    "allow_mix_precision",
    "allow_mix_precision_fp16",
    "allow_mix_precision_bf16",
    "allow_fp32_to_bf16",
}
AIPP_TEMPLATE_KEYS = {  # atlasatc_16_0025 (static AIPP)
    "aipp_mode",
    "related_input_rank",
    "input_format",
    "src_image_size_w",
    "src_image_size_h",
    "crop",
    "load_start_pos_w",
    "load_start_pos_h",
    "crop_size_w",
    "crop_size_h",
    "csc_switch",
    "rbuv_swap_switch",
    "ax_swap_switch",
    "padding",
    "left_padding_size",
    "right_padding_size",
    "top_padding_size",
    "bottom_padding_size",
    *(f"matrix_r{r}c{c}" for r in range(3) for c in range(3)),
    *(f"output_bias_{i}" for i in range(3)),
    *(f"input_bias_{i}" for i in range(3)),
    *(f"mean_chn_{i}" for i in range(4)),
    *(f"min_chn_{i}" for i in range(4)),
    *(f"var_reci_chn_{i}" for i in range(4)),
    "support_rotation",
}


def lines(captured) -> list[str]:
    return [line for line in (captured.out + captured.err).splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------ export


def test_default_export_is_inside_atcs_opset_range_and_cites_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = export_onnx.main([str(tiny_model_dir), str(out), "--soc_version", "Ascend910B4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert out.is_file() and not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".*.probe"))
    assert onnx_export.file_opset(out) == 15  # the file itself, read back by onnx
    # one summary line about the exporter, none of its own chatter
    assert captured.out.startswith("exporter: torchscript (opset 15: ")
    for noise in ("TracerWarning", "DeprecationWarning: You are using", "[torch.onnx]", "Torch IR"):
        assert noise not in captured.out.split("\n", 1)[1] and noise not in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("VERDICT: PASS")
    report = schema.load(out.with_suffix(".json"))  # the export report, read back by the one validating reader
    assert isinstance(report, schema.OnnxExportReport) and report.verdict == "PASS" and report.check.top1_agree == 5
    atc = report.atc
    assert atc["onnx_opsets"] == [11, 15] and atc["opset_in_range"] is True
    assert "CANN 8.0.0" in atc["onnx_opsets_source"] and "atlasatcparam_16_0014" in atc["onnx_opsets_source"]
    assert report.onnx["opset"] == 15 and report.onnx["exporter"] == "torchscript"
    assert report.onnx["inputs"] == [{"name": "pixel_values", "shape": [1, 3, 256, 256], "dtype": "float32"}]
    assert report.onnx["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    assert report.onnx["sha256"] == models.sha256_file(out)
    # the weights' identity is the digest of what was loaded (the runtimes compare it before running the file)
    assert report.weights_sha256 == models.weights_digest(models.load_model(str(tiny_model_dir)).model)
    assert report.check.thresholds.min_cosine == 0.999  # fp32 thresholds
    assert atc["command"] in captured.out
    assert atc["precision_mode"] == "must_keep_origin_dtype" and atc["judge_with"] == "fp32"


def test_dynamic_batch_export_runs_any_batch(tiny_onnx, tiny_model_dir):
    import onnxruntime

    data = read_json(tiny_onnx.with_suffix(".json"))
    assert data["verdict"] == "PASS" and data["onnx"]["dynamic_batch"] is True and data["onnx"]["opset"] == 15
    assert data["onnx"]["inputs"][0]["shape"][0] == "batch"
    loaded = models.load_model(str(tiny_model_dir))
    session = onnxruntime.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = torch.stack([torch.from_numpy(preprocessing.preprocess(p, loaded.preprocess)) for p in PHOTOS[:n]])
        got = session.run(["logits"], {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            want = loaded.model(pixel_values=x).logits.numpy()
        assert got.shape == want.shape == (n, 10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    cmd = data["atc"]["command"]
    words = shlex.split(cmd)
    assert "--input_shape=pixel_values:-1,3,256,256" in words and "--dynamic_batch_size=1,2,4,8,16,32" in words


def test_the_exports_check_is_the_verification_of_that_file(tiny_onnx, tiny_model_dir, tmp_path):
    """export_onnx.py's check and `accuracy_run.py --runtime onnxruntime --onnx` on the same file and photos: one
    comparison (verify.compare_images over the same session opener), so the same figures to the last bit."""
    check = read_json(tiny_onnx.with_suffix(".json"))["check"]
    rc, report = run_accuracy(
        tmp_path, tiny_model_dir, "--runtime", "onnxruntime", "--onnx", str(tiny_onnx), "--device", "cpu"
    )
    assert rc == 0 and report["verdict"] == check["verdict"] == "PASS"
    assert [m["image"] for m in report["per_image"]] == check["images"]
    for key in ("cosine_min", "max_abs_prob_diff", "max_abs_logit_diff"):
        assert report["aggregate"][key] == check[key], key
    assert report["thresholds"] == check["thresholds"]


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


def test_an_opset_outside_atcs_range_is_written_with_a_warning(tiny_model_dir, tiny_onnx, tmp_path, capsys, caplog):
    """--opset 17: allowed, with a warning naming ATC's range; and an earlier export's own JSON of the same name is
    replaced (only unrelated files are protected)."""
    out = tmp_path / "tiny.onnx"
    shutil.copy(tiny_onnx.with_suffix(".json"), out.with_suffix(".json"))  # the JSON of an earlier export of tiny.onnx
    assert export_onnx.main([str(tiny_model_dir), str(out), "--opset", "17", "--batch_size", "2"]) == 0
    text = capsys.readouterr().out
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("--opset 17 is outside 11-15" in w and "CANN 8.0.0 ATC guide" in w for w in warned), warned
    assert "note: opset 17 is outside 11-15" in text
    data = read_json(out.with_suffix(".json"))
    assert data["onnx"]["opset"] == 17 == onnx_export.file_opset(out) and data["atc"]["opset_in_range"] is False
    assert data["onnx"]["inputs"][0]["shape"] == [2, 3, 256, 256] and data["verdict"] == "PASS"


def test_opset_99_is_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_onnx.main([str(tiny_model_dir), str(out), "--opset", "99"]) == 2
    (line,) = lines(capsys.readouterr())
    assert line.startswith("error: --opset 99: torch ") and "11-15" in line
    assert not out.exists()


class _BesselLogits(torch.nn.Module):
    """A model with an operator no ONNX opset has (aten::special_bessel_j0): the TorchScript exporter fails on it."""

    def forward(self, pixel_values):
        return types.SimpleNamespace(logits=torch.special.bessel_j0(pixel_values).mean((2, 3)))


def test_an_export_error_is_one_line_without_the_exporters_native_dump(capfd):
    """On an export error the TorchScript exporter prints the whole Torch IR graph from C++ (torch._C._jit_onnx_log,
    "Torch IR graph at exception: ..."), past Python's sys.stdout; the raw exporter does, the export does not."""
    example = torch.rand(1, 3, 8, 8)
    with pytest.raises(Exception, match="special_bessel_j0"):
        onnx_export._export(execution.Logits(_BesselLogits()), example, Path(os.devnull), 15, False, dynamo=False)
    assert "Torch IR graph at exception" in capfd.readouterr().out  # what the user got on the console before
    with pytest.raises(UserError) as failed:
        onnx_export.export_onnx(_BesselLogits(), os.devnull, image_size=(8, 8))
    assert capfd.readouterr() == ("", "")
    assert str(failed.value).startswith("ONNX export failed (UnsupportedOperatorError: Exporting the operator")
    assert "\n" not in str(failed.value)


def test_native_output_is_kept_out_of_the_console_and_the_descriptors_restored(capfd):
    sink: list[str] = []
    with pytest.raises(RuntimeError), onnx_export._quiet(sink):
        os.write(1, b"native line one\n")
        os.write(2, b"native line two\n")
        raise RuntimeError("the export failed")
    assert capfd.readouterr() == ("", "")
    assert sink == ["native output, 2 line(s): native line one"]
    os.write(1, b"after\n")  # file descriptor 1 is the console's again
    assert capfd.readouterr().out == "after\n"


def test_the_export_json_cannot_be_the_onnx(tiny_model_dir, tmp_path, capsys):
    """`export_onnx.py MODEL out/m2.json` wrote the ONNX, then its JSON over it: OUT must end in .onnx now."""
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path / "m2.json")]) == 2
    assert "does not end in .onnx" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_unrelated_json_of_the_sidecars_name_is_not_overwritten(tiny_model_dir, tmp_path, capsys):
    mine = tmp_path / "x.json"
    mine.write_text('{"my": "notes"}\n')
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path / "x.onnx")]) == 2
    (line,) = lines(capsys.readouterr())
    assert str(mine) in line and str(tmp_path / "x.onnx") in line and "was not written by an export" in line
    assert mine.read_text() == '{"my": "notes"}\n' and not (tmp_path / "x.onnx").exists()
    cfg = tmp_path / "y.aipp.cfg"
    cfg.write_text("aipp_op { aipp_mode: dynamic }\n")
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path / "y.onnx"), "--aipp"]) == 2
    assert str(cfg) in capsys.readouterr().err and cfg.read_text() == "aipp_op { aipp_mode: dynamic }\n"


def test_an_output_in_the_model_folder_is_refused(tiny_model_dir, capsys):
    assert export_onnx.main([str(tiny_model_dir), str(tiny_model_dir / "m.onnx")]) == 2
    assert "model folder" in capsys.readouterr().err and not (tiny_model_dir / "m.onnx").exists()


def test_a_read_only_place_is_one_line_naming_erofs(tiny_model_dir, tmp_path, capsys):
    """A real read-only file system (a tmpfs mounted ro; skipped where mounting is not allowed)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        assert export_onnx.main([str(tiny_model_dir), str(folder / "m.onnx")]) == 2
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    (line,) = lines(capsys.readouterr())
    assert line.startswith("error: OUT.onnx ") and "Read-only file system (EROFS)" in line


def test_export_usage_errors(tiny_model_dir, tmp_path, capsys):
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path / "no" / "m.onnx")]) == 2
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path)]) == 2
    both = ["--dynamic_batch", "--batch_size", "2"]
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path / "m.onnx"), *both]) == 2
    assert export_onnx.main([str(tiny_model_dir), str(tmp_path / "m.onnx"), "--precision_mode", "fp8"]) == 2
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_full_size_export_subprocess(tmp_path):
    """As a user runs it, on the synthetic full-size X-Small."""
    out = tmp_path / "m.onnx"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "export_onnx.py"), "./model", str(out), "--synthetic", "--aipp"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "VERDICT: PASS" in proc.stdout and out.with_suffix(".aipp.cfg").is_file()
    data = read_json(out.with_suffix(".json"))
    assert data["onnx"]["outputs"][0]["shape"] == [1, 1000] and data["check"]["cosine_min"] > 0.9999
    assert data["onnx"]["opset"] == onnx_export.file_opset(out) == 15


def test_json_is_strict(tiny_onnx):
    json.loads(tiny_onnx.with_suffix(".json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


# ----------------------------------------------------------------------------------------------- ATC and AIPP


def test_atc_command_as_the_cann_guide_specifies():
    cmd = onnx_export.atc_command("out/m.onnx", [1, 3, 256, 256], "Ascend910B4", "must_keep_origin_dtype")
    assert cmd.split() == [
        "atc",
        "--framework=5",
        "--model=out/m.onnx",
        "--output=out/m",
        "--input_format=NCHW",
        "--input_shape=pixel_values:1,3,256,256",
        "--soc_version=Ascend910B4",
        "--precision_mode=must_keep_origin_dtype",
    ]
    with_aipp = onnx_export.atc_command("m.onnx", [4, 3, 256, 256], "Ascend310P3", "force_fp16", "m.aipp.cfg")
    assert with_aipp.endswith("--precision_mode=force_fp16 --insert_op_conf=m.aipp.cfg")
    assert "--input_shape=pixel_values:4,3,256,256" in shlex.split(with_aipp)
    placeholder = onnx_export.atc_command(
        "m.onnx", [1, 3, 256, 256], onnx_export.SOC_PLACEHOLDER, "must_keep_origin_dtype"
    )
    assert "'--soc_version=<SOC_VERSION>'" in placeholder  # quoted: no shell redirection when pasted
    assert "--soc_version=<SOC_VERSION>" in shlex.split(placeholder)
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
    text = onnx_export.aipp_config(cfg)
    assert text.startswith(export_onnx.AIPP_FIRST_LINE)  # how a re-export knows the file is its own
    config = parse_aipp(text)
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
