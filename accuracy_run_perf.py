"""Benchmark MobileViT inference on npu / cuda / mps / cpu in several execution modes and write a JSON report.

Examples:
    python accuracy_run_perf.py ./model 50 perf_report.json
    python accuracy_run_perf.py ./model 50 perf_report.json --synthetic --modes all --batch_sizes 1,32
    python accuracy_run_perf.py ./model 100 e2e.json --modes eager,fast --end_to_end --plot latency.png
    python accuracy_run_perf.py ./model 20 perf.json --synthetic --modes eager,fast --profile prof --baseline old.json

Modes (comma list, or `all` = every mode this device offers): see --modes below. On npu the report lists the
operators that fell back to the CPU (cpu_fallbacks).

Timing: the device is synchronized before every clock read; `--warmup` calls per mode are excluded; modes are
interleaved round-robin in one process so their ratios hold on a busy machine; every sample goes into the report.

Output: a table on the console and REPORT.json with, per (mode, batch size): latency_ms (mean, p50, p90, p99, min,
max, stdev; percentiles by linear interpolation), samples_ms, throughput_images_per_s, compile_s, peak_memory_bytes
(device allocator peak on npu/cuda, process peak RSS on cpu), agreement with eager float32 on the same inputs (cosine,
max_abs_diff, top1_agreement), exact, roofline (the model's FLOPs, the device's measured matmul ceiling, the fraction
of it reached at p50 and the floor: the time the FLOPs take at the ceiling), status ("ok" | "unavailable") and reason;
plus the environment (device, versions, threads, allocator). --profile DIR adds `profile` (a separate profiled pass per
mode and batch size after the timed one: top operators, time by operator class, host-vs-device split; traces in DIR);
--baseline OLD.json adds `baseline` (the change in p50 and images/s since that run, a regression only beyond both
runs' spread; refused for other weights, devices or stacks). Exit codes: 0 done, 1 no mode could run, 2 bad
arguments, model or device.
"""

from __future__ import annotations

import argparse
import logging
import sys

import common
from mobilevit_npu import flags
from mobilevit_npu import modes as mode_registry
from mobilevit_npu.errors import UserError

logger = logging.getLogger("mobilevit_npu.perf")


def build_parser() -> argparse.ArgumentParser:
    parser = common.script_parser("accuracy_run_perf.py", __doc__)
    common.add_model_args(parser, positional=True)
    parser.add_argument("iterations", type=common.int_at_least(1), help="timed iterations per mode and batch size")
    parser.add_argument(
        "report", metavar="REPORT.json", type=common.json_path, help="where to write the JSON report (atomically)"
    )
    group = parser.add_argument_group("benchmark")
    group.add_argument("--warmup", type=common.int_at_least(0), default=10, help="untimed calls per mode before timing")
    group.add_argument(
        "--batch_sizes", "--batch-sizes", type=common.batch_sizes, default="1", help="comma list, e.g. 1,32"
    )
    group.add_argument(
        "--modes",
        default="eager",
        help="comma list of modes, or all (every mode available on the device): "
        + mode_registry.help_text(benchmark=True),
    )
    common.add_dtype_arg(group, "precision of the weights and inputs in every mode (agreement is always vs fp32)")
    common.add_synthetic_args(group, "MODEL_PATH")
    group.add_argument(
        "--end_to_end",
        "--end-to-end",
        action="store_true",
        help="time decode + preprocess + copy in + forward + copy out on the bundled photos, not only the forward",
    )
    group.add_argument("--plot", metavar="FILE.png", help="save a latency distribution plot per mode (matplotlib)")
    group.add_argument(
        "--profile",
        metavar="DIR",
        help="after the timed run, a separate profiled pass per mode and batch size (torch.profiler; "
        "torch_npu.profiler on npu): traces in DIR (a new or empty folder), where the time goes in the report and "
        "on the console",
    )
    group.add_argument(
        "--profile_steps", "--profile-steps", type=common.int_at_least(1), default=5, help="profiled steps per mode"
    )
    group.add_argument(
        "--baseline",
        metavar="OLD.json",
        help="an earlier benchmark report of the same weights, device and stack: the change in p50 and images/s",
    )
    common.add_allocator_arg(group)
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_device_args(parser)
    flags.add_runtime_args(parser)
    return parser


def parse_modes(text: str) -> list[str]:
    modes = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not modes:
        raise UserError("--modes is empty")
    known = mode_registry.mode_names(benchmark=True)
    unknown = [m for m in modes if m != "all" and m not in known]
    if unknown:
        raise UserError(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(known)}, all")
    return modes


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import mobilevit_npu.startup  # noqa: F401, I001  (first: imports torch; a failed torch_npu autoload is one line)
    from mobilevit_npu import baseline as perf_baseline
    from mobilevit_npu import bench, compilers, devices, execution, malloc, models, npu, profiling, reports
    from mobilevit_npu import bounds, runtimes

    common.setup_logging(args.verbose)
    modes = parse_modes(args.modes)
    offline_settings = runtimes.RuntimeSettings.pick(vars(args))
    runtimes.check_runtime_args(offline_settings)
    if args.plot and not bench.matplotlib_available():
        raise UserError("--plot needs matplotlib, which is not installed: pip install matplotlib")
    common.check_outputs(
        {"REPORT.json": args.report, "--plot": args.plot},
        {**runtimes.artefact_inputs(offline_settings), "--baseline": args.baseline},  # --onnx / --om, their JSON
        model_dir=None if args.synthetic else args.model_path,
        folders={"the compile cache": compilers.named_compile_cache_dir()},
    )
    if args.profile:
        profiling.check_profile_dir(args.profile, None if args.synthetic else args.model_path)
    old = perf_baseline.load_baseline(args.baseline) if args.baseline else None  # a bad file: one line, before any work
    torch_device = runtimes.torch_device_spec(args.runtime, args.device)  # an offline runtime has its own device
    device = devices.resolve_device(torch_device, jit_compile=args.jit_compile)
    if "all" in modes:
        modes = execution.available_modes(device)
    allocator = malloc.select(args.allocator)  # after every argument is checked: mallopt cannot be undone
    with npu.CpuFallbacks(device) as fallbacks:  # npu: each operator that ran on the CPU, once (not call counts)
        loaded = models.load_named(args, device, "fp32")  # the reference; the benchmark casts a copy for --dtype
        for size in args.batch_sizes:  # photos are cycled: memory bounds a batch, refused before it is allocated
            bounds.bounded_batch(size, 0, loaded.preprocess, device, "--batch_sizes")
        # Before the run: its load average is the start's. The device's float32 defaults (HF32 convs on npu, TF32 on
        # cuda) are left as they are, as in production, and recorded here.
        environment = devices.environment(device, allocator)
        if old is not None:  # other weights, device or stack: refused before the run
            this = {"model_source": loaded.source, "device": str(device), "environment": environment}
            perf_baseline.check_comparable(old[0], this, args.baseline)
        profiler = profiling.Profiler(args.profile, device, args.profile_steps) if args.profile else None
        with runtimes.bench_runtime(offline_settings, loaded) as offline:
            if not offline.torch_modes:
                modes = []
            results = bench.run_benchmark(
                loaded,
                device,
                modes=modes,
                batch_sizes=args.batch_sizes,
                iterations=args.iterations,
                warmup=args.warmup,
                dtype=args.dtype,
                end_to_end=args.end_to_end,
                runners=offline.runners,
                profiler=profiler,
            )
        offline.finish(results, args.iterations)
    settings = {
        "iterations": args.iterations,
        "warmup": args.warmup,
        "batch_sizes": args.batch_sizes,
        "modes": modes,
        "dtype": args.dtype,
        "end_to_end": args.end_to_end,
        "runtime": offline.info,
    }
    profile = profiler.section() if profiler is not None else None
    profiling.add_fallbacks(profile, fallbacks.operators)  # npu: the host time of each operator that fell back
    compared = perf_baseline.section(args.baseline, old[0], old[1], results) if old is not None else None
    report = bench.build_report(
        "accuracy_run_perf.py",
        sys.argv[1:] if argv is None else argv,
        loaded,
        device,
        results,
        settings,
        environment,
        fallbacks.summary(),
        profile=profile,
        baseline=compared,
    )
    reports.write_report(args.report, report)
    print(bench.format_table(results))
    if profile is not None:
        print(profiling.format_profile(profile))
    if compared is not None:
        print(perf_baseline.format_change(compared))
    if fallbacks.line():
        print(fallbacks.line())
    print(f"report: {args.report}")
    if args.plot:
        where = f"{device} ({devices.device_name(device)})"
        print(f"plot: {bench.plot_latencies(results, args.plot, where)}")
    return 0 if any(r["status"] == "ok" for r in results) else 1


def main(argv=None) -> int:
    return common.run_main(_main, argv, usage_codes=True)


if __name__ == "__main__":
    raise SystemExit(main())
