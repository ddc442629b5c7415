"""Stand-ins for the offline runtimes that cannot run here, modelled on their real APIs (names, arguments, errors), and
computing with the real ONNX Runtime on the CPU so the verdict over them is a real one.

onnxruntime with the CANN execution provider (onnxruntime-cann): `get_available_providers()`, `SessionOptions`,
`GraphOptimizationLevel`, `InferenceSession(path, sess_options, providers=[(name, {str: str}), ...])`,
`get_providers()`, `get_inputs()/get_outputs()` (.name, .shape), `run(output_names, feeds)`. The CANN options are
parsed strictly, as onnxruntime's ProviderOptionsParser does: an unknown key is
'Unknown provider option: "KEY".' (microsoft/onnxruntime core/framework/provider_options_utils.h); the known keys are
those of core/providers/cann/cann_execution_provider_info.cc (precision_mode in the onnxruntime-cann 1.22.1 / 1.24.4
wheels, whose provider library holds no precision_mode_v2 option key; precision_mode_v2 on upstream main).

ais_bench (msit benchmark; ais_bench/infer/interface.py): `InferSession(device_id, model_path, acl_json_path=None,
debug=False, loop=1)`, `get_inputs()` (descs with .name, .shape, .datatype), `infer(feeds, mode='static',
custom_sizes=100000, out_array=True)` raising RuntimeError for an unknown mode, `summary()` whose `exec_time_list`
holds one (start, end) pair in ms per run.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CANN_OPTIONS_1_24 = {  # cann_execution_provider_info.cc as in the onnxruntime-cann 1.24.4 wheel
    "device_id", "npu_mem_limit", "arena_extend_strategy", "enable_cann_graph", "enable_cann_subgraph", "dump_graphs",
    "dump_om_model", "precision_mode", "op_select_impl_mode", "optypelist_for_implmode",
}  # fmt: skip
CANN_OPTIONS_MAIN = (CANN_OPTIONS_1_24 - {"precision_mode"}) | {"precision_mode_v2", "input_format",
                                                               "dynamic_batch_size", "dynamic_image_size",
                                                               "dynamic_dims"}  # fmt: skip


class FakeOrtError(Exception):
    """onnxruntime raises onnxruntime.capi.onnxruntime_pybind11_state.* errors; their text is what matters."""


def fake_onnxruntime(real_ort, available=("CANNExecutionProvider", "CPUExecutionProvider"),
                     cann_options=CANN_OPTIONS_1_24, silent_cpu=False):  # fmt: skip
    """An onnxruntime module whose CANN provider runs the graph with the real CPU provider. `calls` records every
    InferenceSession's providers argument. `silent_cpu`: the session ends up on the CPU only, as onnxruntime does
    (with a warning) when a provider cannot be used."""
    calls: list[list] = []

    class InferenceSession:
        def __init__(self, path, sess_options=None, providers=None, provider_options=None):
            calls.append(list(providers or []))
            names = []
            for entry in providers or []:
                name, options = (entry, {}) if isinstance(entry, str) else entry
                if name not in available:
                    raise FakeOrtError(f"{name} is not available")
                if name == "CANNExecutionProvider":
                    for key, value in options.items():
                        if key not in cann_options:
                            raise FakeOrtError(f'Unknown provider option: "{key}".')
                        if not isinstance(value, str):
                            raise FakeOrtError(f"provider option {key} must be a string")
                names.append(name)
            self._providers = ["CPUExecutionProvider"] if silent_cpu else names
            self._real = real_ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def get_providers(self):
            return list(self._providers)

        def get_inputs(self):
            return self._real.get_inputs()

        def get_outputs(self):
            return self._real.get_outputs()

        def run(self, output_names, feeds):
            return self._real.run(output_names, feeds)

    module = types.SimpleNamespace(
        __version__=f"{real_ort.__version__}-cann-standin",
        get_available_providers=lambda: list(available),
        SessionOptions=real_ort.SessionOptions,
        GraphOptimizationLevel=real_ort.GraphOptimizationLevel,
        InferenceSession=InferenceSession,
        calls=calls,
    )
    return module


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
        def __init__(self, device_id: int, model_path: str, acl_json_path: str = None, debug: bool = False,
                     loop: int = 1):  # fmt: skip
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
