"""The model card's test fixtures, made by running the writers: accuracy_run.main, accuracy_run_perf.main and
inference.main on the tiny MobileViT with healthy weights (conftest.tiny_model_dir), and on the synthetic full-size
X-Small. Nothing here is written by hand: a card test reads what the current scripts write.

`make_reports(folder, model_dir)` copies the model into folder/model and runs every writer from inside `folder`, with
relative paths, as a user would (so the argv the reports record is what a user types). Session fixtures keep one set
per test session; tests copy them before damaging anything (`report_set`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
from conftest import PHOTOS, shared_once

# What each fixture report is, and the arguments that make it (the model folder is `model`, the report the 2nd arg).
TINY_RUNS = {
    # bf16 eager with --layers: a FAIL on the tiny model (bf16 rounding, 10 classes), modules below the threshold
    "accuracy_bf16.json": (
        "accuracy_run",
        ["model", "accuracy_bf16.json", "--device", "cpu", "--dtype", "bf16", "--layers", "--reference_cache", "off"],
    ),
    # channels_last fp32: a PASS
    "accuracy_cl.json": (
        "accuracy_run",
        ["model", "accuracy_cl.json", "--device", "cpu", "--target_mode", "channels_last", "--reference_cache", "off"],
    ),
    # a labelled set (labels.csv, written by make_reports), float32 channels_last against the reference: a PASS
    # (float32 eager would be the reference itself: INVALID)
    "labelled.json": (
        "accuracy_run",
        [
            "model",
            "labelled.json",
            "--device",
            "cpu",
            "--target_mode",
            "channels_last",
            "--labels",
            "labels.csv",
            "--batch_size",
            "2",
            "--workers",
            "0",
            "--reference_cache",
            "off",
        ],
    ),
    "perf.json": (
        "accuracy_run_perf",
        [
            "model",
            "3",
            "perf.json",
            "--device",
            "cpu",
            "--modes",
            "eager,channels_last",
            "--batch_sizes",
            "1,2",
            "--warmup",
            "1",
        ],
    ),
    "inference.json": (
        "inference",
        ["--model_path", "model", "--image", "photo.png", "--output", "inference.json", "--device", "cpu"],
    ),
}
SYNTHETIC_RUNS = {
    "synthetic_accuracy.json": (
        "accuracy_run",
        [
            "model",
            "synthetic_accuracy.json",
            "--synthetic",
            "--device",
            "cpu",
            "--target_mode",
            "channels_last",
            "--reference_cache",
            "off",
        ],
    ),
    "synthetic_perf.json": (
        "accuracy_run_perf",
        ["model", "2", "synthetic_perf.json", "--synthetic", "--device", "cpu", "--modes", "eager", "--warmup", "0"],
    ),
}


@contextlib.contextmanager
def working_folder(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)


def run_writer(script: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(script)
    return module.main(list(argv))


def make_reports(folder: Path, model_dir: Path | None, runs: dict[str, tuple[str, list[str]]]) -> dict[str, Path]:
    """Run each writer inside `folder` (the model copied to folder/model); {report name: path}. A writer that writes
    no report fails the fixture: the card tests would otherwise test nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    if model_dir is not None and not (folder / "model").exists():
        shutil.copytree(model_dir, folder / "model")
    shutil.copy(PHOTOS[0], folder / "photo.png")
    for photo in PHOTOS[1:3]:
        shutil.copy(photo, folder / Path(photo).name)
    names = ["photo.png", *(Path(p).name for p in PHOTOS[1:3])]
    (folder / "labels.csv").write_text("image,class_id\n" + "".join(f"{n},{i}\n" for i, n in enumerate(names)))
    out = {}
    with working_folder(folder):
        for name, (script, argv) in runs.items():
            code = run_writer(script, argv)
            assert code in (0, 1), f"{script} {' '.join(argv)} exited {code}"
            assert (folder / name).is_file(), f"{script} {' '.join(argv)} wrote no {name}"
            out[name] = folder / name
    return out


@pytest.fixture(scope="session")
def tiny_reports(tmp_path_factory, tiny_model_dir) -> Path:
    """A folder holding model/ (the tiny model) and the reports of TINY_RUNS, written by the scripts."""
    return shared_once(tmp_path_factory, "card_tiny", lambda folder: make_reports(folder, tiny_model_dir, TINY_RUNS))


@pytest.fixture(scope="session")
def synthetic_reports(tmp_path_factory) -> Path:
    """A folder holding the reports of SYNTHETIC_RUNS (the full-size X-Small with synthetic weights)."""
    return shared_once(tmp_path_factory, "card_synthetic", lambda folder: make_reports(folder, None, SYNTHETIC_RUNS))


def copy_set(source: Path, dest: Path) -> Path:
    """A private copy of a fixture folder, for a test that damages or adds files."""
    shutil.copytree(source, dest, symlinks=True)
    return dest


@pytest.fixture
def tiny_set(tmp_path, tiny_reports, monkeypatch) -> Path:
    """A private copy of the tiny reports' folder, made the working folder."""
    folder = copy_set(tiny_reports, tmp_path / "work")
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def synthetic_set(tmp_path, synthetic_reports, monkeypatch) -> Path:
    folder = copy_set(synthetic_reports, tmp_path / "work")
    monkeypatch.chdir(folder)
    return folder
