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
  python accuracy_run.py ./model report.json --synthetic --device cpu --target_mode bf16

Output: a per-image table, the aggregate, with --layers the modules where the outputs part, and a last line with the
verdict; REPORT.json holds all of it plus the environment and the thresholds. Verdicts: PASS (every threshold met),
FAIL (some missed, or the target produced NaN/Inf), INVALID (the reference cannot judge: some image's reference logits
are non-finite or have almost no spread, e.g. transformers' default init, so agreement would prove nothing; or the
target is the reference itself, CPU float32 eager, as with no --device, --dtype, --target_mode or --runtime on a
machine without an accelerator).
Exit codes: 0 PASS; 1 FAIL or INVALID; 2 usage, model, image or device error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import common
from mobilevit_npu import flags, modes, thresholds

if TYPE_CHECKING:  # the run's modules import torch: imported by _main, after the parser (--help stays torch-free)
    from mobilevit_npu import layerwise, metrics, verify


def build_parser() -> argparse.ArgumentParser:
    parser = common.script_parser("accuracy_run.py", __doc__)
    common.add_synthetic_args(common.add_model_args(parser, positional=True), "MODEL_PATH")
    parser.add_argument(
        "report", metavar="REPORT.json", type=common.json_path, help="where to write the JSON report (atomically)"
    )
    _add_target_args(parser)
    flags.add_runtime_args(parser)
    _add_input_args(parser)
    _add_labelled_args(parser)
    _add_comparison_args(parser)
    _add_speed_args(parser)
    flags.add_msprobe_args(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    """The target: device, dtype, mode and the device's float32 and fallback policies."""
    target = common.add_device_args(parser)
    common.add_dtype_arg(target, "the target's precision (the reference is always CPU float32)")
    target.add_argument(
        "--target_mode",
        "--target-mode",
        choices=modes.mode_names(verify=True),
        default="eager",
        help="how the target runs, built exactly as accuracy_run_perf.py's mode of that name: "
        + modes.help_text(verify=True),
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


def _add_input_args(parser: argparse.ArgumentParser) -> None:
    """The photos (or files) compared, and how many may be skipped."""
    inputs = parser.add_argument_group("input")
    common.add_image_args(inputs, "default: the sample photos bundled with the package")
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


def _add_labelled_args(parser: argparse.ArgumentParser) -> None:
    """A labelled set (--dataset / --labels) and how it is streamed."""
    labelled = parser.add_argument_group(
        "labelled set (ImageNet accuracy of reference and target; spreads over ranks under torchrun)"
    )
    labelled.add_argument(
        "--dataset",
        metavar="DIR",
        type=common.nonempty_path,
        help="an ImageNet-style folder: class subfolders named by wnid (n01440764) or class index (0..999), or flat "
        "files named <wnid>_anything.JPEG",
    )
    labelled.add_argument(
        "--labels",
        metavar="FILE.csv",
        type=common.nonempty_path,
        help="CSV rows image,class_id (relative paths: from --dataset, else the CSV)",
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
        "the main process, between batches). At most the machine's cores: more is lowered to that, with a notice "
        "(each worker is a process; thousands of them never get to decode)",
    )
    labelled.add_argument(
        "--limit", type=common.int_at_least(1), default=None, help="only the first N images of the set (a quick look)"
    )


def _add_comparison_args(parser: argparse.ArgumentParser) -> None:
    """--layers and the thresholds, each with its defaults per dtype."""
    check = parser.add_argument_group("comparison (defaults depend on --dtype; their reasons: docs/accuracy.md)")
    check.add_argument(
        "--layers",
        action="store_true",
        help="also compare every module's output (forward hooks, names as in the state dict) and name the first "
        "divergent one, the first to produce NaN/Inf and the five worst",
    )
    for name, text in thresholds.THRESHOLD_FLAGS.items():
        check.add_argument(
            f"--{name}",
            f"--{name.replace('_', '-')}",
            type=float,
            default=argparse.SUPPRESS,
            metavar="X",
            help=f"{text}; {thresholds.defaults_text(name)}",
        )


def _add_speed_args(parser: argparse.ArgumentParser) -> None:
    """The caches and the allocator."""
    run = parser.add_argument_group("speed")
    run.add_argument(
        "--reference_cache",
        "--reference-cache",
        type=common.nonempty_path,
        metavar="DIR|off",
        default=None,
        help=f"where the CPU float32 reference logits are cached per image content, so later runs (another target, "
        f"another rank) compute only the target; off: neither read nor write it (default: {flags.default_root()}, "
        f"i.e. ${flags.CACHE_ENV} or $XDG_CACHE_HOME/mobilevit-npu or ~/.cache/mobilevit-npu, then /reference)",
    )
    run.add_argument(
        "--pixel_cache",
        "--pixel-cache",
        type=common.nonempty_path,
        metavar="on|DIR|off",
        default=None,
        help="with --dataset/--labels: keep each image's decoded, resized and cropped pixels (196 KB per 256x256 "
        "image) per image content, so later runs over the same set read them instead of decoding the JPEGs again "
        f"(3-5 ms per image on one core); on: in {flags.default_pixel_root()} (default: off)",
    )
    common.add_allocator_arg(run)


def cut(text: str, width: int) -> str:
    """`text` in at most `width` characters: cut short with "..." at its end, never silently."""
    return text if len(text) <= width else f"{text[: max(width - 3, 1)]}..."


def format_console(
    comparison: metrics.Comparison, layers: layerwise.LayerReport | None, compared: str, id2label
) -> str:
    from mobilevit_npu.verify import fmt

    lines = [f"compared: {compared}", "(== same top-1, ~= a near-tie flip, != a flip; ... a name cut short)", ""]
    width = min(max(len(Path(m.image).name) for m in comparison.per_image), 40)
    lines.append(f"{'image':<{width}}  {'cosine':>10}  {'top1 ref -> target':<34}  {'max|dp|':>8}  {'max|dlogit|':>11}")
    for m in comparison.per_image:
        ref_label = cut(id2label.get(m.top1_reference, str(m.top1_reference)), 15)
        tgt_label = cut(id2label.get(m.top1_target, str(m.top1_target)), 15) if m.target_finite else "NaN"
        sign = "==" if m.top1_agree else ("~=" if m.top1_near_tie else "!=")
        top1 = f"{ref_label} {sign} {tgt_label}"
        lines.append(
            f"{cut(Path(m.image).name, width):<{width}}  {fmt(m.cosine):>10}  {top1:<34}  "
            f"{fmt(m.max_abs_prob_diff, '.4f'):>8}  {fmt(m.max_abs_logit_diff, '.4g'):>11}"
        )
    a = comparison.aggregate
    lines += [
        "",
        f"over {a.images} image(s): cosine min {fmt(a.cosine_min)} mean {fmt(a.cosine_mean)}; "
        f"top-1 {a.top1_agree_count}/{a.images} (+{a.top1_near_tie_flips} near-tie flips); "
        f"top-5 overlap {fmt(a.top5_overlap_mean, '.3f')}; "
        f"max|dp| {fmt(a.max_abs_prob_diff, '.4g')}; max|dlogit| {fmt(a.max_abs_logit_diff, '.4g')}; "
        f"RMSE {fmt(a.rmse, '.4g')}",
        f"  mean rel err {fmt(a.mean_relative_error, '.4g')} (|r| > {a.min_error_floor:g}: "
        f"{fmt(a.mean_relative_error_above_error_floor, '.4g')}); rel err < 0.1%: "
        f"{fmt(a.share_rel_err_below_0_001, '.1%')}, < 0.5%: {fmt(a.share_rel_err_below_0_005, '.1%')}; "
        f"reference logit std {fmt(a.reference_logit_std_min, '.3g')}",
        f"  (relative errors are {thresholds.RELATIVE_ERROR_NOT_JUDGED})",
    ]
    if layers is not None:
        lines += [
            "",
            f"layers: {layers.modules_compared} module outputs compared (threshold cosine {layers.threshold})",
        ]
        for label, row in (("first divergent", layers.first_divergent), ("first NaN/Inf", layers.first_nonfinite)):
            text = "none" if row is None else f"{row.name}  (cosine {fmt(row.cosine_min)})"
            lines.append(f"  {label + ':':<16} {text}")
        lines.append(f"  {'five worst:':<16} {'cosine':>10}  {'max abs err':>11}  module")
        for row in layers.worst:
            lines.append(f"  {'':<16} {fmt(row.cosine_min):>10}  {fmt(row.max_abs_error, '.4g'):>11}  {row.name}")
        if layers.note:
            lines.append(f"  note: {layers.note}")
    return "\n".join(lines)


def verdict_line(
    comparison: metrics.Comparison, layers: layerwise.LayerReport | None, compared: str, skipped: dict | None = None
) -> str:
    from mobilevit_npu.verify import fmt

    a = comparison.aggregate
    summary = (
        f"cosine min {fmt(a.cosine_min)}, top-1 {a.top1_agree_count}/{a.images}"
        f"{f' (+{a.top1_near_tie_flips} near ties)' if a.top1_near_tie_flips else ''}, "
        f"max|dp| {fmt(a.max_abs_prob_diff, '.4g')}"
    )
    if skipped and skipped["count"] and skipped["count"] <= skipped["allowed"]:  # over the allowance: a reason below
        count, allowance = f"{skipped['count']} of {skipped['of']}", f"--max_skipped {skipped['max_skipped']:g}"
        summary += f", {count} image(s) skipped ({allowance})"
    why = f" ({'; '.join(comparison.reasons)})" if comparison.reasons else ""
    where = ""
    if layers is not None and comparison.verdict == "FAIL":
        row = layers.first_nonfinite or layers.first_divergent
        if row:
            where = f"; first {'NaN/Inf' if layers.first_nonfinite else 'divergent'} layer: {row.name}"
    if comparison.verdict == "INVALID":  # the reason first: the figures below it prove nothing either way
        return f"VERDICT: INVALID ({'; '.join(comparison.reasons)})  {compared}: {summary}"
    return f"VERDICT: {comparison.verdict}  {compared}: {summary}{why}{where}"


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments (no model loaded yet); usage errors exit 2 through parser.error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: getattr(args, k, None) for k in thresholds.THRESHOLD_FLAGS}
    bad = [f"--{k} {v}" for k, v in given.items() if v is not None and not math.isfinite(v)]
    if bad:
        parser.error(f"thresholds must be finite numbers: {', '.join(bad)}")
    return args


def settings_from(args: argparse.Namespace, argv) -> verify.Settings:
    """The command line resolved once into the run's settings: each flag by its own name."""
    from mobilevit_npu import verify

    values = vars(args)
    names = {f.name for f in dataclasses.fields(verify.Settings)}
    return verify.Settings(
        **{k: v for k, v in values.items() if k in names},
        argv=list(sys.argv[1:] if argv is None else argv),
        threshold_overrides={k: values.get(k) for k in thresholds.THRESHOLD_FLAGS},
    )


def _main(argv=None) -> int:
    args = parse_args(argv)
    import mobilevit_npu.startup  # noqa: F401, I001  (first: imports torch; a failed torch_npu autoload is one line)
    from mobilevit_npu import bounds, npu, probe, verify

    common.setup_logging(args.verbose)
    npu.arm_fallback_error(args.fail_on_cpu_fallback)  # before torch_npu's first fallback (startup.py covers argv)
    if args.workers is not None and args.workers > bounds.max_workers():
        print(
            f"note: --workers {args.workers} lowered to {bounds.max_workers()}, the cores of this machine",
            file=sys.stderr,
        )
        args.workers = bounds.max_workers()
    settings = settings_from(args, argv)
    verify.check(settings)
    common.check_outputs(
        settings.outputs(),
        settings.inputs(),
        None if settings.synthetic else settings.model_path,
        folders=settings.output_folders(),
    )
    try:
        outcome = verify.run(settings)
    except RuntimeError as exc:  # TORCH_NPU_FALLBACK_CPU_DISABLE=1: torch_npu refused a fallback, naming the operator
        if (reason := npu.refusal(exc)) is None:
            raise
        print(f"VERDICT: FAIL  {reason}")
        return 1
    if outcome.comparison is None:  # not rank 0: rank 0 prints and writes
        return 0
    for error in outcome.errors[:10]:
        print(f"skipped {error['image']}: {error['error']}", file=sys.stderr)
    if len(outcome.errors) > 10:
        print(f"... and {len(outcome.errors) - 10} more skipped (see the report)", file=sys.stderr)
    if outcome.dataset is not None:
        print(verify.format_labelled(outcome.dataset, outcome.comparison, outcome.compared))
    else:
        print(format_console(outcome.comparison, outcome.layers, outcome.compared, outcome.id2label))
    print(verify.format_speed(outcome.speed))
    print(f"wrote {' and '.join(outcome.written)}")
    if outcome.fallback_line:
        print(outcome.fallback_line)
    if outcome.msprobe:
        print(probe.console_line(outcome.msprobe))
    print(verdict_line(outcome.comparison, outcome.layers, outcome.compared, outcome.skipped))
    return outcome.exit_code


def main(argv=None) -> int:
    return common.run_main(_main, argv, usage_codes=True)


if __name__ == "__main__":
    raise SystemExit(main())
