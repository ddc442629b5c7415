"""Write the model card (Markdown, front matter a model hub reads) and its plots from measured reports, in Chinese and
English.

Examples:
    python port_report.py accuracy_report.json perf_report.json
    python port_report.py accuracy_report.json perf_report.json imagenet_report.json --lang zh --output README.md

Inputs: reports of accuracy_run.py (CPU-vs-target consistency, or a labelled set with --dataset/--labels) and of
accuracy_run_perf.py, at least one of each, all of the same weights (the same sha256, or the same synthetic seed).
Each is read through the one report format (mobilevit_npu/schema.py). Every figure in the card comes from them; every
command shown is the argv that wrote the report. The model section reads config.json and preprocessor_config.json
from the reports' model folder (model_source.path; the package's X-Small config for synthetic weights; --model_path to
override) and counts the parameters of the model config.json builds. Beside the card, in --assets, the PNGs it embeds
(relative links): the latency of every mode (the benchmark's plot) and, for a --layers run, the cosine of every module.

Honesty: synthetic weights put a warning at the top, in both languages, that the card is not a port result; the title
says "port result" only for real weights measured on an accelerator; a CPU target is called CPU, never NPU or GPU.

The words come from mobilevit_npu/templates/model_card.zh.md and model_card.en.md (not translated at run time).

Refusals (one line naming the file and the field; nothing is written):
  exit 2: bad arguments; the same report file given twice; --output or a plot that is one of the reports (by path,
          symlink or hard link) or lies inside a model folder the reports name (model_source.path, --model_path; for
          synthetic weights the package's config folder), through a symlink too; a report that is not a regular file
          (a FIFO, a link to /dev/zero: refused unopened) or is over reports.MAX_REPORT_BYTES; a report that is not
          valid JSON or does not match its kind's definition (a missing or mistyped field, an unknown kind, a newer
          schema_version, an unknown field without --allow_unknown_fields); a report whose figures lie outside their
          range (cosine in [-1, 1], shares in [0, 1], counts >= 0, no infinity; a null where the verdict relies on a
          number) or contradict its verdict (a PASS with a failed check): schema.check_figures.
  exit 1: reports that cannot make one true card: two with the same content, two of one kind from the same run,
          reports of different weights, a kind the card does not take, no accuracy or no benchmark report.
Exit 0: written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import common
from mobilevit_npu import flags


def build_parser():
    parser = common.script_parser("port_report.py", __doc__)
    parser.add_argument(
        "reports",
        nargs="+",
        metavar="REPORT.json",
        help="accuracy_run.py and accuracy_run_perf.py reports, in the order the card lists them",
    )
    parser.add_argument(
        "--lang",
        choices=("zh", "en", "both"),
        default="both",
        help="the card's language; both = one file: the front matter once, then the Chinese card, then the English "
        "one after a horizontal rule",
    )
    parser.add_argument(
        "--output",
        "-o",
        default="MODEL_CARD.md",
        metavar="CARD.md",
        help="where to write the card (atomically: temp file, then rename)",
    )
    parser.add_argument(
        "--assets",
        default=flags.CARD_ASSETS_DIR,
        metavar="DIR",
        help="folder for the card's PNGs, relative to the card's folder (linked relatively)",
    )
    parser.add_argument(
        "--model_path",
        "--model-path",
        default=None,
        metavar="FOLDER",
        help="model folder for the model section (config.json, preprocessor_config.json); default: "
        "the reports' model_source.path, or the project's model/ for synthetic weights",
    )
    parser.add_argument(
        "--allow_unknown_fields",
        "--allow-unknown-fields",
        action="store_true",
        help="read reports that carry fields the report format does not define (ignored); without "
        "it such a report is refused",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import mobilevit_npu.startup  # noqa: F401, I001  (first: imports torch; a failed torch_npu autoload is one line)
    from mobilevit_npu import card, cardfacts, reports  # after the parser: --help stays torch-free

    common.setup_logging(args.verbose)
    if os.path.isabs(args.assets) or ".." in Path(args.assets).parts:
        print("error: --assets must be a folder inside the card's folder (a relative path without ..)", file=sys.stderr)
        return 2
    inputs = {"REPORT.json": args.reports}
    common.check_outputs({"--output": args.output}, inputs)  # before a report is opened: no report is overwritten
    # The model folders the reports name (and --model_path): the card never lands inside one, through a symlink
    # either (it would replace the weights or config.json with Markdown).
    model_dirs = cardfacts.model_folders(args.reports, args.model_path, args.allow_unknown_fields)
    for model_dir in model_dirs:
        common.check_outputs({"--output": args.output}, inputs, model_dir=model_dir)
    try:
        built = card.build_card(
            args.reports,
            args.lang,
            args.model_path,
            args.allow_unknown_fields,
            args.assets,
            card_argv=card_command(args),
        )
    except card.CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    folder = Path(args.output).parent
    plots = {f"plot {link}": str(folder / link) for link in built.files}
    for model_dir in model_dirs or [None]:
        common.check_outputs({"--output": args.output, **plots}, inputs, model_dir=model_dir)
    for link, data in built.files.items():
        card.write_png(folder / link, data)
    reports.write_text_atomic(args.output, built.text)
    shown = f" and {len(built.files)} plot(s) in {folder / args.assets}" if built.files else ""
    print(f"wrote {args.output} ({args.lang}, from {len(args.reports)} report(s)){shown}")
    return 0


def card_command(args) -> list[str]:
    """This command as the card's Reproduce block shows it: the reports and the output always, then every option not
    at its default (one spelling, whatever the user typed)."""
    parser = build_parser()
    argv = [*args.reports, "--output", args.output]
    for flag in ("lang", "assets", "model_path"):
        if getattr(args, flag) != parser.get_default(flag):
            argv += [f"--{flag}", getattr(args, flag)]
    return argv + (["--allow_unknown_fields"] if args.allow_unknown_fields else [])


def main(argv=None) -> int:
    return common.run_main(_main, argv, usage_codes=True)


if __name__ == "__main__":
    raise SystemExit(main())
