"""The two sides of accuracy_run's comparison: the CPU float32 eager reference and the target (device, dtype,
mode). A compiled target is built by execution.prepare_mode, the very builder the benchmark times.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mobilevit_npu import devices, execution, layerwise, metrics, models, modes, preprocessing, refcache
from mobilevit_npu.errors import Unavailable, UserError

logger = logging.getLogger("mobilevit_npu.targets")


MODES = modes.mode_names(verify=True)  # as at import; the live list is modes.mode_names(verify=True), the registry's
Patch = Callable[[torch.nn.Module], Any]  # installs something on a model (a forward hook, say) before it runs


@dataclass
class Side:
    """One side of the comparison: what runs (an execution.Prepared), where, in what precision and mode."""

    prepared: execution.Prepared
    hook_model: torch.nn.Module  # the eager module that --layers hooks (an eager twin for a compiled target)
    device: devices.Device
    dtype: str
    mode: str
    patched: bool = False  # prepare_target installed patches (tests break a layer this way): not the reference

    @property
    def label(self) -> str:
        return modes.mode(self.mode).side_label(self.device, self.dtype)

    @property
    def notes(self) -> list[str]:
        return list(self.prepared.notes)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, on_hook_model: bool = False) -> torch.Tensor:
        """Logits (float64, CPU) of the shared float32 CPU batch, cast to this side's dtype and layout. With
        `on_hook_model`, through the eager twin that --layers watches instead."""
        x = self.prepared.to_input(pixels)
        autocast = modes.mode(self.mode).autocast
        if on_hook_model and autocast:  # the eager twin under the same autocast as the mode
            with torch.autocast(device_type=self.device.type, dtype=models.DTYPES[autocast]):
                out = self.hook_model(pixel_values=x).logits.float()
        elif on_hook_model:
            out = self.hook_model(pixel_values=x).logits
        else:
            out = self.prepared.call(x)
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
    known = modes.mode_names(verify=True)
    if mode not in known:
        raise UserError(f"unknown target mode {mode!r}: use {', '.join(known)}")
    declared = modes.mode(mode)
    refused = declared.device_refusal(device)
    if refused:  # refused before the model is copied to the device
        usable = [m for m in known if modes.mode(m).device_refusal(device) is None]
        raise UserError(f"--target_mode {mode} cannot run on {device}: {refused}; use {modes.spoken(usable)}")
    model = copy.deepcopy(reference).eval()
    model.to(dtype=models.DTYPES[dtype])
    model.to(device.torch)
    for patch in patches:
        patch(model)
    hook_model = model
    if declared.twin and layers:
        # Layer hooks would break a compiled graph into pieces, and fastpath's restatement has other modules, so
        # --layers watches an eager twin instead.
        hook_model = copy.deepcopy(model)
    try:
        prepared = execution.prepare_mode(mode, model, device, dtype, example)
    except Unavailable as exc:
        raise UserError(f"--target_mode {mode} cannot run on {device}: {exc}") from exc
    if not declared.twin:
        hook_model = prepared.module
    verdict_dtype = declared.judged_by(dtype)  # an autocast mode is judged with its autocast dtype's thresholds
    return Side(
        prepared=prepared, hook_model=hook_model, device=device, dtype=verdict_dtype, mode=mode, patched=bool(patches)
    )


@dataclass
class SideTiming:
    """Images a side computed and the seconds it spent on them (its own thread's clock when run concurrently)."""

    images: int = 0
    seconds: float = 0.0
    first_images: int = 0  # the first call's: it carries the start-up costs (kernel selection, first page faults)
    first_seconds: float = 0.0

    def add(self, images: int, seconds: float) -> None:
        if not self.images:
            self.first_images, self.first_seconds = images, seconds
        self.images += images
        self.seconds += seconds

    @property
    def images_per_s(self) -> float | None:
        return round(self.images / self.seconds, 3) if self.images and self.seconds > 0 else None

    @property
    def steady_images_per_s(self) -> float | None:
        """After the first call: what a benchmark that excludes warm-up would measure."""
        images, seconds = self.images - self.first_images, self.seconds - self.first_seconds
        return round(images / seconds, 3) if images and seconds > 0 else None


class Pair:
    """Both sides over batches of the same float32 CPU tensor.

    The reference comes from `cache` (refcache.ReferenceCache) for the images it holds, and only the rest is
    computed (and stored). When the two sides are on different devices (CPU reference, NPU or CUDA target) the
    reference runs in a worker thread while the device computes, so the device does not wait for the CPU; on one
    device they run one after the other (they would only fight over the same cores).

    The reference computes the rows the cache lacks as one batch. float32 kernels round a little differently per
    batch size (~1e-6 relative), so a cached row may differ from one recomputed in another batch by that much: far
    below every threshold, and the price of computing the reference in batches (several times faster than image by
    image on a many-core host, or on a busy one)."""

    def __init__(
        self,
        reference: Side,
        target: Side,
        cache: refcache.ReferenceCache | None = None,
        concurrent: bool | None = None,
    ):
        self.reference, self.target, self.cache = reference, target, cache
        self.concurrent = reference.device != target.device if concurrent is None else concurrent
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="reference") if self.concurrent else None
        self.reference_timing, self.target_timing = SideTiming(), SideTiming()
        self.cached = self.computed = 0

    def _reference(self, pixels: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.reference.logits(pixels)
        self.reference_timing.add(pixels.shape[0], time.perf_counter() - start)
        return out

    def _target(self, pixels: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.target.logits(pixels)
        self.target_timing.add(pixels.shape[0], time.perf_counter() - start)
        return out

    def run(self, pixels: torch.Tensor, digests: Sequence[str | None] | None = None):
        """(reference logits, target logits, [reference came from the cache] per row); float64 on the CPU."""
        n = pixels.shape[0]
        cached = self.cache.lookup(digests) if self.cache is not None and digests is not None else [None] * n
        missing = [i for i, row in enumerate(cached) if row is None]
        todo = pixels if len(missing) == n else pixels[missing]
        future = computed = None
        if missing and self._pool is not None:
            future = self._pool.submit(self._reference, todo)
        elif missing:
            computed = self._reference(todo)
        try:
            tgt = self._target(pixels)
        finally:
            if future is not None:
                computed = future.result()
        self.record(computed, [digests[i] for i in missing] if digests is not None else None)
        self.cached += n - len(missing)
        if self.cache is not None:
            self.cache.stats.cached += n - len(missing)
        rows = list(cached)
        for j, i in enumerate(missing):
            rows[i] = computed[j]
        return torch.stack(rows).to(torch.float64), tgt, [row is not None for row in cached]

    def record(self, computed: torch.Tensor | None, digests: Sequence[str | None] | None) -> None:
        """Count reference rows computed outside the cache and store them."""
        if computed is None:
            return
        self.computed += computed.shape[0]
        if self.cache is not None:
            self.cache.stats.computed += computed.shape[0]
            if digests is not None:
                for digest, row in zip(digests, computed):
                    self.cache.put(digest, row)

    def summary(self) -> dict[str, Any]:
        """The report's `speed` section (schema.Speed) as a dict: the console and merge_speeds read it by key."""
        from mobilevit_npu import schema

        return asdict(
            schema.Speed(
                concurrent=self.concurrent,
                reference_cached=self.cached,
                reference_computed=self.computed,
                reference_images_per_s=self.reference_timing.images_per_s,
                target_images_per_s=self.target_timing.images_per_s,
                target_images_per_s_after_first_batch=self.target_timing.steady_images_per_s,
                target_first_batch_s=round(self.target_timing.first_seconds, 3),
                target_images=self.target_timing.images,
                reference_s=round(self.reference_timing.seconds, 3),
                target_s=round(self.target_timing.seconds, 3),
                cache=self.cache.summary() if self.cache is not None else None,
            )
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def compare_sides(
    reference: Side,
    target: Side,
    items: list[preprocessing.Decoded],
    thresholds: metrics.Thresholds,
    layers: bool,
    pair: Pair | None = None,
    digests: Sequence[str | None] | None = None,
) -> tuple[metrics.Comparison, layerwise.LayerReport | None]:
    """Both sides over every image, one at a time; with `layers`, the module-by-module comparison as they go (the
    reference is then always computed, since its layers are watched). `pair` (with its reference cache) runs the
    sides otherwise; `digests` are the images' content hashes, the cache's keys."""
    declared = modes.REGISTRY.get(target.mode)  # None for an offline runtime's side
    comparator = None
    if layers:
        comparator = layerwise.LayerComparator(reference.hook_model, target.hook_model, thresholds.layer_min_cosine)
    own_pair = pair is None
    pair = pair or Pair(reference, target)
    ref_rows, tgt_rows = [], []
    try:
        for i, item in enumerate(items):
            digest = [digests[i]] if digests is not None else None
            if not comparator:
                ref, tgt, _ = pair.run(item.batch, digest)
                ref_rows.append(ref)
                tgt_rows.append(tgt)
                continue
            comparator.begin(item.source, "reference")
            ref_rows.append(pair._reference(item.batch))
            pair.record(ref_rows[-1], digest)
            comparator.begin(item.source, "target")
            tgt_rows.append(pair._target(item.batch))
            if declared and declared.twin:  # no hooks in a graph or in fastpath's modules: the eager twin
                target.logits(item.batch, on_hook_model=True)
            comparator.end_image()
    finally:
        if comparator:
            comparator.close()
        if own_pair:
            pair.close()
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
    if layer_report and declared and declared.twin:
        layer_report.note = (
            f"layers compared on an eager twin of the {target.mode} target (the same weights"
            f"{', under the same ' + declared.text() if declared.autocast else ''}): hooks would split a compiled "
            "graph, and fastpath's restatement has other modules"
        )
    return comparison, layer_report


def _merge_caches(caches: list[dict | None]) -> dict | None:
    caches = [c for c in caches if c]
    if not caches:
        return None
    return {
        "folder": caches[0]["folder"],
        **{k: sum(c[k] for c in caches) for k in ("cached", "computed", "invalid", "stored", "uncacheable")},
        "write_errors": [e for c in caches for e in c["write_errors"]][:5],
    }


def merge_speeds(speeds: list[dict], workers: int) -> dict[str, Any]:
    """One speed record from every rank's Pair.summary() (with its `decode_wait_s` and `pixel_cache` where set):
    counts summed, images/s per side over the ranks' summed busy time, the caches' folders and counts."""
    keys = ("reference_cached", "reference_computed", "target_images", "reference_s", "target_s")
    totals = {k: sum(s[k] for s in speeds) for k in keys}
    waits = [s["decode_wait_s"] for s in speeds if s.get("decode_wait_s") is not None]
    from mobilevit_npu import schema  # the section's fields, defined once there

    merged = schema.Speed(
        concurrent=speeds[0]["concurrent"],
        decode_workers=workers,
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in totals.items()},
        # per side: its images over its own busy seconds, summed over ranks
        reference_images_per_s=round(totals["reference_computed"] / totals["reference_s"], 3)
        if totals["reference_computed"] and totals["reference_s"] > 0
        else None,
        target_images_per_s=round(totals["target_images"] / totals["target_s"], 3)
        if totals["target_images"] and totals["target_s"] > 0
        else None,
        # rank 0's target after its first batch (start-up excluded, as a benchmark's warm-up is), and that first batch
        target_images_per_s_after_first_batch=speeds[0]["target_images_per_s_after_first_batch"],
        target_first_batch_s=speeds[0]["target_first_batch_s"],
        # seconds the ranks waited for decoded batches, summed (the first batch's decoding included)
        decode_wait_s=round(sum(waits), 3) if waits else None,
        cache=_merge_caches([s["cache"] for s in speeds]),
        pixel_cache=_merge_caches([s.get("pixel_cache") for s in speeds]),
    )
    return asdict(merged)
