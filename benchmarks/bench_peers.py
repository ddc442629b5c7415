"""ONNX Runtime and OpenVINO side by side with the torch modes, interleaved in one process, on CPU.

Examples:
    python -m benchmarks.bench_peers --synthetic --iterations 50 --batch_sizes 1,32 --output peers.json
    python -m benchmarks.bench_peers --model_path ./model --iterations 100 --modes eager,fast --peers openvino

The peers are the runtimes the registry marks as peers (mobilevit_npu.runtime_registry), each built through the
runtimes' one interface (mobilevit_npu.runtimes.Runtime.peer). They run through the benchmark's own loop
(mobilevit_npu.bench.run_benchmark, as extra runners): the same warm-up, interleaving, synchronized timing, agreement
with eager float32, peak memory, roofline and result schema as accuracy_run_perf.py, whose report format --output
writes.

ONNX Runtime and OpenVINO are optional benchmark dependencies (the `bench` extra); a peer that is not installed
is skipped with a warning. The model is exported at a static batch size by mobilevit_npu.onnx_export (export_onnx.py's
export, at its default opset). ONNX Runtime runs through mobilevit_npu.runtime_ort (the session accuracy_run.py's
--runtime onnxruntime opens) with ORT_ENABLE_ALL, as many intra-op threads as torch uses and
session.intra_op.allow_spinning=0: its workers otherwise busy-spin ~25 ms after each call and steal the CPU from
whatever runs next in the interleaved loop. OpenVINO compiles
the same ONNX file for CPU with INFERENCE_PRECISION_HINT=f32 (its default on CPUs with bfloat16 is bf16, which is not
exact), the LATENCY hint and as many inference threads as torch uses.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import tempfile
from pathlib import Path

import mobilevit_npu.startup  # noqa: F401  (first: imports torch; a failed torch_npu autoload is one line)

import common
from mobilevit_npu import bench, devices, malloc, models, reports, runtime_registry, runtimes
from mobilevit_npu.errors import UserError

logger = logging.getLogger("mobilevit_npu.peers")

PEERS = runtime_registry.peers()  # as at import (the tests' parameters); _main reads the registry itself


def build_parser():
    parser = common.script_parser("python -m benchmarks.bench_peers", __doc__)
    group = common.add_model_args(parser)
    common.add_synthetic_args(group, "--model_path")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--iterations", type=common.int_at_least(1), default=50, help="timed calls per runner and batch")
    group.add_argument("--warmup", type=common.int_at_least(0), default=10, help="untimed calls per runner first")
    group.add_argument(
        "--batch_sizes", "--batch-sizes", type=common.batch_sizes, default="1,32", help="comma list of batch sizes"
    )
    group.add_argument("--modes", default="eager,fast", help="torch modes to run beside the peers")
    group.add_argument(
        "--peers",
        default=",".join(runtime_registry.peers()),
        help="comma list of the registry's peers to run beside torch (those installed)",
    )
    group.add_argument("--output", metavar="FILE.json", help="write the report (accuracy_run_perf.py's format) here")
    common.add_allocator_arg(group)
    return parser


def peer_builder(name: str, workdir: Path) -> bench.Builder:
    """A bench.Builder for one peer: the registry's runtime (mobilevit_npu.runtime_registry) through its one interface,
    Runtime.peer: export at the batch's shape, open the runtime on the CPU, return a Prepared."""
    return runtimes.implementation(name, offered=False).peer(workdir)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging()
    common.check_outputs({"--output": args.output})
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    known = runtime_registry.peers()  # the registry's, now
    unknown = sorted(set(peers) - set(known))
    if unknown:
        raise UserError(f"unknown peer(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    missing = [
        p for p in peers if importlib.util.find_spec(runtime_registry.entry(p, offered=False).package or p) is None
    ]
    if missing:
        logger.warning('not installed, skipped: %s (pip install -e ".[bench]")', ", ".join(missing))
        peers = [p for p in peers if p not in missing]
    if not peers:
        raise UserError('no peer to run: pip install -e ".[bench]"')
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    batch_sizes = args.batch_sizes
    device = devices.Device("cpu")
    environment = devices.environment(device, malloc.select(args.allocator))
    # the peers' versions: in the report's provenance.packages (reports.PROVENANCE_PACKAGES), and in each row's notes
    loaded = models.load_named(args, device, "fp32")
    with tempfile.TemporaryDirectory(prefix="mobilevit_onnx_") as workdir:
        runners = {name: peer_builder(name, Path(workdir)) for name in peers}
        settings = {
            "iterations": args.iterations,
            "warmup": args.warmup,
            "batch_sizes": batch_sizes,
            "modes": modes,
            "dtype": "fp32",
            "end_to_end": False,
        }
        results = bench.run_benchmark(loaded, device, runners=runners, **settings)
    print(bench.format_table(results))
    if args.output:
        settings["peers"] = peers
        argv = sys.argv[1:] if argv is None else argv
        report = bench.build_report("benchmarks/bench_peers.py", argv, loaded, device, results, settings, environment)
        reports.write_report(args.output, report)
        print(f"report: {args.output}")
    return 0 if any(r["status"] == "ok" for r in results) else 1


def main(argv=None) -> int:
    return common.run_main(_main, argv, usage_codes=True)


if __name__ == "__main__":
    raise SystemExit(main())
