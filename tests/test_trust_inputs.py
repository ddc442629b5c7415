"""Issue 28, inputs: folder scans name and count what is not an image file (and read each image once), every file
read is a regular file within a size bound, the labels CSV refuses NUL and huge fields in one line, port_report.py's
--output never lands in the model folder, and a report whose figures lie outside their range or contradict its
verdict is refused. Every test runs a script (main([...]) or a subprocess) and fails on the code before the fix."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import PHOTOS, ROOT, read_json

import accuracy_run
import inference
import port_report
from mobilevit_npu import labelsets, reports

pytest_plugins = ["card_fixtures"]  # tiny_set: reports made by the writers, in a private working folder

TINY = ["accuracy_bf16.json", "accuracy_cl.json", "labelled.json", "perf.json"]


@contextlib.contextmanager
def fifos_unblocked(paths, after: float = 15.0):
    """Code that (wrongly) opens a FIFO for reading blocks until a writer comes: after `after` seconds each FIFO is
    opened for writing and closed again, so such code reads nothing and fails the test instead of hanging it."""
    stop = threading.Event()

    def unblock() -> None:
        if stop.wait(after):
            return
        while not stop.wait(0.5):
            for path in paths:
                with contextlib.suppress(OSError):  # ENXIO: no reader is waiting
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ folder scans


def odd_folder(folder: Path) -> dict[str, str]:
    """Two photos, and beside them the entries that are not image files: {name: what it is}. A plain text file and
    a subfolder are not images and are not counted."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(PHOTOS[0], folder / "a.png")
    shutil.copy(PHOTOS[1], folder / "b.png")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(folder / "pipe")
    os.symlink("/dev/zero", folder / "zero.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    return {
        "dangling.png": "dangling symlink",
        "pipe.png": "FIFO",
        "pipe": "FIFO",
        "zero.png": "character device",
    }


def accuracy_args(model_dir, report, *extra) -> list[str]:
    return [
        str(model_dir),
        str(report),
        "--device",
        "cpu",
        "--target_mode",
        "channels_last",
        "--reference_cache",
        "off",
        "--allocator",
        "system",
        "--max_skipped",
        "10",
        *extra,
    ]


def test_images_folder_names_and_counts_links_fifos_and_devices_and_reads_each_image_once(tiny_model_dir, tmp_path):
    folder = tmp_path / "photos"
    odd = odd_folder(folder)
    os.symlink(folder / "a.png", tmp_path / "alias.png")
    report = tmp_path / "r.json"
    specs = [str(folder), str(folder / "a.png"), f"{folder}/./a.png", str(tmp_path / "alias.png")]
    with fifos_unblocked([folder / "pipe.png", folder / "pipe"]):
        code = accuracy_run.main(accuracy_args(tiny_model_dir, report, "--images", *specs))
    assert code in (0, 1)
    data = read_json(report)
    assert data["aggregate"]["images"] == 2  # a.png under four spellings is one image
    named = {Path(e["image"]).name: e["error"] for e in data["errors"]}
    assert set(named) == set(odd)
    for name, kind in odd.items():
        assert kind in named[name] or (kind == "dangling symlink" and "No such file" in named[name]), named[name]
    assert data["skipped"]["count"] == 4 and data["skipped"]["of"] == 6


def test_dataset_scan_names_and_counts_links_fifos_and_devices(tiny_model_dir, tmp_path):
    root = tmp_path / "ds"
    wnid = labelsets.imagenet_wnids()[3]
    odd = odd_folder(root / wnid)
    (root / wnid / "sub" / "c.png").write_bytes(Path(PHOTOS[2]).read_bytes())  # class folders are searched deep
    os.symlink(root / wnid / "a.png", root / wnid / "sub" / "a_again.png")  # the same file: one image
    report = tmp_path / "r.json"
    args = accuracy_args(tiny_model_dir, report, "--dataset", str(root), "--workers", "0", "--batch_size", "2")
    with fifos_unblocked([root / wnid / "pipe.png", root / wnid / "pipe"]):
        code = accuracy_run.main(args)
    assert code in (0, 1)
    data = read_json(report)
    assert data["dataset"]["images"] == 3 and data["dataset"]["skipped"] == 4
    named = {Path(e["image"]).name: e["error"] for e in data["errors"]}
    assert set(named) == set(odd)
    for name, kind in odd.items():
        assert kind in named[name], named[name]
    assert data["skipped"]["count"] == 4


def test_inference_folder_names_what_is_not_an_image_and_reads_each_image_once(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    odd = odd_folder(folder)
    argv = ["--model_path", str(tiny_model_dir), "--device", "cpu", "--allocator", "system", "--image"]
    with fifos_unblocked([folder / "pipe.png", folder / "pipe"]):
        assert inference.main([*argv, str(folder)]) == 1
    captured = capsys.readouterr()
    assert "2 of 6 image(s) classified" in captured.out
    failed = [line for line in captured.err.splitlines() if ": error: " in line]
    assert sorted(Path(line.split(": error: ")[0]).name for line in failed) == sorted(odd)
    assert inference.main([*argv, str(folder / "a.png"), f"{folder}/./a.png", str(folder / ".." / "photos/a.png")]) == 0
    assert "1 of 1 image(s) classified" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ bounded reads


def test_port_report_refuses_a_fifo_report_without_opening_it(tiny_set, capsys):
    os.mkfifo("pipe.json")
    with fifos_unblocked(["pipe.json"]):
        assert port_report.main(["pipe.json", "perf.json", "--output", "card.md"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "pipe.json" in line and "FIFO" in line and "not a regular file" in line
    assert not Path("card.md").exists()


def test_port_report_refuses_a_link_to_dev_zero_in_bounded_memory(tiny_set):
    os.symlink("/dev/zero", "zero.json")
    limit = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))"  # reading /dev/zero: MemoryError
    )
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{limit}; import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
            str(ROOT / "port_report.py"),
            "zero.json",
            "perf.json",
            "--output",
            "card.md",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2, run.stderr[-2000:]
    line = one_line(run.stderr)
    assert "zero.json" in line and "/dev/zero" in line and "character device" in line
    assert not Path("card.md").exists()


def test_every_file_read_has_a_size_bound(tiny_set, tiny_model_dir, tmp_path, monkeypatch, capsys):
    before = digests(tiny_set)
    monkeypatch.setattr(reports, "MAX_REPORT_BYTES", 2000)
    assert port_report.main([*TINY, "--output", "card.md"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "accuracy_bf16.json" in line and "over the 2,000" in line
    config_bound = reports.MAX_CONFIG_BYTES
    monkeypatch.setattr(reports, "MAX_CONFIG_BYTES", 100)  # config.json and preprocessor_config.json
    argv = ["--model_path", str(tiny_model_dir), "--device", "cpu", "--image", PHOTOS[0]]
    assert inference.main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert "config.json" in line and "over the 100" in line
    monkeypatch.setattr(reports, "MAX_CONFIG_BYTES", config_bound)
    monkeypatch.setattr(reports, "MAX_CSV_BYTES", 10)
    Path("big_labels.csv").write_text(f"{PHOTOS[0]},1\n")
    args = accuracy_args(tiny_model_dir, tmp_path / "r.json", "--labels", "big_labels.csv", "--workers", "0")
    assert accuracy_run.main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert "big_labels.csv" in line and "over the 10" in line
    assert {k: v for k, v in digests(tiny_set).items() if k in before} == before


# ------------------------------------------------------------------------------------------------ labels CSV


@pytest.mark.parametrize(
    "text, said",
    [
        ("image,class_id\nphoto.png,1\x00\n", "NUL"),
        ("image,class_id\nphoto.png,1\n" + "x" * (128 * 1024) + ",2\n", "a field of 131,072 characters"),
        ('image,class_id\n"' + "y" * (200 * 1024) + '",2\n', "field larger than field limit"),
    ],
)
def test_a_labels_csv_with_a_nul_or_a_huge_field_is_one_line(tiny_model_dir, tmp_path, capsys, text, said):
    shutil.copy(PHOTOS[0], tmp_path / "photo.png")
    csv = tmp_path / "labels.csv"
    csv.write_bytes(text.encode())
    before = csv.read_bytes()
    args = accuracy_args(tiny_model_dir, tmp_path / "r.json", "--labels", str(csv), "--workers", "0")
    assert accuracy_run.main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{csv}:" in line and said in line
    assert csv.read_bytes() == before and not (tmp_path / "r.json").exists()


def test_a_labels_csv_naming_one_image_twice_reads_it_once(tiny_model_dir, tmp_path, capsys):
    shutil.copy(PHOTOS[0], tmp_path / "photo.png")
    shutil.copy(PHOTOS[1], tmp_path / "other.png")
    os.symlink("photo.png", tmp_path / "alias.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("photo.png,1\n./photo.png,1\nalias.png,1\nother.png,2\n")
    report = tmp_path / "r.json"
    assert accuracy_run.main(accuracy_args(tiny_model_dir, report, "--labels", str(csv), "--workers", "0")) in (0, 1)
    assert read_json(report)["dataset"]["images"] == 2
    csv.write_text("photo.png,1\n./alias.png,3\n")
    assert accuracy_run.main(accuracy_args(tiny_model_dir, report, "--labels", str(csv), "--workers", "0")) == 2
    line = one_line(capsys.readouterr().err)
    assert "one image, one class" in line and ":2:" in line


# ------------------------------------------------------------------------------------------------ the card's output


@pytest.mark.parametrize("how", ["symlink to the weights", "config.json", "preprocessor_config.json", "new file"])
def test_the_card_never_lands_in_the_model_folder_the_reports_name(tiny_set, capsys, how):
    before = digests(tiny_set / "model")
    reports_before = {name: Path(name).read_bytes() for name in TINY}
    output = {
        "symlink to the weights": "card.md",
        "config.json": "model/config.json",
        "preprocessor_config.json": "./model/preprocessor_config.json",
        "new file": "model/CARD.md",
    }[how]
    if how == "symlink to the weights":
        os.symlink("model/model.safetensors", "card.md")
    assert port_report.main([*TINY, "--output", output]) == 2
    line = one_line(capsys.readouterr().err)
    assert "model folder" in line
    assert digests(tiny_set / "model") == before and not Path("model/CARD.md").exists()
    assert {name: Path(name).read_bytes() for name in TINY} == reports_before
    assert not Path("card_assets").exists() and not Path("model/card_assets").exists()


# ------------------------------------------------------------------------------------------------ figures


def edit(name: str, change) -> bytes:
    data = json.loads(Path(name).read_text(encoding="utf-8"))
    change(data)
    Path(name).write_text(json.dumps(data, indent=2), encoding="utf-8")  # NaN and Infinity as Python's json writes
    return Path(name).read_bytes()


def _check(data: dict, name: str) -> dict:
    return next(c for c in data["checks"] if c["name"] == name)


@pytest.mark.parametrize(
    "name, change, field",
    [
        ("accuracy_cl.json", lambda d: _check(d, "cosine_min").update(passed=False), "checks[N].passed"),
        ("accuracy_cl.json", lambda d: d["aggregate"].update(cosine_min=math.nan), "aggregate.cosine_min"),
        ("accuracy_cl.json", lambda d: d["aggregate"].update(cosine_min=None), "aggregate.cosine_min"),
        ("accuracy_cl.json", lambda d: d["aggregate"].update(top1_agreement=1.5), "aggregate.top1_agreement"),
        ("accuracy_cl.json", lambda d: d["per_image"][0].update(cosine=5.0), "per_image[0].cosine"),
        ("accuracy_cl.json", lambda d: d["aggregate"].update(rmse=-1.0), "aggregate.rmse"),
        ("accuracy_cl.json", lambda d: d["aggregate"].update(images=-3), "aggregate.images"),
        ("accuracy_cl.json", lambda d: d["thresholds"].update(min_cosine=math.inf), "thresholds.min_cosine"),
        ("accuracy_cl.json", lambda d: d.update(verdict="OK"), "verdict"),
        ("accuracy_cl.json", lambda d: d["aggregate"].update(cosine_min=0.5), "checks[N].value"),
        ("accuracy_bf16.json", lambda d: _check(d, "cosine_min").update(passed=True), "checks[N].passed"),
        ("perf.json", lambda d: d["results"][0]["agreement"].update(cosine=5.0), "results[0].agreement.cosine"),
        ("perf.json", lambda d: d["results"][0].update(exact=not d["results"][0]["exact"]), "results[0].exact"),
        ("perf.json", lambda d: d["results"][0]["latency_ms"].update(p50=None), "results[0].latency_ms.p50"),
    ],
)
def test_a_report_whose_figures_are_out_of_range_or_contradict_its_verdict_is_refused(
    tiny_set, capsys, name, change, field
):
    written = edit(name, change)
    assert port_report.main([*TINY, "--output", "card.md"]) == 2
    line = one_line(capsys.readouterr().err)
    assert name in line and re.search(rf"`{re.escape(field).replace('N', r'[0-9]+')}`", line), line
    assert Path(name).read_bytes() == written and not Path("card.md").exists()


def test_a_failed_report_may_hold_a_figure_that_is_not_finite(tiny_set):
    """A NaN is a finding where the verdict is not PASS: the card shows it, it is not refused."""
    edit("accuracy_bf16.json", lambda d: d["per_image"][0].update(cosine=None))
    assert port_report.main([*TINY, "--lang", "en", "--output", "card.md"]) == 0
    assert "card.md" in os.listdir(".")
