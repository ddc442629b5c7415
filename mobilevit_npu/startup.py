"""Imported first by every script, before anything imports torch: it imports torch itself, so that a torch_npu that
fails to autoload becomes one line and exit 2 instead of a traceback.

torch >= 2.5 loads torch_npu through its `torch.backends` entry point while `import torch` runs; on an Ascend host
where CANN's set_env.sh was not sourced that raises "Failed to load the backend extension: torch_npu" before any
project code could catch it, even for --device cpu. A CUDA build of torch beside torch_npu fails the same way
(torch_npu refuses a second accelerator, torch_npu/__init__.py in 2.5.1 and 2.13.0), and gets its own advice.

One more thing must happen before that import: `--fail_on_cpu_fallback` on the command line sets
TORCH_NPU_FALLBACK_CPU_DISABLE=1, torch_npu's switch that makes a CPU fallback an error naming the operator (read by
torch-npu 2.13.0 and 2.14.0, not 2.5.1; Ascend's guide: set it before the process imports torch_npu). main(argv) calls
mobilevit_npu.npu.arm_fallback_error as well, for callers that pass argv themselves. Nothing else happens here.
"""

from __future__ import annotations

import os
import sys

FAIL_FLAGS = ("--fail_on_cpu_fallback", "--fail-on-cpu-fallback")
FALLBACK_SWITCH = "TORCH_NPU_FALLBACK_CPU_DISABLE"

AUTOLOAD_HINT = (
    "torch could not load its torch_npu extension at start-up{cause}. Either source CANN's environment first "
    "(source /usr/local/Ascend/ascend-toolkit/set_env.sh), or, for a CPU or CUDA run on this host, turn the autoload "
    "off: TORCH_DEVICE_BACKEND_AUTOLOAD=0"
)
CUDA_TORCH_HINT = (
    'torch {torch} is a CUDA build, and torch_npu {npu} refuses to load beside it (torch_npu: "Two accelerators '
    'cannot be used at the same time"). For the NPU install the CPU build it pairs with: pip install torch=={pair} '
    "--index-url https://download.pytorch.org/whl/cpu; for CUDA on this host set TORCH_DEVICE_BACKEND_AUTOLOAD=0"
)


def arm_from_argv(argv: list[str] | None = None) -> bool:
    """--fail_on_cpu_fallback (either spelling) in `argv` (sys.argv): set TORCH_NPU_FALLBACK_CPU_DISABLE=1 before torch
    loads torch_npu; True when it was set."""
    args = sys.argv[1:] if argv is None else argv
    if any(arg in FAIL_FLAGS for arg in args):
        os.environ[FALLBACK_SWITCH] = "1"
        return True
    return False


def _cuda_torch_hint(cause: BaseException | None) -> str | None:
    """The advice for a CUDA build of torch beside torch_npu, or None when this failure is not that."""
    from importlib import metadata

    if "Two accelerators cannot be used at the same time" not in str(cause or ""):
        return None
    version = sys.modules.get("torch.version")  # imported early by torch/__init__.py, before the autoload
    try:
        npu = metadata.version("torch_npu")
    except metadata.PackageNotFoundError:
        npu = "?"
    pair = ".".join(npu.split("+")[0].split(".")[:3])
    return CUDA_TORCH_HINT.format(torch=getattr(version, "__version__", "?"), npu=npu, pair=pair)


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
    return _cuda_torch_hint(cause) or AUTOLOAD_HINT.format(cause=detail)


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


arm_from_argv()
import_torch()
