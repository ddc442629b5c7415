"""One registry of runtimes (mobilevit_npu.runtime_registry) behind one interface (mobilevit_npu.runtimes.Runtime):
accuracy_run.py, accuracy_run_perf.py and benchmarks/bench_peers.py all read it; an unknown runtime is an error in
one line, never another runtime (issue 29)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from conftest import PHOTOS

import accuracy_run
import accuracy_run_perf
from benchmarks import bench_peers
from mobilevit_npu import devices, models, runtime_ort, runtime_registry, runtimes, targets, verify
from mobilevit_npu.errors import UserError

SYSTEM = ["--allocator", "system"]  # in-process script runs leave malloc alone (mallopt is process-wide)
CPU = devices.Device("cpu")


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


# ------------------------------------------------------------------------------------------- unknown runtimes


@pytest.mark.parametrize("script", ["accuracy_run", "accuracy_run_perf"])
def test_an_unknown_runtime_is_one_error_line_in_both_scripts(script, tiny_model_dir, tmp_path, capsys):
    report = str(tmp_path / "r.json")
    argv = [str(tiny_model_dir), report] if script == "accuracy_run" else [str(tiny_model_dir), "1", report]
    main = {"accuracy_run": accuracy_run.main, "accuracy_run_perf": accuracy_run_perf.main}[script]
    assert main([*argv, "--runtime", "tensorrt"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--runtime" in line and "tensorrt" in line
    assert all(name in line for name in runtime_registry.runtime_names())  # the choices, from the registry
    assert not (tmp_path / "r.json").exists()


def test_an_unknown_runtime_is_never_run_as_another(tiny_model_dir):
    """Past argparse (a settings object built in code), the old checks let any name through and runtime_target ran it
    as an .om: now the registry refuses it, one line naming the choices."""
    for runtime in ("tensorrt", "openvino"):  # openvino: a peer of bench_peers, not a --runtime choice
        settings = verify.Settings(runtime=runtime, report="r.json", model_path=str(tiny_model_dir), om="m.om")
        with pytest.raises(UserError) as refused:
            verify.check(settings)
        assert str(refused.value) == f"unknown runtime '{runtime}': choose from torch, onnxruntime, om"
        with pytest.raises(UserError, match="unknown runtime"):
            runtimes.runtime_target(settings, None, torch.zeros(1, 3, 8, 8))
        with pytest.raises(UserError, match="unknown runtime"):
            runtimes.torch_device_spec(runtime, "cpu")


def test_openvino_is_declared_once_as_a_peer_only():
    assert runtime_registry.runtime_names() == ("torch", "onnxruntime", "om")
    assert runtime_registry.runtime_names(offered=False) == ("torch", "onnxruntime", "om", "openvino")
    assert runtime_registry.peers() == bench_peers.PEERS == ("onnxruntime", "openvino")
    assert isinstance(runtimes.implementation("openvino", offered=False), runtimes.OnnxFileRuntime)


# ------------------------------------------------------------------------------- a runtime added to the registry


class StandIn(runtimes.Runtime):
    """A runtime a test adds to the registry: the float32 eager model on the CPU, through the one interface."""

    name = "standin"
    needs_workdir = False

    def __init__(self):
        self.calls: list[str] = []

    def device(self, spec, default_index=0):
        return CPU

    def _prepared(self, model):
        return targets.reference_side(copy.deepcopy(model)).prepared

    def target(self, args, loaded, example, device, default_index=0):
        self.calls.append("target")
        return runtimes.RuntimeSide(
            prepared=self._prepared(loaded.model),
            hook_model=loaded.model,
            device=CPU,
            dtype="fp32",
            mode="standin eager",
            where="cpu",
            runtime={"name": "standin"},
        )

    def bench(self, args, loaded, tmp):
        self.calls.append("bench")
        return runtimes.BenchRuntime("standin", CPU, {"standin": self._builder("bench")})

    def peer(self, workdir):
        return self._builder("peer")

    def _builder(self, what):
        def build(model, device, dtype, batch):
            self.calls.append(f"{what} build")
            return self._prepared(model)

        return build


@pytest.fixture
def standin(monkeypatch):
    """StandIn declared in the registry (as a peer too), its implementation importable by the name it declares."""
    runtime = StandIn()
    module = types.ModuleType("standin_runtime")
    module.STANDIN = runtime
    monkeypatch.setitem(sys.modules, "standin_runtime", module)
    entry = runtime_registry.RuntimeEntry(
        "standin", "a test's stand-in", "standin_runtime:STANDIN", package="numpy", peer=True
    )
    monkeypatch.setitem(runtime_registry.REGISTRY, "standin", entry)
    return runtime


def test_a_runtime_added_to_the_registry_is_a_choice_of_both_scripts(standin):
    for parser in (accuracy_run.build_parser(), accuracy_run_perf.build_parser()):
        (action,) = [a for a in parser._actions if "--runtime" in a.option_strings]
        assert "standin" in action.choices and "standin (a test's stand-in)" in action.help


def test_a_runtime_added_to_the_registry_is_verified_through_its_target(standin, tiny_model_dir, tmp_path):
    report = tmp_path / "r.json"
    argv = [str(tiny_model_dir), str(report), "--runtime", "standin", "--images", PHOTOS[0], "--reference_cache", "off"]
    assert accuracy_run.main(argv) == 0
    data = json.loads(report.read_text())
    assert data["verdict"] == "PASS" and data["target"]["mode"] == "standin eager"
    assert standin.calls == ["target"]


def test_a_runtime_added_to_the_registry_is_benchmarked_through_its_runner(standin, tiny_model_dir, tmp_path):
    out = tmp_path / "p.json"
    argv = [str(tiny_model_dir), "1", str(out), "--runtime", "standin", "--warmup", "0", *SYSTEM]
    assert accuracy_run_perf.main(argv) == 0
    data = json.loads(out.read_text())
    assert [(r["mode"], r["status"]) for r in data["results"]] == [("eager", "ok"), ("standin", "ok")]
    assert data["settings"]["runtime"] == {"name": "standin"}
    assert standin.calls == ["bench", "bench build"]


def test_bench_peers_runs_the_registrys_peers(standin, tiny_model_dir, capsys):
    argv = ["--model_path", str(tiny_model_dir), "--peers", "standin", "--modes", "eager", "--iterations", "1"]
    assert bench_peers.main([*argv, "--warmup", "0", "--batch_sizes", "1", *SYSTEM]) == 0
    assert standin.calls == ["peer build"] and "standin" in capsys.readouterr().out
    assert bench_peers.main(["--model_path", str(tiny_model_dir), "--peers", "om"]) == 2  # a runtime, not a peer
    assert "unknown peer(s) om: choose from onnxruntime, openvino, standin" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason='onnx / onnxruntime not installed (pip install -e ".[bench]")',
)
def test_the_onnxruntime_peer_is_the_registrys_and_opens_through_runtime_ort(tiny_model_dir, tmp_path, monkeypatch):
    """bench_peers' ONNX Runtime is the registry's entry: its session comes from runtime_ort.open_session (the one
    opener, fallback refused) on the CPU with torch's thread count, and computes the model's logits."""
    opened = []
    real = runtime_ort.open_session

    def open_session(path, device=None, precision_mode=None, cann_graph=True, threads=None):
        opened.append((device, threads))
        return real(path, device, precision_mode, cann_graph, threads)

    monkeypatch.setattr(runtime_ort, "open_session", open_session)
    loaded = models.load_model(str(tiny_model_dir), CPU, "fp32")
    batch = torch.rand(2, 3, loaded.preprocess.crop_height, loaded.preprocess.crop_width)
    prepared = bench_peers.peer_builder("onnxruntime", tmp_path)(loaded.model, CPU, "fp32", batch)
    assert opened == [(CPU, torch.get_num_threads())]
    with torch.no_grad():
        expected = loaded.model(pixel_values=batch).logits
    got = prepared.call(prepared.to_input(batch))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
