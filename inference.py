"""Classify images with MobileViT-X-Small on the best device present (NPU, CUDA, MPS or CPU).

Examples:
  python inference.py --image cat.jpg
  python inference.py --image photos/ "more/*.jpg" https://example.com/dog.jpg --top_k 3 --output result.json
  python inference.py --device npu:0 --dtype fp16 --image cat.jpg
  python inference.py --model_path ./model --benchmark --iterations 50 --warmup 10

Prints, per image, the top-k ImageNet classes (rank, class id, label, probability) and the preprocessing and model time.
--output writes the same as JSON. Exit codes: 0 all images done; 1 some images failed (the rest are still reported);
2 usage, model or device error, or no image could be read (each one's error is listed; --output still lists them).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import common
from mobilevit_npu.errors import UserError

if TYPE_CHECKING:  # these import torch: _main imports them after the parser, so --help stays torch-free
    from mobilevit_npu import devices, distributed, models, npu, preprocessing


def build_parser() -> argparse.ArgumentParser:
    parser = common.script_parser("inference.py", __doc__)
    common.add_synthetic_args(common.add_model_args(parser), "--model_path")
    inputs = parser.add_argument_group("input and output")
    common.add_image_args(inputs, "with --benchmark, the photos to time on (default: the bundled ones)")
    inputs.add_argument(
        "--top_k", "--top-k", type=common.int_at_least(1), default=5, help="how many classes to show per image"
    )
    inputs.add_argument(
        "--batch_size", "--batch-size", type=common.int_at_least(1), default=1, help="images per forward pass"
    )
    inputs.add_argument("--output", metavar="FILE.json", help="also write the results as JSON (atomically)")
    common.add_image_limit_args(inputs)
    run = common.add_device_args(parser)
    common.add_dtype_arg(run)
    timed = parser.add_argument_group("benchmark (model latency on the device, as in the model card)")
    timed.add_argument("--benchmark", action="store_true", help="time the model instead of printing predictions")
    timed.add_argument("--iterations", type=common.int_at_least(1), default=50, help="timed forward passes")
    timed.add_argument("--warmup", type=common.int_at_least(0), default=10, help="untimed forward passes first")
    timed.add_argument(
        "--profile",
        metavar="DIR",
        help="with --benchmark: then a separate profiled pass (torch.profiler; torch_npu.profiler on npu), traces in "
        "DIR (a new or empty folder), where the time goes on the console and in --output",
    )
    common.add_allocator_arg(run)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def classify(
    loaded: models.LoadedModel, device: devices.Device, items: list[preprocessing.Decoded], top_k: int, batch_size: int
) -> list[dict]:
    """Forward the images in batches; each result carries its top-k and the timing of its batch."""
    import torch

    with torch.inference_mode():
        return _classify(loaded, device, items, top_k, batch_size)


def _classify(loaded, device, items, top_k: int, batch_size: int) -> list[dict]:
    import torch

    from mobilevit_npu import timing

    model = loaded.model
    dtype = next(model.parameters()).dtype
    k = min(top_k, len(loaded.id2label))
    # One untimed pass first, at the first batch's size: first-call costs (kernel selection, NPU operator loading)
    # are not the model's latency.
    warm = min(batch_size, len(items))
    model(pixel_values=torch.zeros((warm, 3) + tuple(items[0].pixels.shape[1:]), dtype=dtype, device=device.torch))
    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pixels = torch.stack([item.pixels for item in chunk])
        logits, elapsed_ms = timing.timed_call(
            lambda pixels=pixels: model(pixel_values=pixels.to(device.torch, dtype=dtype)).logits.float().cpu(), device
        )
        probs = logits.softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        for row, item in enumerate(chunk):
            predictions = [
                {
                    "rank": rank + 1,
                    "class_id": int(class_id),
                    "label": loaded.id2label.get(int(class_id), str(int(class_id))),
                    "probability": float(prob),
                }
                for rank, (prob, class_id) in enumerate(zip(top.values[row], top.indices[row]))
            ]
            times = {
                "preprocess": round(item.preprocess_ms, 3),
                "model": round(elapsed_ms / len(chunk), 3),
                "model_batch": round(elapsed_ms, 3),
                "batch_size": len(chunk),
            }
            results.append({"image": item.source, "predictions": predictions, "timing_ms": times})
    return results


def format_result(result: dict) -> str:
    timing = result["timing_ms"]
    model_note = f"model {timing['model']:.1f} ms"
    if timing["batch_size"] > 1:
        model_note += f" (batch of {timing['batch_size']}: {timing['model_batch']:.1f} ms)"
    lines = [f"{result['image']}  (preprocess {timing['preprocess']:.1f} ms, {model_note})"]
    width = max(len(p["label"]) for p in result["predictions"])
    width = min(max(width, 5), 60)
    lines.append(f"  {'rank':>4}  {'class':>5}  {'label':<{width}}  probability")
    for p in result["predictions"]:
        lines.append(f"  {p['rank']:>4}  {p['class_id']:>5}  {p['label'][:width]:<{width}}  {p['probability']:>11.4f}")
    return "\n".join(lines)


def benchmark(
    args, argv, loaded: models.LoadedModel, device: devices.Device, allocator: dict, fallbacks: npu.CpuFallbacks
) -> int:
    """The model card's --benchmark: eager latency on the device, through the shared benchmark code."""
    from mobilevit_npu import bench, bounds, devices, preprocessing, profiling, reports

    bounds.bounded_batch(args.batch_size, 0, loaded.preprocess, device)  # photos are cycled: memory is the bound
    environment = devices.environment(device, allocator)
    images = preprocessing.expand_images(args.images) if args.images else None
    settings = {
        "iterations": args.iterations,
        "warmup": args.warmup,
        "batch_sizes": [args.batch_size],
        "modes": ["eager"],
        "dtype": args.dtype,
        "end_to_end": False,
    }
    profiler = profiling.Profiler(args.profile, device) if args.profile else None
    results = bench.run_benchmark(loaded, device, images=images, profiler=profiler, **settings)
    print(bench.format_table(results))
    profile = profiler.section() if profiler is not None else None
    if profile is not None:
        profiling.add_fallbacks(profile, fallbacks.operators)
        print(profiling.format_profile(profile))
    lat = results[0]["latency_ms"]
    print(
        f"{device} ({devices.device_name(device)}), {args.dtype}, batch {args.batch_size}: latency ms mean "
        f"{lat['mean']:.2f}  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  min {lat['min']:.2f}  max {lat['max']:.2f}; "
        f"{results[0]['throughput_images_per_s']:.1f} images/s ({args.iterations} timed after {args.warmup} warm-up, "
        "device synchronized before every clock read)"
    )
    if args.output:
        summary = fallbacks.summary()
        report = bench.build_report(
            "inference.py", argv, loaded, device, results, settings, environment, summary, profile=profile
        )
        reports.write_report(args.output, report)
        print(f"wrote {args.output}")
    return 0


def _main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.images and not args.benchmark:
        parser.error("give --image PATH [PATH ...] (or --benchmark)")
    if args.profile and not args.benchmark:
        parser.error("--profile goes with --benchmark")
    import mobilevit_npu.startup  # noqa: F401, I001  (first: imports torch; a failed torch_npu autoload is one line)
    from mobilevit_npu import distributed, malloc, npu, preprocessing, profiling

    if args.profile:
        profiling.check_profile_dir(args.profile, None if args.synthetic else args.model_path)
    common.setup_logging(args.verbose)
    images = preprocessing.expand_images(args.images) if args.images else None
    common.check_outputs(
        {"--output": args.output}, {"--images": images}, model_dir=None if args.synthetic else args.model_path
    )
    allocator = malloc.select(args.allocator)  # before the first large tensor: batches reuse their blocks

    dist, device = distributed.setup(args.device, jit_compile=args.jit_compile)
    try:
        with npu.CpuFallbacks(device) as fallbacks:  # npu: operators that ran on the CPU, in the report and one line
            code = _run(args, sys.argv[1:] if argv is None else argv, dist, device, allocator, fallbacks)
        if fallbacks.line() and dist.is_main:
            print(fallbacks.line())
        return code
    finally:
        dist.close()


def _run(
    args, argv, dist: distributed.Distributed, device: devices.Device, allocator: dict, fallbacks: npu.CpuFallbacks
) -> int:
    from mobilevit_npu import bounds, devices, models, preprocessing

    if args.benchmark and dist.enabled:  # every rank would time its own device and write the same --output
        raise UserError("--benchmark times one device: run it without torchrun, --device npu:N picks which")
    if args.benchmark:  # float32 weights: the benchmark casts a copy for --dtype and checks it against them
        return benchmark(args, argv, models.load_named(args, device, "fp32"), device, allocator, fallbacks)
    loaded = models.load_named(args, device, args.dtype)

    sources = preprocessing.expand_images(args.images)
    if not sources:
        raise UserError(f"no images found in {' '.join(args.images)}")
    # Under torchrun each rank takes every world_size-th image (distributed.shard, the policy of labelled sets too);
    # rank 0 gathers, puts them back in order, prints, writes one report.
    mine = dist.shard(sources)
    batch_size = bounds.bounded_batch(args.batch_size, len(mine), loaded.preprocess, device)
    items, failed = preprocessing.read_images(mine, loaded.preprocess)
    results = classify(loaded, device, items, args.top_k, batch_size) if items else []
    parts = dist.gather((in_input_order(mine, results, failed), len(mine)))
    if not dist.is_main:
        return 1 if failed else 0
    ordered = dist.unshard([part[0] for part in parts])
    results = [entry for ok, entry in ordered if ok]
    failed = [entry for ok, entry in ordered if not ok]
    for result in results:
        print(format_result(result))
    for error in failed:
        print(f"{error['image']}: error: {error['error']}", file=sys.stderr)
    where = f"{device} ({devices.device_name(device)})"
    if dist.enabled:
        where = f"{dist.world_size} ranks on {device.type} over {dist.backend}"
    print(f"{len(results)} of {len(sources)} image(s) classified on {where}, {args.dtype}")
    if not results:  # nothing ran: as bad as a missing model (exit 2); the report still lists why each failed
        if args.output:
            write_inference_report(args, argv, loaded, device, dist, parts, results, failed, allocator, fallbacks)
        raise UserError(f"no images found or none could be read ({len(failed)} input(s) failed, listed above)")
    if args.output:
        write_inference_report(args, argv, loaded, device, dist, parts, results, failed, allocator, fallbacks)
    return 1 if failed else 0


def in_input_order(sources: list[str], results: list[dict], failed: list[dict]) -> list[tuple[bool, dict]]:
    """This rank's results and failures merged back into the order of its `sources` (both lists keep that order):
    (True, result) or (False, error) per source."""
    results_left, failed_left = list(results), list(failed)
    merged = []
    for source in sources:
        if results_left and results_left[0]["image"] == source:
            merged.append((True, results_left.pop(0)))
        elif failed_left and failed_left[0]["image"] == source:
            merged.append((False, failed_left.pop(0)))
    return merged


def write_inference_report(
    args, argv, loaded, device, dist, parts, results: list[dict], failed: list[dict], allocator: dict, fallbacks
) -> None:
    from mobilevit_npu import devices, reports, schema

    report = schema.InferenceReport(
        **schema.header("inference.py", argv, loaded, devices.environment(device, allocator)),
        device=str(device) if not dist.enabled else device.type,
        dtype=args.dtype,
        results=[
            schema.Classified(**{**r, "predictions": [schema.Prediction(**p) for p in r["predictions"]]})
            for r in results
        ],
        errors=[schema.typed(schema.ImageError, e) for e in failed],
        cpu_fallbacks=schema.typed(schema.FallbackReport, fallbacks.summary()),
        per_rank_images=[part[1] for part in parts] if dist.enabled else None,
    )
    reports.write_report(args.output, report)
    print(f"wrote {args.output}")


def main(argv=None) -> int:
    return common.run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
