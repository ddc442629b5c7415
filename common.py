"""The scripts' command-line kit: parser builders, the shared argument groups, model loading from arguments,
logging set-up and run_main (one-line errors, exit codes).

Exit codes, the same in every script: 0 done (PASS); 1 a result that is not a success (FAIL / INVALID, images that
failed); 2 bad usage, model, image set or device (one line on stderr, no traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys

from mobilevit_npu import devices, models, preprocessing, reports, synthetic
from mobilevit_npu.errors import UserError
from mobilevit_npu.models import DEFAULT_MODEL_DIR, DTYPES, HUB_MODEL_ID

logger = logging.getLogger("mobilevit_npu")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help text, and the script docstring kept as written."""


def script_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as the description, the rest (examples...) as the epilog."""
    summary, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=summary, epilog=rest, formatter_class=HelpFormatter)


def int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum, with a usage error (exit 2) otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def count_or_fraction(text: str) -> int | float:
    """--max_skipped: a whole number of images, or a fraction (0..1) of them."""
    value: int | float
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a count (a whole number) nor a fraction between 0 and 1"
            ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def add_device_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("device")
    group.add_argument(
        "--device",
        default="auto",
        help="where to run: auto | cpu | cuda[:N] | npu[:N] | mps. auto picks npu (torch_npu present and a device "
        "visible), else cuda, else mps, else cpu. A device that is asked for and absent is an error (exit 2).",
    )
    group.add_argument(
        "--jit_compile",
        "--jit-compile",
        action="store_true",
        help="NPU only: keep CANN's online operator compilation on (torch.npu.set_compile_mode(jit_compile=True)). "
        "Off by default, which uses prebuilt binary kernels and avoids minutes of first-run compilation on 910B.",
    )
    return group


def add_dtype_arg(group: argparse._ArgumentGroup, help_text: str = "precision of the model on the device") -> None:
    group.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help=help_text)


def add_model_args(parser: argparse.ArgumentParser, positional: bool = False) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    help_text = (
        "Hugging Face model folder (config.json, model.safetensors or pytorch_model.bin, preprocessor_config.json) "
        f"or a hub id such as {HUB_MODEL_ID}. When the default folder holds no weights they are fetched from the "
        "hub (HF_ENDPOINT is honoured, so a mirror works)."
    )
    if positional:
        group.add_argument("model_path", help=help_text)
    else:
        group.add_argument("--model_path", "--model-path", default=DEFAULT_MODEL_DIR, help=help_text)
    return group


def add_synthetic_args(group: argparse._ArgumentGroup, replaces: str) -> None:
    group.add_argument(
        "--synthetic",
        action="store_true",
        help=f"use the full-size X-Small with synthetic healthy weights instead of {replaces} (no download; real "
        "labels, meaningless predictions); reports say so",
    )
    group.add_argument("--seed", type=int, default=0, help="--synthetic only: the seed of the synthetic weights")


def add_image_args(group: argparse._ArgumentGroup, default_text: str) -> None:
    """--image and --images, one flag: files, folders, globs and URLs."""
    group.add_argument(
        "--image",
        "--images",
        dest="images",
        nargs="+",
        metavar="PATH",
        help=f"image files, directories (their images, sorted), globs (quote them) or http(s) URLs; {default_text}",
    )


def add_image_limit_args(group: argparse._ArgumentGroup) -> None:
    """--max_image_pixels and --max_aspect_ratio: images over them are refused from their header, one line each."""
    group.add_argument(
        "--max_image_pixels",
        "--max-image-pixels",
        type=int_at_least(1),
        default=preprocessing.MAX_IMAGE_PIXELS,
        metavar="N",
        help="refuse (as a per-image error, before decoding) an image with more pixels than this, decoded or after "
        "the resize to the shortest edge (PIL's decompression-bomb guard, 179M decoded pixels, stays on)",
    )
    group.add_argument(
        "--max_aspect_ratio",
        "--max-aspect-ratio",
        type=float_at_least(1.0),
        default=preprocessing.MAX_ASPECT_RATIO,
        metavar="R",
        help="refuse an image whose long side is more than R times its short side (a 1x40000 strip would resize "
        "to 288 x 11,520,000 pixels)",
    )


def float_at_least(minimum: float):
    """An argparse type: a finite number >= minimum, with a usage error (exit 2) otherwise."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be a finite number of at least {minimum:g}")
        return value

    parse.__name__ = f"number >= {minimum:g}"
    return parse


def check_outputs(paths: dict[str, str | None]) -> None:
    """Every output path the arguments name ({"--output": path, ...}), checked before any model work: a folder, an
    unwritable folder or a folder under a file is a UserError (exit 2, one line) now, not a traceback after the run."""
    for what, path in paths.items():
        if path is not None:
            reports.check_output_path(path, what)


def json_path(text: str) -> str:
    """An argparse type for REPORT arguments: a path ending in .json (so `MODEL 50` is a usage error, not a file)."""
    if not text.lower().endswith(".json"):
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .json")
    return text


def add_allocator_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--allocator",
        choices=("tuned", "system"),
        default="tuned",
        help="tuned: mallopt at start-up so glibc keeps large blocks instead of page-faulting them in again on "
        "every forward (2.3-2.7x at batch 32 on CPU); system: leave malloc alone, to measure the difference",
    )


def load(args: argparse.Namespace, device: devices.Device | None, dtype: str = "fp32") -> models.LoadedModel:
    """The model the arguments name: --synthetic (seeded) or the folder / hub id, on `device` in `dtype`."""
    if getattr(args, "synthetic", False):
        logger.info("building the synthetic full-size X-Small (%s is not read)", args.model_path)
        loaded = synthetic.synthetic_model(device, dtype, seed=args.seed)
    else:
        loaded = models.load_model(args.model_path, device, dtype)
    limits = {k: getattr(args, k) for k in ("max_image_pixels", "max_aspect_ratio") if hasattr(args, k)}
    if limits:  # the bounds travel with the preprocessing config, into DataLoader workers too
        loaded.preprocess = dataclasses.replace(loaded.preprocess, **limits)
    return loaded


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")


def run_main(body, argv=None, usage_codes: bool = False) -> int:
    """Run a script body, turning UserError into a one-line message and exit code 2 (no traceback). With
    `usage_codes`, argparse's exits (--help 0, usage errors 2) come back as return codes, for main([...]) callers."""
    try:
        return body(argv)
    except SystemExit as exc:
        if not usage_codes:
            raise
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
