"""Export MobileViT to ONNX at an opset ATC accepts, check the file with ONNX Runtime against the CPU float32 model,
and print the ATC command that makes the Ascend .om of it.

Examples:
  python export_onnx.py ./model mobilevit.onnx
  python export_onnx.py ./model mobilevit.onnx --synthetic --dynamic_batch
  python export_onnx.py ./model mobilevit.onnx --soc_version Ascend910B4 --aipp
  python export_onnx.py ./model mobilevit_fp16.onnx --precision_mode allow_mix_precision

Export: opset 15 by default, the newest of the opsets 11-15 the CANN 8.0.0 ATC guide documents for --framework=5
(ONNX); the TorchScript exporter writes it (torch's current exporter writes opset 18 for this model, so it runs only
for --opset 18 and above, which ATC's guide does not list: a warning says so). The exporters' own output is kept off
the console (one summary line; -v lists it). Input pixel_values [N, 3, 256, 256] float32, output logits [N, classes];
N fixed by --batch_size or dynamic with --dynamic_batch.

Check: the written file is run by ONNX Runtime on the CPU over the bundled photos (or --images), one image at a time,
and judged against the CPU float32 torch model by accuracy_run.py's comparison (verify.compare_images), at fp32
thresholds.

Output: OUT.onnx (the name must end in .onnx); OUT.json beside it (the export report: input/output names and shapes,
opset and ATC's opset range with its source, exporter, the weights' digest, the verdict, the ATC command); with --aipp,
OUT.aipp.cfg. An existing OUT.json or OUT.aipp.cfg that an earlier export of OUT.onnx did not write is never
overwritten (exit 2). The ATC command is printed with --soc_version from the flag (an Ascend SoC name such as
Ascend310P3 or Ascend910B4, else exit 2), else the visible NPU's name, else a placeholder marked as such, and
--precision_mode always explicit; every argument shell-quoted, so the line pastes into a shell as one command.
Exit codes: 0 PASS; 1 FAIL or INVALID; 2 usage, model, image, output or export error.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import common
from mobilevit_npu import flags
from mobilevit_npu.errors import UserError

if TYPE_CHECKING:  # these import torch: _main imports them after the parser, so --help stays torch-free
    from mobilevit_npu import models

logger = logging.getLogger("mobilevit_npu.export_onnx")
AIPP_FIRST_LINE = "# AIPP for "  # then the family: "# AIPP for MobileViT, from ..."


def onnx_path(text: str) -> str:
    """An argparse type for OUT.onnx: a name ending in .onnx, so OUT.json and OUT.aipp.cfg never are the file itself."""
    if not text.lower().endswith(".onnx") or not Path(text).stem:
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .onnx (OUT.json and OUT.aipp.cfg go beside it)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = common.script_parser("export_onnx.py", __doc__)
    common.add_synthetic_args(common.add_model_args(parser, positional=True), "MODEL_PATH")
    parser.add_argument(
        "output", metavar="OUT.onnx", type=onnx_path, help="the ONNX file to write (OUT.json and OUT.aipp.cfg beside)"
    )
    export = parser.add_argument_group("export")
    lo, hi = flags.ATC_OPSETS
    export.add_argument(
        "--opset",
        type=common.int_at_least(7),
        default=flags.DEFAULT_OPSET,
        help=f"ONNX opset; ATC documents {lo}-{hi} ({flags.ATC_OPSET_SOURCE}); another is "
        "written with a warning. Below 18 the TorchScript exporter runs (the current one writes 18+ "
        "for this model)",
    )
    batch = export.add_mutually_exclusive_group()
    batch.add_argument(
        "--batch_size", "--batch-size", type=common.int_at_least(1), default=1, help="the fixed batch size of the input"
    )
    batch.add_argument(
        "--dynamic_batch",
        "--dynamic-batch",
        action="store_true",
        help="a dynamic batch dimension (ATC then gets --dynamic_batch_size profiles)",
    )
    export.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "torchscript"),
        default="auto",
        help="auto: TorchScript below opset 18, else the current (dynamo) exporter where it works",
    )
    common.add_image_args(export, "the photos the export is checked on; default: the photos bundled with the package")
    atc = parser.add_argument_group("ATC (the .om for Ascend)")
    atc.add_argument(
        "--soc_version",
        "--soc-version",
        metavar="NAME",
        help="ATC --soc_version, e.g. Ascend910B4 (npu-smi info); default: the visible NPU's name, else a placeholder",
    )
    atc.add_argument(
        "--precision_mode",
        "--precision-mode",
        choices=sorted(flags.PRECISION_MODES),
        default=flags.DEFAULT_PRECISION_MODE,
        metavar="MODE",
        help=f"ATC --precision_mode, one of {', '.join(sorted(flags.PRECISION_MODES))}; always written out (ATC's "
        "own default would be force_fp16); the default keeps every operator in fp32, for an fp32 verdict; a "
        "lowering mode is judged with fp16 (or bf16) thresholds",
    )
    atc.add_argument(
        "--aipp",
        action="store_true",
        help="also write OUT.aipp.cfg (static AIPP from preprocessor_config.json: RGB->BGR, x1/255, no "
        "mean/std, 256x256) and add --insert_op_conf; the .om then takes uint8 RGB NHWC, resized and "
        "centre-cropped on the host",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and every exporter message")
    return parser


def _fmt_shape(entry: dict) -> str:
    return f"{entry['name']} {entry['shape']} {entry['dtype']}"


def _check_opset(opset: int) -> bool:
    """UserError for an opset this torch cannot export; a warning naming ATC's range outside it. True when inside."""
    import torch
    from torch.onnx import _constants  # torch's own bounds (private, present from torch 1.13 to 2.13)

    from mobilevit_npu import onnx_export

    top = getattr(_constants, "ONNX_MAX_OPSET", None)
    if top is not None and opset > top:
        raise UserError(
            f"--opset {opset}: torch {torch.__version__} exports opsets up to {top}; ATC documents "
            f"{'-'.join(map(str, onnx_export.ATC_OPSETS))} ({onnx_export.ATC_OPSET_SOURCE})"
        )
    lo, hi = onnx_export.ATC_OPSETS
    if lo <= opset <= hi:
        return True
    logger.warning(
        "--opset %d is outside %d-%d, the ONNX opsets of %s: ATC may refuse this file",
        opset,
        lo,
        hi,
        onnx_export.ATC_OPSET_SOURCE,
    )
    return False


def _written_by_an_export_of(path: Path, out: Path) -> bool:
    """Whether an existing OUT.json / OUT.aipp.cfg is this script's, from an earlier export of the same OUT.onnx (which
    a new export may replace), not some other file that happens to have the name."""
    from mobilevit_npu import reports

    try:  # read_bounded: a FIFO or a link to /dev/zero at OUT.json is not ours, and is never opened or read
        text = reports.read_bounded(path, "the file beside the ONNX", reports.MAX_CONFIG_BYTES).decode("utf-8")
        if path.suffix == ".cfg":
            return text.startswith(AIPP_FIRST_LINE)
        data = json.loads(text)
    except (UserError, ValueError, RecursionError):
        return False
    return (
        isinstance(data, dict)
        and data.get("tool") == "export_onnx.py"
        and Path(str((data.get("onnx") or {}).get("path", ""))).name == out.name
    )


def _check_outputs(args, out: Path, json_path: Path, aipp_path: Path | None, sources: list[str] | None) -> None:
    """Before any model work: the three outputs through the CLI kit's guard (no output is an input, a file of the
    model folder or another output), no unrelated file of a sidecar's name replaced, and the folder writable (a
    read-only file system is named, one line)."""
    folder = out.resolve().parent
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "error")
        raise UserError(f"OUT.onnx {out} cannot be written: {folder}: {exc.strerror} ({code})") from exc
    os.close(fd)
    os.unlink(probe)
    common.check_outputs(
        {"OUT.onnx": out, "its export JSON": json_path, "its AIPP config": aipp_path},
        {"--images": sources},
        model_dir=None if args.synthetic else args.model_path,
    )
    for side in (json_path, aipp_path):
        if side is not None and side.exists() and not _written_by_an_export_of(side, out):
            raise UserError(
                f"{side} exists and was not written by an export of {out}: exporting {out} would replace "
                "it; move it or choose another OUT.onnx"
            )


def _check(path: Path, loaded: models.LoadedModel, sources: list[str] | None):
    """The file through ONNX Runtime on the CPU (the runtimes' session opener) as the target side, judged against the
    CPU float32 torch model over the photos by the verification's own comparison (verify.compare_images), at fp32
    thresholds: (comparison, image names, session)."""
    from mobilevit_npu import devices, metrics, preprocessing, runtime_ort, runtimes, verify

    session = runtime_ort.open_session(path)
    side = runtimes.ort_side(session, session.prepared(), devices.Device("cpu"), loaded.model, {"model": str(path)})
    items, skipped = preprocessing.read_images(sources or preprocessing.bundled_images(), loaded.preprocess)
    for s in skipped:
        logger.warning("skipping %s: %s", s["image"], s["error"])
    if not items:
        raise UserError("no photos to check the export on")
    result = verify.compare_images(loaded, side, items, metrics.Thresholds.for_dtype("fp32"))
    return result.comparison, [item.source for item in items], session


@dataclass
class _Plan:
    """What the command line asks, checked before any model work: the three outputs and the photos."""

    out: Path
    json_path: Path
    aipp_path: Optional[Path]
    sources: Optional[list[str]]
    opset_in_range: bool = True


def _plan(args) -> _Plan:
    """Every check that needs no model: the SoC name, the folder, onnx and onnxruntime, the outputs, the opset."""
    from mobilevit_npu import onnx_export, preprocessing, runtimes

    out = Path(args.output)
    plan = _Plan(out, runtimes.sidecar_path(out), out.with_suffix(".aipp.cfg") if args.aipp else None, None)
    if args.soc_version:  # before any work: it goes into the printed command
        onnx_export.check_soc_version(args.soc_version)
    if not out.parent.is_dir():
        raise UserError(f"folder {out.parent} does not exist")
    for package in ("onnx", "onnxruntime"):
        if not _installed(package):
            raise UserError(f'{package} is not installed: pip install -e ".[bench]"')
    plan.sources = preprocessing.expand_images(args.images) if args.images else None
    _check_outputs(args, out, plan.json_path, plan.aipp_path, plan.sources)
    plan.opset_in_range = _check_opset(args.opset)
    return plan


def _export_and_check(args, plan: _Plan, loaded: models.LoadedModel):
    """The ONNX written under a temporary name, checked by ONNX Runtime, then renamed into place: (export, its
    description, comparison, image names, session)."""
    from mobilevit_npu import atomic, onnx_export

    cfg = loaded.preprocess
    try:  # the one atomic writer (mobilevit_npu.atomic): exported and checked under a temp name, then renamed
        with atomic.staged(plan.out) as tmp:
            exported = onnx_export.export_onnx(
                loaded.model,
                tmp,
                opset=args.opset,
                batch_size=args.batch_size,
                dynamic_batch=args.dynamic_batch,
                exporter=args.exporter,
                image_size=(cfg.crop_height, cfg.crop_width),
            )
            print(exported.summary())
            for line in exported.captured if args.verbose else []:
                print(f"  exporter: {line}")
            described = onnx_export.describe(tmp)
            comparison, names, session = _check(tmp, loaded, plan.sources)
    except OSError as exc:  # the disk filled or the folder changed under the export: one line, nothing left behind
        raise UserError(f"could not write {plan.out}: {exc.strerror or exc}") from exc
    exported.path = plan.out
    return exported, described, comparison, names, session


def _om_input(args, cfg, described: dict) -> str:
    """What the .om takes: uint8 pixels through AIPP, or the preprocessed float32 tensor."""
    from mobilevit_npu import onnx_export

    if args.aipp:
        return (
            f"uint8 RGB NHWC [N, {cfg.crop_height}, {cfg.crop_width}, 3]: decode, resize and centre-crop as "
            f"preprocessor_config.json says on the host; AIPP {onnx_export.pixel_map(cfg).describe()}"
        )
    return f"float32 NCHW {described['inputs'][0]['shape']}, preprocessed on the host as for the torch model"


def _report(args, argv, plan: _Plan, loaded, exported, described: dict, comparison, names, session, atc: dict):
    """The export report (OUT.json), through the schema's definition."""
    from mobilevit_npu import devices, models, schema

    a = comparison.aggregate
    return schema.OnnxExportReport(
        **schema.header(
            "export_onnx.py", sys.argv[1:] if argv is None else argv, loaded, devices.environment(devices.Device("cpu"))
        ),
        weights_sha256=models.weights_digest(loaded.model),
        onnx={
            "path": str(plan.out),
            "sha256": models.sha256_file(plan.out),
            "bytes": plan.out.stat().st_size,
            "exporter": exported.exporter,
            "exporter_why": exported.why,
            "export_s": round(exported.seconds, 3),
            "exporter_warnings": exported.captured,
            "dynamic_batch": exported.dynamic_batch,
            **described,
        },
        check=schema.OnnxCheck(
            runtime=f"onnxruntime {session.version} {session.provider}",
            reference="cpu float32 eager torch",
            images=names,
            verdict=comparison.verdict,
            verdict_reasons=comparison.reasons,
            thresholds=comparison.thresholds,
            cosine_min=a.cosine_min,
            top1_agree=a.top1_agree_count,
            max_abs_prob_diff=a.max_abs_prob_diff,
            max_abs_logit_diff=a.max_abs_logit_diff,
        ),
        verdict=comparison.verdict,
        atc=atc,
    )


def _print_atc(args, plan: _Plan, described: dict, atc: dict) -> None:
    """The ATC command to paste on the Ascend host, and the notes that go with it."""
    from mobilevit_npu import onnx_export

    lo, hi = flags.ATC_OPSETS
    print("ATC, on the Ascend host (CANN's set_env.sh sourced):")
    print(f"  {atc['command']}")
    if not plan.opset_in_range:
        print(f"  note: opset {described['opset']} is outside {lo}-{hi}, the opsets ATC documents for ONNX")
    if atc["soc_version"] == onnx_export.SOC_PLACEHOLDER:
        print(f"  note: --soc_version={atc['soc_version']} is a PLACEHOLDER ({atc['soc_version_source']})")
    if atc["judge_with"] != "fp32":
        print(
            f"  note: --precision_mode {args.precision_mode} lowers operators: judge the .om with {atc['judge_with']} "
            "thresholds (accuracy_run.py --runtime om reads the mode from the JSON)"
        )
    if plan.aipp_path:
        print(f"  AIPP: {plan.aipp_path}; the .om then takes {atc['om_input']}")
    print(
        f"  then: python accuracy_run.py MODEL_PATH report.json --runtime om --om {plan.out.with_suffix('.om')} "
        "--device npu:0"
    )


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    import mobilevit_npu.startup  # noqa: F401, I001  (first: imports torch; a failed torch_npu autoload is one line)
    from mobilevit_npu import bounds, devices, models, onnx_export, reports

    common.setup_logging(args.verbose)
    plan = _plan(args)
    loaded = models.load_named(args, devices.Device("cpu"), "fp32")
    cfg = loaded.preprocess
    if args.aipp:
        onnx_export.pixel_map(cfg)  # an AIPP this processor cannot have is refused before anything is written
    if not args.dynamic_batch:  # the traced example: memory bounds it, refused before it is allocated
        bounds.bounded_batch(args.batch_size, 0, cfg, devices.Device("cpu"))
    exported, described, comparison, names, session = _export_and_check(args, plan, loaded)

    soc, soc_source = onnx_export.soc_version(args.soc_version)
    if plan.aipp_path:
        title = loaded.family.title if loaded.family else ""
        reports.write_text_atomic(plan.aipp_path, onnx_export.aipp_config(cfg, title=title))
    shape = described["inputs"][0]["shape"]
    atc: dict[str, Any] = {
        "command": onnx_export.atc_command(plan.out, shape, soc, args.precision_mode, plan.aipp_path),
        "soc_version": soc,
        "soc_version_source": soc_source,
        "precision_mode": args.precision_mode,
        "judge_with": onnx_export.verdict_dtype(args.precision_mode),
        "aipp_config": str(plan.aipp_path) if plan.aipp_path else None,
        "om_input": _om_input(args, cfg, described),
        "onnx_opsets": list(flags.ATC_OPSETS),
        "onnx_opsets_source": flags.ATC_OPSET_SOURCE,
        "opset_in_range": plan.opset_in_range,
    }
    report = _report(args, argv, plan, loaded, exported, described, comparison, names, session, atc)
    reports.write_report(plan.json_path, report)

    a = comparison.aggregate
    figures = (
        f"cosine min {a.cosine_min:.6f}, top-1 {a.top1_agree_count}/{a.images}, max|dp| "
        f"{a.max_abs_prob_diff:.3g}, max|dlogit| {a.max_abs_logit_diff:.3g}"
    )
    out = plan.out
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {_fmt_shape(described['inputs'][0])} -> "
        f"{_fmt_shape(described['outputs'][0])}, opset {described['opset']}"
    )
    print(f"check: onnxruntime {session.version} CPU vs CPU float32 torch on {a.images} photo(s): {figures}")
    _print_atc(args, plan, described, atc)
    print(f"wrote {plan.json_path}")
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
