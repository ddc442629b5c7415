"""The device seam: every backend call (npu, cuda, mps, cpu) and the environment every report carries.

Nothing here touches an accelerator at import time: torch_npu is imported only when an NPU is asked for or
auto-detected. `resolve_device` fails loudly (UserError) when the device asked for is absent; scripts never write
torch.cuda.* or torch.npu.* themselves.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import platform
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mobilevit_npu.errors import UserError, first_line

if TYPE_CHECKING:
    from mobilevit_npu import schema

logger = logging.getLogger("mobilevit_npu.devices")


@dataclass(frozen=True)
class Device:
    """A resolved device. `type` is npu | cuda | mps | cpu; `index` is None for cpu and mps."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    @property
    def torch(self) -> torch.device:
        return torch.device(str(self))


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|npu|mps)(?::(\d+))?$")


def _import_torch_npu():
    """Import torch_npu, or return None when it is not installed. Import failures (no CANN) become a UserError."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:  # torch_npu raises ImportError/RuntimeError/OSError when CANN is missing or broken
        raise UserError(
            f"torch_npu is installed but failed to import ({type(exc).__name__}: {first_line(exc)}). Source CANN first "
            "(source /usr/local/Ascend/ascend-toolkit/set_env.sh); for a CPU or CUDA run on this host set "
            "TORCH_DEVICE_BACKEND_AUTOLOAD=0 and pick --device cpu or cuda"
        ) from exc


def npu_api():
    """torch_npu.npu, the module that torch_npu also exposes as torch.npu."""
    torch_npu = sys.modules.get("torch_npu") or _import_torch_npu()
    if torch_npu is None:
        raise UserError("torch_npu is not installed (pip install torch-npu matching your torch and CANN)")
    return torch_npu.npu


def _npu_available() -> bool:
    try:
        torch_npu = _import_torch_npu()
    except UserError as exc:
        logger.warning("ignoring torch_npu during auto-detection: %s", exc)
        return False
    return torch_npu is not None and bool(torch_npu.npu.is_available())


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _setup_npu(index: int, jit_compile: bool) -> None:
    """Import torch_npu, apply transfer_to_npu, set the compile mode and the current device, in that order."""
    api = npu_api()
    if not api.is_available() or api.device_count() == 0:
        raise UserError("no NPU device is visible to torch_npu (check npu-smi info and ASCEND_RT_VISIBLE_DEVICES)")
    if index >= api.device_count():
        raise UserError(f"npu:{index} asked for, but only {api.device_count()} NPU device(s) are visible")
    # Importing this module is what applies it: it patches torch.cuda/.to('cuda') etc. onto the NPU. It must happen
    # before the model is built, and only on the NPU path.
    apply_transfer_to_npu()
    api.set_compile_mode(jit_compile=jit_compile)
    api.set_device(index)
    pairing = torch_npu_pairing()
    if pairing["mismatch"]:
        logger.warning("!!! %s", pairing["mismatch"])


# What transfer_to_npu may replace (torch_npu contrib/transfer_to_npu.py _init: 2.5.1 l.307-367, 2.13.0 l.468-606):
# each is compared before and after its import, so the report lists what it did replace here.
TRANSFER_WATCH = (
    "torch.cuda.is_available",
    "torch.cuda.synchronize",
    "torch.Tensor.cuda",
    "torch.Tensor.to",
    "torch.nn.Module.cuda",
    "torch.nn.Module.to",
    "torch.zeros",
    "torch.randn",
    "torch.autocast",
    "torch.amp.autocast_mode.autocast.__init__",
    "torch.jit.script",
    "torch.jit.script_method",
    "torch.distributed.init_process_group",
    "torch.distributed.is_nccl_available",
    "torch.Generator",
    "torch.utils._triton.has_triton",
)
_transfer_to_npu: dict[str, Any] | None = None


def _attribute_at(dotted: str) -> Any:
    obj: Any = sys.modules.get("torch")
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part, None) if obj is not None else None
    return obj


def apply_transfer_to_npu() -> dict[str, Any]:
    """Import torch_npu.contrib.transfer_to_npu (the import applies it) with Python's warning filters saved and put
    back: it calls warnings.filterwarnings("once") for the whole process (l.21 in 2.5.1, l.27 in 2.13.0/2.14.0). What
    it replaced, and the filters it added, are kept for the report (`transfer_to_npu_effects`)."""
    global _transfer_to_npu
    if _transfer_to_npu is not None and "torch_npu.contrib.transfer_to_npu" in sys.modules:
        return _transfer_to_npu
    before = {name: _attribute_at(name) for name in TRANSFER_WATCH}
    filters_before = list(warnings.filters)
    with warnings.catch_warnings():
        importlib.import_module("torch_npu.contrib.transfer_to_npu")
        added = [f for f in warnings.filters if f not in filters_before]
    _transfer_to_npu = {
        "patched": [name for name in TRANSFER_WATCH if _attribute_at(name) is not before[name]],
        "warnings_filters_restored": [
            f"{f[0]}" + (f" ({f[2].__name__})" if f[2] is not Warning else "") for f in added
        ],
    }
    return _transfer_to_npu


def transfer_to_npu_effects() -> dict[str, Any] | None:
    """What transfer_to_npu replaced in this process (None when it was not applied here)."""
    return _transfer_to_npu if "torch_npu.contrib.transfer_to_npu" in sys.modules else None


def detect_device_type() -> str:
    """What --device auto means here: npu, else cuda, else mps, else cpu (nothing is configured yet)."""
    if _npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    if _mps_available():
        return "mps"
    return "cpu"


def resolve_device(spec: str = "auto", jit_compile: bool = False, default_index: int = 0) -> Device:
    """Turn a --device string into a Device, failing loudly (UserError) when the device is absent. An npu or cuda spec
    without an index takes `default_index` (LOCAL_RANK under torchrun)."""
    match = _DEVICE_RE.match(spec.strip().lower())
    if not match:
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda[:N], npu[:N] or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if index is not None:
            raise UserError("auto takes no index; name the device, e.g. npu:1 or cuda:1")
        kind = detect_device_type()
    if kind in ("cpu", "mps") and index not in (None, "0"):
        raise UserError(f"{kind} takes no device index")
    idx = int(index) if index is not None else default_index
    if kind == "npu":
        _setup_npu(idx, jit_compile)
        return Device("npu", idx)
    if kind == "cuda":
        if "torch_npu.contrib.transfer_to_npu" in sys.modules:  # it repointed torch.cuda at torch.npu
            raise UserError(
                "torch_npu's transfer_to_npu is applied in this process, so torch.cuda is the NPU: use --device npu"
            )
        if not torch.cuda.is_available():
            raise UserError("no CUDA device: torch.cuda.is_available() is False (CPU build of torch or no driver)")
        if idx >= torch.cuda.device_count():
            raise UserError(f"cuda:{idx} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(idx)
        return Device("cuda", idx)
    if kind == "mps":
        if not _mps_available():
            raise UserError("no MPS device: torch.backends.mps.is_available() is False")
        return Device("mps")
    return Device("cpu")


def backend_api(device: Device):
    """The torch module for the device's backend (torch.cuda, torch_npu.npu, torch.mps), None for cpu."""
    if device.type == "npu":
        return npu_api()
    if device.type == "cuda":
        return torch.cuda
    if device.type == "mps":
        return torch.mps
    return None


def synchronize(device: Device) -> None:
    """Wait for all queued work on the device. Every clock read in this project is preceded by this call."""
    api = backend_api(device)
    if api is None:
        return
    if device.type == "mps":
        api.synchronize()
    else:
        api.synchronize(device.index)


def reset_peak_memory(device: Device) -> None:
    api = backend_api(device)
    if api is not None and hasattr(api, "reset_peak_memory_stats"):
        api.reset_peak_memory_stats(device.index)


def peak_memory_bytes(device: Device) -> int | None:
    """The device allocator's peak (npu, cuda), the current allocation on mps, the process's peak RSS on cpu."""
    if device.type in ("npu", "cuda"):
        return int(backend_api(device).max_memory_allocated(device.index))
    if device.type == "mps":
        return int(torch.mps.current_allocated_memory())
    return process_peak_rss_bytes()


def process_peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def device_name(device: Device) -> str:
    if device.type in ("npu", "cuda"):
        return str(backend_api(device).get_device_name(device.index))
    if device.type == "mps":
        return "Apple MPS"
    return cpu_name()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cann_version() -> str | None:
    """The CANN version (never imports torch_npu); cann_version_source() says where it came from."""
    return cann_version_source()[0]


def cann_version_source() -> tuple[str | None, str | None]:
    """(CANN version, where it was read): torch_npu.npu.utils.get_cann_version(module="CANN") when torch_npu is loaded
    (it answers "" where CANN lacks aclsysGetCANNVersion, before 8.1.RC1); else torch.version.cann, which torch_npu
    sets from the toolkit's ascend_*_install.info (utils/collect_env.py; "not known" when it found none); else that
    file read here (preflight) where torch_npu is installed."""
    torch_npu = sys.modules.get("torch_npu")
    if torch_npu is not None:
        try:
            version = torch_npu.npu.utils.get_cann_version(module="CANN")
        except Exception:  # an older torch_npu without it, or CANN refusing the query
            version = None
        if version:
            return str(version), "torch_npu.npu.utils.get_cann_version"
        version = getattr(torch.version, "cann", None)
        if version and str(version) != "not known":
            return str(version), "torch.version.cann"
    elif not (package_version("torch_npu") or package_version("torch-npu")):
        return None, None
    from mobilevit_npu import preflight

    home, _ = preflight.toolkit_home(dict(os.environ), preflight.DEFAULT_ROOT)
    found = preflight.cann_facts(home)
    return (found["version"], found["read_from"]) if found else (None, None)


def torch_npu_pairing() -> dict[str, Any]:
    """torch_npu X.Y.Z[.postN] is built for exactly torch X.Y.Z: the two versions and, when they differ, the warning
    (None when they pair or torch_npu is absent)."""
    torch_npu = sys.modules.get("torch_npu")
    npu_version = getattr(torch_npu, "__version__", None) if torch_npu else package_version("torch_npu")
    mismatch = None
    if npu_version:
        from mobilevit_npu import preflight

        if not preflight.pairs_with_torch(str(npu_version), torch.__version__):
            theirs = preflight._release(str(npu_version))
            mismatch = (
                f"torch_npu {npu_version} is built for torch {theirs}, but torch {torch.__version__} is "
                f"installed: install the matching pair (pip install torch=={theirs} or the torch_npu release "
                "for this torch)"
            )
    return {"torch": torch.__version__, "torch_npu": npu_version, "mismatch": mismatch}


def fp32_precision(device: Device) -> dict[str, Any]:
    """The reduced-precision float32 modes in force on the device: on npu HF32 for convolutions (torch_npu's default:
    on) and matmuls (off); on cuda TF32 for cuDNN convolutions (torch's default: on) and matmuls (off); elsewhere
    torch's float32 matmul precision."""
    if device.type == "npu":
        api = npu_api()
        try:
            return {"conv_hf32": bool(api.conv.allow_hf32), "matmul_hf32": bool(api.matmul.allow_hf32)}
        except AttributeError:  # a torch_npu without the HF32 switches: unknown, not guessed
            return {"conv_hf32": None, "matmul_hf32": None}
    if device.type == "cuda":
        return {
            "conv_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        }
    return {"float32_matmul_precision": torch.get_float32_matmul_precision()}


def set_fp32_reduced_precision(device: Device, allow: bool) -> dict[str, Any]:
    """Allow (or forbid) HF32 on npu / TF32 on cuda for both convolutions and matmuls; the state now in force."""
    if device.type == "npu":
        api = npu_api()
        api.conv.allow_hf32 = allow
        api.matmul.allow_hf32 = allow
    elif device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = allow
        torch.backends.cuda.matmul.allow_tf32 = allow
    return fp32_precision(device)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: Device, allocator: dict[str, Any] | None = None) -> schema.Environment:
    """What every report carries about where it ran: device, versions, threads, allocator, load (schema.Environment)."""
    import transformers

    from mobilevit_npu import malloc, schema

    torch_npu = sys.modules.get("torch_npu")
    ascend = (
        device.type == "npu" or torch_npu is not None or package_version("torch_npu") or package_version("torch-npu")
    )
    return schema.Environment(
        device=str(device),
        device_name=device_name(device),
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        torch_npu=getattr(torch_npu, "__version__", None) if torch_npu else package_version("torch_npu"),
        torch_npu_mismatch=torch_npu_pairing()["mismatch"],
        cann=cann_version(),
        fp32_precision=fp32_precision(device),
        cuda=torch.version.cuda if device.type == "cuda" else None,
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        mkldnn=bool(torch.backends.mkldnn.is_available()),
        cpu_bf16=cpu_bf16_supported() if device.type == "cpu" else None,
        allocator=allocator or malloc.current(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        pillow=package_version("pillow"),  # decoding and resizing are part of what a port run checks
        ascend=ascend_environment() if ascend else None,
    )


def ascend_environment() -> dict[str, Any]:
    """environment.ascend: the stack as preflight reads it (files and metadata, no subprocess), the CANN version in
    force and where it came from, and what transfer_to_npu replaced in this process."""
    from mobilevit_npu import preflight

    facts = preflight.stack_facts()
    version, source = cann_version_source()
    facts["cann_in_use"] = {"version": version, "read_from": source}
    facts["transfer_to_npu"] = transfer_to_npu_effects()
    return facts


def cpu_bf16_supported() -> bool:
    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
