"""An ATC .om as a runtime, through ais_bench's InferSession on an Ascend NPU: a bench.Builder that feeds it whole
batches (split or padded to the .om's own batch), with the NPU compute time of every call kept apart.

ais_bench's API as its source has it (msit ais_bench/infer/interface.py, read before its removal at msit commit
6394cfe1d; docs/benchmark/API_GUIDE.md): `from ais_bench.infer.interface import InferSession`;
InferSession(device_id, model_path); .get_inputs() -> descs with .name, .shape, .datatype; .infer(feeds,
mode="static"|"dymbatch", ...) -> [ndarray]; .summary().exec_time_list -> [(start_ms, end_ms)] per run, the NPU
compute time without host copies (its __main__ computes end - start).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilevit_npu import devices, execution, onnx_export, preprocessing, timing
from mobilevit_npu.errors import Unavailable, UserError, first_line

AIS_BENCH_INSTALL = (
    "ais_bench is not installed (the om runtime needs it): pip install the aclruntime and ais_bench "
    "wheels from https://gitee.com/ascend/tools/tree/master/ais-bench_workload/tool/ais_bench, then "
    "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
)


def import_infer_session():
    """ais_bench's InferSession, or UserError saying how to install it."""
    try:
        return importlib.import_module("ais_bench.infer.interface").InferSession
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "ais_bench":
            raise UserError(AIS_BENCH_INSTALL) from exc
        why = f"{type(exc).__name__}: {first_line(exc)}"  # aclruntime missing
        raise UserError(f"ais_bench failed to import ({why}); {AIS_BENCH_INSTALL}") from exc
    except Exception as exc:  # CANN not sourced
        why = f"{type(exc).__name__}: {first_line(exc)}"
        raise UserError(f"ais_bench failed to import ({why}); {AIS_BENCH_INSTALL}") from exc


class OmRunner:
    """A bench.Builder for an .om: one InferSession, fed whole batches (split or padded to the .om's own batch when it
    is static), with the NPU compute time of every call kept apart (ais_bench's summary excludes the host copies).
    `precision_mode` is the mode ATC compiled it with and `precision_source` where that was read
    (runtimes.om_precision_mode)."""

    def __init__(
        self,
        om_path: str | Path,
        device: devices.Device,
        cfg: preprocessing.PreprocessConfig,
        precision_mode: str,
        precision_source: str,
    ):
        self.om_path = Path(om_path)
        self.device = device
        self.cfg = cfg
        self.precision_mode, self.precision_source = precision_mode, precision_source
        self.compute_ms: list[list[float]] = []  # one list per Prepared built (one per batch size benchmarked)
        self._session = None
        self._summary_seen = 0

    @property
    def verdict_dtype(self) -> str:
        return onnx_export.verdict_dtype(self.precision_mode)

    @property
    def opened(self) -> bool:
        return self._session is not None

    def session(self):
        if self._session is None:
            InferSession = import_infer_session()
            try:
                self._session = InferSession(self.device.index or 0, str(self.om_path))
            except Exception as exc:
                raise UserError(f"ais_bench could not load {self.om_path} on {self.device}: {first_line(exc)}") from exc
            desc = self._session.get_inputs()[0]
            self.input_name = desc.name
            self.input_shape = [int(d) for d in desc.shape]
            self.input_dtype = getattr(desc.datatype, "name", str(desc.datatype)).lower()
            # AIPP: uint8 NHWC in (atlasatc_16_0025 restriction 9); else the model's float NCHW
            self.aipp = "uint8" in self.input_dtype or (len(self.input_shape) == 4 and self.input_shape[-1] == 3)
        return self._session

    def info(self) -> dict[str, Any]:
        self.session()
        return {
            "name": "om",
            "runner": "ais_bench InferSession",
            "model": str(self.om_path),
            "device_id": self.device.index or 0,
            "input": {"name": self.input_name, "shape": self.input_shape, "dtype": self.input_dtype},
            "aipp": self.aipp,
            "precision_mode": self.precision_mode,
            "precision_mode_source": self.precision_source,
            "verdict_dtype": self.verdict_dtype,
        }

    def _compute_ms_since(self) -> float | None:
        times = list(getattr(self._session.summary(), "exec_time_list", []) or [])
        new, self._summary_seen = times[self._summary_seen :], len(times)
        if not new:
            return None
        return float(sum(end - start for start, end in new))

    def _infer(self, feed: np.ndarray, sink: list[float]) -> np.ndarray:
        """One batch through the .om: a static .om gets chunks of its batch (the last padded), a dynamic-batch one
        (ATC --dynamic_batch_size, export_onnx.py's gears 1, 2, 4 ... 32) chunks of at most 32, each padded up to the
        next gear. Padding rows are dropped from the output."""
        session = self.session()
        fixed = self.input_shape[0] if self.input_shape and self.input_shape[0] > 0 else None
        mode = "static" if fixed else "dymbatch"
        step = fixed or onnx_export.DYNAMIC_BATCH_GEARS[-1]
        outputs, total = [], 0.0
        for start in range(0, len(feed), step):
            chunk = feed[start : start + step]
            rows = chunk.shape[0]
            size = fixed or next(g for g in onnx_export.DYNAMIC_BATCH_GEARS if g >= rows)
            if rows < size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - rows, axis=0)])
            out = session.infer([np.ascontiguousarray(chunk)], mode=mode)[0]
            outputs.append(np.asarray(out, dtype=np.float32).reshape(size, -1)[:rows])
            spent = self._compute_ms_since()
            total += spent if spent is not None else float("nan")
        sink.append(total)
        return np.concatenate(outputs)

    def to_input(self, x: torch.Tensor) -> np.ndarray:
        self.session()
        if self.aipp:
            return onnx_export.aipp_host_input(x, self.cfg)
        return x.to(torch.float32).contiguous().numpy()

    def __call__(self, model: torch.nn.Module, _torch_device: devices.Device, dtype: str, batch: torch.Tensor):
        if dtype != "fp32":
            raise Unavailable("an .om's precision is fixed by ATC's --precision_mode")
        self.session()
        self._summary_seen = len(list(getattr(self._session.summary(), "exec_time_list", []) or []))
        sink: list[float] = []
        self.compute_ms.append(sink)
        notes = [
            f"ais_bench InferSession on {self.device}: {self.om_path.name}, input {self.input_name} "
            f"{self.input_shape} {self.input_dtype}{' (AIPP: uint8 RGB NHWC in)' if self.aipp else ''}; "
            f"ATC precision_mode {self.precision_mode} ({self.precision_source})"
        ]
        return execution.Prepared(
            call=lambda feed: torch.from_numpy(self._infer(feed, sink)), to_input=self.to_input, notes=notes
        )


def attach_compute_times(results: list[dict[str, Any]], runner: OmRunner, name: str, iterations: int) -> None:
    """Put the .om's NPU compute time (ais_bench's, host copies excluded) beside each of its timed results: the last
    `iterations` calls of each Prepared are the timed ones (agreement, warm-up and the memory call come first)."""
    rows = [r for r in results if r["mode"] == name and r["status"] == "ok"]
    for row, samples in zip(rows, runner.compute_ms):
        timed = samples[-iterations:]
        if timed and all(np.isfinite(timed)):
            row["compute_ms"] = {
                **timing.latency_stats(timed).__dict__,
                "samples_ms": timed,
                "what": "NPU compute only (ais_bench summary().exec_time_list), host copies "
                "excluded; latency_ms is end to end of InferSession.infer",
            }
        else:
            row["compute_ms"] = None
