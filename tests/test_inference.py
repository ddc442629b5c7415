"""inference.py end to end: predictions, JSON, bad inputs and exit codes."""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, PHOTOS, ROOT, read_json

import inference
from mobilevit_npu import devices, distributed, preprocessing


@pytest.fixture(scope="module")
def http_photos():
    """A loopback HTTP server over tests/data."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(DATA_DIR))

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client that hangs up early (the size-cap test) is expected

    server = Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow
def test_synthetic_x_small_matches_transformers_own_pipeline(synthetic_model_dir, tmp_path):
    """The done-when check: same class ids as transformers' processor + model, probabilities within 1e-5."""
    import transformers
    from transformers.image_utils import load_image

    out = tmp_path / "out.json"
    assert (
        inference.main(
            [
                "--allocator",
                "system",
                "--model_path",
                str(synthetic_model_dir),
                "--image",
                *PHOTOS,
                "--device",
                "cpu",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = read_json(out)
    processor_cls = getattr(transformers, "MobileViTImageProcessorPil", None) or transformers.MobileViTImageProcessor
    processor = processor_cls.from_pretrained(str(synthetic_model_dir))
    model = transformers.MobileViTForImageClassification.from_pretrained(str(synthetic_model_dir)).eval()
    assert [r["image"] for r in report["results"]] == PHOTOS
    for result in report["results"]:
        pixels = processor(load_image(result["image"]), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            probs = model(pixel_values=pixels).logits.softmax(-1)[0]
        top = probs.topk(5)
        assert [p["class_id"] for p in result["predictions"]] == top.indices.tolist()
        for p, expected in zip(result["predictions"], top.values.tolist()):
            assert abs(p["probability"] - expected) <= 1e-5
            assert p["label"] == model.config.id2label[p["class_id"]]


def test_report_shape_and_console_table(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = inference.main(
        [
            "--allocator",
            "system",
            "--model_path",
            str(tiny_model_dir),
            "--image",
            str(DATA_DIR),
            "--top_k",
            "3",
            "--batch_size",
            "2",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    report = read_json(out)
    assert set(report) >= {"tool", "argv", "model_source", "device", "dtype", "environment", "results", "errors"}
    assert report["tool"] == "inference.py" and report["model_source"]["path"] == str(tiny_model_dir)
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and report["errors"] == []
    assert report["environment"]["torch"] == torch.__version__
    assert len(report["results"]) == len(PHOTOS)
    first = report["results"][0]
    assert [p["rank"] for p in first["predictions"]] == [1, 2, 3]
    probs = [p["probability"] for p in first["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    assert first["timing_ms"]["preprocess"] > 0 and first["timing_ms"]["model"] > 0
    assert first["timing_ms"]["batch_size"] == 2
    console = capsys.readouterr().out
    assert "rank  class  label" in console and "classified on cpu" in console


def test_batching_does_not_change_results(tiny_model_dir, tmp_path):
    outs = []
    for batch in ("1", "4"):
        out = tmp_path / f"b{batch}.json"
        assert (
            inference.main(
                [
                    "--allocator",
                    "system",
                    "--model_path",
                    str(tiny_model_dir),
                    "--image",
                    *PHOTOS,
                    "--batch_size",
                    batch,
                    "--output",
                    str(out),
                ]
            )
            == 0
        )
        outs.append(read_json(out)["results"])
    for a, b in zip(*outs):
        assert [p["class_id"] for p in a["predictions"]] == [p["class_id"] for p in b["predictions"]]
        for p, q in zip(a["predictions"], b["predictions"]):
            assert abs(p["probability"] - q["probability"]) < 1e-4


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_runs(tiny_model_dir, tmp_path, dtype):
    out = tmp_path / "out.json"
    assert (
        inference.main(
            [
                "--allocator",
                "system",
                "--model_path",
                str(tiny_model_dir),
                "--image",
                PHOTOS[0],
                "--dtype",
                dtype,
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = read_json(out)
    assert report["dtype"] == dtype and 0 < report["results"][0]["predictions"][0]["probability"] <= 1


def test_bad_images_are_reported_and_the_rest_go_on(tiny_model_dir, tmp_path, http_photos, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(Path(PHOTOS[0]).read_bytes()[:4000])
    out = tmp_path / "out.json"
    chelsea = str(DATA_DIR / "chelsea.png")
    images = [
        chelsea,
        str(text),
        str(truncated),
        str(tmp_path / "missing.png"),
        f"{http_photos}/chelsea.png",
        f"{http_photos}/nope.png",
        "http://127.0.0.1:9/refused.jpg",
    ]
    rc = inference.main(
        ["--allocator", "system", "--model_path", str(tiny_model_dir), "--image", *images, "--output", str(out)]
    )
    assert rc == 1
    report = read_json(out)
    assert [r["image"] for r in report["results"]] == [chelsea, f"{http_photos}/chelsea.png"]
    assert [e["image"] for e in report["errors"]] == images[1:4] + images[5:]
    assert all(e["error"] for e in report["errors"])
    # the URL gives the same answer as the file
    assert report["results"][0]["predictions"] == report["results"][1]["predictions"]
    assert "Traceback" not in capsys.readouterr().err


def test_url_size_cap(http_photos):
    with pytest.raises(OSError, match="cap"):
        preprocessing.fetch_url(f"{http_photos}/chelsea.png", max_bytes=1000)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_path", "/no/such/folder"], "does not exist"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_model_and_device_errors_exit_2(tiny_model_dir, capsys, args, message):
    argv = ["--allocator", "system", "--model_path", str(tiny_model_dir), "--image", PHOTOS[0], *args]
    assert inference.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_absent_cuda_exit_2(tiny_model_dir, capsys):
    assert (
        inference.main(
            ["--allocator", "system", "--model_path", str(tiny_model_dir), "--image", PHOTOS[0], "--device", "cuda"]
        )
        == 2
    )
    assert "no CUDA device" in capsys.readouterr().err


def test_no_images_found_exit_2(tiny_model_dir, tmp_path, capsys):
    assert inference.main(["--allocator", "system", "--model_path", str(tiny_model_dir), "--image", str(tmp_path)]) == 2
    assert "no images found" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--image", "x.jpg", "--top_k", "0"], ["--image", "x.jpg", "--batch_size", "0"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        inference.main(argv)
    assert info.value.code == 2


def test_kebab_case_twins(tiny_model_dir, tmp_path):
    out = tmp_path / "out.json"
    assert (
        inference.main(
            [
                "--allocator",
                "system",
                "--model-path",
                str(tiny_model_dir),
                "--image",
                PHOTOS[0],
                "--top-k",
                "2",
                "--batch-size",
                "1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert len(read_json(out)["results"][0]["predictions"]) == 2


def test_script_runs_as_a_subprocess(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "inference.py", "--model_path", str(tiny_model_dir), "--image", PHOTOS[2], "--top_k", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "chelsea.png" in proc.stdout and "rank  class  label" in proc.stdout
    help_text = subprocess.run([sys.executable, "inference.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    for flag in (
        "--model_path",
        "--image",
        "--top_k",
        "--batch_size",
        "--dtype",
        "--output",
        "--device",
        "--benchmark",
        "--iterations",
        "--warmup",
        "--jit_compile",
    ):
        assert flag in help_text.stdout


def test_benchmark_flag_goes_through_the_shared_benchmark(tiny_model_dir, tmp_path, capsys, monkeypatch):
    calls = []
    real_sync = devices.synchronize
    monkeypatch.setattr(devices, "synchronize", lambda device: (calls.append(str(device)), real_sync(device))[1])
    out = tmp_path / "bench.json"
    argv = [
        "--model_path",
        str(tiny_model_dir),
        "--benchmark",
        "--iterations",
        "4",
        "--warmup",
        "1",
        "--batch_size",
        "2",
        "--output",
        str(out),
        "--allocator",
        "system",
    ]
    assert inference.main(argv) == 0
    report = read_json(out)
    (result,) = report["results"]
    assert result["mode"] == "eager" and result["batch_size"] == 2 and len(result["samples_ms"]) == 4
    assert set(result["latency_ms"]) == {"mean", "p50", "p90", "p99", "min", "max", "stdev"}
    assert report["settings"]["iterations"] == 4 and report["settings"]["warmup"] == 1
    assert len(calls) >= 2 * 4  # a sync before and after every timed call
    console = capsys.readouterr().out
    assert "latency ms mean" in console and "device synchronized before every clock read" in console


def test_benchmark_under_torchrun_is_refused(tiny_model_dir, monkeypatch, capsys):
    two_ranks = distributed.Distributed(rank=0, world_size=2)
    monkeypatch.setattr(distributed, "setup", lambda spec, jit_compile=False: (two_ranks, devices.Device("cpu")))
    assert inference.main(["--allocator", "system", "--model_path", str(tiny_model_dir), "--benchmark"]) == 2
    assert "--benchmark times one device" in capsys.readouterr().err
