"""Verification: the target (device, dtype, mode or offline runtime) against the CPU float32 eager reference.

The counterpart of bench.run_benchmark for accuracy: `run(settings)` takes settings resolved once from the command
line (`Settings`), runs the images or the labelled set, judges them with metrics, writes the report (a schema kind)
and returns an `Outcome` for the console. `compare_images` is the comparison on decoded images alone, for callers
that bring their own target (export_onnx.py's ONNX Runtime check).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mobilevit_npu import (
    compilers,
    devices,
    distributed,
    labelsets,
    layerwise,
    malloc,
    metrics,
    models,
    modes,
    npu,
    preprocessing,
    probe,
    refcache,
    reports,
    runtime_registry,
    runtimes,
    schema,
    targets,
)
from mobilevit_npu.errors import UserError

logger = logging.getLogger("mobilevit_npu.verify")

WORST_KEPT = 20  # a labelled report's per_image: the lowest-cosine images (all of them are in the JSON-lines file)


@dataclass
class Settings(runtimes.RuntimeSettings):
    """What one verification run does, resolved once from the command line (accuracy_run.py's `settings_from`):
    the target (device, dtype, target_mode, the offline runtime: runtimes.RuntimeSettings' fields) and the rest.
    Attribute names are the flags' own, so every flag reaches its field by name."""

    report: str = ""  # REPORT.json
    argv: list[str] = field(default_factory=list)  # the command line, as the report records it
    model_path: str = ""
    synthetic: bool = False
    seed: int = 0
    jit_compile: bool = False
    allow_hf32: bool = False
    fail_on_cpu_fallback: bool = False
    images: Optional[list[str]] = None
    max_skipped: float = 0
    max_image_pixels: Optional[int] = None
    max_aspect_ratio: Optional[float] = None
    dataset: Optional[str] = None
    labels: Optional[str] = None
    resume: bool = False
    batch_size: int = 32
    workers: Optional[int] = None
    limit: Optional[int] = None
    threshold_overrides: dict[str, Optional[float]] = field(default_factory=dict)
    reference_cache: Optional[str] = None
    pixel_cache: Optional[str] = None
    allocator: str = "tuned"
    msprobe: Optional[str] = None  # probe.py: dump both sides with msprobe into this folder and compare them
    msprobe_level: str = "mix"
    msprobe_task: str = "statistics"
    msprobe_images: Optional[int] = None

    @property
    def labelled(self) -> bool:
        return bool(self.dataset or self.labels)

    @property
    def verdict_dtype(self) -> str:
        """The dtype whose thresholds judge the target: --dtype, an autocast mode's dtype (modes.Mode.judged_by), and
        for an offline runtime the precision its mode calls for."""
        if self.runtime != "torch":
            return runtimes.planned_verdict_dtype(self, distributed.local_rank())
        return modes.mode(self.target_mode).judged_by(self.dtype)

    @property
    def weights_dtype(self) -> str:
        """The dtype the target's weights are cast to: float32 under an autocast mode (modes.Mode.weights)."""
        return modes.mode(self.target_mode).weights(self.dtype)

    def thresholds(self) -> metrics.Thresholds:
        return metrics.Thresholds.for_dtype(self.verdict_dtype, **self.threshold_overrides)

    def images_file(self) -> Path:
        """Where a labelled run writes every image's record: REPORT.images.jsonl beside REPORT.json."""
        return Path(f"{Path(self.report).with_suffix('')}.images.jsonl")

    def outputs(self) -> dict[str, Optional[str | Path]]:
        """Every file the run writes, named as the output guard (common.check_outputs) names them."""
        return {
            "REPORT.json": self.report,
            "the per-image file": self.images_file() if self.labelled else None,
            "the journal lock": labelsets.lock_file(self.report) if self.labelled else None,
        }

    def output_folders(self) -> dict[str, Optional[str | Path]]:
        """Every folder the run writes into, for the output guard: none may be, or lie inside, the model folder or an
        input. The caches where the user named them (a flag, or $MOBILEVIT_NPU_CACHE / $MOBILEVIT_NPU_COMPILE_CACHE)."""
        named_cache = bool(self.reference_cache or os.environ.get(refcache.CACHE_ENV, "").strip())
        return {
            "the --resume journal": labelsets.journal_folder(self.report) if self.labelled else None,
            "the reference cache": refcache.reference_root(self.reference_cache) if named_cache else None,
            "--pixel_cache": refcache.pixel_root(self.pixel_cache) if self.labelled else None,
            "the compile cache": compilers.named_compile_cache_dir() if self.runtime == "torch" else None,
            "--msprobe": self.msprobe,
        }

    def inputs(self) -> dict[str, Any]:
        """Every file the run reads: no output may be one of them (the --onnx / --om file's export JSON included)."""
        return {
            "--images": self.images,
            "--labels": self.labels,
            "--dataset": self.dataset,
            **runtimes.artefact_inputs(self),
        }


def check(settings: Settings) -> None:
    """Flag combinations that cannot work, refused before any model work (UserError: one line, exit 2)."""
    runtimes.check_runtime_args(settings)
    known = modes.mode_names(verify=True)
    if settings.target_mode not in known:
        raise UserError(f"unknown --target_mode {settings.target_mode}: use {', '.join(known)}")
    mode = modes.mode(settings.target_mode)
    if mode.autocast and settings.dtype not in ("fp32", mode.autocast):
        raise UserError(f"--target_mode {mode.name} is {mode.text()} over the float32 weights: leave --dtype at fp32")
    pixel_cache = refcache.pixel_cache_wanted(settings.pixel_cache)
    if not settings.labelled and (settings.resume or settings.limit or pixel_cache):
        raise UserError("--resume, --limit and --pixel_cache go with --dataset or --labels")
    if settings.labelled and (settings.images or settings.layers):
        raise UserError("--images and --layers do not go with --dataset/--labels")
    if settings.msprobe:  # a mode or runtime msprobe cannot dump, msprobe absent, a used or unusable folder
        probe.check_dumpable(settings.target_mode, settings.runtime, settings.msprobe)


@dataclass
class Outcome:
    """What a run found, for the console: the report it wrote (None on ranks other than 0) and the pieces."""

    comparison: Optional[metrics.Comparison]
    compared: str = ""
    layers: Optional[layerwise.LayerReport] = None
    speed: dict[str, Any] = field(default_factory=dict)
    skipped: Optional[dict[str, Any]] = None  # the skip budget (metrics.skip_budget)
    errors: list[dict[str, str]] = field(default_factory=list)  # the images that could not be used
    dataset: Optional[dict[str, Any]] = None  # a labelled set's summary
    fallback_line: Optional[str] = None
    id2label: dict[int, str] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    report: Optional[schema.AccuracyReport] = None
    msprobe: Optional[dict[str, Any]] = None

    @property
    def exit_code(self) -> int:
        if self.comparison is None:  # a rank other than 0: rank 0 judges
            return 0
        return 0 if self.comparison.verdict == "PASS" else 1


def run(settings: Settings) -> Outcome:
    """The whole verification: device, target, images or labelled set, verdict, report written."""
    check(settings)
    allocator_info = malloc.select(settings.allocator)  # before the first large tensor: batches reuse their blocks
    torch_device = runtimes.torch_device_spec(settings.runtime, settings.device)  # an offline runtime has its own
    dist, device = distributed.setup(torch_device, jit_compile=settings.jit_compile)
    try:
        if dist.enabled and not settings.labelled:
            raise UserError("under torchrun, give --dataset or --labels: the set is what gets spread over ranks")
        refused = modes.mode(settings.target_mode).device_refusal(device) if settings.runtime == "torch" else None
        if refused:
            raise UserError(f"--target_mode {settings.target_mode} cannot run on {device}: {refused}")
        if settings.verdict_dtype == "fp32" and device.type in ("npu", "cuda") and not settings.allow_hf32:
            state = devices.set_fp32_reduced_precision(device, False)  # fp32 means fp32: HF32 / TF32 off
            logger.info("float32 on %s: %s", device, state)
        with npu.CpuFallbacks(device) as fallbacks:
            run_ = _Run(settings, dist, device, allocator_info, fallbacks)
            outcome = run_.labelled() if settings.labelled else run_.images()
        outcome.fallback_line = fallbacks.line() if dist.is_main else None
        return outcome
    finally:
        dist.close()


def self_comparison(settings: Settings, target) -> Optional[str]:
    """Why the run is no port check, when its target is the reference itself: CPU float32 eager through torch
    (what `python accuracy_run.py ./model report.json` compares on a machine with no accelerator), its model not
    patched (tests break a layer in the target alone). None when the target differs in any of them. The text names
    the flags that make a port."""
    if settings.runtime != "torch" or getattr(target, "patched", False):
        return None
    if (target.device.type, target.dtype, target.mode) != ("cpu", "fp32", "eager"):
        return None
    dtypes = "|".join(d for d in models.DTYPES if d != "fp32")
    ports = "|".join(m for m in modes.mode_names(verify=True) if m != "eager" and not modes.mode(m).only_on)
    offline = "|".join(r for r in runtime_registry.runtime_names() if r != "torch")
    return (
        "the target is the reference itself (cpu float32 eager, torch), so the run only shows that the CPU is "
        f"deterministic; name the port to check: --device npu|cuda, --dtype {dtypes}, --target_mode {ports}, or "
        f"--runtime {offline}"
    )


def with_fallbacks(comparison: metrics.Comparison, fallbacks: npu.CpuFallbacks, fail: bool) -> metrics.Comparison:
    """--fail_on_cpu_fallback: operators that ran on the CPU turn the verdict into FAIL, with the reason."""
    reason = fallbacks.fail_reason() if fail else None
    if reason is None or comparison.verdict == "INVALID":
        return comparison
    return dataclasses.replace(comparison, verdict="FAIL", reasons=[*comparison.reasons, reason])


@dataclass
class ImagesResult:
    comparison: metrics.Comparison
    layers: Optional[layerwise.LayerReport]
    speed: dict[str, Any]


def compare_images(
    loaded: models.LoadedModel,
    target: targets.Side,
    items: list[preprocessing.Decoded],
    thresholds: metrics.Thresholds,
    layers: bool = False,
    reference_cache: str | None = "off",
) -> ImagesResult:
    """The reference (CPU float32 eager) and `target` over decoded images, judged with `thresholds`; with `layers`
    module by module too. `reference_cache` as --reference_cache (default off: nothing read or written)."""
    reference = targets.reference_side(loaded.model)
    cache = refcache.open_cache(reference_cache, loaded.model, loaded.source, loaded.preprocess)
    pair = targets.Pair(reference, target, cache)
    try:
        comparison, layer_report = targets.compare_sides(
            reference,
            target,
            items,
            thresholds,
            layers,
            pair=pair,
            digests=[refcache.file_digest(item.source) for item in items],
        )
    finally:
        pair.close()
    return ImagesResult(comparison, layer_report, pair.summary())


class _Run:
    """One run's shared state: the model, both sides, the notes, and the report they make."""

    def __init__(self, settings: Settings, dist, device: devices.Device, allocator_info: dict, fallbacks):
        self.s, self.dist, self.device, self.allocator_info, self.fallbacks = (
            settings,
            dist,
            device,
            allocator_info,
            fallbacks,
        )
        self.thresholds = settings.thresholds()
        self.loaded = models.load_named(settings, None, "fp32")
        self.reference = targets.reference_side(self.loaded.model)
        cfg = self.loaded.preprocess
        self.samples: list[labelsets.Sample] = []
        self.unlabelled: list[dict] = []
        if settings.labelled:
            if settings.labels:
                self.samples = labelsets.read_labels_csv(settings.labels, root=settings.dataset)
            else:
                self.samples, self.unlabelled = labelsets.scan_folder(settings.dataset)
            self.samples = self.samples[: settings.limit] if settings.limit else self.samples
        # The batch the run will really use: never more than the images, refused when it cannot fit in memory.
        self.batch_size = (
            labelsets.bounded_batch(settings.batch_size, len(self.samples), cfg, device) if settings.labelled else 1
        )
        self.example = torch.zeros(self.batch_size, 3, cfg.crop_height, cfg.crop_width)  # what the target is built for
        # the registry's runtime builds it (torch: settings.weights_dtype in target_mode on `device`)
        self.target = runtimes.runtime_target(settings, self.loaded, self.example, distributed.local_rank(), device)
        self.compared = f"{self.reference.label}  vs  {self.target.label}"
        self.notes: list[str] = []
        self.same_as_reference = self_comparison(settings, self.target)
        if self.same_as_reference:
            logger.warning("not a port check: %s", self.same_as_reference)
        if settings.synthetic:
            self.notes.append(
                "synthetic weights: the numbers say how the device treats a healthy X-Small, not ImageNet accuracy"
            )

    def judged(self, comparison: metrics.Comparison) -> metrics.Comparison:
        """The verdict as both paths (images, labelled sets) give it: a self-comparison is INVALID, whatever its
        figures; --fail_on_cpu_fallback turns a PASS or FAIL into FAIL."""
        if self.same_as_reference:
            comparison = metrics.not_a_port_check(comparison, self.same_as_reference)
        return with_fallbacks(comparison, self.fallbacks, self.s.fail_on_cpu_fallback)

    # ------------------------------------------------------------------------------------------ images

    def images(self) -> Outcome:
        s = self.s
        sources = preprocessing.expand_images(s.images) if s.images else preprocessing.bundled_images()
        if not sources:
            raise UserError(f"no images found in {' '.join(s.images or [str(preprocessing.BUNDLED_IMAGES_DIR)])}")
        items, errors = preprocessing.read_images(sources, self.loaded.preprocess)
        if not items:
            raise UserError(f"none of the {len(sources)} image(s) could be read: {errors[0]['error']}")
        result = compare_images(self.loaded, self.target, items, self.thresholds, s.layers, s.reference_cache)
        dumped = items[: s.msprobe_images or 1]  # --msprobe: the first batch (batch size 1: the first image)
        msprobe = self.msprobe(torch.cat([item.batch for item in dumped]), result.layers) if s.msprobe else None
        return self.finish(
            result.comparison,
            errors,
            len(sources),
            input=f"the same float32 CPU tensor per image (preprocessed once); the target casts it to "
            f"{self.target_dtype_text} on {self.target.device}; batch size 1",
            per_image=None,
            layers=result.layers,
            notes=self.notes,
            speed=result.speed,
            msprobe=msprobe,
        )

    # ------------------------------------------------------------------------------------------ labelled sets

    def labelled(self) -> Outcome:
        """The labelled set, streamed in batches and spread over ranks: both sides per batch, metrics per image."""
        s, dist, loaded, thresholds = self.s, self.dist, self.loaded, self.thresholds
        samples, unlabelled = self.samples, self.unlabelled
        journal = labelsets.Journal(
            s.report,
            dist,
            self.journal_key(samples),
            resume=s.resume,
            check=labelsets.record_checker(getattr(getattr(loaded.model, "config", None), "num_labels", None)),
        )
        cache = refcache.open_cache(s.reference_cache, loaded.model, loaded.source, loaded.preprocess)
        pixel_cache = refcache.open_pixel_cache(s.pixel_cache, loaded.preprocess)
        pair = targets.Pair(self.reference, self.target, cache)
        verdict_dtype = s.verdict_dtype

        def process(batch: list[labelsets.Sample], pixels: torch.Tensor, digests: list[str | None]) -> list[dict]:
            ref, tgt, from_cache = pair.run(pixels, digests)
            per_image = metrics.image_metrics(ref, tgt, verdict_dtype, thresholds, [x.image for x in batch])
            ref5 = ref.topk(min(5, ref.shape[1])).indices.tolist()
            tgt5 = torch.nan_to_num(tgt, nan=-math.inf).topk(min(5, tgt.shape[1])).indices.tolist()
            return [
                {
                    "image": x.image,
                    "label": x.label,
                    "reference_top5": r5,
                    "target_top5": t5,
                    "reference_finite": bool(torch.isfinite(row).all()),
                    "reference_cached": cached,
                    "metrics": dataclasses.asdict(m),
                }
                for x, r5, t5, row, m, cached in zip(batch, ref5, tgt5, ref, per_image, from_cache)
            ]

        warmup = _WarmUp(self.target, self.example)
        workers = s.workers if s.workers is not None else labelsets.default_workers(dist.world_size)
        waits: list[float] = []
        start = time.perf_counter()
        try:
            records, per_rank = labelsets.run_shards(
                samples,
                loaded.preprocess,
                process,
                dist,
                self.batch_size,
                workers,
                journal,
                digests=True,
                on_start=warmup,
                pixel_cache=pixel_cache,
                waits=waits,
            )
        finally:
            pair.close()
        elapsed_s = time.perf_counter() - start - warmup.seconds
        mine = {
            **pair.summary(),
            "decode_wait_s": sum(waits),
            "pixel_cache": pixel_cache.summary() if pixel_cache is not None else None,
        }
        msprobe = self.msprobe_labelled(samples) if s.msprobe else None  # every rank dumps its own first batch
        speeds = dist.gather(mine)  # every rank's counts and timings, in rank order (None off rank 0)
        if not dist.is_main:
            journal.close(remove=True)
            return Outcome(None)
        summary = labelsets.summarize_labels(records, unlabelled, per_rank)  # per_rank: resumed images included
        this_run = sum(per_rank) - journal.resumed
        summary["resumed_images"] = journal.resumed
        # this run's images (not resumed ones), decode to gather, both sides; the target's warm-up call not included
        summary["elapsed_s"] = round(elapsed_s, 3)
        summary["images_per_s"] = round(this_run / elapsed_s, 3) if elapsed_s > 0 else None
        speed = targets.merge_speeds(speeds, workers)
        speed["images_per_s"] = summary["images_per_s"]
        speed["target_warmup_s"] = round(warmup.seconds, 3)  # rank 0's; not in elapsed_s or any images/s
        done = [r for r in records if "error" not in r]
        if not done:
            journal.close(remove=False)
            raise UserError(f"none of the {len(samples)} image(s) in the set could be read")
        per_image = [metrics.ImageMetrics(**r["metrics"]) for r in done]
        comparison = metrics.judge(
            per_image, verdict_dtype, thresholds, reference_finite=all(r["reference_finite"] for r in done)
        )
        jsonl_path = s.images_file()
        reports.write_jsonl_atomic(jsonl_path, records)
        worst = sorted(per_image, key=lambda m: m.cosine if not math.isnan(m.cosine) else -2.0)[:WORST_KEPT]
        errors = summary.pop("skipped_images")
        summary.pop("per_class", None)  # in the JSON-lines file's records; a thousand classes would drown the report
        outcome = self.finish(
            comparison,
            errors,
            summary["images"] + summary["skipped"],
            input=f"labelled set {s.labels or s.dataset}: the same float32 CPU batch for both sides; the target "
            f"casts it to {self.target_dtype_text}; batch size {self.batch_size}; {dist.world_size} rank(s)",
            per_image=worst,
            layers=None,
            notes=[*self.notes, f"per_image: the {WORST_KEPT} lowest-cosine images; every image is in {jsonl_path}"],
            speed=speed,
            dataset=summary,
            images_file=str(jsonl_path),
            target_device=self.target.device.type if dist.enabled else None,
            msprobe=msprobe,
        )
        journal.close(remove=True)
        return outcome

    def journal_key(self, samples: list[labelsets.Sample]) -> dict[str, Any]:
        """What --resume checks, by name (a mismatch names the setting that differs): everything that changes a
        journaled record. The weights as loaded, config.json (refcache.reference_key's digest: hidden_act...),
        preprocessor_config.json as parsed, the pixel code and decoder, torch and transformers; the target (device,
        dtype, mode, float32 precision, the offline runtime and the bytes of its --onnx / --om file); the image list
        with its labels; the thresholds."""
        s, loaded = self.s, self.loaded
        ref = refcache.reference_key(loaded.model, loaded.source, loaded.preprocess)
        entry = runtime_registry.entry(s.runtime)
        artefact = getattr(s, entry.artefact) if entry.artefact else None
        return {
            "model": ref["weights_sha256"],  # the weights as loaded, not only the file
            "model_config": ref["model_config_sha256"],
            "preprocessing": hashlib.sha256(json.dumps(ref["pixels"], sort_keys=True).encode()).hexdigest(),
            "torch": ref["torch"],
            "transformers": ref["transformers"],
            "target": self.compared,
            "device": str(self.target.device),
            "dtype": s.dtype,
            "target_mode": s.target_mode,
            "verdict_dtype": s.verdict_dtype,
            "allow_hf32": s.allow_hf32,
            "jit_compile": s.jit_compile,
            "runtime": s.runtime,
            "runtime_file_sha256": refcache.file_digest(artefact) if artefact else None,
            "precision_mode": s.precision_mode,
            "cann_graph": s.cann_graph,
            "images": hashlib.sha256("\n".join(f"{x.image},{x.label}" for x in samples).encode()).hexdigest(),
            "thresholds": dataclasses.asdict(self.thresholds),
        }

    # ------------------------------------------------------------------------------------------ msprobe

    def msprobe(self, pixels: torch.Tensor, layers: Optional[layerwise.LayerReport]) -> dict[str, Any]:
        """--msprobe: both sides dumped by msprobe on `pixels` and compared (probe.py), after the verdict's own
        comparison (which it cannot change); --layers' first divergent module beside msprobe's first failing one."""
        s = self.s
        first = layers.first_divergent.name if layers is not None and layers.first_divergent else None
        rank = self.dist.rank if self.dist.enabled else None
        return probe.run_sides(
            s.msprobe,
            self.reference,
            self.target,
            pixels,
            s.msprobe_level,
            s.msprobe_task,
            rank=rank,
            project_first_divergent=first,
        )

    def msprobe_labelled(self, samples: list[labelsets.Sample]) -> Optional[dict[str, Any]]:
        """--msprobe on a labelled set: this rank's first batch (its first --msprobe_images, default --batch_size,
        of its share), decoded again; None when none of them can be read."""
        mine = self.dist.shard(samples)[: self.s.msprobe_images or self.batch_size]
        items, _ = preprocessing.read_images([x.image for x in mine], self.loaded.preprocess)
        if not items:
            logger.warning("--msprobe: none of this rank's first %d image(s) could be read: nothing dumped", len(mine))
            return None
        section = self.msprobe(torch.cat([item.batch for item in items]), None)
        if self.dist.enabled:
            ranks = f"each of the {self.dist.world_size} ranks dumped its own first batch (rank folders); rank 0's here"
            section["note"] = f"{section['note']}; {ranks}" if section.get("note") else ranks
        return section

    # ------------------------------------------------------------------------------------------ the report

    @property
    def target_dtype_text(self) -> str:
        return modes.mode(self.s.target_mode).weights_text(self.s.weights_dtype)

    def finish(
        self,
        comparison: metrics.Comparison,
        errors: list[dict[str, str]],
        total: int,
        *,
        per_image: Optional[list[metrics.ImageMetrics]],
        speed: dict[str, Any],
        dataset: Optional[dict[str, Any]] = None,
        images_file: Optional[str] = None,
        msprobe: Optional[dict[str, Any]] = None,
        **sections: Any,
    ) -> Outcome:
        """The tail both paths (images, labelled sets) share: the verdict judged (`judged`), `errors` of `total`
        inputs held against --max_skipped, the report built and written, and the Outcome for the console.
        `per_image` None keeps every image's figures; `sections` (input, layers, notes, ...) go to `report()`."""
        s = self.s
        comparison = self.judged(comparison)
        budget = metrics.skip_budget(comparison, len(errors), total, s.max_skipped)
        labelled = {"dataset": dataset, "images_file": images_file} if s.labelled else {}
        made = self.report(
            comparison,
            per_image=comparison.per_image if per_image is None else per_image,
            errors=errors,
            skipped=budget,
            speed=speed,
            msprobe=msprobe,
            **labelled,
            **sections,
        )
        reports.write_report(s.report, made)
        layers = sections.get("layers")
        written = [s.report, *([images_file] if images_file else [])]
        return Outcome(
            comparison,
            self.compared,
            layers,
            speed,
            budget,
            errors,
            dataset=dataset,
            id2label=self.loaded.id2label,
            written=written,
            report=made,
            msprobe=msprobe,
        )

    def report(
        self,
        comparison: metrics.Comparison,
        *,
        input: str,
        per_image,
        errors: list[dict],
        layers,
        notes: list[str],
        skipped: dict,
        speed: dict | None,
        dataset: dict | None = None,
        images_file: str | None = None,
        target_device: str | None = None,
        msprobe: dict | None = None,
    ) -> schema.AccuracyReport:
        """The report, every section typed (schema.typed checks the computing modules' dicts as the reader would):
        the shared header, the verdict and everything it rests on."""
        s, target = self.s, self.target
        kind = schema.LabelledReport if s.labelled else schema.AccuracyReport
        extra = (
            {"dataset": schema.typed(schema.DatasetSummary, dataset), "images_file": images_file} if s.labelled else {}
        )
        fallbacks = schema.typed(schema.FallbackReport, self.fallbacks.summary())
        environment = devices.environment(target.device, self.allocator_info)
        return kind(
            **schema.header("accuracy_run.py", s.argv, self.loaded, environment),
            reference_environment=devices.environment(self.reference.device, self.allocator_info),
            verdict=comparison.verdict,
            verdict_reasons=comparison.reasons,
            compared=self.compared,
            reference=schema.SideInfo("cpu", "float32", "eager", self.reference.label),
            target=schema.SideInfo(
                target_device or getattr(target, "where", "") or str(target.device),
                modes.mode(s.target_mode).side_dtype(target.dtype),
                target.mode,
                target.label,
                target.notes,
            ),
            runtime=getattr(target, "runtime", None) or {"name": "torch"},
            input=input,
            thresholds=comparison.thresholds,
            threshold_reasons=metrics.THRESHOLD_REASONS,
            checks=comparison.checks,
            reference_checks=comparison.reference_checks,
            aggregate=comparison.aggregate,
            per_image=per_image,
            errors=[schema.typed(schema.ImageError, e) for e in errors],
            skipped=schema.typed(schema.SkipBudget, skipped),
            layers=layers,
            notes=notes,
            speed=schema.typed(schema.Speed, speed),
            cpu_fallbacks=fallbacks,
            msprobe=schema.typed(schema.Msprobe, msprobe or None),
            **extra,
        )


class _WarmUp:
    """The target's first call on the zeros of the run's batch shape it was built for, outside its timing (as the
    benchmark's warm-up is): kernel selection and first page faults, ~0.8 s at batch 32 on the CPU, while the
    workers decode the first batches."""

    def __init__(self, target: targets.Side, example: torch.Tensor):
        self.target, self.example, self.seconds = target, example, 0.0

    def __call__(self) -> None:
        start = time.perf_counter()
        self.target.logits(self.example)
        self.seconds = time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ console


def fmt(value: float | None, spec: str = ".6f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return format(value, spec)


def format_speed(speed: dict[str, Any]) -> str:
    cache, pixels = speed.get("cache"), speed.get("pixel_cache")
    where = f"reference cache {cache['folder']}" if cache else "reference cache off"
    invalid = f", {cache['invalid']} invalid entries recomputed" if cache and cache["invalid"] else ""

    def rate(x):
        return "-" if x is None else f"{x:.1f}"

    text = (
        f"reference: {speed['reference_cached']} cached, {speed['reference_computed']} computed{invalid} ({where}); "
        f"images/s: reference {rate(speed['reference_images_per_s'])}, target {rate(speed['target_images_per_s'])}"
        + (
            f" ({rate(speed['target_images_per_s_after_first_batch'])} after its first batch)"
            if speed.get("target_images_per_s_after_first_batch")
            else ""
        )
        + (f", overall {rate(speed.get('images_per_s'))}" if speed.get("images_per_s") else "")
        + ("; reference and target concurrent" if speed["concurrent"] else "")
    )
    if speed.get("decode_wait_s") is not None:
        text += f"\ndecoding: waited {speed['decode_wait_s']:.1f} s for decoded batches"
        if pixels:
            bad = f", {pixels['invalid']} invalid entries redone" if pixels["invalid"] else ""
            text += f"; pixels {pixels['cached']} cached, {pixels['computed']} decoded{bad} ({pixels['folder']})"
    return text


def format_labelled(summary: dict, comparison: metrics.Comparison, compared: str) -> str:
    def pct(x):
        return "n/a" if x is None else f"{x:.2%}"

    a = comparison.aggregate
    ranks = summary["per_rank_images"]
    return "\n".join(
        [
            f"compared: {compared}",
            f"images: {summary['images']} evaluated, {summary['skipped']} skipped"
            + (f" ({summary['resumed_images']} from the --resume journal)" if summary.get("resumed_images") else "")
            + (f"; per rank {ranks}" if len(ranks) > 1 else "")
            + f"; {summary['images_per_s']} images/s (reference + target)",
            f"reference top-1 {pct(summary['reference']['top1'])}  top-5 {pct(summary['reference']['top5'])}",
            f"target    top-1 {pct(summary['target']['top1'])}  top-5 {pct(summary['target']['top5'])}",
            f"top-1 agreement {pct(summary['agreement_top1'])} ({len(summary['disagreements'])} image(s) differ); "
            f"cosine min {fmt(a.cosine_min)} mean {fmt(a.cosine_mean)}; max|dp| {fmt(a.max_abs_prob_diff, '.4g')}",
        ]
    )
