"""benchmarks/bench_peers.py: ONNX Runtime and OpenVINO beside the torch modes (pip install -e ".[bench]")."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest
from conftest import ROOT, read_json

from benchmarks import bench_peers


def test_unknown_peer_exits_2(tiny_model_dir, capsys):
    assert bench_peers.main(["--model_path", str(tiny_model_dir), "--peers", "tensorrt"]) == 2
    assert "unknown peer(s) tensorrt" in capsys.readouterr().err


@pytest.mark.parametrize("sizes", ["0", "1,x", ",", ""])
def test_batch_sizes_are_checked_by_the_shared_parser(sizes, capsys):
    """common.batch_sizes, the parser accuracy_run_perf.py uses too: a usage error before any model work."""
    assert bench_peers.main(["--synthetic", "--batch_sizes", sizes]) == 2
    assert "--batch_sizes" in capsys.readouterr().err


def test_no_installed_peer_exits_2(tiny_model_dir, monkeypatch, capsys):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in bench_peers.PEERS else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert bench_peers.main(["--model_path", str(tiny_model_dir)]) == 2
    assert "no peer to run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("peer", bench_peers.PEERS)
def test_peer_runs_beside_eager_and_agrees(peer, tiny_model_dir, tmp_path):
    """As a user runs it, in its own process: OpenVINO's thread pool in the pytest process (next to the gloo groups and
    DataLoader workers of other tests) crashes the interpreter at exit."""
    if importlib.util.find_spec(peer) is None or importlib.util.find_spec("onnx") is None:
        pytest.skip(f'{peer} or onnx not installed (pip install -e ".[bench]")')
    out = tmp_path / "peers.json"
    argv = [
        "--model_path",
        str(tiny_model_dir),
        "--peers",
        peer,
        "--modes",
        "eager",
        "--iterations",
        "2",
        "--warmup",
        "1",
        "--batch_sizes",
        "1,2",
        "--allocator",
        "system",
        "--output",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_peers", *argv], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert peer in proc.stdout and "% ceiling" in proc.stdout
    data = read_json(out)  # the benchmark's own report: same header, settings and result schema
    assert data["tool"] == "benchmarks/bench_peers.py" and data["settings"]["peers"] == [peer]
    assert data["provenance"]["packages"][peer] == importlib.metadata.version(peer)  # the installed distribution
    assert data["environment"]["allocator"]["tuned"] is False
    rows = [(r["mode"], r["batch_size"]) for r in data["results"]]
    assert rows == [("eager", 1), (peer, 1), ("eager", 2), (peer, 2)]
    for r in data["results"]:
        assert len(r["samples_ms"]) == 2
        assert r["exact"] is True, r["agreement"]  # float32 on both sides: the same logits to float rounding
        assert r["roofline"]["flop_per_image"] > 0
        assert r["status"] == "ok" and r["peak_memory_bytes"] > 0 and r["latency_ms"]["p50"] > 0
