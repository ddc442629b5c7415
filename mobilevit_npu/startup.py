"""Imported first by every script, before anything imports torch: it imports torch itself, so that a torch_npu that
fails to autoload becomes one line and exit 2 instead of a traceback.

torch >= 2.5 loads torch_npu through its `torch.backends` entry point while `import torch` runs; on an Ascend host
where CANN's set_env.sh was not sourced that raises "Failed to load the backend extension: torch_npu" before any
project code could catch it, even for --device cpu. Nothing else happens here; the module has no other use.
"""

from __future__ import annotations

import sys

AUTOLOAD_HINT = (
    "torch could not load its torch_npu extension at start-up{cause}. Either source CANN's environment first "
    "(source /usr/local/Ascend/ascend-toolkit/set_env.sh), or, for a CPU or CUDA run on this host, turn the autoload "
    "off: TORCH_DEVICE_BACKEND_AUTOLOAD=0"
)


def autoload_failure(exc: BaseException) -> str | None:
    """The one-line message for a failed torch_npu autoload, or None when `exc` is something else."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "Failed to load the backend extension" not in text:
        return None
    if "torch_npu" not in text:
        return None
    cause = exc.__cause__
    detail = ""
    if cause is not None:
        first = (str(cause).strip().splitlines() or [""])[0][:200]
        detail = f" ({type(cause).__name__}: {first})" if first else f" ({type(cause).__name__})"
    return AUTOLOAD_HINT.format(cause=detail)


def import_torch():
    """`import torch`; a failed torch_npu autoload prints the one line and exits 2."""
    try:
        import torch
    except RuntimeError as exc:
        message = autoload_failure(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    return torch


import_torch()
