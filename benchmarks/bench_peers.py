"""ONNX Runtime and OpenVINO side by side with eager and the `fast` mode, interleaved in one process, on CPU.

Examples:
    python benchmarks/bench_peers.py --synthetic --iterations 50 --batch_sizes 1,32 --output peers.json
    python benchmarks/bench_peers.py --model_path ./model --iterations 100

ONNX Runtime is an optional benchmark dependency (requirements-bench.txt). The model is exported with torch.onnx at a
static batch size, run with ORT_ENABLE_ALL and as many intra-op threads as torch uses, with
session.intra_op.allow_spinning=0: ORT's workers otherwise busy-spin ~25 ms after each call and steal the CPU from
whatever mode runs next in the interleaved loop (a peer alone in its own process is 15-40% faster). Agreement is
against eager float32 on the same photos, like accuracy_run_perf.py.

OpenVINO runs when it is installed (also in requirements-bench.txt): the same ONNX file, compiled for CPU with
INFERENCE_PRECISION_HINT=f32 (its default on CPUs with bfloat16 is bf16, which is not exact), the LATENCY hint and
as many inference threads as torch uses. `--peers` picks which peers run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmark  # noqa: E402
import common  # noqa: E402

logger = logging.getLogger("mobilevit_npu.peers")

PEERS = ("onnxruntime", "openvino")


def build_parser() -> argparse.ArgumentParser:
    parser = common.script_parser("bench_peers.py", __doc__)
    common.add_model_args(parser)
    group = parser.add_argument_group("benchmark")
    group.add_argument("--synthetic", action="store_true", help="use the synthetic full-size X-Small")
    group.add_argument("--iterations", type=int, default=50, help="timed iterations per runner and batch size")
    group.add_argument("--warmup", type=int, default=10, help="untimed calls per runner first")
    group.add_argument("--batch_sizes", "--batch-sizes", default="1,32", help="comma list of batch sizes")
    group.add_argument("--modes", default="eager,fast", help="torch modes to run beside ONNX Runtime")
    group.add_argument("--peers", default="onnxruntime,openvino", help="peers to run beside torch (those installed)")
    group.add_argument("--output", help="write the results as JSON here")
    group.add_argument("--allocator", choices=("tuned", "system"), default="tuned", help="as accuracy_run_perf.py")
    return parser


def export_onnx(model: torch.nn.Module, batch: torch.Tensor, path: Path) -> Path:
    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).logits

    wrapper = Logits(model).eval()
    try:
        torch.onnx.export(wrapper, (batch,), str(path), input_names=["pixel_values"], output_names=["logits"],
                          opset_version=17, dynamo=False)  # fmt: skip
    except Exception as exc:  # the TorchScript exporter is deprecated in new torch: fall back to the dynamo one
        logger.info("TorchScript export failed (%s), using the dynamo exporter", exc)
        torch.onnx.export(wrapper, (batch,), str(path), input_names=["pixel_values"], output_names=["logits"],
                          dynamo=True)  # fmt: skip
    return path


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def openvino_model(path: Path, threads: int):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda feed: request.infer(feed)[0]


def peer_runners(names: list[str], path: Path, threads: int) -> dict[str, Callable[[dict], Any]]:
    """{peer: run(feed) -> logits as numpy} for each installed peer named."""
    runners = {}
    for name in names:
        if name == "onnxruntime":
            session = ort_session(path, threads)
            runners[name] = lambda feed, s=session: s.run(["logits"], feed)[0]
        elif name == "openvino":
            runners[name] = openvino_model(path, threads)
    return runners


@torch.no_grad()
def run(args) -> list[dict]:
    device = common.Device("cpu")
    loaded = common.synthetic_model(device) if args.synthetic else common.load_model(args.model_path, device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="mobilevit_onnx_") as workdir:
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            results.extend(_run_batch(args, loaded, modes, batch_size, Path(workdir)))
    return results


def _run_batch(args, loaded: common.LoadedModel, modes: list[str], batch_size: int, workdir: Path) -> list[dict]:
    """Every torch mode and peer at one batch size, interleaved; one result dict each."""
    device = common.Device("cpu")
    model = loaded.model
    results = []
    batches = benchmark.photo_batches(common.bundled_images(), loaded.preprocess, batch_size)
    reference = torch.cat([model(pixel_values=b).logits for b in batches])
    flop = benchmark.model_flop(model, batches[0][:1])
    calls, rows = {}, {}
    for mode in modes:
        prepared = benchmark.prepare_mode(mode, model, device, "fp32", batches[0])
        outputs = torch.cat([prepared.call(prepared.to_input(b)) for b in batches])
        x = prepared.to_input(batches[0])
        calls[mode] = lambda p=prepared, x=x: p.call(x)
        rows[mode] = {"compile_s": prepared.compile_s, "agreement": benchmark.compare(reference, outputs)}
    path = export_onnx(model, batches[0], workdir / f"mobilevit_b{batch_size}.onnx")
    feeds = [{"pixel_values": b.numpy()} for b in batches]
    for name, runner in peer_runners(args.peer_list, path, torch.get_num_threads()).items():
        outputs = torch.cat([torch.from_numpy(runner(f)) for f in feeds])
        calls[name] = lambda r=runner, f=feeds[0]: r(f)
        rows[name] = {"compile_s": None, "agreement": benchmark.compare(reference, outputs)}
    for call in calls.values():
        for _ in range(args.warmup):
            call()
    samples = benchmark.interleaved_samples(calls, args.iterations, device)
    for name in calls:
        stats = benchmark.latency_stats(samples[name])
        results.append(
            {
                "mode": name,
                "batch_size": batch_size,
                "dtype": "fp32",
                "status": "ok",
                "latency_ms": vars(stats),
                "throughput_images_per_s": batch_size * 1000.0 / stats.mean,
                "samples_ms": samples[name],
                "compile_s": rows[name]["compile_s"],
                "agreement": vars(rows[name]["agreement"]),
                "exact": benchmark.is_exact(rows[name]["agreement"]),
                "roofline": benchmark.roofline(
                    flop, batch_size, stats.p50, benchmark.matmul_ceiling(device, torch.float32)
                ),
            }
        )
    return results


def main(argv=None) -> int:
    def body(argv) -> int:
        args = build_parser().parse_args(argv)
        common.setup_logging()
        args.peer_list = [p.strip() for p in args.peers.split(",") if p.strip()]
        unknown = sorted(set(args.peer_list) - set(PEERS))
        if unknown:
            raise common.UserError(f"unknown peer(s) {', '.join(unknown)}: choose from {', '.join(PEERS)}")
        missing = [p for p in args.peer_list if importlib.util.find_spec(p) is None]
        if missing:
            logger.warning("not installed, skipped: %s (pip install -r requirements-bench.txt)", ", ".join(missing))
            args.peer_list = [p for p in args.peer_list if p not in missing]
        if not args.peer_list:
            raise common.UserError("no peer to run: pip install -r requirements-bench.txt")
        allocator = benchmark.tune_malloc() if args.allocator == "tuned" else benchmark.system_allocator()
        logger.info("allocator: %s", allocator)
        env = benchmark.benchmark_environment(common.Device("cpu"), allocator)
        results = run(args)
        print(benchmark.format_table(results))
        if args.output:
            for name in args.peer_list:
                env[name] = importlib.import_module(name).__version__
            common.write_json_atomic(args.output, {"environment": env, "results": results})
            print(f"report: {args.output}")
        return 0

    return common.run_main(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
