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

import os
import sys

# This process must not load torch_npu (the subprocess row does, as every script would): torch's autoload is off while
# common imports torch, and the caller's setting is back right after (torch reads it only during its import).
_CALLER_AUTOLOAD = os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD")
os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
try:
    import common
    from mobilevit_npu import preflight, reports
finally:
    if _CALLER_AUTOLOAD is None:
        del os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"]
    else:
        os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = _CALLER_AUTOLOAD


def build_parser():
    parser = common.script_parser("preflight.py", __doc__)
    parser.add_argument(
        "--ascend_root",
        "--ascend-root",
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


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.check_outputs({"--json": args.json})
    env = dict(os.environ)
    facts = preflight.stack_facts(env, args.ascend_root)
    rows = preflight.check(facts, args.ascend_root)
    if not args.skip_import_check:
        rows.append(preflight.npu_smi())
        rows.append(preflight.probe_import_torch(env))
    code, reason = preflight.verdict(rows)
    print(f"Ascend stack preflight (pairings: {preflight.PAIRING_SOURCE})")
    print(preflight.format_table(rows))
    print(f"result: exit {code}: {reason}")
    if args.json:
        reports.write_json_atomic(args.json, preflight.as_dict(rows, code, reason, facts))
    return code


def main(argv=None) -> int:
    return common.run_main(_main, argv, usage_codes=True)


if __name__ == "__main__":
    sys.exit(main())
