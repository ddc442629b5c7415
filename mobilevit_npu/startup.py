"""Imported first by every script, before anything imports torch: it imports torch itself, so that a torch_npu that
fails to autoload becomes one line and exit 2 instead of a traceback.

torch >= 2.5 loads torch_npu through its `torch.backends` entry point while `import torch` runs; on an Ascend host
where CANN's set_env.sh was not sourced that raises "Failed to load the backend extension: torch_npu" before any
project code could catch it, even for --device cpu. A CUDA build of torch beside torch_npu fails the same way
(torch_npu refuses a second accelerator, torch_npu/__init__.py in 2.5.1 and 2.13.0), and gets its own advice.

One more thing must happen before that import: `--fail_on_cpu_fallback` on the command line sets
TORCH_NPU_FALLBACK_CPU_DISABLE=1, torch_npu's switch that makes a CPU fallback an error naming the operator (read by
torch-npu 2.13.0 and 2.14.0, not 2.5.1; Ascend's guide: set it before the process imports torch_npu). main(argv) calls
mobilevit_npu.npu.arm_fallback_error as well, for callers that pass argv themselves.

And one thing after it: where torch did not load torch_npu (TORCH_DEVICE_BACKEND_AUTOLOAD=0, or a torch without the
autoload) and torch_npu is installed, the first `import torch_npu` comes later, from transformers'
is_torch_npu_available (an unguarded import: transformers/utils/import_utils.py:390-407 in 5.x) or from
`--device npu`. If that import fails, its error is one line too (a UserError naming the fix, `TorchNpuImportError`),
through an import hook for torch_npu alone (`guard_torch_npu_import`).
"""

from __future__ import annotations

import os
import sys

from mobilevit_npu.errors import UserError

FAIL_FLAGS = ("--fail_on_cpu_fallback", "--fail-on-cpu-fallback")
FALLBACK_SWITCH = "TORCH_NPU_FALLBACK_CPU_DISABLE"

AUTOLOAD_HINT = (
    "torch could not load its torch_npu extension at start-up{cause}. Either source CANN's environment first "
    "({set_env}), or, for a CPU or CUDA run on this host, turn the autoload off: TORCH_DEVICE_BACKEND_AUTOLOAD=0"
)
IMPORT_HINT = (
    "torch_npu is installed but fails to import{cause}{by}. Source CANN's environment first ({set_env}); for a CPU or "
    "CUDA run on this host, uninstall torch-npu or run it in an environment without it"
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


def _set_env() -> str:
    """The command that sources CANN's environment here (CANN 8.5's <root>/cann/set_env.sh, else the toolkit's)."""
    from mobilevit_npu.preflight import set_env_hint

    return set_env_hint()


def _first_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f" ({type(exc).__name__}: {first})" if first else f" ({type(exc).__name__})"


def autoload_failure(exc: BaseException) -> str | None:
    """The one-line message for a failed torch_npu autoload, or None when `exc` is something else."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "Failed to load the backend extension" not in text:
        return None
    if "torch_npu" not in text:
        return None
    cause = exc.__cause__
    detail = _first_line(cause) if cause is not None else ""
    return _cuda_torch_hint(cause) or AUTOLOAD_HINT.format(cause=detail, set_env=_set_env())


def _importer() -> str:
    """Who is importing torch_npu (" (imported by transformers)"), read from the stack; "" when it is not known."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "") or ""
        top = name.split(".")[0]
        if top and top not in ("importlib", "torch_npu", "_frozen_importlib", "_frozen_importlib_external"):
            if name != __name__:
                return f" (imported by {name})"
        frame = frame.f_back
    return ""


class TorchNpuImportError(UserError, ImportError):
    """torch_npu failed at its import, said in one line with the fix: a UserError, so a script prints it as "error: ..."
    (exit 2), and an ImportError, so code that guards the import (accelerate, the device seam) treats it as absent."""


class _GuardedLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        try:
            self.loader.exec_module(module)
        except Exception as exc:
            if isinstance(exc, TorchNpuImportError):
                raise
            by = _importer()
            message = _cuda_torch_hint(exc) or IMPORT_HINT.format(cause=_first_line(exc), by=by, set_env=_set_env())
            if by and not by.startswith(" (imported by mobilevit_npu"):
                # a library's import (transformers' is_torch_npu_available, at its import of sdpa_attention) sits
                # under its lazy-module wrapper, which turns any exception into a RuntimeError traceback: one line
                # and exit 2 here, as a failed autoload does
                print(f"error: {message}", file=sys.stderr)
                raise SystemExit(2) from exc
            raise TorchNpuImportError(message) from exc

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _TorchNpuGuard:
    """A meta path finder for `torch_npu` alone: the real spec, with a loader whose failure is a TorchNpuImportError."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "torch_npu":
            return None
        import importlib.machinery

        for finder in sys.meta_path:
            if isinstance(finder, _TorchNpuGuard) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
                    spec.loader = _GuardedLoader(spec.loader)
                return spec
        return None


def guard_torch_npu_import() -> bool:
    """Install the import hook when torch_npu is installed and not loaded yet; True when installed."""
    import importlib.util

    if "torch_npu" in sys.modules or any(isinstance(f, _TorchNpuGuard) for f in sys.meta_path):
        return False
    try:
        if importlib.util.find_spec("torch_npu") is None:
            return False
    except (ImportError, ValueError):
        return False
    sys.meta_path.insert(0, _TorchNpuGuard())
    return True


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
guard_torch_npu_import()
