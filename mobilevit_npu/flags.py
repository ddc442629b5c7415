"""What the scripts' command lines name, declared once here and importable without torch, so that `--help` never
imports torch (6-12 s): the defaults and limits the parsers show, the names their choices take, and the argument
groups of modules that import torch (the offline runtime's, msprobe's). The modules that act on these facts import
them from here (models, preprocessing, execution, onnx_export, refcache, runtimes, probe re-export them under their
old names), so a fact is still spelled once.

Nothing here may import torch, numpy, PIL or transformers: tests/test_first_hour.py runs every script's --help and
checks that torch stayed out of sys.modules.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from mobilevit_npu import modes, runtime_registry

# The model (models.py reads these).
DEFAULT_MODEL_DIR = "./model"
HUB_MODEL_ID = "apple/mobilevit-x-small"
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # --dtype; models.DTYPES maps each to its torch dtype

# Images (preprocessing.py reads these).
MAX_IMAGE_PIXELS = 2**27  # 134M: a 108 MP phone photo fits; decoded and resized sizes alike (PIL's own guard,
# which refuses over 2 x Image.MAX_IMAGE_PIXELS = 179M decoded pixels, stays on above it)
MAX_ASPECT_RATIO = 32.0  # 32:1 (wider than any phone panorama); resized that is 288 x 9216 pixels

# Execution modes, in the order the benchmark runs them: declared in modes.REGISTRY (torch-free; execution.py builds
# them). The scripts call modes.mode_names() when they build their parsers, so a mode added to the registry is offered.
MODES = modes.mode_names()

# ONNX export and CANN (onnx_export.py reads these).
ATC_OPSETS = (11, 15)  # the ONNX opsets ATC documents for --framework=5 (CANN 8.0.0; see onnx_export's docstring)
ATC_OPSET_SOURCE = (
    "CANN 8.0.0 ATC guide, --framework (atlasatcparam_16_0014): ONNX models with ai.onnx operators of opsets v11 to v15"
)
DEFAULT_OPSET = ATC_OPSETS[1]  # the newest ATC takes; the TorchScript exporter writes it for this model
# ATC --precision_mode (and the CANN execution provider's precision_mode) -> the dtype whose thresholds judge it.
# must_keep_origin_dtype keeps the fp32 graph in fp32; force_fp32 (= cube_fp16in_fp32out) lets matrix operators take
# float16 inputs; the others lower some or all operators to float16 / bfloat16.
PRECISION_MODES = {
    "must_keep_origin_dtype": "fp32",
    "force_fp32": "fp16",
    "cube_fp16in_fp32out": "fp16",
    "allow_fp32_to_fp16": "fp16",
    "allow_mix_precision": "fp16",
    "allow_mix_precision_fp16": "fp16",
    "force_fp16": "fp16",
    "allow_mix_precision_bf16": "bf16",
    "allow_fp32_to_bf16": "bf16",
}
DEFAULT_PRECISION_MODE = "must_keep_origin_dtype"  # the only mode that keeps every fp32 operator in fp32

# Runtimes: declared once, torch-free, in mobilevit_npu.runtime_registry (--runtime's choices and help come from it).

# msprobe (probe.py drives it).
MSPROBE_LEVELS = ("L0", "L1", "mix")
MSPROBE_TASKS = ("statistics", "tensor")
MSPROBE_INSTALL = 'pip install -e ".[msprobe]" (or pip install mindstudio-probe)'

# The model card (card.py writes it).
CARD_ASSETS_DIR = "card_assets"  # beside the card: the PNGs it embeds, linked relatively

# Caches (refcache.py keeps them).
CACHE_ENV = "MOBILEVIT_NPU_CACHE"  # overrides the user cache folder for every cache of this project


def user_cache_dir() -> Path:
    """The project's cache folder: $MOBILEVIT_NPU_CACHE, else $XDG_CACHE_HOME/mobilevit-npu, else
    ~/.cache/mobilevit-npu."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mobilevit-npu"


def default_root() -> Path:
    """Where the reference logits are cached by default."""
    return user_cache_dir() / "reference"


def default_pixel_root() -> Path:
    """Where `--pixel_cache on` keeps decoded pixels."""
    return user_cache_dir() / "pixels"


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


def add_runtime_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--runtime and its artefacts and precision, the same in accuracy_run.py and accuracy_run_perf.py."""
    group = parser.add_argument_group("offline runtime (docs/offline.md)")
    group.add_argument(
        "--runtime",
        choices=runtime_registry.runtime_names(),  # the registry's, when the parser is built
        default="torch",
        help=runtime_registry.runtime_help(),
    )
    group.add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="--runtime onnxruntime: this file (default: exported now, into a temporary folder, dynamic batch)",
    )
    group.add_argument("--om", metavar="FILE.om", help="--runtime om: the ATC model to run; required with it")
    group.add_argument(
        "--precision_mode",
        "--precision-mode",
        choices=sorted(PRECISION_MODES),
        default=None,
        metavar="MODE",
        help=f"CANN precision, one of {', '.join(sorted(PRECISION_MODES))}: passed to the CANN execution provider; "
        "for --om, the mode ATC was given (default: the one in the export's FILE.json beside it, else "
        f"{DEFAULT_PRECISION_MODE}, which keeps fp32). A mode that lowers operators is judged with that dtype's "
        "thresholds (fp16 or bf16)",
    )
    group.add_argument(
        "--cann_graph",
        "--cann-graph",
        choices=("0", "1"),
        default="1",
        help="CANN execution provider enable_cann_graph: 1 runs the whole graph through CANN's graph engine, 0 "
        "operator by operator",
    )
    group.add_argument(
        "--allow_foreign_weights",
        "--allow-foreign-weights",
        action="store_true",
        help="run an --onnx / --om whose export JSON names other weights than the model loaded (refused otherwise: "
        "its verdict would judge other weights against this model)",
    )
    return group


def add_msprobe_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> argparse._ArgumentGroup:
    """--msprobe DIR and its level, task and image bound, in their own group."""
    if isinstance(parser, argparse.ArgumentParser):
        group = parser.add_argument_group("msprobe (MindStudio Probe, Ascend's accuracy tool; docs/msprobe.md)")
    else:
        group = parser
    group.add_argument(
        "--msprobe",
        metavar="DIR",
        default=None,
        help="also dump the reference (CPU float32 eager) and the target with msprobe's PrecisionDebugger on the same "
        "images into DIR/reference and DIR/target, and write msprobe compare's table under DIR/compare; the report "
        f"gets its counts by result and first failing rows. Target modes {modes.spoken(modes.msprobe_names(), 'and')}; "
        "needs mindstudio-probe: " + MSPROBE_INSTALL,
    )
    group.add_argument(
        "--msprobe_level",
        "--msprobe-level",
        choices=MSPROBE_LEVELS,
        default="mix",
        help="what msprobe dumps: L0 modules, L1 torch APIs, mix both",
    )
    group.add_argument(
        "--msprobe_task",
        "--msprobe-task",
        choices=MSPROBE_TASKS,
        default="statistics",
        help="statistics: max, min, mean and L2 norm of every tensor (small); tensor: the tensors themselves too "
        "(large: see docs/msprobe.md for sizes per image)",
    )
    group.add_argument(
        "--msprobe_images",
        "--msprobe-images",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="dump the first N images (default: the first batch: --batch_size images with --dataset/--labels, each "
        "rank its own; else the first image)",
    )
    return group
