"""probe: msprobe (the real mindstudio-probe) dumps both sides and compares them; the refusals; accuracy_run's
--msprobe. Each dump imports and runs msprobe for real, on the tiny MobileViT with healthy weights."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PHOTOS, ROOT, labelled_argv, make_labelled_set, read_json
from perturb import add_noise_in_forward

from mobilevit_npu import devices, metrics, models, preprocessing, probe, schema, targets
from mobilevit_npu.errors import UserError

NOISY = "mobilevit.encoder.layer.1"  # the second MobileNet block: divergence starts there, nowhere earlier


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model loaded the real way, and two real photos preprocessed with its own config."""
    loaded = models.load_model(str(tiny_model_dir), None, "fp32")
    items, errors = preprocessing.read_images(PHOTOS[:2], loaded.preprocess)
    assert not errors
    return loaded, items


def _dump_files(root: Path) -> dict[str, list[str]]:
    """Per side, msprobe's own layout: step0/<rank or proc folder>/ with its three json files."""
    found = {}
    for side in ("reference", "target"):
        folders = sorted((root / side / "step0").iterdir())
        found[side] = [f.name for f in folders]
        for folder in folders:
            assert {"dump.json", "stack.json", "construct.json"} <= {p.name for p in folder.iterdir()}, folder
    return found


def test_fp32_against_bf16_names_the_modules_and_counts_dtype_rows_apart(tiny, tmp_path):
    loaded, items = tiny
    model = loaded.model
    target = copy.deepcopy(model).to(torch.bfloat16)
    section = probe.dump_and_compare(tmp_path / "m", model, target, items[0].batch, "bf16")
    files = _dump_files(tmp_path / "m")
    assert files["reference"] == files["target"] == ["rank0"]  # msprobe's own rank layout, as -da reads it
    table = Path(section["compare_table"])
    assert table.parent == tmp_path / "m" / "compare" / "rank0" and table.suffix == ".csv"
    rows = probe.read_table(table)
    assert sum(section["counts"].values()) == len(rows)
    assert {"NPU Name", "Bench Name", "NPU Dtype", "Bench Dtype", "Result", "Err_message"} <= set(rows[0])
    # the rows name the model's modules: every module row maps to a real submodule (no wrapper prefix), and the
    # stem's convolution and the classifier are among them
    names = {probe.module_name(r["NPU Name"]) for r in rows} - {None}
    for name in names:
        model.get_submodule(name.split("#")[0])
    assert {"mobilevit.conv_stem.convolution", "mobilevit.encoder.layer.2.transformer", "classifier"} <= names
    # bfloat16 against float32: most rows fail for the dtype alone; they are counted apart, never listed
    assert section["counts"]["error"] >= section["dtype_only"] > len(rows) // 2
    assert "bfloat16" in section["dtype_note"]
    for row in section["first_failing"]:
        assert row["message"] != f"error: {probe.DTYPE_MESSAGE}", row
    dtype_rows = [r for r in rows if r["NPU Dtype"] != r["Bench Dtype"] and r["Result"] == "error"]
    assert len(dtype_rows) >= section["dtype_only"]
    line = probe.console_line(section)
    assert "\n" not in line and f"{section['dtype_only']} of the errors only for the dtype" in line
    assert section["version"] == probe.msprobe_version() and section["images_dumped"] == 1


def test_noise_in_one_module_is_msprobes_first_failing_module_and_layers_agree(tiny, tmp_path):
    loaded, items = tiny
    reference = targets.reference_side(loaded.model)
    example = torch.zeros(1, 3, 256, 256)
    target = targets.prepare_target(
        loaded.model,
        devices.Device("cpu"),
        "fp32",
        "eager",
        example,
        layers=True,
        patches=[add_noise_in_forward(NOISY)],
    )
    thresholds = metrics.Thresholds.for_dtype("fp32")
    _, layers = targets.compare_sides(reference, target, items[:1], thresholds, layers=True)
    assert layers.first_divergent.name == NOISY  # the project's own --layers
    pixels = items[0].batch
    section = probe.run_sides(
        tmp_path / "m",
        reference,
        target,
        pixels,
        "mix",
        "statistics",
        project_first_divergent=layers.first_divergent.name,
    )
    assert section["first_failing_module"] == NOISY
    assert probe.module_name(section["first_failing"][0]["name"]) == NOISY  # nothing before it fails, API rows either
    assert section["agree"] is True and section["dtype_only"] == 0 and section["dtype_note"] is None
    assert "agrees with --layers" in probe.console_line(section)
    # the same target without the noise: every row passes (float32 eager on one CPU is deterministic)
    clean = targets.prepare_target(loaded.model, devices.Device("cpu"), "fp32", "eager", example)
    baseline = probe.run_sides(tmp_path / "clean", reference, clean, pixels, "mix", "statistics")
    assert set(baseline["counts"]) == {"pass"} and baseline["first_failing"] == []
    assert baseline["first_failing_module"] is None and baseline["agree"] is None


def test_disagreement_is_said():
    section = {"first_failing_module": "mobilevit.encoder.layer.1", "note": None}
    said = probe.with_project(section, "mobilevit.encoder.layer.2")
    assert said["agree"] is False and "mobilevit.encoder.layer.2" in said["note"]
    assert probe.with_project(section, None)["agree"] is None


def test_msprobe_names_map_to_the_projects():
    row = "Module.mobilevit.encoder.layer.1.MobileViTMobileNetLayer.forward.0.output.0"
    assert probe.module_name(row) == "mobilevit.encoder.layer.1"
    assert probe.module_name("Module.classifier.Linear.forward.1.input.0") == "classifier#2"  # layerwise's 2nd call
    assert probe.module_name("Module.classifier.Linear.forward.0.parameters.weight") == "classifier"
    assert probe.module_name("Functional.conv2d.0.forward.output.0") is None
    assert probe.compare_names(row, "mobilevit.encoder.layer.1")
    assert not probe.compare_names(row, "mobilevit.encoder.layer.10")
    assert not probe.compare_names("Functional.conv2d.0.forward.output.0", "conv2d")


@pytest.mark.parametrize("mode", ["compiled", "fast", "npugraph"])
def test_compiled_modes_are_refused(mode):
    with pytest.raises(UserError, match="dynamo graphs of torch >= 2.7") as info:
        probe.check_dumpable(mode)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("runtime", ["onnxruntime", "om"])
def test_offline_runtimes_are_refused(runtime):
    with pytest.raises(UserError, match=f"--runtime {runtime}"):
        probe.check_dumpable("eager", runtime)


def test_missing_msprobe_is_one_line_with_the_install_command(monkeypatch):
    def absent():
        raise ModuleNotFoundError("No module named 'msprobe'")

    monkeypatch.setattr(probe, "_import_msprobe", absent)
    with pytest.raises(UserError) as info:
        probe.check_dumpable("eager")
    message = str(info.value)
    assert "\n" not in message and 'pip install -e ".[msprobe]"' in message and "mindstudio-probe" in message


def test_a_release_older_than_the_oldest_tried_is_refused(monkeypatch):
    monkeypatch.setattr(probe.importlib.metadata, "version", lambda name: "8.3.3")
    with pytest.raises(UserError, match=f"mindstudio-probe >= {probe.MIN_VERSION}.*not 8.3.3"):
        probe.check_dumpable("eager")
    monkeypatch.setattr(probe.importlib.metadata, "version", lambda name: "26.1.0.post1")
    assert probe.check_dumpable("eager") == "26.1.0.post1"


def test_folder_refusals(tmp_path):
    with pytest.raises(UserError, match="only letters, digits"):
        probe.check_out_dir(tmp_path / "a b")
    (tmp_path / "used" / "reference").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds an msprobe run"):
        probe.check_out_dir(tmp_path / "used")
    probe.check_out_dir(tmp_path / "new")  # a new folder is fine, and not made by the check
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------ accuracy_run


def _accuracy_args(model_dir, report, *extra):
    return [
        str(model_dir),
        str(report),
        "--device",
        "cpu",
        "--dtype",
        "bf16",
        "--images",
        PHOTOS[0],
        "--reference_cache",
        "off",
        "--allocator",
        "system",
        *extra,
    ]


def test_accuracy_run_msprobe_writes_the_table_and_keeps_the_verdict(tiny_model_dir, tmp_path, capsys):
    import accuracy_run

    plain, probed, out = tmp_path / "plain.json", tmp_path / "probed.json", tmp_path / "out"
    rc = accuracy_run.main(_accuracy_args(tiny_model_dir, plain))
    verdict_plain = capsys.readouterr().out.strip().splitlines()[-1]
    assert accuracy_run.main(_accuracy_args(tiny_model_dir, probed, "--msprobe", str(out))) == rc
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == verdict_plain  # the same verdict line, word for word
    assert lines[-2].startswith("msprobe ") and "table " in lines[-2]
    report = schema.load(probed)  # the validating reader: the section is the schema's
    section = report.msprobe
    assert Path(section.compare_table).is_file() and Path(section.compare_table).parent == out / "compare" / "rank0"
    assert read_json(plain)["verdict"] == read_json(probed)["verdict"]
    assert read_json(plain)["aggregate"] == read_json(probed)["aggregate"]
    assert section.counts["error"] >= section.dtype_only > 0 and section.images_dumped == 1
    assert section.reference_dump == str(out / "reference") and section.target_dump == str(out / "target")
    # the folder now holds a run: a second one into it is refused before any work (exit 2)
    assert accuracy_run.main(_accuracy_args(tiny_model_dir, tmp_path / "again.json", "--msprobe", str(out))) == 2
    assert "already holds an msprobe run" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--target_mode", "compiled"], ["--runtime", "onnxruntime"]])
def test_accuracy_run_refuses_before_any_work(tiny_model_dir, tmp_path, capsys, extra):
    import accuracy_run

    report, out = tmp_path / "r.json", tmp_path / "out"
    args = _accuracy_args(tiny_model_dir, report, "--msprobe", str(out), *extra)
    if "--runtime" in extra:
        args[args.index("--dtype") + 1] = "fp32"  # an offline runtime takes its precision from --precision_mode
    assert accuracy_run.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--msprobe" in err and len(err.splitlines()) == 1
    assert not report.exists() and not out.exists()


def _labelled_set(tmp_path) -> Path:
    return make_labelled_set(tmp_path / "set", PHOTOS[:4], classes=2)


def test_accuracy_run_on_a_labelled_set_dumps_the_first_batch(tiny_model_dir, tmp_path):
    import accuracy_run

    out, report = tmp_path / "out", tmp_path / "r.json"
    extra = ["--dtype", "bf16", "--reference_cache", "off", "--msprobe", str(out)]
    args = labelled_argv(tiny_model_dir, report, _labelled_set(tmp_path), *extra)
    assert accuracy_run.main(args) in (0, 1)
    section = schema.load(report).msprobe
    assert section.images_dumped == 2  # the first batch, not the whole set
    table = probe.read_table(section.compare_table)
    shapes = {r["NPU Tensor Shape"] for r in table if r["NPU Name"] == "Functional.conv2d.0.forward.input.0"}
    assert shapes == {"[2, 3, 256, 256]"}  # one forward over the batch
    assert _dump_files(out) == {"reference": ["rank0"], "target": ["rank0"]}


@pytest.mark.slow
def test_two_ranks_under_torchrun_give_one_dump_per_rank(tiny_model_dir, tmp_path):
    root = _labelled_set(tmp_path)
    out, report = tmp_path / "out", tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "accuracy_run.py"),
        str(tiny_model_dir),
        str(report),
        "--dataset",
        str(root),
        "--device",
        "cpu",
        "--dtype",
        "bf16",
        "--batch_size",
        "1",
        "--workers",
        "0",
        "--allocator",
        "system",
        "--msprobe",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert _dump_files(out) == {"reference": ["rank0", "rank1"], "target": ["rank0", "rank1"]}
    for rank in ("rank0", "rank1"):
        assert len(list((out / "compare" / rank).glob("compare_result_*.csv"))) == 1, rank
        dumped = json.loads((out / "target" / "step0" / rank / "dump.json").read_text())
        assert dumped["data"], rank
    section = read_json(report)["msprobe"]
    assert Path(section["compare_table"]).parent == out / "compare" / "rank0"
    assert section["images_dumped"] == 1 and "ranks" in section["note"]


def _msprobe(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real msprobe command line, as a user runs it on the dumps."""
    code = "import sys; from msprobe.msprobe import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_a_broken_layer_in_a_bf16_target_is_the_first_failing_module_and_msprobe_commands_read_the_dumps(
    tiny, tmp_path
):
    """Issue 31: bf16 against the float32 reference, one convolution's weights flipped in the target. The rows the
    dtype explains are counted apart; the broken convolution's are not, so it is the first failing module. The dumps
    are in msprobe's own rank layout, so `msprobe compare -da` finds the first difference and graph_visualize builds
    its graph on them as they are; both sides' configs are kept."""
    loaded, items = tiny
    model = loaded.model
    target = copy.deepcopy(model).to(torch.bfloat16)
    broken = next(n for n, m in target.named_modules() if n.startswith(NOISY) and isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        target.get_submodule(broken).weight.neg_()
    out = tmp_path / "m"
    section = probe.dump_and_compare(out, model, target, items[0].batch, "bf16")
    assert section["first_failing_module"] == broken, section["first_failing"]
    assert section["dtype_only"] > 0 and "14%" in section["dtype_note"]
    assert "beyond bfloat16" in section["first_failing"][0]["message"]
    for side in ("reference", "target"):
        config = json.loads((out / f"config.rank0.{side}.json").read_text())
        assert config["dump_path"] == str(out / side) and config["level"] == "mix"
    # msprobe's first-difference analysis on the dumps as written
    done = _msprobe("compare", "-tp", str(out / "target" / "step0"), "-gp", str(out / "reference" / "step0"),
                    "-o", str(tmp_path / "da"), "-da")  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = sorted((tmp_path / "da").glob("diff_analyze_*.json"))
    assert found, (done.stdout + done.stderr)[-2000:]
    first = json.loads(found[-1].read_text())["rank_0"][0]
    assert first["op_name"].startswith("Functional.conv2d."), first["op_name"]  # the broken convolution's call
    done = _msprobe("graph_visualize", "-tp", str(out / "target" / "step0"), "-gp", str(out / "reference" / "step0"),
                    "-o", str(tmp_path / "graph"))  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list((tmp_path / "graph").glob("*.vis.db"))
