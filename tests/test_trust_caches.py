"""Issue 28, caches, memory bounds and messages: every cache keyed on what changes what it holds, batch sizes bounded
by memory before anything is allocated, and one-line errors (exit 2) where a traceback, a hang or a silent success
used to be."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import PHOTOS, read_json

import accuracy_run
import accuracy_run_perf
import export_onnx
from mobilevit_npu import compilers, devices, execution, fastpath, models, refcache

CPU = devices.Device("cpu")
SYSTEM = ["--allocator", "system"]  # in-process script runs leave malloc alone (mallopt is process-wide)


def error_line(err: str) -> str:
    """The one line a refusal prints, checked to be the only line and free of a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def set_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(fields)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------------------- cache keys


def test_every_cache_key_changes_when_only_hidden_act_changes(model_copy):
    """silu -> gelu: SiLUActivation and GELUActivation live in one source file (transformers/activations.py), the
    weights file is untouched, so neither the code digest nor the weights told the two apart: the compile cache
    handed the silu build to the gelu model."""
    x = torch.rand(1, 3, 256, 256)
    cl = x.contiguous(memory_format=torch.channels_last)

    def keys(folder: Path) -> tuple[dict, ...]:
        loaded = models.load_model(str(folder))
        fast = fastpath.build_fast_model(loaded.model, channels_last=True)
        return (
            compilers.aoti_key(execution.Logits(loaded.model), CPU, x),
            compilers.aoti_key(fast, CPU, cl),
            refcache.reference_key(loaded.model, loaded.source, loaded.preprocess),
        )

    silu = keys(model_copy)
    set_config(model_copy, hidden_act="gelu")
    gelu = keys(model_copy)
    for before, after in zip(silu, gelu):
        assert before["weights_sha256"] == after["weights_sha256"]  # the same tensors: only config.json changed
        assert before != after
    assert silu[0]["config_sha256"] != gelu[0]["config_sha256"]
    assert silu[1]["structure_sha256"] != gelu[1]["structure_sha256"]  # the fast model holds no config: its layers say


def test_cache_keys_do_not_depend_on_where_the_model_folder_is(model_copy, tmp_path):
    """The same files in another folder: the same keys (a moved model keeps its compile and reference caches)."""
    x = torch.rand(1, 3, 256, 256)
    elsewhere = shutil.copytree(model_copy, tmp_path / "moved")
    a, b = models.load_model(str(model_copy)), models.load_model(str(elsewhere))
    assert compilers.aoti_key(execution.Logits(a.model), CPU, x) == compilers.aoti_key(
        execution.Logits(b.model), CPU, x
    )
    assert refcache.reference_key(a.model, a.source, a.preprocess) == refcache.reference_key(
        b.model, b.source, b.preprocess
    )


def test_compile_key_names_the_cpp_compiler_and_python():
    key = compilers.aoti_key(torch.nn.Conv2d(3, 4, 3).eval(), CPU, torch.rand(1, 3, 8, 8))
    assert key["python"] == ".".join(map(str, sys.version_info[:3]))
    if shutil.which("g++") or shutil.which("c++"):
        assert key["cpp_compiler"] and " version " in key["cpp_compiler"]
    assert key["config_sha256"] is None  # a bare module holds no config; its structure and code still key it


@pytest.mark.slow
@pytest.mark.skipif(not compilers.aoti_available(), reason="the CPU's compiled target is cached as an AOTI package")
def test_compiled_target_after_only_hidden_act_changed_is_built_again_and_passes(
    model_copy, tmp_path, tiny_compile_cache, capsys
):
    """The issue's repro, script-level: the compile cache holds the silu model's compiled build (conftest.compiled_tiny:
    the benchmark's, which a compiled target of this very folder loads); change only config.json's hidden_act to gelu
    and the compiled target must be the gelu model's (it loaded the silu build and FAILed, cosine 0.23)."""
    report = tmp_path / "r.json"
    argv = [str(model_copy), str(report), "--device", "cpu", "--target_mode", "compiled", "--images", PHOTOS[0]]
    first = accuracy_run.main(argv + ["--reference_cache", "off"])
    assert first in (0, 1) and read_json(report)["checks"]
    assert "compile cache hit" in " ".join(read_json(report)["target"]["notes"])  # the silu build is in the cache
    set_config(model_copy, hidden_act="gelu")
    rc = accuracy_run.main(argv + ["--reference_cache", "off"])
    data = read_json(report)
    notes = " ".join(data["target"]["notes"])
    assert "compile cache hit" not in notes  # a new build: the key saw config.json change
    cosine = next(c for c in data["checks"] if "cosine" in c["name"])
    assert cosine["passed"], (rc, data["verdict"], cosine)
    assert data["verdict"] != "FAIL"


# ------------------------------------------------------------------------------------------------ memory bounds


def test_export_batch_size_beyond_memory_is_refused_before_any_allocation(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from mobilevit_npu import onnx_export

    def no_example(*args):
        pytest.fail("the example batch was allocated")

    monkeypatch.setattr(onnx_export, "_example", no_example)
    out = tmp_path / "m.onnx"
    rc = export_onnx.main([str(tiny_model_dir), str(out), "--batch_size", "100000"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "--batch_size 100000" in line and "GiB" in line
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, no temp file left


def test_perf_batch_sizes_beyond_memory_are_refused_before_any_allocation(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from mobilevit_npu import bench

    monkeypatch.setattr(bench, "photo_batches", lambda *a, **k: pytest.fail("a batch was allocated"))
    report = tmp_path / "p.json"
    rc = accuracy_run_perf.main([str(tiny_model_dir), "1", str(report), "--batch_sizes", "1,100000", *SYSTEM])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "--batch_sizes 100000" in line
    assert not report.exists()


# ----------------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1), "9" * 5000])
def test_seed_beyond_64_bits_is_a_usage_error(seed, tmp_path, capsys):
    report = tmp_path / "r.json"
    rc = accuracy_run.main(["./model", str(report), "--synthetic", "--seed", seed, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "--seed" in line and "64-bit" in line and len(line) < 300
    assert not report.exists()


def test_seed_at_the_64_bit_bounds_is_taken():
    import common

    for value in (2**64 - 1, -(2**63), 0):
        assert common.seed(str(value)) == value
        torch.Generator().manual_seed(value)  # torch takes them too


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_plot_to_a_full_device_is_an_error_not_a_success(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    report = tmp_path / "r.json"
    argv = [str(tiny_model_dir), "1", str(report), "--warmup", "0", "--modes", "eager", "--plot", "/dev/full"]
    rc = accuracy_run_perf.main([*argv, *SYSTEM])
    captured = capsys.readouterr()
    line = error_line(captured.err)
    assert rc == 2 and "/dev/full" in line and "No space left on device" in line
    assert "plot: /dev/full" not in captured.out
    assert os.path.exists("/dev/full") and not Path("/dev/full").is_file()  # written through, never replaced


def test_card_png_on_a_full_disk_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """port_report's PNGs on a full disk: every write into the assets folder goes to /dev/full (ENOSPC when the
    bytes are flushed, as on a full file system): one line, exit 2, no card."""
    pytest.importorskip("matplotlib")
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    import port_report
    from mobilevit_npu import atomic

    work = tmp_path / "work"
    model = shutil.copytree(tiny_model_dir, work / "model")
    acc, perf = work / "acc.json", work / "perf.json"
    common_args = ["--device", "cpu", "--reference_cache", "off", "--images", PHOTOS[0]]
    assert accuracy_run.main([str(model), str(acc), "--target_mode", "channels_last", *common_args]) in (0, 1)
    assert accuracy_run_perf.main([str(model), "2", str(perf), "--warmup", "0", "--modes", "eager", *SYSTEM]) in (0, 1)
    capsys.readouterr()
    real_temp = atomic._temp_beside

    def full_disk(target):
        fd, name = real_temp(target)
        if target.suffix == ".png":  # a PNG's temp file: its bytes go nowhere
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        return fd, name

    monkeypatch.setattr(atomic, "_temp_beside", full_disk)
    card_path = work / "card.md"
    rc = port_report.main([str(acc), str(perf), "--output", str(card_path)])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "No space left on device" in line and ".png" in line
    assert not card_path.exists()
    assert not [p for p in (work / "card_assets").rglob("*") if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("kind", ["fifo", "device link", "folder", "dangling link"])
def test_weights_that_are_not_a_regular_file_are_named_so(kind, model_copy, tmp_path, capsys):
    weights = model_copy / "model.safetensors"
    weights.unlink()
    if kind == "fifo":
        os.mkfifo(weights)  # opening it for reading would wait for a writer forever
    elif kind == "device link":
        weights.symlink_to("/dev/zero")
    elif kind == "folder":
        weights.mkdir()
    else:
        weights.symlink_to(tmp_path / "gone.safetensors")
    report = tmp_path / "r.json"
    rc = accuracy_run.main([str(model_copy), str(report), "--device", "cpu", "--images", PHOTOS[0]])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and str(weights) in line and "holds no weights" not in line
    assert ("not a regular file" in line) if kind != "dangling link" else ("does not exist" in line)
    assert not report.exists()


# --------------------------------------------------------------------------------------------------- ATC command


def test_soc_version_with_shell_syntax_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = export_onnx.main([str(tiny_model_dir), str(out), "--soc_version", "X; rm -rf /tmp/x"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "--soc_version" in line and "Ascend910B4" in line
    assert sorted(os.listdir(tmp_path)) == []


def test_known_soc_names_pass_and_others_do_not():
    from mobilevit_npu import onnx_export

    for name in ("Ascend310P3", "Ascend910B4", "Ascend910B4-1", "Ascend910_9391", "Ascend910PremiumA", "Ascend310B1"):
        assert onnx_export.check_soc_version(name) == name
    for name in ("X; rm -rf /tmp/x", "Ascend910B4 --x", "ascend", "Ascend910B4`id`", "$(id)", "Ascend910'", ""):
        with pytest.raises(Exception, match="not an Ascend SoC name"):
            onnx_export.check_soc_version(name)


def test_atc_command_is_one_shell_command_whatever_the_paths_hold():
    import shlex

    from mobilevit_npu import onnx_export

    odd = "out dir/it's; touch pwned $(id).onnx"
    cmd = onnx_export.atc_command(odd, [1, 3, 256, 256], "Ascend910B4", "must_keep_origin_dtype", "a b.aipp.cfg")
    words = shlex.split(cmd)
    assert words[0] == "atc" and f"--model={odd}" in words and "--insert_op_conf=a b.aipp.cfg" in words
    assert f"--output={odd[: -len('.onnx')]}" in words
    assert len(words) == 9  # nothing split off into a second command or argument
