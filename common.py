"""The scripts' command-line kit: parser builders, the shared argument groups, model loading from arguments,
logging set-up and run_main (one-line errors, exit codes).

Exit codes, the same in every script: 0 done (PASS); 1 a result that is not a success (FAIL / INVALID, images that
failed); 2 bad usage, model, image set or device (one line on stderr, no traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import stat
import sys
from collections.abc import Sequence
from typing import Union

from mobilevit_npu import flags
from mobilevit_npu.errors import UserError
from mobilevit_npu.flags import float_at_least, int_at_least  # noqa: F401  (the kit's argparse types)

# This module imports nothing that imports torch (the package's heavy modules are imported inside the functions that
# need them), so a script's --help builds its parser in a fraction of a second: tests/test_first_hour.py checks it.

logger = logging.getLogger("mobilevit_npu")

SAYS_DEFAULT = re.compile(r"\(default|default:|default by|by default")  # a help that already says its default
LONG_CHOICES = 30  # characters: a longer list of choices is shown once, in the help, and by name in the usage


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The script docstring kept as written, and every option said once:
    - its default appended as "(default: X)" unless its help already says what happens by default, or there is
      nothing to say (no value: None, False, suppressed);
    - both spellings of a flag before one metavar (`--top_k, --top-k TOP_K`), not the metavar after each;
    - a long list of choices by name in the usage (`--precision_mode MODE`) and listed once, in its help;
    - a one-line usage (`prog [options] MODEL_PATH REPORT.json`): the options are listed below it, once."""

    def add_usage(self, usage, actions, groups, prefix=None):
        if usage is None:
            positionals = [self._format_args(a, self._get_default_metavar_for_positional(a)) for a in actions]
            usage = " ".join(
                ["%(prog)s [options]"] + [text for a, text in zip(actions, positionals) if not a.option_strings]
            )
        super().add_usage(usage, actions, groups, prefix)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if SAYS_DEFAULT.search(text) or action.required or nothing:
            return text
        return f"{text} (default: %(default)s)"

    def _metavar_formatter(self, action: argparse.Action, default_metavar: str):
        if action.metavar is None and action.choices is not None and len(",".join(action.choices)) > LONG_CHOICES:
            action.metavar = action.dest.upper()
            if not all(choice in (action.help or "") for choice in action.choices):
                action.help = f"{action.help or ''}; one of: {', '.join(action.choices)}"
        return super()._metavar_formatter(action, default_metavar)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"


def script_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as the description, the rest (examples...) as the epilog."""
    summary, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=summary, epilog=rest, formatter_class=HelpFormatter)


# torch's seed range (torch/random.py manual_seed, l.49-58 in torch 2.13: "[-0x8000_0000_0000_0000,
# 0xffff_ffff_ffff_ffff]"); outside it the generator raises "Overflow when unpacking long long".
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def seed(text: str) -> int:
    """An argparse type for --seed: a whole number torch's generator takes (SEED_RANGE), a usage error otherwise."""
    shown = text if len(text) <= 40 else f"{text[:37]}..."
    lo, hi = SEED_RANGE
    outside = argparse.ArgumentTypeError(f"{shown} is outside the 64-bit seeds torch takes ({lo} to {hi})")
    try:
        value = int(text)
    except ValueError:
        if text.strip().lstrip("+-").isdigit():  # digits past Python's 4300-digit bound for int()
            raise outside from None
        raise argparse.ArgumentTypeError(f"{shown!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise outside
    return value


def batch_sizes(text: str) -> list[int]:
    """An argparse type for --batch_sizes: a comma list of whole numbers >= 1 ("1,32"), a usage error otherwise."""
    sizes = [int_at_least(1)(part.strip()) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"no batch sizes in {text!r}")
    return sizes


def nonempty_path(text: str) -> str:
    """An argparse type for path arguments: an empty value ("" would mean the working folder) is a usage error."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


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
    group.add_argument("--dtype", choices=sorted(flags.DTYPE_NAMES), default="fp32", help=help_text)


def add_model_args(parser: argparse.ArgumentParser, positional: bool = False) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    help_text = (
        "Hugging Face model folder (config.json, model.safetensors or pytorch_model.bin, preprocessor_config.json) "
        f"or a hub id such as {flags.HUB_MODEL_ID}. When the default folder holds no weights they are fetched from "
        "the hub (HF_ENDPOINT is honoured, so a mirror works; offline, --synthetic needs no weights)."
    )
    if positional:
        group.add_argument("model_path", metavar="MODEL_PATH", type=nonempty_path, help=help_text)
    else:
        group.add_argument(
            "--model_path", "--model-path", type=nonempty_path, default=flags.DEFAULT_MODEL_DIR, help=help_text
        )
    return group


def add_synthetic_args(group: argparse._ArgumentGroup, replaces: str) -> None:
    group.add_argument(
        "--synthetic",
        action="store_true",
        help=f"use the full-size X-Small with synthetic healthy weights instead of {replaces} (no download; real "
        "labels, meaningless predictions); reports say so",
    )
    group.add_argument("--seed", type=seed, default=0, help="--synthetic only: the seed of the synthetic weights")


def add_image_args(group: argparse._ArgumentGroup, default_text: str) -> None:
    """--image and --images, one flag: files, folders, globs and URLs."""
    group.add_argument(
        "--image",
        "--images",
        dest="images",
        nargs="+",
        type=nonempty_path,
        metavar="PATH",
        help=f"image files, directories (their images, sorted), globs (quote them) or http(s) URLs; {default_text}",
    )


def add_image_limit_args(group: argparse._ArgumentGroup) -> None:
    """--max_image_pixels and --max_aspect_ratio: images over them are refused from their header, one line each."""
    group.add_argument(
        "--max_image_pixels",
        "--max-image-pixels",
        type=int_at_least(1),
        default=flags.MAX_IMAGE_PIXELS,
        metavar="N",
        help="refuse (as a per-image error, before decoding) an image with more pixels than this, decoded or after "
        "the resize to the shortest edge (PIL's decompression-bomb guard, 179M decoded pixels, stays on)",
    )
    group.add_argument(
        "--max_aspect_ratio",
        "--max-aspect-ratio",
        type=float_at_least(1.0),
        default=flags.MAX_ASPECT_RATIO,
        metavar="R",
        help="refuse an image whose long side is more than R times its short side (a 1x40000 strip would resize "
        "to 288 x 11,520,000 pixels)",
    )


PathArg = Union[str, "os.PathLike[str]", None]


def _is_regular_or_absent(path: str) -> bool:
    """False for /dev/null, /dev/stdout, FIFOs and other streams: several outputs may share those."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return not os.path.abspath(path).startswith(("/dev/", "/proc/"))


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value if v is not None]


def check_outputs(
    outputs: dict[str, PathArg],
    inputs: dict[str, PathArg | Sequence[str]] | None = None,
    model_dir: PathArg = None,
    folders: dict[str, PathArg] | None = None,
) -> None:
    """The output guard, called before any model work: every output path the run will write ({"--output": path,
    "the per-image file": path, ...}; None entries are skipped) is checked and refused with a UserError (exit 2, one
    line naming both paths) when it
      - cannot take a file (a folder, an unwritable folder, a folder under a file: reports.check_output_path);
      - is the same file as another output of this run (sidecar, journal, plot), by path or by inode;
      - is the same file as an input ({"--images": [specs], "--labels": path, ...}; folders and globs stand for the
        images they hold, as preprocessing.expand_images lists them; URLs are skipped), by path, by symlink or by hard
        link, so a run never overwrites what it reads;
      - lies inside the model folder `model_dir` (config.json, the weights: the next run could not load the model), or
        inside an input that is a folder (--dataset DIR, --images DIR: the next scan would read it).
    `folders` are the folders the run writes into ({"the --resume journal": path, "--reference_cache": path,
    "--msprobe": path, ...}; None skipped): each is refused when it is, or lies inside, the model folder or an input
    folder, or is an input or output file by another name (reports.is_within, reports.file_identity).
    Streams (/dev/null, /dev/stdout, FIFOs) are never compared: writing there destroys nothing."""
    from mobilevit_npu import reports  # numpy, no torch: preflight.py's --json check imports no torch

    named = [(what, os.fspath(path)) for what, path in outputs.items() if path is not None]
    for what, path in named:
        if not path.strip():
            raise UserError(f"{what} is an empty path")
        reports.check_output_path(path, what)
    dirs = [(what, os.fspath(path)) for what, path in (folders or {}).items() if path is not None]
    for what, path in dirs:
        if not path.strip():
            raise UserError(f"{what} is an empty path")
    files = [(what, path, reports.file_identity(path)) for what, path in named if _is_regular_or_absent(path)]
    places = files + [(what, path, reports.file_identity(path)) for what, path in dirs]

    def same(a: tuple[str, tuple | None], b: tuple[str, tuple | None]) -> bool:
        return a[0] == b[0] or (a[1] is not None and a[1] == b[1])

    for i, (what, path, ident) in enumerate(places):
        for other_what, other, other_ident in files[:i]:  # two folders may be one (caches sharing a root)
            if same(ident, other_ident):
                raise UserError(f"{what} {path} and {other_what} {other} are the same file; give them different paths")
    input_folders: list[tuple[str, str]] = []
    if inputs:
        from mobilevit_npu import preprocessing  # imports torch; only for a run that reads inputs
    for in_what, value in (inputs or {}).items():
        specs = [spec for spec in _as_list(value) if spec and not preprocessing.is_url(spec)]
        input_folders += [(f"input {in_what}", spec) for spec in specs if os.path.isdir(spec)]
        for source in preprocessing.expand_images(specs):  # folders and globs: the files they name
            source_ident = reports.file_identity(source)
            for what, path, ident in places:
                if same(ident, source_ident):
                    raise UserError(f"{what} {path} is the input {in_what} {source}: writing it would destroy it")
    if model_dir is not None and os.path.isdir(model_dir):
        folder = os.path.realpath(model_dir)
        try:
            model_files = {reports.file_identity(entry.path)[1] for entry in os.scandir(folder) if entry.is_file()}
        except OSError:  # an unreadable model folder is reported when the model is loaded
            model_files = set()
        for what, path, ident in places:
            if reports.is_within(ident[0], folder) or (ident[1] is not None and ident[1] in model_files):
                raise UserError(
                    f"{what} {path} is inside the model folder {model_dir} (or a link to one of its "
                    "files): writing it would change the model; write it elsewhere"
                )
    for in_what, spec in input_folders:
        for what, path, ident in places:
            if reports.is_within(ident[0], os.path.realpath(spec)):
                raise UserError(
                    f"{what} {path} is inside the {in_what} {spec}: writing there would change what the run "
                    "reads; write it elsewhere"
                )


def json_path(text: str) -> str:
    """An argparse type for REPORT arguments: a path ending in .json (so `MODEL 50` is a usage error, not a file)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
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
