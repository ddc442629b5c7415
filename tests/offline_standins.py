"""Stand-ins for the offline runtimes that cannot run here, modelled on their real sources (names, arguments, errors,
behaviour), and computing with the real ONNX Runtime on the CPU so the verdict over them is a real one.

onnxruntime with the CANN execution provider (onnxruntime-cann): the module's InferenceSession IS the installed
onnxruntime's InferenceSession, subclassed at one seam, `_create_inference_session(providers, provider_options,
disabled_optimizers)`, the method the real __init__ calls and whose ValueError / RuntimeError its CPU fallback catches
(onnxruntime/capi/onnxruntime_inference_collection.py, 1.32.0: __init__ l.692-709, _create_inference_session
l.711-731; the onnxruntime-cann 1.24.4 wheel: l.503-519, l.521-577). So the fallback that runs here is onnxruntime's
own code, not a model of it. At the seam, as the real one:
  - the fallback providers are set first, to ["CPUExecutionProvider"] ("All others fall back to CPU", l.724-731);
  - the CANN options are parsed strictly, as ProviderOptionsParser does: an unknown key is
    'Unknown provider option: "KEY".' (microsoft/onnxruntime core/framework/provider_options_utils.h), thrown with
    ORT_THROW from the provider factory, which pybind11 turns into a RuntimeError (the class the fallback catches;
    the real "Unknown Provider Type: X" comes out the same way, checked in test_runtime_ort.py). The known keys are
    those of core/providers/cann/cann_execution_provider_info.cc: precision_mode in the onnxruntime-cann 1.24.4 wheel
    (its option parser registers the 14-character "precision_mode", read from the provider library's disassembly),
    precision_mode_v2 on upstream main;
  - `fail`: the provider cannot start, e.g. the provider library that does not load without CANN's set_env.sh, as
    users report it for the CUDA provider library ("Failed to load library libonnxruntime_providers_cuda.so with
    error: ..."), raised the same way;
  - then the graph runs on the real CPU provider while get_providers() names the providers the session would have.
`ignores_enable_fallback`: a build whose InferenceSession does not read the enable_fallback keyword (the keyword is
read at l.672 in 1.32.0 and l.482 in 1.24.4; older builds keep the fallback always on): the real fallback then runs.

ais_bench (msit benchmark; ais_bench/infer/interface.py): `InferSession(device_id, model_path, acl_json_path=None,
debug=False, loop=1)`, `get_inputs()` (descs with .name, .shape, .datatype), `infer(feeds, mode='static',
custom_sizes=100000, out_array=True)` raising RuntimeError for an unknown mode, `summary()` whose `exec_time_list`
holds one (start, end) pair in ms per run.
"""

from __future__ import annotations

import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CANN = "CANNExecutionProvider"
CANN_OPTIONS_1_24 = {  # cann_execution_provider_info.cc as in the onnxruntime-cann 1.24.4 wheel
    "device_id",
    "npu_mem_limit",
    "arena_extend_strategy",
    "enable_cann_graph",
    "enable_cann_subgraph",
    "dump_graphs",
    "dump_om_model",
    "precision_mode",
    "op_select_impl_mode",
    "optypelist_for_implmode",
}
CANN_OPTIONS_MAIN = (CANN_OPTIONS_1_24 - {"precision_mode"}) | {
    "precision_mode_v2",
    "input_format",
    "dynamic_batch_size",
    "dynamic_image_size",
    "dynamic_dims",
}
CANN_NOT_SOURCED = (
    "onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : "
    "Failed to load library libonnxruntime_providers_cann.so with error: libascendcl.so: cannot open "
    "shared object file: No such file or directory"
)


def _name(entry) -> str:
    return entry if isinstance(entry, str) else entry[0]


DISABLE_CPU_EP_FALLBACK = "session.disable_cpu_ep_fallback"  # onnxruntime_session_options_config_keys.h


def _without_config_entry(options, key: str):
    """A copy of SessionOptions (the fields runtime_ort sets) without one config entry."""
    import onnxruntime

    copy = onnxruntime.SessionOptions()
    copy.graph_optimization_level = options.graph_optimization_level
    copy.intra_op_num_threads = options.intra_op_num_threads
    copy.inter_op_num_threads = options.inter_op_num_threads
    value = _entry(options, "session.intra_op.allow_spinning")
    if value is not None and key != "session.intra_op.allow_spinning":
        copy.add_session_config_entry("session.intra_op.allow_spinning", value)
    return copy


def _entry(options, key: str):
    """A session config entry's value, None when never set (onnxruntime raises for those)."""
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:
        return None


def cann_onnxruntime(
    real_ort,
    available=(CANN, "CPUExecutionProvider"),
    cann_options=CANN_OPTIONS_1_24,
    version="1.24.4",
    fail: str | None = None,
    ignores_enable_fallback=False,
):
    """An onnxruntime module (onnxruntime-cann `version`) whose InferenceSession is the real one with a CANN provider
    at the session-creation seam (see the module docstring). `calls` records the providers each creation was asked
    for, the real fallback's retry included."""
    calls: list[list] = []

    class InferenceSession(real_ort.InferenceSession):
        def __init__(self, path_or_bytes, sess_options=None, providers=None, provider_options=None, **kwargs):
            if ignores_enable_fallback:
                kwargs.pop("enable_fallback", None)
            super().__init__(path_or_bytes, sess_options, providers, provider_options, **kwargs)

        def _create_inference_session(self, providers, provider_options, disabled_optimizers=None):
            calls.append(list(providers or []))
            self._fallback_providers = ["CPUExecutionProvider"]
            names = [_name(p) for p in providers or []]
            if CANN not in names:
                return super()._create_inference_session(providers, provider_options, disabled_optimizers)
            entry = providers[names.index(CANN)]
            for key in entry[1] if isinstance(entry, tuple) else {}:
                if key not in cann_options:
                    raise RuntimeError(f'Unknown provider option: "{key}".')
            if fail:
                raise RuntimeError(fail)
            options = self._sess_options
            if options is not None and _entry(options, DISABLE_CPU_EP_FALLBACK) == "1":
                # onnxruntime/core/session/inference_session.cc (InferenceSession::Initialize): with the CPU EP
                # fallback disabled, an explicitly added CPU EP is refused; the stand-in's CANN provider takes every
                # node, so the real session underneath (which is the CPU EP) runs without the entry
                if "CPUExecutionProvider" in names:
                    raise RuntimeError(
                        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Conflicting session configuration: explicitly "
                        "added the CPU EP to the session, but also disabled fallback to the CPU EP via session "
                        "configuration options."
                    )
                self._sess_options = _without_config_entry(options, DISABLE_CPU_EP_FALLBACK)
            super()._create_inference_session(["CPUExecutionProvider"], None, disabled_optimizers)
            self._sess_options = options
            self._providers = [n for n in names if n in available]  # what the real session reports it has

    return types.SimpleNamespace(
        __version__=version,
        get_available_providers=lambda: list(available),
        SessionOptions=real_ort.SessionOptions,
        GraphOptimizationLevel=real_ort.GraphOptimizationLevel,
        InferenceSession=InferenceSession,
        calls=calls,
    )


# ------------------------------------------------------------------------------------------------------ ais_bench

INFER_MODES = ("static", "dymbatch", "dymhw", "dymdims", "dymshape")  # interface.py infer_mode_switch


@dataclass
class _DType:
    name: str


@dataclass
class _Desc:
    name: str
    shape: list
    datatype: _DType


def parse_aipp(text: str) -> dict[str, str]:
    """key: value pairs of an aipp_op { ... } prototxt (comments dropped)."""
    body = re.search(r"aipp_op\s*\{(.*)\}", text, re.S).group(1)
    pairs = {}
    for line in body.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, value = (part.strip() for part in line.split(":", 1))
            pairs[key] = value
    return pairs


def apply_aipp(config: dict[str, str], nhwc_u8: np.ndarray) -> np.ndarray:
    """What the CANN ATC guide says a static RGB888_U8 AIPP does: optional R/B swap (rbuv_swap_switch), then
    pixel_out = (pixel_in - mean_chn_i - min_chn_i) * var_reci_chn_i per channel, to the model's NCHW input."""
    x = nhwc_u8.astype(np.float32)
    if config.get("rbuv_swap_switch") == "true":
        x = x[..., ::-1]
    out = np.empty_like(x)
    for c in range(3):
        mean = float(config.get(f"mean_chn_{c}", 0))
        low = float(config.get(f"min_chn_{c}", 0))
        reci = np.float32(float(config.get(f"var_reci_chn_{c}", 1.0)))
        out[..., c] = (x[..., c] - np.float32(mean + low)) * reci
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def fake_ais_bench(real_ort, models: dict[str, dict]):
    """A `ais_bench.infer.interface` module. `models` maps an .om path to {"onnx": path, "batch": int or -1,
    "aipp": config text or None}: the .om is that ONNX file (with the AIPP in front). `sessions` records each
    InferSession's (device_id, model_path) and `infers` each infer's (mode, shape, dtype)."""
    sessions: list[tuple] = []
    infers: list[tuple] = []

    class Summary:
        def __init__(self):
            self.exec_time_list: list[tuple[float, float]] = []

    class InferSession:
        def __init__(
            self, device_id: int, model_path: str, acl_json_path: str = None, debug: bool = False, loop: int = 1
        ):
            spec = models.get(str(model_path))
            if spec is None:
                raise RuntimeError(f"[ERROR] load model from file failed, model file is {model_path}")
            sessions.append((device_id, model_path))
            self._spec = spec
            self._aipp = parse_aipp(spec["aipp"]) if spec.get("aipp") else None
            self._real = real_ort.InferenceSession(str(spec["onnx"]), providers=["CPUExecutionProvider"])
            self._summary = Summary()
            self._clock = 0.0

        def get_inputs(self):
            batch = spec_batch = self._spec["batch"]
            if self._aipp:
                h, w = int(self._aipp["src_image_size_h"]), int(self._aipp["src_image_size_w"])
                return [_Desc("pixel_values", [batch, h, w, 3], _DType("uint8"))]
            del spec_batch
            return [_Desc("pixel_values", [batch, 3, 256, 256], _DType("float32"))]

        def get_outputs(self):
            return [_Desc("logits", [self._spec["batch"], -1], _DType("float32"))]

        def infer(self, feeds, mode="static", custom_sizes=100000, out_array=True):
            if mode not in INFER_MODES:
                raise RuntimeError(f"wrong infer_mode:{mode}")
            (feed,) = feeds
            if type(feed) is not np.ndarray:
                raise RuntimeError(f"type:{type(feed)} invalid")
            desc = self.get_inputs()[0]
            fixed = desc.shape[0]
            if mode == "static" and (fixed < 0 or list(feed.shape) != desc.shape):
                raise RuntimeError("input datas and intensors dim not matched!")
            if mode == "dymbatch" and fixed >= 0:
                raise RuntimeError("not a dymbatch model!")
            if feed.dtype != np.dtype(desc.datatype.name):
                raise RuntimeError(f"input dtype {feed.dtype} is not the model's {desc.datatype.name}")
            infers.append((mode, tuple(feed.shape), str(feed.dtype)))
            x = apply_aipp(self._aipp, feed) if self._aipp else feed
            out = self._real.run(["logits"], {"pixel_values": x})[0]
            self._summary.exec_time_list.append((self._clock, self._clock + 0.5))  # 0.5 ms of "NPU compute"
            self._clock += 1.0
            return [out]

        def summary(self):
            return self._summary

        def free_resource(self):
            pass

    interface = types.SimpleNamespace(InferSession=InferSession, sessions=sessions, infers=infers)
    return interface


def om_spec(onnx_path: Path, batch: int, aipp: str | None = None) -> dict:
    return {"onnx": str(onnx_path), "batch": batch, "aipp": aipp}


# ------------------------------------------------------------------------------------------- shared test helpers


@pytest.fixture(scope="module")
def real_ort():
    """The installed onnxruntime (the stand-ins compute with it, and its InferenceSession is theirs)."""
    import onnxruntime

    return onnxruntime


@pytest.fixture
def tiny_onnx(tmp_path_factory, tiny_model_dir):
    """The tiny model exported with a dynamic batch, with export_onnx.py's JSON: the runtimes' artefact."""
    return shared_export(tmp_path_factory, tiny_model_dir, "tiny", "--dynamic_batch", "--soc_version", "Ascend910B4")


def shared_export(tmp_path_factory, model_dir: Path, name: str, *extra: str) -> Path:
    """export_onnx.py run once per test session for `name` (the ONNX and its export JSON, as a user makes them),
    shared by the test modules that need it. Tests that change either copy them first."""
    import export_onnx

    folder = tmp_path_factory.getbasetemp() / "offline_exports"
    folder.mkdir(exist_ok=True)
    out = folder / f"{name}.onnx"
    if not out.exists():
        assert export_onnx.main([str(model_dir), str(out), *extra]) == 0
    return out


def run_accuracy(tmp_path: Path, model_dir: Path, *extra: str):
    """accuracy_run.py in-process: (exit code, the report or None)."""
    import accuracy_run

    report = tmp_path / "r.json"
    rc = accuracy_run.main([str(model_dir), str(report), *extra])
    return rc, (json.loads(report.read_text()) if report.exists() else None)


def install_ais_bench(monkeypatch, interface) -> None:
    """The ais_bench stand-in importable as ais_bench.infer.interface."""
    monkeypatch.setitem(sys.modules, "ais_bench", types.ModuleType("ais_bench"))
    monkeypatch.setitem(sys.modules, "ais_bench.infer", types.ModuleType("ais_bench.infer"))
    monkeypatch.setitem(sys.modules, "ais_bench.infer.interface", interface)
