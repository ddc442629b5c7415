"""Check that MobileViT on a device (NPU, CUDA, MPS, or the CPU in another dtype or mode) matches the CPU float32 model.

Reference: the CPU, float32, eager, always. Target: --device, --dtype and --target_mode. Both consume the very same
preprocessed tensors. Metrics per image and over all images, in float64: cosine similarity of the logits, top-1
agreement, top-5 overlap, max |probability difference|, max |logit difference|, RMSE, mean relative error (all logits,
and logits above msprobe's minimum-error floor), and the share of logits within 0.1% and 0.5% relative error.

Examples:
  python accuracy_run.py ./model accuracy_report.json --device npu:0
  python accuracy_run.py ./model report.json --device npu --dtype fp16 --images photos/ "more/*.jpg" --layers
  python accuracy_run.py ./model report.json --synthetic --device cpu --dtype bf16 --layers
  python accuracy_run.py ./model report.json --device cuda --target_mode compiled --min_cosine 0.9999

Output: a per-image table, the aggregate, with --layers the modules where the outputs part, and a last line with the
verdict; REPORT.json holds all of it plus the environment and the thresholds. Verdicts: PASS (every threshold met),
FAIL (some missed, or the target produced NaN/Inf), INVALID (the reference logits are non-finite or have almost no
spread, e.g. transformers' default init, so agreement would prove nothing).
Exit codes: 0 PASS; 1 FAIL or INVALID; 2 usage, model, image or device error.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import mobilevit_npu.startup  # noqa: F401  (first: imports torch; a failed torch_npu autoload is one line)

import torch

import common
from mobilevit_npu import (
    devices,
    distributed,
    labelsets,
    layerwise,
    malloc,
    metrics,
    npu,
    preprocessing,
    refcache,
    reports,
    runtimes,
    targets,
)
from mobilevit_npu.errors import UserError
from mobilevit_npu.models import dtype_name

logger = logging.getLogger("mobilevit_npu.accuracy_run")

THRESHOLD_FLAGS = {
    "min_cosine": "lowest cosine similarity of logits allowed for any image",
    "min_top1_agreement": "lowest share (0..1) of images whose top-1 class must match the reference's",
    "max_prob_diff": "largest |probability difference| allowed (strictly below), over all images and classes",
    "top1_tie_margin": "a top-1 flip is forgiven as a near tie when the reference's probabilities of the two classes "
    "differ by less than this",
    "layer_min_cosine": "--layers: a module whose output cosine falls under this is divergent",
    "min_reference_logit_std": "the reference's logits must spread at least this much across classes (and across "
    "images), else the verdict is INVALID",
}


def _defaults_text(name: str) -> str:
    values = ", ".join(f"{d} {getattr(metrics.DEFAULT_THRESHOLDS[d], name):g}" for d in ("fp32", "fp16", "bf16"))
    return f"default by --dtype: {values}"


def build_parser() -> argparse.ArgumentParser:
    parser = common.script_parser("accuracy_run.py", __doc__)
    common.add_synthetic_args(common.add_model_args(parser, positional=True), "MODEL_PATH")
    parser.add_argument(
        "report", metavar="REPORT.json", type=common.json_path, help="where to write the JSON report (atomically)"
    )
    target = common.add_device_args(parser)
    common.add_dtype_arg(target, "the target's precision (the reference is always CPU float32)")
    target.add_argument(
        "--target_mode",
        "--target-mode",
        choices=targets.MODES,
        default="eager",
        help="how the target runs: eager; channels_last (model and input in NHWC; not on npu); compiled (built "
        "exactly as accuracy_run_perf.py's compiled mode: inductor + freezing on CPU, CUDA graphs on CUDA, torchair "
        "GE graph on NPU); npugraph (npu only: torchair reduce-overhead, aclgraph)",
    )
    target.add_argument(
        "--allow_hf32",
        "--allow-hf32",
        action="store_true",
        help="float32 target on npu/cuda: leave the device's float32 defaults as in production (npu: HF32 "
        "convolutions on, HF32 matmuls off, torch_npu's defaults; cuda: torch's TF32 defaults). Without it HF32 "
        "(npu) or TF32 (cuda) is turned off for convolutions and matmuls, so fp32 means fp32. The report's "
        "environment.fp32_precision says what was in force",
    )
    target.add_argument(
        "--fail_on_cpu_fallback",
        "--fail-on-cpu-fallback",
        action="store_true",
        help="npu: an operator that fell back to the CPU (torch_npu's warning) makes the verdict FAIL; without it "
        "the fallbacks are listed beside the verdict and in the report",
    )
    runtimes.add_runtime_args(parser)
    inputs = parser.add_argument_group("input")
    common.add_image_args(inputs, "default: the photos bundled in tests/data")
    inputs.add_argument(
        "--max_skipped",
        "--max-skipped",
        type=common.count_or_fraction,
        default=0,
        metavar="N",
        help="images that may be skipped (unreadable, refused, unlabelled) before the run fails (exit 1): a count, "
        "or a fraction of all images such as 0.1",
    )
    common.add_image_limit_args(inputs)
    labelled = parser.add_argument_group(
        "labelled set (ImageNet accuracy of reference and target; spreads over ranks under torchrun)"
    )
    labelled.add_argument(
        "--dataset",
        metavar="DIR",
        help="an ImageNet-style folder: class subfolders named by wnid (n01440764) or class index (0..999), or flat "
        "files named <wnid>_anything.JPEG",
    )
    labelled.add_argument(
        "--labels", metavar="FILE.csv", help="CSV rows image,class_id (relative paths: from --dataset, else the CSV)"
    )
    labelled.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run from the JSON lines beside the report (REPORT.json.parts/), not redoing images",
    )
    labelled.add_argument(
        "--batch_size", "--batch-size", type=common.int_at_least(1), default=32, help="images per forward pass"
    )
    labelled.add_argument(
        "--workers",
        type=common.int_at_least(0),
        default=None,
        help="DataLoader processes that decode and preprocess while the model computes, at idle CPU priority "
        "(SCHED_IDLE, else nice 19) so they never slow the model (default: cores per rank, at most 8; 0 decodes in "
        "the main process, between batches)",
    )
    labelled.add_argument(
        "--limit", type=common.int_at_least(1), default=None, help="only the first N images of the set (a quick look)"
    )
    check = parser.add_argument_group("comparison (threshold defaults depend on --dtype; see the readme for reasons)")
    check.add_argument(
        "--layers",
        action="store_true",
        help="also compare every module's output (forward hooks, names as in the state dict) and name the first "
        "divergent one, the first to produce NaN/Inf and the five worst",
    )
    for name, text in THRESHOLD_FLAGS.items():
        check.add_argument(
            f"--{name}",
            f"--{name.replace('_', '-')}",
            type=float,
            default=argparse.SUPPRESS,
            metavar="X",
            help=f"{text}; {_defaults_text(name)}",
        )
    run = parser.add_argument_group("speed")
    run.add_argument(
        "--reference_cache",
        "--reference-cache",
        metavar="DIR|off",
        default=None,
        help=f"where the CPU float32 reference logits are cached per image content, so later runs (another target, "
        f"another rank) compute only the target; off: neither read nor write it (default: {refcache.default_root()}, "
        f"i.e. ${refcache.CACHE_ENV} or $XDG_CACHE_HOME/mobilevit-npu or ~/.cache/mobilevit-npu, then /reference)",
    )
    run.add_argument(
        "--pixel_cache",
        "--pixel-cache",
        metavar="on|DIR|off",
        default=None,
        help="with --dataset/--labels: keep each image's decoded, resized and cropped pixels (196 KB per 256x256 "
        "image) per image content, so later runs over the same set read them instead of decoding the JPEGs again "
        f"(3-5 ms per image on one core); on: in {refcache.default_pixel_root()} (default: off)",
    )
    common.add_allocator_arg(run)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _fmt(value: float | None, spec: str = ".6f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return format(value, spec)


def format_console(
    comparison: metrics.Comparison, layers: layerwise.LayerReport | None, compared: str, id2label
) -> str:
    lines = [f"compared: {compared}", "(== same top-1, ~= a near-tie flip, != a flip)", ""]
    width = min(max(len(Path(m.image).name) for m in comparison.per_image), 40)
    lines.append(f"{'image':<{width}}  {'cosine':>10}  {'top1 ref -> target':<34}  {'max|dp|':>8}  {'max|dlogit|':>11}")
    for m in comparison.per_image:
        ref_label = id2label.get(m.top1_reference, str(m.top1_reference))[:14]
        tgt_label = id2label.get(m.top1_target, str(m.top1_target))[:14] if m.target_finite else "NaN"
        sign = "==" if m.top1_agree else ("~=" if m.top1_near_tie else "!=")
        top1 = f"{ref_label} {sign} {tgt_label}"
        lines.append(
            f"{Path(m.image).name[:width]:<{width}}  {_fmt(m.cosine):>10}  {top1:<34}  "
            f"{_fmt(m.max_abs_prob_diff, '.4f'):>8}  {_fmt(m.max_abs_logit_diff, '.4g'):>11}"
        )
    a = comparison.aggregate
    lines += [
        "",
        f"over {a.images} image(s): cosine min {_fmt(a.cosine_min)} mean {_fmt(a.cosine_mean)}; "
        f"top-1 {a.top1_agree_count}/{a.images} (+{a.top1_near_tie_flips} near-tie flips); "
        f"top-5 overlap {_fmt(a.top5_overlap_mean, '.3f')}; "
        f"max|dp| {_fmt(a.max_abs_prob_diff, '.4g')}; max|dlogit| {_fmt(a.max_abs_logit_diff, '.4g')}; "
        f"RMSE {_fmt(a.rmse, '.4g')}",
        f"  mean rel err {_fmt(a.mean_relative_error, '.4g')} (|r| > {a.min_error_floor:g}: "
        f"{_fmt(a.mean_relative_error_above_error_floor, '.4g')}); rel err < 0.1%: "
        f"{_fmt(a.share_rel_err_below_0_001, '.1%')}, < 0.5%: {_fmt(a.share_rel_err_below_0_005, '.1%')}; "
        f"reference logit std {_fmt(a.reference_logit_std_min, '.3g')}",
    ]
    if layers is not None:
        lines += [
            "",
            f"layers: {layers.modules_compared} module outputs compared (threshold cosine {layers.threshold})",
        ]
        for label, row in (("first divergent", layers.first_divergent), ("first NaN/Inf", layers.first_nonfinite)):
            text = "none" if row is None else f"{row['name']}  (cosine {_fmt(row['cosine_min'])})"
            lines.append(f"  {label + ':':<16} {text}")
        lines.append(f"  {'five worst:':<16} {'cosine':>10}  {'max abs err':>11}  module")
        for row in layers.worst:
            lines.append(f"  {'':<16} {_fmt(row['cosine_min']):>10}  {_fmt(row['max_abs_error'], '.4g'):>11}  "
                         f"{row['name']}")  # fmt: skip
        if layers.note:
            lines.append(f"  note: {layers.note}")
    return "\n".join(lines)


def verdict_line(
    comparison: metrics.Comparison, layers: layerwise.LayerReport | None, compared: str, skipped: dict | None = None
) -> str:
    a = comparison.aggregate
    summary = (
        f"cosine min {_fmt(a.cosine_min)}, top-1 {a.top1_agree_count}/{a.images}"
        f"{f' (+{a.top1_near_tie_flips} near ties)' if a.top1_near_tie_flips else ''}, "
        f"max|dp| {_fmt(a.max_abs_prob_diff, '.4g')}"
    )
    if skipped and skipped["count"] and skipped["count"] <= skipped["allowed"]:  # over the allowance: a reason below
        count, allowance = f"{skipped['count']} of {skipped['of']}", f"--max_skipped {skipped['max_skipped']:g}"
        summary += f", {count} image(s) skipped ({allowance})"
    why = f" ({'; '.join(comparison.reasons)})" if comparison.reasons else ""
    where = ""
    if layers is not None and comparison.verdict == "FAIL":
        row = layers.first_nonfinite or layers.first_divergent
        if row:
            where = f"; first {'NaN/Inf' if layers.first_nonfinite else 'divergent'} layer: {row['name']}"
    return f"VERDICT: {comparison.verdict}  {compared}: {summary}{why}{where}"


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments (no model loaded yet); usage errors exit 2 through parser.error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [f"--{k} {v}" for k in THRESHOLD_FLAGS if (v := getattr(args, k, None)) is not None and not math.isfinite(v)]
    if bad:
        parser.error(f"thresholds must be finite numbers: {', '.join(bad)}")
    return args


def _main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {name: getattr(args, name, None) for name in THRESHOLD_FLAGS}
    common.setup_logging(args.verbose)
    runtimes.check_runtime_args(args)
    if args.runtime != "torch":  # the offline runtimes are judged by their precision mode's dtype
        args.dtype = runtimes.planned_verdict_dtype(args, runtimes.local_rank())
    args.allocator_info = malloc.select(args.allocator)  # before the first large tensor: batches reuse their blocks
    thresholds = metrics.Thresholds.for_dtype(args.dtype, **overrides)
    labelled = bool(args.dataset or args.labels)
    common.check_outputs({"REPORT.json": args.report, "the per-image file": images_file(args) if labelled else None})

    if not labelled and (args.resume or args.limit or refcache.pixel_cache_wanted(args.pixel_cache)):
        raise UserError("--resume, --limit and --pixel_cache go with --dataset or --labels")
    if labelled and (args.images or args.layers):
        raise UserError("--images and --layers do not go with --dataset/--labels")
    torch_device = args.device if args.runtime == "torch" else "cpu"  # an offline runtime has its own device
    dist, device = distributed.setup(torch_device, jit_compile=args.jit_compile)
    try:
        if dist.enabled and not labelled:
            raise UserError("under torchrun, give --dataset or --labels: the set is what gets spread over ranks")
        if args.target_mode == "npugraph" and device.type != "npu":
            raise UserError(f"--target_mode npugraph is torchair's aclgraph mode: npu only, not {device}")
        if args.dtype == "fp32" and device.type in ("npu", "cuda") and not args.allow_hf32:
            state = devices.set_fp32_reduced_precision(device, False)  # fp32 means fp32: HF32 / TF32 off
            logger.info("float32 on %s: %s", device, state)
        with npu.CpuFallbacks(device) as fallbacks:
            args.cpu_fallbacks = fallbacks
            return _run(args, argv, thresholds, dist, device, labelled)
    finally:
        dist.close()


def _fallback_verdict(args, comparison: metrics.Comparison) -> metrics.Comparison:
    """--fail_on_cpu_fallback: operators that ran on the CPU turn the verdict into FAIL (with the reason)."""
    counts = args.cpu_fallbacks.counts if getattr(args, "cpu_fallbacks", None) else {}
    if not (args.fail_on_cpu_fallback and counts) or comparison.verdict == "INVALID":
        return comparison
    reason = f"{len(counts)} operator(s) fell back to the CPU: {', '.join(sorted(counts))} (--fail_on_cpu_fallback)"
    return dataclasses.replace(comparison, verdict="FAIL", reasons=[*comparison.reasons, reason])


def _print_verdict(args, comparison, layers, compared, skipped: dict | None = None) -> None:
    line = args.cpu_fallbacks.line() if getattr(args, "cpu_fallbacks", None) else None
    if line:
        print(line)
    print(verdict_line(comparison, layers, compared, skipped))


def _run(
    args, argv, thresholds: metrics.Thresholds, dist: distributed.Distributed, device: devices.Device, labelled: bool
) -> int:
    loaded = common.load(args, None, "fp32")
    reference = targets.reference_side(loaded.model)
    example = torch.zeros(args.batch_size if labelled else 1, 3, loaded.preprocess.crop_height,
                          loaded.preprocess.crop_width)  # fmt: skip
    if args.runtime == "torch":
        target = targets.prepare_target(
            loaded.model, device, args.dtype, args.target_mode, example, layers=args.layers
        )
    else:
        target = runtimes.runtime_target(args, loaded, example, runtimes.local_rank())
    compared = f"{reference.label}  vs  {target.label}"
    notes = []
    if target.device.type == "cpu" and args.dtype == "fp32" and args.target_mode == "eager" and args.runtime == "torch":
        notes.append("the target is the reference configuration: this checks determinism only")
        logger.warning(notes[-1])
    if args.synthetic:
        notes.append(
            "synthetic weights: the numbers say how the device treats a healthy X-Small, not ImageNet accuracy"
        )

    if labelled:
        return run_labelled(args, argv, loaded, reference, target, thresholds, dist, compared, notes, example)
    specs = args.images
    sources = preprocessing.expand_images(specs) if specs else preprocessing.bundled_images()
    if not sources:
        raise UserError(f"no images found in {' '.join(specs or [str(preprocessing.BUNDLED_IMAGES_DIR)])}")
    items, skipped = preprocessing.read_images(sources, loaded.preprocess)
    for s in skipped:
        print(f"skipped {s['image']}: {s['error']}", file=sys.stderr)
    if not items:
        raise UserError(f"none of the {len(sources)} image(s) could be read (listed above)")

    cache = refcache.open_cache(args.reference_cache, loaded.model, loaded.source, loaded.preprocess)
    pair = targets.Pair(reference, target, cache)
    try:
        comparison, layer_report = targets.compare_sides(
            reference, target, items, thresholds, args.layers, pair=pair,
            digests=[refcache.file_digest(item.source) for item in items],
        )  # fmt: skip
    finally:
        pair.close()
    speed = pair.summary()
    comparison = _fallback_verdict(args, comparison)

    budget = metrics.skip_budget(comparison, len(skipped), len(sources), args.max_skipped)
    print(format_console(comparison, layer_report, compared, loaded.id2label))
    print(format_speed(speed))
    report = make_report(
        args, argv, comparison, loaded, reference, target,
        input=f"the same float32 CPU tensor per image (preprocessed once); the target casts it to "
        f"{dtype_name(args.dtype)} on {target.device}; batch size 1",
        per_image=comparison.per_image, errors=skipped, layers=layer_report, notes=notes, skipped=budget, speed=speed,
    )  # fmt: skip
    reports.write_json_atomic(args.report, report)
    print(f"wrote {args.report}")
    _print_verdict(args, comparison, layer_report, compared, budget)
    return 0 if comparison.verdict == "PASS" else 1


def make_report(
    args, argv, comparison: metrics.Comparison, loaded, reference: targets.Side, target: targets.Side, *,
    input: str, per_image, errors: list[dict], layers, notes: list[str], dataset: dict | None = None,
    target_device: str | None = None, skipped: dict | None = None, speed: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The JSON report: the shared header (tool, argv, model_source, synthetic, environment of the target), the
    verdict and everything it rests on. `errors` lists the images that could not be used, as inference.py does."""
    return {
        **reports.header("accuracy_run.py", sys.argv[1:] if argv is None else argv, loaded,
                         devices.environment(target.device, args.allocator_info)),
        "reference_environment": devices.environment(reference.device, args.allocator_info),
        "verdict": comparison.verdict,
        "verdict_reasons": comparison.reasons,
        "compared": f"{reference.label}  vs  {target.label}",
        "reference": {"device": str(reference.device), "dtype": "float32", "mode": "eager"},
        "target": {"device": target_device or getattr(target, "where", "") or str(target.device),
                   "dtype": dtype_name(args.dtype), "mode": args.target_mode, "notes": target.notes},
        "runtime": getattr(target, "runtime", None) or {"name": "torch"},
        "input": input,
        "thresholds": dataclasses.asdict(comparison.thresholds),
        "threshold_reasons": metrics.THRESHOLD_REASONS,
        "checks": [dataclasses.asdict(c) for c in comparison.checks],
        "reference_checks": [dataclasses.asdict(c) for c in comparison.reference_checks],
        "aggregate": dataclasses.asdict(comparison.aggregate),
        "per_image": [dataclasses.asdict(m) for m in per_image],
        "errors": errors,
        "skipped": skipped,
        "layers": dataclasses.asdict(layers) if layers else None,
        "notes": notes,
        "dataset": dataset,
        "cpu_fallbacks": fallbacks.summary() if (fallbacks := getattr(args, "cpu_fallbacks", None)) else None,
        "speed": speed,
    }  # fmt: skip


def images_file(args) -> Path:
    """Where a labelled run writes every image's record: REPORT.images.jsonl beside REPORT.json."""
    return Path(f"{Path(args.report).with_suffix('')}.images.jsonl")


def load_samples(args) -> tuple[list[labelsets.Sample], list[dict]]:
    if args.labels:
        samples, unlabelled = labelsets.read_labels_csv(args.labels, root=args.dataset), []
    else:
        samples, unlabelled = labelsets.scan_folder(args.dataset)
    return (samples[: args.limit] if args.limit else samples), unlabelled


def run_labelled(
    args, argv, loaded, reference: targets.Side, target: targets.Side, thresholds, dist, compared: str,
    notes: list[str], example: torch.Tensor,
) -> int:
    """The labelled set, streamed in batches and spread over ranks: both sides per batch, metrics kept per image."""
    samples, unlabelled = load_samples(args)
    run_key = {
        "model": loaded.source.get("sha256") or loaded.source.get("name"),
        "target": compared,
        "images": hashlib.sha256("\n".join(f"{s.image},{s.label}" for s in samples).encode()).hexdigest(),
        "thresholds": dataclasses.asdict(thresholds),
    }
    journal = labelsets.Journal(args.report, dist, run_key, resume=args.resume)

    cache = refcache.open_cache(args.reference_cache, loaded.model, loaded.source, loaded.preprocess)
    pixel_cache = refcache.open_pixel_cache(args.pixel_cache, loaded.preprocess)
    pair = targets.Pair(reference, target, cache)

    def process(batch: list[labelsets.Sample], pixels: torch.Tensor, digests: list[str | None]) -> list[dict]:
        ref, tgt, from_cache = pair.run(pixels, digests)
        per_image = metrics.image_metrics(ref, tgt, args.dtype, thresholds, [s.image for s in batch])
        ref5 = ref.topk(min(5, ref.shape[1])).indices.tolist()
        tgt5 = torch.nan_to_num(tgt, nan=-math.inf).topk(min(5, tgt.shape[1])).indices.tolist()
        return [
            {"image": s.image, "label": s.label, "reference_top5": r5, "target_top5": t5,
             "reference_finite": bool(torch.isfinite(row).all()), "reference_cached": cached,
             "metrics": dataclasses.asdict(m)}
            for s, r5, t5, row, m, cached in zip(batch, ref5, tgt5, ref, per_image, from_cache)
        ]  # fmt: skip

    warmup_s = 0.0

    def warm_up() -> None:
        """The target's first call, on `example` (the zeros of the run's batch shape it was built for), outside its
        timing (as the benchmark's warm-up is): kernel selection and first page faults, ~0.8 s at batch 32 on the
        CPU, while the workers decode the first batches."""
        nonlocal warmup_s
        start = time.perf_counter()
        target.logits(example)
        warmup_s = time.perf_counter() - start

    workers = args.workers if args.workers is not None else labelsets.default_workers(dist.world_size)
    waits: list[float] = []
    start = time.perf_counter()
    try:
        records, per_rank = labelsets.run(
            samples, loaded.preprocess, process, dist, args.batch_size, workers, journal, digests=True,
            on_start=warm_up, pixel_cache=pixel_cache, waits=waits,
        )  # fmt: skip
    finally:
        pair.close()
    elapsed_s = time.perf_counter() - start - warmup_s
    mine = {**pair.summary(), "decode_wait_s": sum(waits),
            "pixel_cache": pixel_cache.summary() if pixel_cache is not None else None}  # fmt: skip
    speeds = dist.gather(mine)  # every rank's counts and timings, in rank order (None off rank 0)
    if not dist.is_main:
        journal.close(remove=True)
        return 0
    summary = labelsets.summarize_labels(records, unlabelled, per_rank)  # per_rank: resumed images included
    this_run = sum(per_rank) - journal.resumed
    summary["resumed_images"] = journal.resumed
    # this run's images (not resumed ones), decode to gather, both sides; the target's warm-up call not included
    summary["elapsed_s"] = round(elapsed_s, 3)
    summary["images_per_s"] = round(this_run / elapsed_s, 3) if elapsed_s > 0 else None
    speed = targets.merge_speeds(speeds, workers)
    speed["images_per_s"] = summary["images_per_s"]
    speed["target_warmup_s"] = round(warmup_s, 3)  # rank 0's; not in elapsed_s or any images/s
    done = [r for r in records if "error" not in r]
    if not done:
        journal.close(remove=False)
        raise UserError(f"none of the {len(samples)} image(s) in the set could be read")
    per_image = [metrics.ImageMetrics(**r["metrics"]) for r in done]
    comparison = metrics.judge(
        per_image, args.dtype, thresholds, reference_finite=all(r["reference_finite"] for r in done)
    )
    comparison = _fallback_verdict(args, comparison)
    total = summary["images"] + summary["skipped"]
    budget = metrics.skip_budget(comparison, summary["skipped"], total, args.max_skipped)
    jsonl_path = images_file(args)
    reports.write_jsonl_atomic(jsonl_path, records)
    worst = sorted(per_image, key=lambda m: m.cosine if not math.isnan(m.cosine) else -2.0)[:20]
    report = make_report(
        args, argv, comparison, loaded, reference, target,
        input=f"labelled set {args.labels or args.dataset}: the same float32 CPU batch for both sides; the target "
        f"casts it to {dtype_name(args.dtype)}; batch size {args.batch_size}; {dist.world_size} rank(s)",
        per_image=worst, errors=summary["skipped_images"], layers=None,
        notes=[*notes, f"per_image holds the 20 lowest-cosine images; every image is in {jsonl_path}"],
        dataset={k: v for k, v in summary.items() if k != "skipped_images"},
        target_device=target.device.type if dist.enabled else None, skipped=budget, speed=speed,
    )  # fmt: skip
    reports.write_json_atomic(args.report, report)
    journal.close(remove=True)
    print(format_labelled(summary, comparison, compared))
    for s in summary["skipped_images"][:10]:
        print(f"skipped {s['image']}: {s['error']}", file=sys.stderr)
    if summary["skipped"] > 10:
        print(f"... and {summary['skipped'] - 10} more skipped (see the report)", file=sys.stderr)
    print(format_speed(speed))
    print(f"wrote {args.report} and {jsonl_path}")
    _print_verdict(args, comparison, None, compared, budget)
    return 0 if comparison.verdict == "PASS" else 1


def format_speed(speed: dict[str, Any]) -> str:
    cache, pixels = speed.get("cache"), speed.get("pixel_cache")
    where = f"reference cache {cache['folder']}" if cache else "reference cache off"
    invalid = f", {cache['invalid']} invalid entries recomputed" if cache and cache["invalid"] else ""

    def rate(x):
        return "-" if x is None else f"{x:.1f}"

    text = (
        f"reference: {speed['reference_cached']} cached, {speed['reference_computed']} computed{invalid} ({where}); "
        f"images/s: reference {rate(speed['reference_images_per_s'])}, target {rate(speed['target_images_per_s'])}"
        + (f" ({rate(speed['target_images_per_s_after_first_batch'])} after its first batch)"
           if speed.get("target_images_per_s_after_first_batch") else "")
        + (f", overall {rate(speed.get('images_per_s'))}" if speed.get("images_per_s") else "")
        + ("; reference and target concurrent" if speed["concurrent"] else "")
    )  # fmt: skip
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
    return "\n".join([
        f"compared: {compared}",
        f"images: {summary['images']} evaluated, {summary['skipped']} skipped"
        + (f" ({summary['resumed_images']} from the --resume journal)" if summary.get("resumed_images") else "")
        + (f"; per rank {ranks}" if len(ranks) > 1 else "")
        + f"; {summary['images_per_s']} images/s (reference + target)",
        f"reference top-1 {pct(summary['reference']['top1'])}  top-5 {pct(summary['reference']['top5'])}",
        f"target    top-1 {pct(summary['target']['top1'])}  top-5 {pct(summary['target']['top5'])}",
        f"top-1 agreement {pct(summary['agreement_top1'])} ({len(summary['disagreements'])} image(s) differ); "
        f"cosine min {_fmt(a.cosine_min)} mean {_fmt(a.cosine_mean)}; max|dp| {_fmt(a.max_abs_prob_diff, '.4g')}",
    ])  # fmt: skip


def main(argv=None) -> int:
    return common.run_main(_main, argv, usage_codes=True)


if __name__ == "__main__":
    raise SystemExit(main())
