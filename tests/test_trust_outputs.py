"""Issue 28, nothing destroyed and nothing stale: the output guard over folders and inputs (journal, caches, --msprobe,
the export JSON beside --onnx), the journal that deletes only what it made, a --resume keyed on everything that
changes a record with every journaled line checked, and a bounded --workers. Script-level: accuracy_run.main /
accuracy_run_perf.main, every input compared byte for byte after each refusal."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from conftest import PHOTOS, labelled_argv, make_labelled_set
from offline_standins import tiny_onnx  # noqa: F401  (a pytest fixture: the tiny model exported by export_onnx.py)

import accuracy_run
import accuracy_run_perf
import common
from mobilevit_npu import compilers, labelsets, models
from mobilevit_npu.errors import UserError


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file under `root` (or `root` itself) by relative path: its bytes, or a link's target."""
    root = Path(root)
    if root.is_file():
        return {".": root.read_bytes()}
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir"
    return out


make_set = make_labelled_set  # the photos as a labelled set in class-index folders (the tiny model has 10 classes)


def labelled(model_dir, report, dataset, *extra) -> list[str]:
    # channels_last: not the reference itself, a port check that can PASS
    port = ["--target_mode", "channels_last"]
    return labelled_argv(model_dir, report, dataset, "--reference_cache", "off", *port, *extra)


def one_line_refusal(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model_work(monkeypatch):
    """Refusals come before any model work: loading the model fails the test."""

    def load_named(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(models, "load_named", load_named)


def killed_run(argv: list[str], monkeypatch) -> None:
    """A labelled run killed (KeyboardInterrupt) after its first batch is journaled."""
    real = labelsets.stream

    def killed_after_one_batch(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(labelsets, "stream", killed_after_one_batch)
    assert accuracy_run.main(argv) == 130
    monkeypatch.setattr(labelsets, "stream", real)


# ------------------------------------------------------------------------------------ item 1: the journal folder


@pytest.mark.parametrize("victim", ["model", "dataset"])
def test_a_journal_folder_that_is_the_model_or_the_dataset_is_refused_and_kept(
    tmp_path, tiny_model_dir, capsys, no_model_work, victim
):
    """REPORT.json.parts is the model folder or the data set: today deleted with VERDICT: PASS; now one line, exit 2,
    before the model is loaded, every byte kept."""
    report = tmp_path / "r.json"
    model, dataset = tmp_path / "model", tmp_path / "set"
    if victim == "model":
        model = tmp_path / "r.json.parts"
    else:
        dataset = tmp_path / "r.json.parts"
    shutil.copytree(tiny_model_dir, model)
    make_set(dataset)
    before = {"model": snapshot(model), "set": snapshot(dataset)}
    assert accuracy_run.main(labelled(model, report, dataset)) == 2
    one_line_refusal(capsys, "the --resume journal", str(tmp_path / "r.json.parts"))
    assert {"model": snapshot(model), "set": snapshot(dataset)} == before and not report.exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_the_journal_did_not_make_is_neither_used_nor_deleted(
    tmp_path, tiny_model_dir, capsys, monkeypatch, resume
):
    report, parts = tmp_path / "r.json", tmp_path / "r.json.parts"
    parts.mkdir()
    (parts / "thesis.tex").write_text("years of work")
    (parts / "meta.json").write_text("{}")  # even one that looks like a journal
    dataset = make_set(tmp_path / "set")
    before = snapshot(parts)
    argv = labelled(tiny_model_dir, report, dataset, *(["--resume"] if resume else []))
    assert accuracy_run.main(argv) == 2
    one_line_refusal(capsys, str(parts), "did not make")
    assert snapshot(parts) == before and not report.exists()


def test_a_marked_journal_with_a_users_file_in_it_is_not_deleted(tmp_path, tiny_model_dir, capsys, monkeypatch):
    report, parts = tmp_path / "r.json", tmp_path / "r.json.parts"
    dataset = make_set(tmp_path / "set")
    argv = labelled(tiny_model_dir, report, dataset)
    killed_run(argv, monkeypatch)
    assert (parts / labelsets.JOURNAL_MARKER).is_file()
    (parts / "notes.txt").write_text("mine")
    before = snapshot(parts)
    assert accuracy_run.main(argv) == 2  # a fresh run would empty the journal: not with a user's file in it
    one_line_refusal(capsys, "notes.txt", "did not write")
    assert snapshot(parts) == before
    (parts / "notes.txt").unlink()
    assert accuracy_run.main(argv) == 0 and not parts.exists()  # the tool's own journal goes once the report is there


@pytest.mark.parametrize(
    "where",
    [
        "reference_cache_in_model",
        "pixel_cache_in_model",
        "pixel_cache_is_dataset",
        "msprobe_in_dataset",
        "compile_cache_env_in_model",
        "report_in_dataset",
        "parts_link_to_model",
    ],
)
def test_every_folder_the_run_writes_is_under_the_output_guard(
    tmp_path, tiny_model_dir, capsys, monkeypatch, no_model_work, where
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    dataset = make_set(tmp_path / "set")
    report = tmp_path / "r.json"
    extra: list[str] = []
    if where == "reference_cache_in_model":
        extra = ["--reference_cache", str(model / "cache")]
    elif where == "pixel_cache_in_model":
        extra = ["--pixel_cache", str(model / "pixels")]
    elif where == "pixel_cache_is_dataset":
        extra = ["--pixel_cache", str(dataset)]
    elif where == "msprobe_in_dataset":
        extra = ["--msprobe", str(dataset / "dump")]
    elif where == "compile_cache_env_in_model":
        monkeypatch.setenv(compilers.COMPILE_CACHE_ENV, str(model / "compiled"))
        extra = ["--target_mode", "compiled"]
    elif where == "report_in_dataset":
        report = dataset / "r.json"
    elif where == "parts_link_to_model":
        (tmp_path / "r.json.parts").symlink_to(model)
    argv = labelled(model, report, dataset, *extra)  # a later --reference_cache overrides the helper's "off"
    before = {"model": snapshot(model), "set": snapshot(dataset)}
    assert accuracy_run.main(argv) == 2
    line = one_line_refusal(capsys)
    assert "inside the" in line or "is the input --dataset" in line, line
    assert {"model": snapshot(model), "set": snapshot(dataset)} == before


def test_check_outputs_takes_folders_and_input_folders(tmp_path, model_copy):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(PHOTOS[0], photos / "a.png")
    fine = {"--output": str(tmp_path / "r.json")}
    common.check_outputs(fine, {"--images": [str(photos)]}, model_copy, folders={"--msprobe": str(tmp_path / "d")})
    cases = [
        ({"--output": str(photos / "r.json")}, {}, "inside the input --images"),  # a report inside an input folder
        ({}, {"--msprobe": str(photos)}, "inside the input --images"),  # a folder that is an input folder
        ({}, {"--msprobe": str(model_copy / "x")}, "inside the model folder"),
        ({}, {"--msprobe": str(photos / "a.png")}, "is the input --images"),  # a folder output named as an image
        ({}, {"the journal": str(tmp_path / "r.json")}, "the same file"),  # a folder output that is an output
    ]
    for outputs, folders, message in cases:
        with pytest.raises(UserError, match=message) as refused:
            common.check_outputs({**fine, **outputs}, {"--images": [str(photos)]}, model_copy, folders=folders)
        assert "\n" not in str(refused.value)


# ------------------------------------------------------------------------------------ item 2: the export JSON


def test_a_report_over_the_export_json_beside_the_onnx_is_refused(tmp_path, tiny_model_dir, capsys, no_model_work):
    onnx, sidecar = tmp_path / "m.onnx", tmp_path / "m.json"
    onnx.write_bytes(b"not parsed before the refusal")
    sidecar.write_text('{"tool": "export_onnx.py"}\n')
    before = snapshot(tmp_path)
    runtime = ["--runtime", "onnxruntime", "--onnx", str(onnx), "--device", "cpu"]
    assert accuracy_run.main([str(tiny_model_dir), str(sidecar), *runtime]) == 2
    one_line_refusal(capsys, "export JSON", str(sidecar))
    assert accuracy_run_perf.main([str(tiny_model_dir), "1", str(sidecar), *runtime]) == 2
    one_line_refusal(capsys, "export JSON", str(sidecar))
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------ item 3: --resume's identity


@pytest.mark.parametrize("change", ["preprocessor_config", "config"])
def test_resume_refuses_a_changed_model_config(tmp_path, tiny_model_dir, capsys, monkeypatch, change):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    dataset = make_set(tmp_path / "set")
    report = tmp_path / "r.json"
    killed_run(labelled(model, report, dataset), monkeypatch)
    if change == "preprocessor_config":  # bicubic instead of bilinear: other pixels, other records
        path, key, value = model / "preprocessor_config.json", "resample", 3
    else:  # another activation, the same weights (the weights digest alone cannot see it)
        path, key, value = model / "config.json", "hidden_act", "gelu"
    data = json.loads(path.read_text())
    assert data[key] != value
    path.write_text(json.dumps({**data, key: value}))
    journal = snapshot(tmp_path / "r.json.parts")
    assert accuracy_run.main([*labelled(model, report, dataset), "--resume"]) == 2
    one_line_refusal(capsys, "different run", "preprocessing" if change == "preprocessor_config" else "model_config")
    assert snapshot(tmp_path / "r.json.parts") == journal and not report.exists()


def test_resume_refuses_another_onnx_of_the_same_weights(tmp_path, tiny_model_dir, tiny_onnx, capsys, monkeypatch):  # noqa: F811
    import onnx as onnx_lib

    onnx = tmp_path / "m.onnx"
    shutil.copy(tiny_onnx, onnx)
    shutil.copy(tiny_onnx.with_suffix(".json"), tmp_path / "m.json")
    dataset = make_set(tmp_path / "set")
    report = tmp_path / "r.json"
    argv = labelled(tiny_model_dir, report, dataset)
    argv = [*argv[: argv.index("--target_mode")], "--runtime", "onnxruntime", "--onnx", str(onnx)]  # its own graph
    killed_run(argv, monkeypatch)
    swapped = onnx_lib.load(str(onnx))  # the same weights, another graph file under the same name
    swapped.doc_string = "re-exported"
    onnx_lib.save(swapped, str(onnx))
    assert accuracy_run.main([*argv, "--resume"]) == 2
    one_line_refusal(capsys, "different run", "runtime_file_sha256")


def journal_lines(parts: Path) -> list[dict]:
    return [json.loads(line) for line in (parts / "rank0.jsonl").read_text().splitlines()]


def test_resume_refuses_a_journal_line_whose_metrics_cannot_be(tmp_path, tiny_model_dir, capsys, monkeypatch):
    dataset = make_set(tmp_path / "set")
    report, parts = tmp_path / "r.json", tmp_path / "r.json.parts"
    argv = labelled(tiny_model_dir, report, dataset)
    killed_run(argv, monkeypatch)
    entries = journal_lines(parts)
    bad = [
        ("cosine", 5.0),
        ("cosine", None),  # NaN with finite logits on both sides
        ("max_abs_prob_diff", -0.1),
        ("top1_agree", 1),
        ("top1_target", 10_000),
        ("rmse", "small"),
    ]
    for field, value in bad:
        lines = json.loads(json.dumps(entries))
        lines[1]["record"]["metrics"][field] = value
        (parts / "rank0.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
        assert accuracy_run.main([*argv, "--resume"]) == 2, field
        one_line_refusal(capsys, f"rank0.jsonl:2: metrics.{field}", "cannot be trusted")
        assert not report.exists()


def test_a_journaled_nan_target_is_read_back_as_nan():
    """A target's NaN is written as null (strict JSON); read back it is NaN again, as the fresh run holds it."""
    metrics_fields = {
        "image": "x.png",
        "cosine": None,
        "top1_reference": 3,
        "top1_target": -1,
        "top1_agree": False,
        "top1_near_tie": False,
        "top1_reference_margin": None,
        "top5_overlap": 0.0,
        "max_abs_prob_diff": None,
        "max_abs_logit_diff": None,
        "rmse": None,
        "mean_relative_error": None,
        "mean_relative_error_above_error_floor": None,
        "logits_above_error_floor": 10,
        "share_rel_err_below_0_001": 0.0,
        "share_rel_err_below_0_005": 0.0,
        "reference_logit_std": 1.5,
        "reference_top1_prob": 0.4,
        "target_top1_prob": None,
        "target_finite": False,
    }
    record = {
        "image": "x.png",
        "label": 3,
        "reference_top5": [3, 1, 2, 0, 4],
        "target_top5": [0, 1, 2, 3, 4],
        "reference_finite": True,
        "reference_cached": False,
        "metrics": metrics_fields,
    }
    assert labelsets.record_checker(10)(record) is None
    assert math.isnan(record["metrics"]["cosine"]) and math.isnan(record["metrics"]["target_top1_prob"])
    finite = {**record, "metrics": {**metrics_fields, "target_finite": True, "top1_target": 3, "top1_agree": True}}
    assert "metrics.cosine is nan with finite logits" in labelsets.record_checker(10)(finite)


# ------------------------------------------------------------------------------------ item 4: --workers


def test_workers_beyond_the_cores_are_lowered_with_a_notice(tmp_path, tiny_model_dir, capsys, monkeypatch):
    dataset = make_set(tmp_path / "set")
    report = tmp_path / "r.json"
    asked: list[int] = []
    real = labelsets.stream

    def stream(sources, cfg, batch_size, workers, *args, **kwargs):
        asked.append(workers)
        return real(sources, cfg, batch_size, 0, *args, **kwargs)  # never fork them, whatever was asked

    monkeypatch.setattr(labelsets, "stream", stream)
    argv = labelled(tiny_model_dir, report, dataset, "--limit", "2")
    argv[argv.index("--workers") + 1] = "10000"
    assert accuracy_run.main(argv) == 0
    assert asked and max(asked) <= (os.cpu_count() or 1)
    assert f"--workers 10000 lowered to {os.cpu_count() or 1}" in capsys.readouterr().err
