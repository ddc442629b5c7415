"""Check the Ascend stack before any model work: one table of what is installed, where each version was read, and
whether it pairs as Ascend documents (Ascend/pytorch's version table), each row with its fix.

Examples:
    python preflight.py
    python preflight.py --ascend_root /opt/Ascend --json preflight.json
    python preflight.py --skip_import_check

Rows: Python, torch (CPU / CUDA build), torch_npu and the torch it requires, torchair, the CANN toolkit, driver and
firmware, npu-smi, whether set_env.sh was sourced, ASCEND_RT_VISIBLE_DEVICES, HCCL for torchrun, then `import torch`
in a subprocess (torch's autoload imports torch_npu there, never in this process) and its outcome. Status: ok,
mismatch, missing, or unknown (the table does not list the pair).

Exit codes: 0 every row ok (unknown allowed); 1 a mismatch or something missing that an NPU run survives; 2 unusable
(the reason on the last line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mobilevit_npu import atomic, preflight
from mobilevit_npu.errors import UserError

# This script must run on a bare Python (no torch, no numpy: its torch row says so and how to install it), and this
# process never imports torch (nor, through torch's autoload, torch_npu: the subprocess row does, as every script
# would). The command-line kit imports no torch; its output guard needs reports, which needs numpy: used where it
# imports.
try:
    import common
    from mobilevit_npu import reports
except Exception:  # numpy absent or broken: the preflight's own rows say what
    common = reports = None


def _folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder (the Ascend install root), not an empty string")
    return text


def build_parser():
    if common is not None:
        parser = common.script_parser("preflight.py", __doc__)
    else:
        summary, _, rest = __doc__.strip().partition("\n\n")
        parser = argparse.ArgumentParser(
            prog="preflight.py", description=summary, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    parser.add_argument(
        "--ascend_root",
        "--ascend-root",
        type=_folder,
        default=preflight.DEFAULT_ROOT,
        metavar="DIR",
        help="where the driver, firmware and (without ASCEND_TOOLKIT_HOME) the toolkit are installed",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows and facts as JSON here")
    parser.add_argument(
        "--skip_import_check",
        "--skip-import-check",
        action="store_true",
        help="leave out the rows that run programs (npu-smi, import torch in a subprocess)",
    )
    return parser


def _check_json(path: str | None) -> None:
    if path is None:
        return
    if common is not None:
        common.check_outputs({"--json": path})
    elif os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"--json {path}: not a file in an existing folder")


def _write_json(path: str, data: dict) -> None:
    if reports is not None:
        reports.write_json_atomic(path, data)
        return
    try:  # the one atomic writer: standard library only, so it is here on a bare Python too
        atomic.write(path, json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"--json {path}: {exc.strerror or exc}") from None


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_json(args.json)
    env = dict(os.environ)
    facts = preflight.stack_facts(env, args.ascend_root)
    rows = preflight.stack_rows(facts, args.ascend_root)
    if not args.skip_import_check:
        rows.append(preflight.npu_smi())
        rows.append(preflight.probe_import_torch(env, torch_installed=facts.get("torch") is not None))
    code, reason = preflight.verdict(rows)
    print(f"Ascend stack preflight (pairings: {preflight.PAIRING_SOURCE})")
    print(preflight.format_rows(rows))
    print(f"result: exit {code}: {reason}")
    if args.json:
        _write_json(args.json, preflight.as_dict(rows, code, reason, facts))
    return code


def main(argv=None) -> int:
    if common is not None:
        return common.run_main(_main, argv, usage_codes=True)
    try:  # common.run_main's contract, for a bare Python
        return _main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
