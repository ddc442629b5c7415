"""Write the model card (Markdown, front matter a model hub reads) from measured reports, in Chinese and English.

Examples:
    python port_report.py accuracy_report.json perf_report.json --lang both --output MODEL_CARD.md
    python port_report.py accuracy_report.json perf_report.json imagenet_report.json --lang zh --output README.md

Inputs: reports of accuracy_run.py (CPU-vs-target consistency, or a labelled set with --dataset/--labels) and of
accuracy_run_perf.py, at least one of each, all of the same weights (the same sha256, or the same synthetic seed).
Every figure in the card comes from them; every command shown is the argv that wrote the report. The model section
reads config.json and preprocessor_config.json from the reports' model folder (model_source.path; the project's
model/ for synthetic weights; --model_path to override) and computes the parameter count from the config.

Honesty: synthetic weights put a warning at the top, in both languages, that the card is not a port result; a CPU
target is called CPU, never NPU or GPU (NPU/Ascend tags only for a target that ran on an npu).

The words come from templates/model_card.zh.md and templates/model_card.en.md (not translated at run time).

Exit codes: 0 written; 1 the reports cannot make a card without a hole (a field missing, naming the report and the
field; reports of different weights, naming both); 2 bad arguments or an unreadable report.
"""

from __future__ import annotations

import sys

import mobilevit_npu.startup  # noqa: F401  (first: imports torch; a failed torch_npu autoload is one line)

import common
from mobilevit_npu import card, reports


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
    parser.add_argument("--output", "-o", required=True, metavar="CARD.md",
                        help="where to write the card (atomically: temp file, then rename)")  # fmt: skip
    parser.add_argument("--model_path", "--model-path", default=None, metavar="FOLDER",
                        help="model folder for the model section (config.json, preprocessor_config.json); default: "
                        "the reports' model_source.path, or the project's model/ for synthetic weights")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.verbose)
    common.check_outputs({"--output": args.output})
    try:
        text = card.build_card(args.reports, args.lang, args.model_path)
    except card.CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    reports.write_text_atomic(args.output, text)
    print(f"wrote {args.output} ({args.lang}, from {len(args.reports)} report(s))")
    return 0


def main(argv=None) -> int:
    return common.run_main(_main, argv, usage_codes=True)


if __name__ == "__main__":
    raise SystemExit(main())
