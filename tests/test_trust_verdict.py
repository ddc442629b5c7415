"""Issue 28, the verdict: INVALID only when the reference cannot judge (or the target is the reference itself); one
reference rule on both paths (--images and --dataset), whatever the number of images."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PHOTOS, ROOT, read_json
from perturb import perturb_targets
from PIL import Image

import accuracy_run
from mobilevit_npu import card, devices, metrics

CONV = "mobilevit.encoder.layer.1.layer.0.conv_3x3.convolution"
COMMON = ["--device", "cpu", "--allocator", "system", "--reference_cache", "off"]


def flip_weights(module_name: str):
    """A patch flipping one convolution's kernels left-right and top-bottom in the target only (a classic port bug:
    correlation taken for convolution)."""

    def install(model: torch.nn.Module):
        weight = model.get_submodule(module_name).weight
        with torch.no_grad():
            weight.copy_(weight.flip(-1, -2))

    return install


def look_alikes(folder, count: int) -> list[str]:
    """`count` PNGs: the first photo with one pixel in the middle (inside the centre crop) inverted, a different one
    in each. Distinct inputs whose reference logits hardly change from one to the next (as photos of one scene do)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.array(Image.open(PHOTOS[0]).convert("RGB"))
    middle_row, middle_column = pixels.shape[0] // 2, pixels.shape[1] // 2
    paths = []
    for i in range(count):
        variant = pixels.copy()
        variant[middle_row, middle_column + 8 * i] = 255 - variant[middle_row, middle_column + 8 * i]
        path = folder / f"look_alike_{i}.png"
        Image.fromarray(variant).save(path)
        paths.append(str(path))
    return paths


def accuracy(tmp_path, model_dir, name: str, *extra: str) -> tuple[int, dict]:
    report = tmp_path / name
    rc = accuracy_run.main([str(model_dir), str(report), *COMMON, *extra])
    return rc, read_json(report)


def failed(report: dict) -> list[str]:
    return [c["name"] for c in report["reference_checks"] + report["checks"] if not c["passed"]]


# ------------------------------------------------------------------------------------------- 1. FAIL, not INVALID


def test_a_flipped_convolution_over_look_alike_photos_is_fail_not_invalid(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """fp32 on the CPU, one convolution's weights flipped in the target only, two photos of (almost) one scene: the
    reference's logits spread across the classes on each image, so it can judge, and the broken target FAILs (it was
    INVALID: 'the reference cannot discriminate', from the spread across the two images)."""
    perturb_targets(monkeypatch, flip_weights(CONV))
    rc, report = accuracy(tmp_path, tiny_model_dir, "r.json", "--images", *look_alikes(tmp_path / "photos", 2))
    assert len({m["cosine"] for m in report["per_image"]}) == 2  # two different inputs
    assert (rc, report["verdict"]) == (1, "FAIL"), report["verdict_reasons"]
    assert report["aggregate"]["cosine_min"] < 0.999
    assert "cosine_min" in failed(report)
    assert all(c["passed"] for c in report["reference_checks"])
    assert not any("cannot discriminate" in r for r in report["verdict_reasons"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("VERDICT: FAIL  cpu float32 eager  vs")


def test_invalid_needs_a_reference_that_cannot_judge():
    """compare_logits: reference logits that barely change from image to image judge fine (FAIL for a wrong target,
    PASS for a right one); non-finite or flat reference logits are INVALID; NaN in the target beside a finite, flat
    reference is FAIL (no reference is needed to see it)."""
    gen = torch.Generator().manual_seed(3)
    ref = (torch.randn(1, 20, generator=gen, dtype=torch.float64) * 3).repeat(4, 1)
    ref += torch.randn(4, 20, generator=gen, dtype=torch.float64) * 1e-3  # distinct images, near-identical logits
    wrong = ref + torch.randn(4, 20, generator=gen, dtype=torch.float64) * 2
    result = metrics.compare_logits(ref, wrong, "fp32")
    assert result.verdict == "FAIL" and [c.name for c in result.reference_checks if not c.passed] == []
    assert metrics.compare_logits(ref, ref.clone(), "fp32").verdict == "PASS"

    flat = torch.zeros(2, 10, dtype=torch.float64)
    assert metrics.compare_logits(flat, flat + 1e-3, "fp32").verdict == "INVALID"
    nan_target = flat.clone()
    nan_target[1, 2] = math.nan
    result = metrics.compare_logits(flat, nan_target, "fp32")
    assert result.verdict == "FAIL"
    assert any("target_logits_finite" in r for r in result.reasons)
    assert any("cannot discriminate" in r for r in result.reasons)  # said, though not the verdict
    nan_ref = ref.clone()
    nan_ref[0, 0] = math.nan
    assert metrics.compare_logits(nan_ref, nan_target[:, :1].repeat(2, 20), "fp32").verdict == "INVALID"


# ------------------------------------------------------------------------------------------- 2. one rule, both paths


def test_one_reference_rule_on_both_paths_whatever_the_image_count(tmp_path, tiny_model_dir):
    """bf16, the same photos through --images and through --dataset: the same verdict and the same reference checks
    (it was INVALID through --images, from a spread across images that only that path checked, and PASS through
    --dataset); one photo or three, the same rule."""
    photos = look_alikes(tmp_path / "set" / "0", 3)  # an index folder: class 0 of the tiny model
    target = ["--dtype", "bf16"]
    rc_images, images = accuracy(tmp_path, tiny_model_dir, "images.json", *target, "--images", *photos)
    rc_set, labelled = accuracy(
        tmp_path, tiny_model_dir, "set.json", *target, "--dataset", str(tmp_path / "set"), "--workers", "0"
    )
    rc_one, one = accuracy(tmp_path, tiny_model_dir, "one.json", *target, "--images", photos[0])
    assert images["verdict"] == labelled["verdict"] == one["verdict"] != "INVALID"
    assert rc_images == rc_set == rc_one
    names = [[c["name"] for c in r["reference_checks"]] for r in (images, labelled, one)]
    assert names[0] == names[1] == names[2] == ["reference_logits_finite", "reference_logit_std_min"]
    assert [c["passed"] for c in images["reference_checks"]] == [c["passed"] for c in labelled["reference_checks"]]
    assert images["reference_checks"][1]["value"] == pytest.approx(labelled["reference_checks"][1]["value"], rel=1e-5)


# ------------------------------------------------------------------------------------------- 3. no self-comparison


def test_the_reference_against_itself_is_invalid_naming_the_flags(tmp_path, tiny_model_dir, capsys):
    """CPU float32 eager against CPU float32 eager is no port check, on both paths: INVALID (exit 1), with a failed
    reference check the card can describe, and the flags that make a port named on the console's last line."""
    rc, report = accuracy(tmp_path, tiny_model_dir, "r.json", "--images", PHOTOS[0])
    assert (rc, report["verdict"]) == (1, "INVALID")
    assert report["compared"] == "cpu float32 eager  vs  cpu float32 eager"
    assert report["aggregate"]["cosine_min"] == 1.0  # the figures are perfect, and prove nothing
    assert failed(report) == ["target_differs_from_reference"]
    (reason,) = report["verdict_reasons"]
    assert reason.startswith("not a port check: the target is the reference itself")
    for flag in ("--device", "--dtype", "--target_mode", "--runtime"):
        assert flag in reason
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("VERDICT: INVALID (not a port check: the target is the reference itself")
    for lang in ("en", "zh"):  # the model card describes every check a report can hold (else it refuses the report)
        assert f"rule_{metrics.SAME_AS_REFERENCE}" in card.load_template(lang).words

    labelled = tmp_path / "set" / "0"
    labelled.mkdir(parents=True)
    shutil.copy(PHOTOS[0], labelled)
    rc, report = accuracy(tmp_path, tiny_model_dir, "set.json", "--dataset", str(tmp_path / "set"), "--workers", "0")
    assert (rc, report["verdict"]) == (1, "INVALID") and failed(report) == ["target_differs_from_reference"]


@pytest.mark.parametrize("port", [["--target_mode", "channels_last"], ["--dtype", "bf16"]])
def test_a_cpu_port_is_judged(tmp_path, tiny_model_dir, port):
    """Any flag that changes the target makes it a port check again, judged on its figures."""
    rc, report = accuracy(tmp_path, tiny_model_dir, "r.json", "--images", PHOTOS[0], *port)
    assert report["verdict"] in ("PASS", "FAIL")
    assert "target_differs_from_reference" not in failed(report)
    assert rc == (0 if report["verdict"] == "PASS" else 1)


@pytest.mark.skipif(devices.detect_device_type() != "cpu", reason="an accelerator: the default target is not the CPU")
def test_the_users_command_on_a_machine_without_an_accelerator_is_invalid(tmp_path, tiny_model_dir):
    """`python accuracy_run.py ./model report.json` as a user types it, no --device: on a machine with no accelerator
    the target is the reference, and the last line says INVALID and why (it printed PASS)."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "accuracy_run.py"), str(tiny_model_dir), str(report), "--images", PHOTOS[0]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("VERDICT: INVALID (not a port check")
    assert read_json(report)["verdict"] == "INVALID"
