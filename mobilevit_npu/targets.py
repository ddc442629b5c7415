"""The two sides of accuracy_run's comparison: the CPU float32 eager reference and the target (device, dtype,
mode). A compiled target is built by execution.prepare_mode, the very builder the benchmark times.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mobilevit_npu import devices, execution, layerwise, metrics, models, preprocessing
from mobilevit_npu.errors import Unavailable, UserError

logger = logging.getLogger("mobilevit_npu.targets")


MODES = ("eager", "channels_last", "compiled", "npugraph")  # the execution modes accuracy_run can target
Patch = Callable[[torch.nn.Module], Any]  # installs something on a model (a forward hook, say) before it runs


@dataclass
class Side:
    """One side of the comparison: what runs (an execution.Prepared), where, in what precision and mode."""

    prepared: execution.Prepared
    hook_model: torch.nn.Module  # the eager module that --layers hooks (an eager twin for a compiled target)
    device: devices.Device
    dtype: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.device} {models.dtype_name(self.dtype)} {self.mode}"

    @property
    def notes(self) -> list[str]:
        return list(self.prepared.notes)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, on_hook_model: bool = False) -> torch.Tensor:
        """Logits (float64, CPU) of the shared float32 CPU batch, cast to this side's dtype and layout. With
        `on_hook_model`, through the eager twin that --layers watches instead."""
        x = self.prepared.to_input(pixels)
        out = self.hook_model(pixel_values=x).logits if on_hook_model else self.prepared.call(x)
        devices.synchronize(self.device)
        return out.detach().to("cpu", torch.float64)


def reference_side(model: torch.nn.Module) -> Side:
    """The CPU float32 eager model, always the reference."""
    model = model.to("cpu", torch.float32).eval()
    cpu = devices.Device("cpu")
    prepared = execution.prepare_mode("eager", model, cpu, "fp32", torch.empty(0))
    return Side(prepared=prepared, hook_model=model, device=cpu, dtype="fp32", mode="eager")


def prepare_target(
    reference: torch.nn.Module,
    device: devices.Device,
    dtype: str,
    mode: str,
    example: torch.Tensor,
    layers: bool = False,
    patches: Sequence[Patch] = (),
) -> Side:
    """A deep copy of the reference (never an alias) on the device and dtype, built into `mode` by the benchmark's
    own execution.prepare_mode (a compiled target is the very code path the benchmark times). `example` is a batch
    of the shape to compile for. `patches` are installed on the target model first (tests perturb it this way).
    `layers`: the run will watch every layer (--layers), so a compiled target also gets an eager twin to hook."""
    if mode not in MODES:
        raise UserError(f"unknown target mode {mode!r}: use {', '.join(MODES)}")
    if mode == "channels_last" and device.type == "npu":  # refused before the model is copied to the device
        raise UserError(
            "--target_mode channels_last cannot run on npu: NPU tensors refuse channels-last memory (\"Only "
            "c10::MemoryFormat::Contiguous is supported for creating a npu tensor\"); use eager, compiled or npugraph"
        )
    model = copy.deepcopy(reference).eval()
    model.to(dtype=models.DTYPES[dtype])
    model.to(device.torch)
    for patch in patches:
        patch(model)
    hook_model = model
    if mode in ("compiled", "npugraph") and layers:
        # Layer hooks would break the compiled graph into pieces, so --layers watches an eager twin instead.
        hook_model = copy.deepcopy(model)
    try:
        prepared = execution.prepare_mode(mode, model, device, dtype, example)
    except Unavailable as exc:
        raise UserError(f"--target_mode {mode} cannot run on {device}: {exc}") from exc
    if mode not in ("compiled", "npugraph"):
        hook_model = prepared.module
    return Side(prepared=prepared, hook_model=hook_model, device=device, dtype=dtype, mode=mode)


def compare_sides(
    reference: Side,
    target: Side,
    items: list[preprocessing.Decoded],
    thresholds: metrics.Thresholds,
    layers: bool,
) -> tuple[metrics.Comparison, layerwise.LayerReport | None]:
    """Both sides over every image, one at a time; with `layers`, the module-by-module comparison as they go."""
    comparator = None
    if layers:
        comparator = layerwise.LayerComparator(reference.hook_model, target.hook_model, thresholds.layer_min_cosine)
    ref_rows, tgt_rows = [], []
    try:
        for item in items:
            if comparator:
                comparator.begin(item.source, "reference")
            ref_rows.append(reference.logits(item.batch))
            if comparator:
                comparator.begin(item.source, "target")
            tgt_rows.append(target.logits(item.batch))
            if comparator and target.mode in ("compiled", "npugraph"):  # no hooks in a graph: the eager twin
                target.logits(item.batch, on_hook_model=True)
            if comparator:
                comparator.end_image()
    finally:
        if comparator:
            comparator.close()
    distinct = len({hashlib.sha256(item.batch.numpy().tobytes()).hexdigest() for item in items}) > 1
    comparison = metrics.compare_logits(
        torch.cat(ref_rows),
        torch.cat(tgt_rows),
        target.dtype,
        thresholds,
        names=[item.source for item in items],
        distinct_inputs=distinct,
    )
    layer_report = comparator.report() if comparator else None
    if layer_report and target.mode in ("compiled", "npugraph"):
        layer_report.note = "layers compared on an eager twin of the compiled target: hooks would split the graph"
    return comparison, layer_report
