"""The package is self-contained: what it reads at run time (sample photos, ImageNet wnids, the X-Small config for
--synthetic, the card templates) is package data, so a non-editable install runs the scripts from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from mobilevit_npu import DATA_DIR, labelsets, preprocessing, synthetic


def test_the_synthetic_config_is_the_model_folders():
    for name in ("config.json", "preprocessor_config.json"):
        shipped = json.loads((synthetic.X_SMALL_DIR / name).read_text(encoding="utf-8"))
        assert shipped == json.loads((ROOT / "model" / name).read_text(encoding="utf-8")), name


def test_run_time_files_live_in_the_package():
    package = ROOT / "mobilevit_npu"
    for path in (preprocessing.BUNDLED_IMAGES_DIR, labelsets.WNIDS_FILE, synthetic.X_SMALL_DIR):
        assert Path(path).resolve().is_relative_to(package.resolve()), path
    assert len(preprocessing.bundled_images()) == 5 and (DATA_DIR / "images" / "SOURCES.md").is_file()


@pytest.mark.slow
def test_a_non_editable_install_runs_the_scripts_from_another_folder(tmp_path):
    """pip install . (no editable link, no repository on the path), then the scripts from an empty folder: the
    default photos, --synthetic and the card all come from the installed package."""
    source = tmp_path / "source"  # a copy: pip builds in the source folder, and the checkout stays clean
    shutil.copytree(ROOT / "mobilevit_npu", source / "mobilevit_npu", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [*ROOT.glob("*.py"), ROOT / "pyproject.toml", ROOT / "readme.md"]:
        shutil.copy(path, source / path.name)
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=900)

    where = run("-c", "import mobilevit_npu, accuracy_run; print(mobilevit_npu.__file__, accuracy_run.__file__)")
    assert where.returncode == 0 and str(ROOT) not in where.stdout and str(site) in where.stdout, where
    assert not (ROOT / "build").exists()
    acc = run(
        "-m",
        "accuracy_run",
        "model",
        "acc.json",
        "--synthetic",
        "--device",
        "cpu",
        "--target_mode",  # a float32 port check that can PASS; bf16 is emulated (slow) on CPUs without it
        "channels_last",
        "--reference_cache",
        "off",
    )
    assert acc.returncode == 0, acc.stderr[-2000:]
    assert len(json.loads((work / "acc.json").read_text())["per_image"]) == 5  # the five photos the package ships
    perf = run("-m", "accuracy_run_perf", "model", "2", "perf.json", "--synthetic", "--device", "cpu", "--warmup", "0")
    assert perf.returncode == 0, perf.stderr[-2000:]
    card = run("-m", "port_report", "acc.json", "perf.json", "--output", "CARD.md")
    assert card.returncode == 0 and (work / "CARD.md").stat().st_size > 1000, card.stderr[-2000:]
