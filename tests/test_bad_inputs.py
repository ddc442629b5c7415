"""The bad inputs a new user hits (issues 11, 22): nothing lost, nothing silently dropped, one line each, bounded
memory. Organised by script: what every script refuses up front, then inference.py, the model folder, accuracy_run.py
(images; --dataset and --labels; --resume), accuracy_run_perf.py, and what lies under every script (the atomic writer,
image decoding and fetching). Each test is named for the behaviour it guards."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_DIR, PHOTOS, ROOT, make_labelled_set, read_json
from PIL import Image, ImageFile

import accuracy_run
import accuracy_run_perf
import inference
from mobilevit_npu import bench, distributed, labelsets, models, preprocessing, reports
from mobilevit_npu.errors import UserError, first_line

CHELSEA = str(DATA_DIR / "chelsea.png")


def thin_png(path: Path, width: int = 1, height: int = 40000) -> str:
    """A few hundred bytes on disk; 288 x 11,520,000 pixels once resized to shortest edge 288 (1x40000)."""
    Image.new("L", (width, height), 128).save(path)
    return str(path)


def one_line(text: str) -> bool:
    return bool(text) and "\n" not in text and "Traceback" not in text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Loopback HTTP: /thin.png (1x40000), /page (text/html), /garbage (not an image), /slow (a byte every 0.3 s)."""
    folder = tmp_path_factory.mktemp("served")
    thin_png(folder / "thin.png")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/page":
                body = b"<html><body>Sign in</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/slow":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    for _ in range(1000):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.3)
                except OSError:
                    pass
            elif self.path == "/garbage":
                body = bytes(range(256)) * 4
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                super().do_GET()

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass

    srv = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture
def labelled_set(tmp_path):
    """Four photos in index folders (0..3), and `extra` bad files added by each test."""
    return make_labelled_set(tmp_path / "set", PHOTOS[:4], classes=4)


PORT = ["--target_mode", "channels_last"]  # a CPU port check (float32 eager against itself is INVALID)


def labelled(model_dir, root, report, *extra):
    return [str(model_dir), str(report), "--dataset", str(root), "--device", "cpu", "--batch_size", "2", *PORT, *extra]


def run_acc(tmp_path, model_dir, *extra):
    report = tmp_path / "report.json"
    rc = accuracy_run.main([str(model_dir), str(report), "--device", "cpu", *PORT, *extra])
    return rc, (read_json(report) if report.exists() else None)


def error_line(captured: str) -> str:
    """The one error line a refused run prints (stderr), checked to be alone and free of tracebacks."""
    lines = [line for line in captured.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in captured, captured
    return lines[0]


def drop_tensor(folder: Path, name: str, extra: str | None = None) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    weights.pop(name)
    if extra:
        weights[extra] = torch.zeros(1)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def enospc_on_fsync(monkeypatch):
    """Injected ENOSPC: fsync of the journal fails as it does on a full disk (the write is buffered until then)."""

    real_fsync = os.fsync

    def fsync(fd):
        if re.search(r"rank\d+\.jsonl$", os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def killed_run(tiny_model_dir, labelled_set, report, monkeypatch, *extra) -> None:
    """A labelled run killed after its first batch (2 images journaled)."""
    real_stream = labelsets.stream

    def killed_after_one_batch(*args, **kwargs):
        for i, batch in enumerate(real_stream(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(labelsets, "stream", killed_after_one_batch)
    assert accuracy_run.main(labelled(tiny_model_dir, labelled_set, report, "--workers", "0", *extra)) == 130
    monkeypatch.setattr(labelsets, "stream", real_stream)


def labels_run(model_dir, tmp_path, text: str | bytes, *extra) -> tuple[int, Path]:
    for i, photo in enumerate(PHOTOS[:3]):
        shutil.copy(photo, tmp_path / f"img{i}.png")
    labels = tmp_path / "labels.csv"
    labels.write_bytes(text if isinstance(text, bytes) else text.encode())
    report = tmp_path / "r.json"
    argv = [str(model_dir), str(report), "--labels", str(labels), "--device", "cpu", "--workers", "0", *PORT, *extra]
    return accuracy_run.main(argv), report


def fake_results(end_to_end: bool, low: float, high: float, n: int = 40) -> list[dict]:
    rng = np.random.default_rng(0)
    samples = list(np.exp(rng.uniform(np.log(low), np.log(high), n)))
    return [
        {"mode": m, "batch_size": b, "dtype": "fp16", "end_to_end": end_to_end, "samples_ms": samples}
        for m in ("eager", "fast")
        for b in (1, 32)
    ]


# --------------------------------------------------------------------------------------------------------------------
# Every script: output paths refused up front, before any model work (common.check_outputs)
# --------------------------------------------------------------------------------------------------------------------


def test_output_folder_is_refused_before_any_model_work(tmp_path, capsys):
    missing_model = str(tmp_path / "no_model")  # a model error would come first if the output were checked late
    assert inference.main(["--model_path", missing_model, "--image", CHELSEA, "--output", str(tmp_path)]) == 2
    assert inference.main(["--model_path", missing_model, "--benchmark", "--output", str(tmp_path)]) == 2
    folder_json = tmp_path / "out.json"
    folder_json.mkdir()
    assert accuracy_run_perf.main([missing_model, "5", str(folder_json)]) == 2
    assert accuracy_run.main([missing_model, str(folder_json)]) == 2
    argv = [missing_model, "5", str(tmp_path / "r.json"), "--plot", str(tmp_path)]
    if bench.matplotlib_available():
        assert accuracy_run_perf.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(lines) == (5 if bench.matplotlib_available() else 4)
    assert all("is a folder, not a file" in line for line in lines), lines


def test_output_inside_the_model_folder_is_refused(model_copy, capsys):
    config = model_copy / "config.json"
    before = config.read_bytes()
    rc = inference.main(["--model_path", str(model_copy), "--image", CHELSEA, "--output", str(config)])
    assert rc == 2 and "model folder" in error_line(capsys.readouterr().err)
    rc = accuracy_run_perf.main([str(model_copy), "1", str(config), "--device", "cpu"])
    assert rc == 2 and "model folder" in error_line(capsys.readouterr().err)
    assert config.read_bytes() == before


def test_report_arguments_must_end_in_json(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert accuracy_run.main([str(tiny_model_dir), "50"]) == 2
    assert accuracy_run_perf.main([str(tiny_model_dir), "5", "perf.txt"]) == 2
    err = capsys.readouterr().err
    assert err.count("usage:") == 2 and "'50' does not end in .json" in err
    assert list(tmp_path.iterdir()) == []  # no file named 50


@pytest.mark.parametrize("flag", ["--pixel_cache", "--reference_cache", "--dataset", "--labels"])
def test_empty_path_arguments_are_usage_errors(tiny_model_dir, labelled_set, tmp_path, capsys, flag):
    argv = [str(tiny_model_dir), str(tmp_path / "r.json"), "--device", "cpu", flag, ""]
    if flag in ("--pixel_cache", "--reference_cache"):
        argv += ["--dataset", str(labelled_set)]
    assert accuracy_run.main(argv) == 2  # --dataset and --labels: needs verify's parser types (nonempty_path)
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(SystemExit) as exit_:
        inference.main(["--model_path", str(tiny_model_dir), "--images", ""])
    assert exit_.value.code == 2 and "an empty path" in capsys.readouterr().err


def test_bench_peers_output_folder_is_refused_up_front(tmp_path, capsys):
    from benchmarks import bench_peers

    assert bench_peers.main(["--model_path", str(tmp_path / "no_model"), "--output", str(tmp_path)]) == 2
    assert "--output" in capsys.readouterr().err


def test_port_report_output_folder_is_refused_up_front(tmp_path, capsys):
    import port_report

    assert port_report.main([str(ROOT / "accuracy_report.json"), "--output", str(tmp_path)]) == 2
    assert "--output" in capsys.readouterr().err and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------------------------
# inference.py: images (pixel bounds, URLs, globs), per-image errors, its output
# --------------------------------------------------------------------------------------------------------------------


def test_thin_image_is_refused_and_the_good_one_reported(tiny_model_dir, tmp_path, capsys):
    thin = thin_png(tmp_path / "thin.png")
    assert os.path.getsize(thin) < 1000
    out = tmp_path / "out.json"
    rc = inference.main(["--model_path", str(tiny_model_dir), "--image", thin, CHELSEA, "--output", str(out)])
    assert rc == 1
    report = read_json(out)
    assert [r["image"] for r in report["results"]] == [CHELSEA]
    (error,) = report["errors"]
    assert error["image"] == thin and one_line(error["error"])
    assert "288x11520000" in error["error"] and "--max_aspect_ratio" in error["error"]
    err = capsys.readouterr().err
    assert f"{thin}: error: refused" in err and "Traceback" not in err


def test_max_aspect_ratio_and_max_image_pixels_flags_move_the_bounds(tiny_model_dir, tmp_path):
    strip = thin_png(tmp_path / "strip.png", 1, 100)  # 100:1, 288 x 28,800 pixels resized
    out = tmp_path / "out.json"
    base = ["--model_path", str(tiny_model_dir), "--output", str(out)]
    assert inference.main([*base, "--image", strip]) == 2  # refused by default: nothing ran
    assert "aspect ratio of 100:1" in read_json(out)["errors"][0]["error"]
    assert inference.main([*base, "--image", strip, "--max_aspect_ratio", "100"]) == 0
    assert inference.main([*base, "--image", CHELSEA, "--max-image-pixels", "50000"]) == 2
    assert "--max_image_pixels" in read_json(out)["errors"][0]["error"]


def test_thin_image_over_a_url_is_refused(tiny_model_dir, tmp_path, server):
    out = tmp_path / "out.json"
    url = f"{server}/thin.png"
    rc = inference.main(["--model_path", str(tiny_model_dir), "--image", url, CHELSEA, "--output", str(out)])
    assert rc == 1
    assert [e["image"] for e in read_json(out)["errors"]] == [url]
    assert "refused" in read_json(out)["errors"][0]["error"]


def test_html_url_is_named_by_its_url(tiny_model_dir, tmp_path, server):
    out = tmp_path / "out.json"
    url = f"{server}/page"
    assert inference.main(["--model_path", str(tiny_model_dir), "--image", url, CHELSEA, "--output", str(out)]) == 1
    (error,) = read_json(out)["errors"]
    assert url in error["error"] and "text/html" in error["error"] and "BytesIO" not in error["error"]


def test_undecodable_url_bytes_do_not_show_a_stream_repr(tiny_model_dir, tmp_path, server, capsys):
    url = f"{server}/garbage"
    assert inference.main(["--model_path", str(tiny_model_dir), "--image", url, CHELSEA]) == 1
    err = capsys.readouterr().err
    assert f"{url}: error: cannot identify image file" in err and "BytesIO" not in err


def test_unmatched_glob_and_empty_folder_are_errors(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    pattern = str(tmp_path / "nothing*.jpg")
    out = tmp_path / "out.json"
    base = ["--model_path", str(tiny_model_dir), "--output", str(out)]
    assert inference.main([*base, "--image", CHELSEA, pattern, str(empty)]) == 1
    errors = {e["image"]: e["error"] for e in read_json(out)["errors"]}
    assert errors == {pattern: "no files match this pattern", str(empty): errors[str(empty)]}
    assert errors[str(empty)].startswith("no images found in this folder")
    assert inference.main([*base, "--image", pattern]) == 2  # nothing ran
    assert inference.main([*base, "--image", str(empty)]) == 2
    assert "no images found" in capsys.readouterr().err

    rc, report = run_acc(tmp_path, tiny_model_dir, "--images", CHELSEA, pattern)
    assert rc == 1 and report["errors"] == [{"image": pattern, "error": "no files match this pattern"}]
    rc, report = run_acc(tmp_path, tiny_model_dir, "--images", str(empty))
    assert rc == 2


def test_per_image_errors_go_to_stderr(tiny_model_dir, tmp_path, capsys):
    missing = str(tmp_path / "missing.png")
    assert inference.main(["--model_path", str(tiny_model_dir), "--image", CHELSEA, missing]) == 1
    out, err = capsys.readouterr()
    assert f"{missing}: error:" in err and missing not in out


def test_benchmark_batch_over_memory_is_one_line_not_an_oom_kill(tiny_model_dir, capsys):
    rc = inference.main(
        [
            "--model_path",
            str(tiny_model_dir),
            "--benchmark",
            "--batch_size",
            "1000000000",
            "--iterations",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
        ]
    )
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "--batch_size 1000000000" in line and "needs about" in line


def test_output_that_is_an_input_image_is_refused_by_path_or_link(tiny_model_dir, tmp_path, capsys):
    image = tmp_path / "cat.png"
    shutil.copy(CHELSEA, image)
    before = image.read_bytes()
    os.link(image, tmp_path / "cat.json")  # a hard link: another name, the same inode
    for output in (image, tmp_path / "cat.json"):
        rc = inference.main(["--model_path", str(tiny_model_dir), "--image", str(image), "--output", str(output)])
        line = error_line(capsys.readouterr().err)
        assert rc == 2 and str(output) in line and str(image) in line
    assert image.read_bytes() == before


def test_inference_output_to_dev_full_is_one_line(tiny_model_dir, capsys):
    assert inference.main(["--model_path", str(tiny_model_dir), "--image", CHELSEA, "--output", "/dev/full"]) == 2
    err = capsys.readouterr().err
    assert "error: could not write /dev/full: No space left on device" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------------------------
# inference.py and accuracy_run.py: the model folder
# --------------------------------------------------------------------------------------------------------------------


def test_mismatched_weights_list_the_keys_and_both_shapes(model_copy, capsys):
    from safetensors.torch import load_file, save_file

    weights = model_copy / "model.safetensors"
    state = load_file(str(weights))
    state["classifier.weight"] = torch.zeros(7, state["classifier.weight"].shape[1])
    save_file(state, str(weights), metadata={"format": "pt"})
    assert inference.main(["--model_path", str(model_copy), "--image", CHELSEA]) == 2
    err = capsys.readouterr().err.strip()
    assert one_line(err)
    assert re.search(r"classifier\.weight: checkpoint \[7, \d+\] vs model \[10, \d+\]", err), err
    assert "above report" not in err


def test_garbage_pytorch_model_bin_is_said_in_whole_sentences(model_copy, capsys):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(bytes(range(256)) * 12)
    assert inference.main(["--model_path", str(model_copy), "--image", CHELSEA]) == 2
    err = capsys.readouterr().err.strip()
    assert one_line(err) and "not a torch.save archive" in err
    assert err.endswith(".)"), err  # torch's message ends at a sentence end


def test_missing_default_model_folder_says_how_to_get_the_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert inference.main(["--image", CHELSEA]) == 2
    err = capsys.readouterr().err.strip()
    assert one_line(err) and "./model does not exist" in err and str(tmp_path) in err
    assert models.HUB_MODEL_ID in err and "--model_path" in err and "download" in err and "--local-dir" in err


def test_checkpoint_missing_a_tensor_is_refused_not_run_on_random_weights(model_copy, tmp_path, capsys):
    drop_tensor(model_copy, "mobilevit.conv_stem.convolution.weight", extra="stray.weight")
    rc = inference.main(["--model_path", str(model_copy), "--image", CHELSEA])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "mobilevit.conv_stem.convolution.weight" in line and "stray.weight" in line
    report = tmp_path / "r.json"
    for _ in range(2):  # the sweep's run 1 PASSed and run 2 FAILed against run 1's random weights
        rc = accuracy_run.main([str(model_copy), str(report), "--device", "cpu", "--images", CHELSEA])
        assert rc == 2 and "missing" in error_line(capsys.readouterr().err)
    assert not report.exists()


def test_model_folder_file_that_is_a_device_is_refused(model_copy, capsys):
    (model_copy / "config.json").unlink()
    (model_copy / "config.json").symlink_to("/dev/zero")
    rc = inference.main(["--model_path", str(model_copy), "--image", CHELSEA])
    assert rc == 2 and "not a regular file" in error_line(capsys.readouterr().err)


def test_reference_cache_key_follows_the_weights_loaded_not_the_file(model_copy, tmp_path, monkeypatch):
    from mobilevit_npu import refcache

    loaded = models.load_model(str(model_copy))
    key = refcache.reference_key(loaded.model, loaded.source, loaded.preprocess)
    with torch.no_grad():
        loaded.model.mobilevit.conv_stem.convolution.weight.mul_(0.5)  # same file, other tensors
    assert refcache.reference_key(loaded.model, loaded.source, loaded.preprocess) != key


# --------------------------------------------------------------------------------------------------------------------
# accuracy_run.py: images, skipped images, its report and caches
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allowance, rc", [(None, 1), ("1", 0), ("0.5", 0), ("0.4", 1)])
def test_skipped_images_fail_unless_allowed(tiny_model_dir, tmp_path, capsys, allowance, rc):
    missing = str(tmp_path / "missing.png")
    extra = ["--max_skipped", allowance] if allowance else []
    got, report = run_acc(tmp_path, tiny_model_dir, "--images", CHELSEA, missing, *extra)
    assert got == rc
    assert report["skipped"]["count"] == 1 and report["skipped"]["of"] == 2
    assert report["verdict"] == ("PASS" if rc == 0 else "FAIL")
    out, err = capsys.readouterr()
    verdict = [line for line in out.splitlines() if line.startswith("VERDICT")][0]
    assert "1 of 2 image(s) skipped" in verdict
    assert f"skipped {missing}" in err and missing not in out


@pytest.mark.parametrize("bad", ["-1", "1.5", "abc", "nan"])
def test_a_negative_fractional_or_non_numeric_max_skipped_is_a_usage_error(tiny_model_dir, tmp_path, bad):
    assert accuracy_run.main([str(tiny_model_dir), str(tmp_path / "r.json"), "--max_skipped", bad]) == 2


def test_output_under_a_file_or_unwritable_folder_is_refused(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        reports.check_output_path(a_file / "sub" / "out.json", "--output")
    assert accuracy_run.main([str(tmp_path / "m"), str(a_file / "r.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(UserError, match="no write permission"):
            reports.check_output_path(locked / "out.json")


def test_accuracy_report_over_the_model_config_is_refused(model_copy, capsys):  # needs verify's check_outputs call
    config = model_copy / "config.json"
    before = config.read_bytes()
    rc = accuracy_run.main([str(model_copy), str(config), "--device", "cpu", "--images", CHELSEA])
    assert rc == 2 and str(config) in error_line(capsys.readouterr().err)
    assert config.read_bytes() == before


def test_accuracy_report_over_an_input_image_list_is_refused(tiny_model_dir, tmp_path, capsys):
    labels = tmp_path / "labels.json"  # a CSV that happens to end in .json
    labels.write_text(f"{CHELSEA},1\n")
    before = labels.read_bytes()
    rc = accuracy_run.main([str(tiny_model_dir), str(labels), "--device", "cpu", "--labels", str(labels)])
    assert rc == 2 and str(labels) in error_line(capsys.readouterr().err)
    assert labels.read_bytes() == before


def test_reference_cache_that_is_a_file_is_said_once(tiny_model_dir, tmp_path, capsys, caplog):
    cache = tmp_path / "cache"
    cache.write_text("a file")
    argv = [
        str(tiny_model_dir),
        str(tmp_path / "r.json"),
        "--device",
        "cpu",
        "--reference_cache",
        str(cache),
        "--images",
        *PHOTOS[:3],
        *PORT,
    ]
    assert accuracy_run.main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "reference cache" in r.getMessage()]
    assert len(warnings) == 1 and "ENOTDIR" in warnings[0]
    assert "invalid" not in capsys.readouterr().out
    assert cache.read_text() == "a file"


def test_cache_entries_get_the_users_umask(tiny_model_dir, tmp_path):
    cache = tmp_path / "refs"
    old = os.umask(0o022)
    try:
        argv = [
            str(tiny_model_dir),
            str(tmp_path / "r.json"),
            "--device",
            "cpu",
            "--reference_cache",
            str(cache),
            "--images",
            CHELSEA,
            *PORT,
        ]
        assert accuracy_run.main(argv) == 0
    finally:
        os.umask(old)
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert entries and {stat.S_IMODE(p.stat().st_mode) for p in entries} == {0o644}


# --------------------------------------------------------------------------------------------------------------------
# accuracy_run.py --dataset / --labels: bad files are records, bounded batches, labels files
# --------------------------------------------------------------------------------------------------------------------


def test_thin_image_in_a_dataset_with_a_worker_is_a_record(tiny_model_dir, labelled_set, tmp_path, capsys):
    thin_png(labelled_set / "1" / "thin.png")
    report = tmp_path / "r.json"
    rc = accuracy_run.main(labelled(tiny_model_dir, labelled_set, report, "--workers", "1", "--max_skipped", "1"))
    assert rc == 0
    data = read_json(report)
    assert data["dataset"]["images"] == 4 and data["dataset"]["skipped"] == 1
    assert "refused" in data["errors"][0]["error"]
    assert "thin.png: refused" in capsys.readouterr().err


def test_a_worker_error_of_any_kind_becomes_that_images_record(monkeypatch):
    def boom(source, cfg, pixels=False):
        raise MemoryError("cannot allocate") if source == "a" else RuntimeError("odd decoder failure\nsecond line")

    monkeypatch.setattr(preprocessing, "preprocess", boom)
    images = labelsets._Images(["a", "b"], preprocessing.PreprocessConfig())
    # (index, pixels, error, file digest, pixel cache counts)
    assert images[0] == (0, None, "MemoryError: cannot allocate", None, None)
    assert images[1] == (1, None, "RuntimeError: odd decoder failure", None, None)


def test_a_mostly_unreadable_dataset_fails(tiny_model_dir, labelled_set, tmp_path, capsys):
    for i in range(6):
        (labelled_set / str(i % 4) / f"broken{i}.png").write_text("not a png")
    report = tmp_path / "r.json"
    assert accuracy_run.main(labelled(tiny_model_dir, labelled_set, report, "--workers", "0")) == 1
    data = read_json(report)
    assert data["verdict"] == "FAIL" and data["skipped"] == {"count": 6, "of": 10, "max_skipped": 0, "allowed": 0}
    assert "6 of 10 image(s) skipped" in capsys.readouterr().out
    allowed = labelled(tiny_model_dir, labelled_set, report, "--workers", "0", "--max-skipped", "0.6")
    assert accuracy_run.main(allowed) == 0


def test_stray_image_beside_class_folders_is_counted(tiny_model_dir, labelled_set, tmp_path, capsys):
    shutil.copy(PHOTOS[0], labelled_set / "stray.png")
    report = tmp_path / "r.json"
    argv = labelled(tiny_model_dir, labelled_set, report, "--workers", "0", "--max_skipped", "1")
    assert accuracy_run.main(argv) == 0
    data = read_json(report)
    assert data["dataset"]["images"] == 4 and data["dataset"]["skipped"] == 1
    assert data["errors"][0]["image"].endswith("stray.png")


def test_dataset_with_an_identical_cpu_target_says_determinism_only(tiny_model_dir, labelled_set, tmp_path, caplog):
    report = tmp_path / "r.json"
    argv = [str(tiny_model_dir), str(report), "--dataset", str(labelled_set), "--device", "cpu", "--workers", "0"]
    assert accuracy_run.main(argv) == 1  # not a port check: INVALID, as through --images
    assert read_json(report)["verdict"] == "INVALID"
    assert "deterministic" in read_json(report)["verdict_reasons"][0]
    assert "not a port check" in caplog.text


def test_a_per_image_file_that_is_a_folder_is_refused_up_front(tiny_model_dir, labelled_set, tmp_path, capsys):
    (tmp_path / "r.images.jsonl").mkdir()
    assert accuracy_run.main(labelled(tiny_model_dir, labelled_set, tmp_path / "r.json")) == 2
    assert "r.images.jsonl is a folder" in capsys.readouterr().err


def test_labelled_batch_is_bounded_by_the_images(tiny_model_dir, labelled_set, tmp_path, capsys):
    # needs verify to build its example and warm-up with labelsets.bounded_batch
    report = tmp_path / "r.json"
    argv = [
        str(tiny_model_dir),
        str(report),
        "--dataset",
        str(labelled_set),
        "--device",
        "cpu",
        "--batch_size",
        "1000000000",
        "--workers",
        "0",
        *PORT,
    ]
    assert accuracy_run.main(argv) == 0, capsys.readouterr().err
    assert read_json(report)["dataset"]["images"] == 4


def test_bounded_batch_takes_the_images_and_refuses_what_cannot_fit(monkeypatch):
    from mobilevit_npu import malloc

    cfg = preprocessing.PreprocessConfig()
    assert labelsets.bounded_batch(1_000_000_000, 5, cfg) == 5
    assert labelsets.bounded_batch(3, 5, cfg) == 3
    monkeypatch.setattr(malloc, "available_memory", lambda device=None: (labelsets.batch_bytes(8, cfg), "test"))
    assert labelsets.bounded_batch(8, 100, cfg) == 8
    with pytest.raises(UserError, match="--batch_size 9: a batch of 9 image"):
        labelsets.bounded_batch(9, 100, cfg)


def test_pixel_cache_on_a_full_disk_is_said_once_for_all_workers(
    tiny_model_dir, labelled_set, tmp_path, monkeypatch, caplog
):
    """Injected ENOSPC: every pixel-cache write fails as on a full disk, in each (forked) decoding worker."""
    from mobilevit_npu import refcache

    def full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(refcache.EntryCache, "_write_atomic", staticmethod(full))
    report = tmp_path / "r.json"
    argv = labelled(
        tiny_model_dir,
        labelled_set,
        report,
        "--workers",
        "2",
        "--batch_size",
        "1",
        "--pixel_cache",
        str(tmp_path / "pixels"),
    )
    assert accuracy_run.main(argv) == 0
    said = [r.getMessage() for r in caplog.records if "pixel cache" in r.getMessage()]
    assert len(said) == 1 and "No space left on device" in said[0]


def test_labels_row_naming_dev_zero_is_skipped_not_hashed_forever(tiny_model_dir, tmp_path):
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    shutil.copy(CHELSEA, tmp_path / "cat.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("cat.png,1\nzero.png,2\n")
    report = tmp_path / "r.json"
    cmd = [
        sys.executable,
        str(ROOT / "accuracy_run.py"),
        str(tiny_model_dir),
        str(report),
        "--device",
        "cpu",
        "--labels",
        str(labels),
        "--workers",
        "1",
        "--max_skipped",
        "1",
        *PORT,
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    errors = read_json(report)["errors"]
    assert len(errors) == 1 and "zero.png" in errors[0]["image"] and "not a regular file" in errors[0]["error"]


def test_gbk_labels_csv_is_refused_naming_the_encoding(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "猫.png").write_bytes(Path(PHOTOS[0]).read_bytes())
    rc, _ = labels_run(tiny_model_dir, tmp_path, "图像,类别\n猫.png,1\n".encode("gbk"))
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "not UTF-8" in line and re.search(r"gb|GB|big5|cp9", line), line


def test_class_id_superscript_is_one_line(tiny_model_dir, tmp_path, capsys):
    rc, _ = labels_run(tiny_model_dir, tmp_path, "img0.png,1\nimg1.png,\u00b2\n")
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "labels.csv:2" in line and "not a whole number" in line


def test_headerless_csv_keeps_its_first_row_and_a_bom_is_stripped(tiny_model_dir, tmp_path, capsys):
    rc, report = labels_run(tiny_model_dir, tmp_path, "\ufeffimg0.png,1\nimg1.png,2\nimg2.png,3\n")
    assert rc == 0, capsys.readouterr().err
    data = read_json(report)["dataset"]
    assert data["images"] == 3 and data["skipped"] == 0


def test_duplicate_rows_are_counted_once_and_conflicts_refused(tiny_model_dir, tmp_path, capsys, caplog):
    rc, report = labels_run(tiny_model_dir, tmp_path, "image,class_id\nimg0.png,1\nimg1.png,2\nimg0.png,1\n")
    assert rc == 0
    data = read_json(report)["dataset"]
    assert data["images"] == 2 and data["per_rank_images"] == [2]
    assert any("1 duplicate row" in r.getMessage() for r in caplog.records)
    rc, _ = labels_run(tiny_model_dir, tmp_path, "img0.png,3\nimg1.png,2\nimg0.png,5\n")
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "labelled 5 here and 3 on line 1" in line


# --------------------------------------------------------------------------------------------------------------------
# accuracy_run.py --resume: the journal counts the whole run, refuses what it cannot trust
# --------------------------------------------------------------------------------------------------------------------


def test_resume_counts_cover_the_whole_run(tiny_model_dir, labelled_set, tmp_path, monkeypatch, capsys):
    (labelled_set / "3" / "broken.png").write_text("not a png")
    report = tmp_path / "r.json"
    real_stream = labelsets.stream
    killed_run(tiny_model_dir, labelled_set, report, monkeypatch, "--max_skipped", "1")
    assert not report.exists()
    monkeypatch.setattr(labelsets, "stream", real_stream)
    argv = labelled(tiny_model_dir, labelled_set, report, "--workers", "0", "--max_skipped", "1", "--resume")
    assert accuracy_run.main(argv) == 0
    data = read_json(report)["dataset"]
    assert data["resumed_images"] == 2
    assert "(2 from the --resume journal)" in capsys.readouterr().out
    assert data["images"] == 4 and data["skipped"] == 1 and data["per_rank_images"] == [5]


def test_run_adds_resumed_images_to_their_ranks(tmp_path):
    dist = distributed.Distributed()
    samples = [labelsets.Sample(p, 0) for p in PHOTOS]
    journal = labelsets.Journal(tmp_path / "r.json", dist, {"k": 1}, resume=False)
    journal.close(remove=False)
    with open(tmp_path / "r.json.parts" / "rank1.jsonl", "w") as fh:  # an earlier run on two ranks
        fh.write(
            reports.json_line(
                {
                    "v": labelsets.JOURNAL_FORMAT,
                    "sha256": models.sha256_file(Path(PHOTOS[0])),
                    "record": {"image": PHOTOS[0], "label": 0},
                }
            )
        )
    journal = labelsets.Journal(tmp_path / "r.json", dist, {"k": 1}, resume=True)
    records, per_rank = labelsets.run_shards(
        samples,
        preprocessing.PreprocessConfig(),
        lambda batch, pixels: [{"image": s.image} for s in batch],
        dist,
        2,
        0,
        journal,
    )
    journal.close(remove=True)
    assert len(records) == len(PHOTOS) and per_rank == [len(PHOTOS) - 1, 1] and journal.resumed == 1


@pytest.mark.parametrize("bad", ['{"foo": 1}', '{"image": "x.png", "label": 1, "metrics": {}}', "not json"])
def test_resume_refuses_a_journal_line_it_cannot_read(tiny_model_dir, labelled_set, tmp_path, monkeypatch, capsys, bad):
    report = tmp_path / "r.json"
    killed_run(tiny_model_dir, labelled_set, report, monkeypatch)
    journal = tmp_path / "r.json.parts" / "rank0.jsonl"
    with open(journal, "a") as fh:
        fh.write(bad + "\n")
    rc = accuracy_run.main(labelled(tiny_model_dir, labelled_set, report, "--workers", "0", "--resume"))
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and f"{journal}:3" in line and "without --resume" in line
    assert not report.exists() and journal.exists()  # nothing done, the journal kept for a look


def test_resume_redoes_an_image_whose_bytes_changed(
    tiny_model_dir, labelled_set, tmp_path, monkeypatch, capsys, caplog
):
    report = tmp_path / "r.json"
    killed_run(tiny_model_dir, labelled_set, report, monkeypatch)
    journaled = [
        json.loads(line)["record"]["image"]
        for line in (tmp_path / "r.json.parts" / "rank0.jsonl").read_text().splitlines()
    ]
    shutil.copy(PHOTOS[-1], journaled[0])  # other bytes under the same name
    assert accuracy_run.main(labelled(tiny_model_dir, labelled_set, report, "--workers", "0", "--resume")) == 0
    assert read_json(report)["dataset"]["resumed_images"] == 1
    assert any("changed since the journal" in r.getMessage() for r in caplog.records)


def test_resume_of_a_finished_run_changes_nothing(tiny_model_dir, labelled_set, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert accuracy_run.main(labelled(tiny_model_dir, labelled_set, report, "--workers", "0")) == 0
    before = report.read_bytes()
    rc = accuracy_run.main(
        labelled(tiny_model_dir, labelled_set, report, "--workers", "0", "--resume", "--dtype", "bf16")
    )
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "finished run" in line and report.read_bytes() == before


def test_resume_names_the_setting_that_differs(tiny_model_dir, labelled_set, tmp_path, monkeypatch, capsys):
    report = tmp_path / "r.json"
    killed_run(tiny_model_dir, labelled_set, report, monkeypatch)
    rc = accuracy_run.main(
        labelled(tiny_model_dir, labelled_set, report, "--workers", "0", "--resume", "--min_cosine", "0.5")
    )
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "thresholds" in line


def test_a_second_live_run_on_the_same_report_is_refused(tiny_model_dir, labelled_set, tmp_path, monkeypatch, capsys):
    import fcntl

    report = tmp_path / "r.json"
    killed_run(tiny_model_dir, labelled_set, report, monkeypatch)
    journal = sorted((tmp_path / "r.json.parts").iterdir())
    with open(labelsets.lock_file(report), "a") as held:  # another live run holds the report
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        rc = accuracy_run.main(labelled(tiny_model_dir, labelled_set, report, "--workers", "0"))
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "another live run" in line
    assert sorted((tmp_path / "r.json.parts").iterdir()) == journal  # its journal is untouched


def test_journal_on_a_full_disk_is_one_line_exit_2(tiny_model_dir, labelled_set, tmp_path, monkeypatch, capsys):
    enospc_on_fsync(monkeypatch)
    rc = accuracy_run.main(labelled(tiny_model_dir, labelled_set, tmp_path / "r.json", "--workers", "0"))
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "rank0.jsonl" in line and "Errno 28" in line


def test_journal_folder_that_is_a_file_is_one_line(tiny_model_dir, labelled_set, tmp_path, capsys):
    report = tmp_path / "r.json"
    Path(f"{report}.parts").write_text("not a folder")
    for extra in ((), ("--resume",)):
        rc = accuracy_run.main(labelled(tiny_model_dir, labelled_set, report, "--workers", "0", *extra))
        assert rc == 2 and "not a folder" in error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------------------------
# accuracy_run_perf.py: the latency plot says what was timed
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("end_to_end, low, high", [(False, 30.0, 40.0), (True, 1.5, 900.0)])
def test_plot_says_what_was_timed_in_plain_ms(end_to_end, low, high, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = bench.latency_figure(fake_results(end_to_end, low, high), "npu:0 (Ascend910B4)")
    fig.canvas.draw()
    title = fig._suptitle.get_text()
    assert ("end to end" if end_to_end else "model only") in title
    assert "npu:0 (Ascend910B4)" in title and "fp16" in title
    panels = [ax.get_title() for ax in fig.axes]
    assert panels == ["batch size 1, 40 samples per mode", "batch size 32, 40 samples per mode"]
    for ax in fig.axes:
        assert "ms" in ax.get_ylabel()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert len(labels) >= 2, labels
        for label in labels:
            assert "$" not in label and "10^" not in label and "times" not in label, label
            float(label.replace(",", ""))  # plain numbers of milliseconds
    plt.close(fig)
    path = bench.plot_latencies(fake_results(end_to_end, low, high), str(tmp_path / "p.png"), "cpu")
    assert Path(path).stat().st_size > 0


# --------------------------------------------------------------------------------------------------------------------
# The atomic writer every script writes its outputs through (mobilevit_npu.reports)
# --------------------------------------------------------------------------------------------------------------------


def test_writer_replaces_a_regular_file_atomically(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    path.chmod(0o640)
    reports.write_json_atomic(path, {"a": 1})
    assert read_json(path) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # replacing keeps the permissions
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


def test_writer_keeps_a_symlink_and_replaces_its_target(tmp_path):
    target = tmp_path / "real" / "r.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    reports.write_json_atomic(link, {"b": 2})
    assert link.is_symlink() and read_json(target) == {"b": 2}
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "real" / "new.json")
    reports.write_json_atomic(dangling, {"c": 3})
    assert dangling.is_symlink() and read_json(tmp_path / "real" / "new.json") == {"c": 3}


def test_writer_writes_devices_and_fifos_through(tmp_path, capfd):
    reports.write_json_atomic("/dev/null", {"a": 1})
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # still the device node
    with pytest.raises(UserError, match="could not write /dev/full: No space left on device"):
        reports.write_json_atomic("/dev/full", {"a": 1})
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    reports.write_json_atomic(fifo, {"f": 1})
    reader.join(10)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and '"f": 1' in got[0]
    reports.write_json_atomic("/dev/stdout", {"to": "stdout"})
    assert '"to": "stdout"' in capfd.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# Under every script: image decoding and fetching (mobilevit_npu.preprocessing), one-line messages
# --------------------------------------------------------------------------------------------------------------------


def test_the_bound_is_checked_before_pil_decodes(tmp_path, monkeypatch):
    decoded = []
    original = ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(OSError, match="aspect ratio"):
        preprocessing.preprocess(thin_png(tmp_path / "t.png"), preprocessing.PreprocessConfig())
    assert decoded == []  # refused from the header alone


@pytest.mark.parametrize(
    "size, limits, message",
    [
        ((600, 600), {"max_image_pixels": 100_000}, "360,000 pixels, over the 100,000"),  # decoded size
        ((100, 100), {"max_image_pixels": 50_000}, "288x288 = 82,944 pixels"),  # resized size
        ((40, 2000), {}, "aspect ratio of 50:1"),
        ((10, 300), {"max_aspect_ratio": 30.0}, None),  # exactly at the bound: allowed
    ],
)
def test_an_image_over_a_bound_is_refused_naming_that_bound(size, limits, message):
    cfg = preprocessing.PreprocessConfig(**limits)
    if message is None:
        preprocessing.check_size(*size, cfg)
        return
    with pytest.raises(OSError) as info:
        preprocessing.check_size(*size, cfg)
    assert message in str(info.value) and one_line(str(info.value))


def test_random_images_give_a_tensor_or_one_line_within_bounded_memory(tmp_path):
    """Property: images of random mode, size and aspect ratio (extreme ones included) each give a 3x256x256 float32
    tensor or a one-line OSError, and memory stays bounded: no image costs more than its bounds allow."""
    rng = np.random.default_rng(11)
    modes = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
    cfg = preprocessing.PreprocessConfig()
    paths = []
    for i in range(60):
        mode = modes[i % len(modes)]
        short = int(rng.integers(1, 400))
        ratio = float(np.exp(rng.uniform(0, np.log(50_000))))  # 1:1 .. 50000:1, log-uniform
        long = max(short, min(int(short * ratio), 60_000, 2_000_000 // short))  # the test's own images stay small
        width, height = (short, long) if rng.random() < 0.5 else (long, short)
        image = Image.new(mode, (width, height), 7 if mode in ("1", "L", "P", "I;16", "I", "F") else None)
        tiff = mode in ("CMYK", "I;16", "I", "F")
        path = tmp_path / f"{i}_{mode.replace(';', '')}_{width}x{height}{'.tiff' if tiff else '.png'}"
        image.save(path, **({"compression": "tiff_deflate"} if tiff else {}))
        paths.append((str(path), width, height))
        del image
    tracemalloc.start()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    outcomes = {"tensor": 0, "refused": 0}
    try:
        for path, width, height in paths:
            try:
                array = preprocessing.preprocess(path, cfg)
            except OSError as exc:
                assert one_line(str(exc)), (path, str(exc))
                assert max(width, height) / min(width, height) > cfg.max_aspect_ratio, (path, str(exc))
                outcomes["refused"] += 1
                continue
            assert array.shape == (3, 256, 256) and array.dtype == np.float32 and np.isfinite(array).all(), path
            outcomes["tensor"] += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert outcomes["tensor"] >= 10 and outcomes["refused"] >= 10, outcomes  # both sides of the bound were tried
    assert peak < 200 * 2**20, f"numpy peak {peak / 2**20:.0f} MiB"
    assert rss_growth_mb < 500, f"peak RSS grew {rss_growth_mb:.0f} MiB"


def test_a_slow_server_is_cut_off_at_the_total_deadline(server):
    start = time.monotonic()
    with pytest.raises(OSError, match=r"no complete response within 1 s"):
        preprocessing.fetch_url(f"{server}/slow", timeout=1.0)
    assert time.monotonic() - start < 2.5  # a byte every 0.3 s would pass any per-read timeout


def test_first_line_cuts_at_a_sentence_end():
    long = "First sentence is here. " + "Second sentence goes on and on " * 20 + "end."
    assert first_line(ValueError(long), limit=100) == "First sentence is here."
    assert first_line(ValueError("word " * 100), limit=50).endswith(" ...")
    assert first_line(ValueError("short\nmore")) == "short"
