"""Export MobileViT to ONNX, check the file with ONNX Runtime against the CPU float32 model, and print the ATC command
that makes the Ascend .om of it.

Examples:
  python export_onnx.py ./model mobilevit.onnx
  python export_onnx.py ./model mobilevit.onnx --synthetic --dynamic_batch
  python export_onnx.py ./model mobilevit.onnx --soc_version Ascend910B4 --aipp
  python export_onnx.py ./model mobilevit_fp16.onnx --precision_mode allow_mix_precision

Export: torch's current exporter (torch.onnx.export(dynamo=True), needs onnxscript) where it works, else the
TorchScript one; the output says which ran and why, and the exporters' own warnings are kept off the console (one
summary line; -v lists them). Input pixel_values [N, 3, 256, 256] float32, output logits [N, classes]; N fixed by
--batch_size or dynamic with --dynamic_batch.

Check: the written file is loaded back and run by ONNX Runtime on the CPU over the bundled photos (or --images), and
judged against the CPU float32 torch model with accuracy_run.py's verdict and fp32 thresholds.

Output: OUT.onnx; OUT.json beside it (input/output names and shapes, opset, exporter, the weights' sha256, the
verdict, the ATC command); with --aipp, OUT.aipp.cfg. The ATC command is printed with --soc_version from the flag,
else the visible NPU's name, else a placeholder marked as such, and --precision_mode always explicit.
Exit codes: 0 PASS; 1 FAIL or INVALID; 2 usage, model, image or export error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

import mobilevit_npu.startup  # noqa: F401  (first: imports torch; a failed torch_npu autoload is one line)

import torch

import common
from mobilevit_npu import devices, metrics, onnx_export, preprocessing, reports
from mobilevit_npu.errors import UserError

logger = logging.getLogger("mobilevit_npu.export_onnx")


def build_parser() -> argparse.ArgumentParser:
    parser = common.script_parser("export_onnx.py", __doc__)
    common.add_synthetic_args(common.add_model_args(parser, positional=True), "MODEL_PATH")
    parser.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write (OUT.json and OUT.aipp.cfg beside)")
    export = parser.add_argument_group("export")
    export.add_argument("--opset", type=common.int_at_least(7), default=onnx_export.DEFAULT_OPSET,
                        help="ONNX opset; below 18 the TorchScript exporter runs (the current one emits 18+ for this "
                        "model)")  # fmt: skip
    batch = export.add_mutually_exclusive_group()
    batch.add_argument("--batch_size", "--batch-size", type=common.int_at_least(1), default=1,
                       help="the fixed batch size of the input")  # fmt: skip
    batch.add_argument("--dynamic_batch", "--dynamic-batch", action="store_true",
                       help="a dynamic batch dimension (ATC then gets --dynamic_batch_size profiles)")  # fmt: skip
    export.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                        help="auto: the current (dynamo) exporter where it works, else TorchScript")  # fmt: skip
    common.add_image_args(export, "the photos the export is checked on; default: the photos bundled in tests/data")
    atc = parser.add_argument_group("ATC (the .om for Ascend)")
    atc.add_argument("--soc_version", "--soc-version", metavar="NAME",
                     help="ATC --soc_version, e.g. Ascend910B4 (npu-smi info); default: the visible NPU's name, else "
                     "a placeholder")  # fmt: skip
    atc.add_argument("--precision_mode", "--precision-mode", choices=sorted(onnx_export.PRECISION_MODES),
                     default=onnx_export.DEFAULT_PRECISION_MODE,
                     help="ATC --precision_mode, always written out (ATC's own default is force_fp16): "
                     "must_keep_origin_dtype keeps fp32 for an fp32 verdict; a lowering mode is judged with fp16 "
                     "(or bf16) thresholds")  # fmt: skip
    atc.add_argument("--aipp", action="store_true",
                     help="also write OUT.aipp.cfg (static AIPP from preprocessor_config.json: RGB->BGR, x1/255, no "
                     "mean/std, 256x256) and add --insert_op_conf; the .om then takes uint8 RGB NHWC, resized and "
                     "centre-cropped on the host")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and every exporter warning")
    return parser


def _fmt_shape(entry: dict) -> str:
    return f"{entry['name']} {entry['shape']} {entry['dtype']}"


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose)
    out = Path(args.output)
    if out.is_dir():
        parser.error(f"OUT.onnx {out} is a directory")
    if not out.parent.is_dir():
        parser.error(f"folder {out.parent} does not exist")
    for package in ("onnx", "onnxruntime"):
        if not _installed(package):
            raise UserError(f"{package} is not installed: pip install onnx onnxruntime onnxscript")
    sources = preprocessing.expand_images(args.images) if args.images else None
    loaded = common.load(args, devices.Device("cpu"), "fp32")
    model = loaded.model
    cfg = loaded.preprocess

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        exported = onnx_export.export_onnx(model, tmp, opset=args.opset, batch_size=args.batch_size,
                                           dynamic_batch=args.dynamic_batch, exporter=args.exporter,
                                           image_size=(cfg.crop_height, cfg.crop_width))  # fmt: skip
        print(exported.summary())
        for line in exported.captured if args.verbose else []:
            print(f"  exporter: {line}")
        described = onnx_export.describe(tmp)

        batches, names = onnx_export.photo_batches(cfg, None if args.dynamic_batch else args.batch_size, sources)
        with torch.no_grad():
            reference = torch.cat([model(pixel_values=b).logits for b in batches])[: len(names)]
        target = onnx_export.ort_cpu_logits(tmp, batches, len(names))
        thresholds = metrics.Thresholds.for_dtype("fp32")
        comparison = metrics.compare_logits(reference, target, "fp32", thresholds, names=names,
                                            distinct_inputs=len(names) > 1)  # fmt: skip
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    exported.path = out

    soc, soc_source = onnx_export.soc_version(args.soc_version)
    aipp_path = None
    if args.aipp:
        aipp_path = out.with_suffix(".aipp.cfg")
        reports.write_text_atomic(aipp_path, onnx_export.aipp_config(cfg))
    command = onnx_export.atc_command(out, described["inputs"][0]["shape"], soc, args.precision_mode, aipp_path)
    lowered = onnx_export.verdict_dtype(args.precision_mode)

    import onnxruntime

    a = comparison.aggregate
    figures = (f"cosine min {a.cosine_min:.6f}, top-1 {a.top1_agree_count}/{a.images}, max|dp| "
               f"{a.max_abs_prob_diff:.3g}, max|dlogit| {a.max_abs_logit_diff:.3g}")  # fmt: skip
    weights = loaded.source.get("sha256") or onnx_export.weights_sha256(model)
    if args.aipp:
        om_input = (f"uint8 RGB NHWC [N, {cfg.crop_height}, {cfg.crop_width}, 3]: decode, resize the shortest edge to "
                    f"{cfg.shortest_edge} (bilinear) and centre-crop {cfg.crop_height}x{cfg.crop_width} on the host; "
                    "AIPP swaps to BGR and scales by 1/255")  # fmt: skip
    else:
        om_input = f"float32 NCHW {described['inputs'][0]['shape']}, preprocessed on the host as for the torch model"
    report = {
        **reports.header("export_onnx.py", sys.argv[1:] if argv is None else argv, loaded,
                         devices.environment(devices.Device("cpu"))),
        "weights_sha256": weights,
        "onnx": {"path": str(out), "sha256": onnx_export.sha256_file(out), "bytes": out.stat().st_size,
                 "exporter": exported.exporter, "exporter_why": exported.why, "export_s": round(exported.seconds, 3),
                 "exporter_warnings": exported.captured, "dynamic_batch": exported.dynamic_batch,
                 **described},
        "check": {"runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
                  "reference": "cpu float32 eager torch", "images": names, "verdict": comparison.verdict,
                  "verdict_reasons": comparison.reasons, "thresholds": dataclasses.asdict(comparison.thresholds),
                  "cosine_min": a.cosine_min, "top1_agree": a.top1_agree_count,
                  "max_abs_prob_diff": a.max_abs_prob_diff, "max_abs_logit_diff": a.max_abs_logit_diff},
        "verdict": comparison.verdict,
        "atc": {"command": command, "soc_version": soc, "soc_version_source": soc_source,
                "precision_mode": args.precision_mode, "judge_with": lowered,
                "aipp_config": str(aipp_path) if aipp_path else None, "om_input": om_input},
    }  # fmt: skip
    json_path = reports.write_json_atomic(out.with_suffix(".json"), report)

    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {_fmt_shape(described['inputs'][0])} -> "
          f"{_fmt_shape(described['outputs'][0])}, opset {described['opset']}")  # fmt: skip
    print(f"check: onnxruntime {onnxruntime.__version__} CPU vs CPU float32 torch on {a.images} photo(s): {figures}")
    print("ATC, on the Ascend host (CANN's set_env.sh sourced):")
    print(f"  {command}")
    if soc == onnx_export.SOC_PLACEHOLDER:
        print(f"  note: --soc_version={soc} is a PLACEHOLDER ({soc_source})")
    if lowered != "fp32":
        print(f"  note: --precision_mode {args.precision_mode} lowers operators: judge the .om with {lowered} "
              "thresholds (accuracy_run.py --runtime om reads the mode from the JSON)")  # fmt: skip
    if aipp_path:
        print(f"  AIPP: {aipp_path}; the .om then takes {om_input}")
    print(f"  then: python accuracy_run.py MODEL_PATH report.json --runtime om --om {out.with_suffix('.om')} "
          "--device npu:0")
    print(f"wrote {json_path}")
    why = f" ({'; '.join(comparison.reasons)})" if comparison.reasons else ""
    print(f"VERDICT: {comparison.verdict}  onnxruntime CPU {out.name} vs cpu float32 eager: {figures}{why}")
    return 0 if comparison.verdict == "PASS" else 1


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv=None) -> int:
    return common.run_main(_main, argv, usage_codes=True)


if __name__ == "__main__":
    raise SystemExit(main())
