"""A stand-in torch_npu package that behaves like the real one where it matters to this project (read from the real
torch-npu 2.5.1 / 2.13.0 sources, cited per behaviour below and in docs/npu.md):

- `import torch_npu` registers torch.npu (the npu module, with the real functions' signatures) and the lazy `torchair`
  placeholder (torch_npu.dynamo._LazyTorchair): `import torchair` always succeeds; a broken torchair raises
  _TorchairImportError (an Exception, not an ImportError) at the first attribute use;
- importing torch_npu.contrib.transfer_to_npu repoints torch.cuda at torch.npu (torch.cuda.is_available() becomes
  True) and disables torch.jit.script;
- torch.npu.conv.allow_hf32 reads True until set, torch.npu.matmul.allow_hf32 False;
- an operator named in `fallback_ops` falls back to the CPU on every forward of a model moved to npu, and the stand-in
  says so as torch_npu does: once per operator per process, as one line written to file descriptor 2 from native code
  (libc's write through ctypes), in c10's log format, never through Python's `warnings` (see `emit_c10_warning`);
  silenced by TORCH_NPU_DISABLED_WARNING=1 and on ranks other than 0/-1; from 2.13.0 on,
  TORCH_NPU_FALLBACK_CPU_DISABLE=1 turns the fallback into torch_npu's RuntimeError naming the operator;
- `kernel_fallbacks` (KERNEL_WORDINGS keys) are op-plugin's own CPU kernels ("Warning: kernel [sinc] is not supported by
  NPU currently. ..."), each said once per process on its real route: TORCH_NPU_WARN_ONCE to fd 2 as above,
  TORCH_WARN_ONCE as a Python UserWarning "(Triggered internally at ...)", whatever the switches; c10's
  TORCH_CPP_LOG_LEVEL=ERROR/FATAL silences the fd 2 lines (the dispatcher's too);
- it exports npu_fusion_attention, which transformers 5.x imports from it once is_torch_npu_available() is True;
  with `import_fails`, `import torch_npu` raises as without CANN; torchair 2.13+'s get_npu_backend calls
  warnings.filterwarnings("once", category=UserWarning) for the whole process, as the real one does;
- torch_npu/lib/libtorch_npu.so holds, as NUL-terminated strings, the names of the environment switches the imitated
  version reads (the project looks for them there, as in the real library);
- torchair's CompilerConfig.mode accepts only the modes of the torchair being imitated (`torchair_modes`); its
  backend (the graph runs as traced) refuses a graph holding scaled_dot_product_attention with
  `reject_flash_attention`, as torchair 7.0.0's converter for the flash SDPA raises NotImplementedError;
- with `autoload_fails`, a torch_npu-X.dist-info declaring the `torch.backends` entry point whose _autoload raises, as
  on a host where CANN's set_env.sh was not sourced (only subprocesses see it: `import torch` reads entry points);
  with `autoload`, the same entry point succeeding (it records TORCH_NPU_FALLBACK_CPU_DISABLE as it found it).

Device storage is the CPU. The real torch_npu renames torch's PrivateUse1 backend to "npu"; the stand-in cannot: the
rename cannot be undone, and afterwards torch.accelerator (and so every torch.compile) fails for the rest of the test
process ("Device 'npu' does not have a corresponding module registered"). Instead the `npu_standin` fixture points
Device("npu", N).torch at torch.device("cpu", 0), which the stand-in recognises as the NPU in Tensor.to, Module.to,
torch.zeros and torch.randn; torch.autocast("npu") runs the CPU's autocast. A model's first move to the NPU is logged
and gets the fallback hook. Every step is appended to torch_npu.CALLS, in order. The fixture installs the stand-in in
this process and undoes every patch afterwards.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import npu_profiler_standin
import pytest
import torch

FALLBACK_TEXT = (
    "CAUTION: The operator '{op}' is not currently supported on the NPU backend and will fall back to run on the CPU. "
    "This may have performance implications."
)
# torch_npu 2.5.1 @9e105eaa torch_npu/csrc/aten/VariableFallbackKernel.cpp:250-254 (TORCH_NPU_WARN in npu_cpu_fallback);
# the same text in 2.13.0 and 2.14.0 (strings in libtorch_npu.so).
# The wordings of 2.13.0 and 2.14.0 beyond it (strings in their libtorch_npu.so; op-plugin @517f2e7d
# op_plugin/ops/opapi/TransfromBiasRescaleQKVKernelNpuOpApi.cpp:23-26, LogitKernelNpuOpApi.cpp:17-20,
# MaskedSoftMaxKernelNpuOpApi.cpp:57-61; Ascend/pytorch master SparseCsrReductionFallbackKernelNpu.cpp:22-26).
WORDINGS = {
    "dispatcher": FALLBACK_TEXT.format(op="aten::_fused_adam_"),
    "op-plugin": "CAUTION: The operator aten::_transform_bias_rescale_qkv is currently not supported on the NPU "
    "backend. Now this operator will fallback to run on the CPU and may have performance implications. Please try to "
    "update your CANN version.",
    "op-plugin, several operators": "CAUTION: The operator aten::logit, aten::logit_ and aten::logit.out is currently "
    "not supported on the NPU backend. Now this operator will fallback to run on the CPU and may have performance "
    "implications.",
    "op-plugin, conditions": "CAUTION: The operator aten::_masked_softmax need to be met the following conditions to "
    "run on the NPU backend: 1. dim = None/dim = -1/dim = input.dim()-1; 2. mask_type = 2; 3. input.dim() = 4. Now "
    "this operator will fallback to run on the CPU and may have performance implications. Please check your params.",
    "fallback switch": "CPU fallback is allowed because TORCH_NPU_FALLBACK_CPU_DISABLE=0. Since the NPU interface does "
    "not support operator 'aten::_sparse_csr_sum.dim_dtype', the operator will fall back to CPU.",
}
# op-plugin's own CPU kernels (16 strings in each of the 2.5.1, 2.13.0 and 2.14.0 libtorch_npu.so), each on its real
# route: "fd2" is TORCH_NPU_WARN_ONCE (torch_npu's private handler: stderr, silenced like the dispatcher's line),
# "python" is c10's TORCH_WARN_ONCE, which torch hands to Python as a UserWarning "... (Triggered internally at
# FILE:LINE.)" when the operator was called from Python (torch's PyWarningHandler). Ascend/op-plugin @517f2e7d,
# op_plugin/ops/.
KERNEL_WORDINGS = {
    "complex": ("Warning: kernel [complex] is not supported by NPU currently. Now this kernel is running on CPU.",
                "fd2", "aclops/ComplexKernelNpu.cpp:21"),
    "gcd.out": ("Warning: kernel [gcd.out] is not supported by NPU currently.Now this kernel is running on CPU.",
                "fd2", "aclops/GcdKernelNpu.cpp:24"),
    "isneginf": ("Warning: kernel [isneginf] is not supported by NPU currently. Now this kernel is running on CPU.",
                 "fd2", "aclops/IsNegInfKernelNpu.cpp:25"),
    "nanmedian": ("Warning: kernel [nanmedian] is not supported by NPU currently. Now this kernel is running on CPU.",
                  "fd2", "aclops/MedianKernelNpu.cpp:146"),
    "sinc": ("Warning: kernel [sinc] is not supported by NPU currently. Now this kernel is running on CPU.",
             "fd2", "aclops/SincKernelNpu.cpp:22"),
    "polar": ("Warning: kernel [polar] is not supported by NPU currently. Now this kernel is running on CPU.",
              "python", "aclops/PolarKernelNpu.cpp:34"),
    "nanmedian.dim": ("Warning: kernel [nanmedian.dim] is not supported by NPU currently. Now this kernel is running "
                      "on CPU.", "python", "aclops/MedianKernelNpu.cpp:155"),
    "adaptive_max_pool3d.out": ("adaptive_max_pool3d.out is not supported by NPU currently. Now this kernel is running "
                                "on CPU.", "python", "opapi/AdaptiveMaxPool3dKernelNpuOpApi.cpp:39"),
}  # fmt: skip
# Every op-plugin string of the second family, as in each wheel's libtorch_npu.so (2.5.1, 2.13.0, 2.14.0: 16 each;
# tests/test_npu_contract.py checks this list against them), with the operator each names (as aten::NAME).
SECOND_FAMILY = {
    "Warning: kernel [polar.out] is not supported by NPU currently. Now this kernel is running on CPU.": "polar.out",
    "adaptive_max_pool3d_backward is not supported by NPU currently. Now this kernel is running on CPU.": (
        "adaptive_max_pool3d_backward"
    ),
    "Warning: kernel [isneginf] is not supported by NPU currently. Now this kernel is running on CPU.": "isneginf",
    "adaptive_max_pool3d is not supported by NPU currently. Now this kernel is running on CPU.": "adaptive_max_pool3d",
    "Warning: kernel [nanmedian.dim] is not supported by NPU currently. Now this kernel is running on CPU.": (
        "nanmedian.dim"
    ),
    "Warning: kernel [sinc] is not supported by NPU currently. Now this kernel is running on CPU.": "sinc",
    "Warning: kernel [polar] is not supported by NPU currently. Now this kernel is running on CPU.": "polar",
    "Warning: kernel [isposinf.out] is not supported by NPU currently. Now this kernel is running on CPU.": (
        "isposinf.out"
    ),
    "adaptive_max_pool3d_backward.grad_input is not supported by NPU currently. Now this kernel is running on CPU.": (
        "adaptive_max_pool3d_backward.grad_input"
    ),
    "Warning: kernel [gcd.out] is not supported by NPU currently.Now this kernel is running on CPU.": "gcd.out",
    "adaptive_max_pool3d.out is not supported by NPU currently. Now this kernel is running on CPU.": (
        "adaptive_max_pool3d.out"
    ),
    "Warning: kernel [isposinf] is not supported by NPU currently. Now this kernel is running on CPU.": "isposinf",
    "Warning: kernel [isneginf.out] is not supported by NPU currently. Now this kernel is running on CPU.": (
        "isneginf.out"
    ),
    "Warning: kernel [complex] is not supported by NPU currently. Now this kernel is running on CPU.": "complex",
    "Warning: kernel [complex_out] is not supported by NPU currently. Now this kernel is running on CPU.": (
        "complex_out"
    ),
    "Warning: kernel [nanmedian] is not supported by NPU currently. Now this kernel is running on CPU.": "nanmedian",
}
WORDING_OPERATORS = {
    "dispatcher": ["aten::_fused_adam_"],
    "op-plugin": ["aten::_transform_bias_rescale_qkv"],
    "op-plugin, several operators": ["aten::logit", "aten::logit_", "aten::logit.out"],
    "op-plugin, conditions": ["aten::_masked_softmax"],
    "fallback switch": ["aten::_sparse_csr_sum.dim_dtype"],
}


def c10_warning_line(
    text: str, function: str = "npu_cpu_fallback", where: str = "VariableFallbackKernel.cpp:254"
) -> bytes:
    """One warning as c10's default WarningHandler logs it: "Warning: <msg> (function <fn>)" (torch
    c10/util/Exception.cpp, WarningHandler::process) behind MessageLogger's prefix
    "[W<mmdd> hh:mm:ss.<ns> <file>:<line>] " (c10/util/Logging.cpp), "[rank<N>]:" in front when torch.distributed set a
    global rank; one line."""
    import time

    now = time.time()
    stamp = time.strftime("%m%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e9):09d}"
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}]:" if rank is not None else ""
    return f"{prefix}[W{stamp} {where}] Warning: {text} (function {function})\n".encode()


def native_write(data: bytes, fd: int = 2) -> None:
    """write(2) from libc, as C++'s std::cerr ends up doing: below Python's sys.stderr and its warnings."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
    view = bytes(data)
    while view:
        written = libc.write(fd, view, len(view))
        if written < 0:
            raise OSError(ctypes.get_errno(), "write(2) failed")
        view = view[written:]


def emit_c10_warning(text: str, **where) -> None:
    native_write(c10_warning_line(text, **where))


_INIT = """
import json, os, sys, types, warnings
from pathlib import Path

import torch

OPTIONS = json.loads((Path(__file__).parent / "standin.json").read_text())
__version__ = OPTIONS["version"]
CALLS = ["import torch_npu"]
if OPTIONS["import_fails"]:  # torch_npu/__init__.py's `import torch_npu._C` without CANN's libraries
    raise ImportError("libhccl.so: cannot open shared object file: No such file or directory. "
                      "Please run 'source set_env.sh' in the CANN installation path.")
PATCHES = []  # (owner, name, previous value): the fixture puts them back
_MISSING = object()
FALLBACK_TEXT = OPTIONS["fallback_text"]


def _patch(owner, name, value):
    old = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name, _MISSING)
    PATCHES.append((owner, name, old))
    setattr(owner, name, value)


AUTOLOAD_SWITCH = None  # TORCH_NPU_FALLBACK_CPU_DISABLE as torch's autoload found it


def _autoload():
    global AUTOLOAD_SWITCH
    AUTOLOAD_SWITCH = os.environ.get("TORCH_NPU_FALLBACK_CPU_DISABLE", "unset")
    if OPTIONS["autoload_fails"]:
        raise ImportError("libhccl.so: cannot open shared object file: No such file or directory. "
                          "Please run 'source set_env.sh' in the CANN installation path.")


# --- torch.npu ----------------------------------------------------------------------------------------------------
_options = {}


class _allowHF32Matmul:
    def __setattr__(cls, name, value):
        if name == "allow_hf32":
            CALLS.append(f"matmul.allow_hf32={value}")
            _options["ALLOW_MATMUL_HF32"] = "enable" if value else "disable"
            return
        raise AttributeError(name)

    def __getattr__(cls, name):
        if name == "allow_hf32":
            return _options.get("ALLOW_MATMUL_HF32") == "enable"
        raise AttributeError(name)


class _allowHF32Conv:
    def __setattr__(cls, name, value):
        if name == "allow_hf32":
            CALLS.append(f"conv.allow_hf32={value}")
            _options["ALLOW_CONV_HF32"] = "enable" if value else "disable"
            return
        raise AttributeError(name)

    def __getattr__(cls, name):
        if name == "allow_hf32":
            value = _options.get("ALLOW_CONV_HF32")
            return value is None or value == "" or value == "enable"
        raise AttributeError(name)


npu = types.ModuleType("torch_npu.npu")
npu.__all__ = ["is_available", "device_count", "set_device", "current_device", "synchronize", "get_device_name",
               "max_memory_allocated", "reset_peak_memory_stats", "set_compile_mode", "is_bf16_supported",
               "get_rng_state", "set_rng_state"]
_state = {"device": 0}


def is_available():
    return npu.device_count() > 0


def device_count():
    return OPTIONS["device_count"]


def set_device(device):
    CALLS.append(f"set_device({device})")
    _state["device"] = int(str(device).split(":")[-1])


def current_device():
    return _state["device"]


def synchronize(device=None):
    pass


def get_device_name(device_name=None):
    return "Ascend910B4 (stand-in)"


def max_memory_allocated(device=None):
    return 1234


def reset_peak_memory_stats(device=None):
    pass


def set_compile_mode(jit_compile=False):
    CALLS.append(f"set_compile_mode(jit_compile={jit_compile})")


def is_bf16_supported():
    return True


def get_rng_state(device="npu"):
    return torch.get_rng_state()


def set_rng_state(new_state, device="npu"):
    torch.set_rng_state(new_state)


for _fn in (is_available, device_count, set_device, current_device, synchronize, get_device_name,
            max_memory_allocated, reset_peak_memory_stats, set_compile_mode, is_bf16_supported, get_rng_state,
            set_rng_state):
    setattr(npu, _fn.__name__, _fn)
npu.conv = _allowHF32Conv()
npu.matmul = _allowHF32Matmul()
npu.utils = types.ModuleType("torch_npu.npu.utils")


def get_cann_version(module="CANN"):
    return OPTIONS["cann"]


npu.utils.get_cann_version = get_cann_version
# torch_npu sets torch.version.cann at import from the toolkit's ascend_*_install.info (utils/collect_env.py l.222-223,
# "not known" when it finds none)
_patch(torch.version, "cann", OPTIONS["torch_version_cann"])
sys.modules["torch_npu.npu"] = npu
sys.modules["torch_npu.npu.utils"] = npu.utils
_patch(torch, "npu", npu)  # torch._register_device_module("npu", ...), which cannot be undone, does these two
sys.modules["torch.npu"] = npu

# --- device storage on the CPU --------------------------------------------------------------------------------------
# The npu_standin fixture makes Device("npu", N).torch give NPU_DEVICE, a CPU device that nothing else in the project
# names (its "cpu" has no index), so the wrappers below can tell a move to the NPU from a move to the CPU.
NPU_DEVICE = torch.device("cpu", 0)


def _is_npu(value):
    if isinstance(value, torch.device):
        return value == NPU_DEVICE
    return isinstance(value, str) and (value.startswith("npu") or value == "cpu:0")


def _cpu(args, kwargs):
    args = tuple("cpu" if _is_npu(a) else a for a in args)
    kwargs = {k: ("cpu" if _is_npu(v) else v) for k, v in kwargs.items()}
    return args, kwargs


_WARNED = set()  # VariableFallbackKernel.cpp:237-245 has_op_name_warned: a static set, once per operator per process
_STATIC = {}  # function-local statics: read at first use, then kept for the process


def _strtol(value, default):
    # strtol(value, NULL, 10) as OptionsManager reads a switch: the leading integer, 0 when there is none
    if value is None:
        return default
    text = value.lstrip()
    sign = -1 if text[:1] == "-" else 1
    text = text[1:] if text[:1] in ("+", "-") else text
    digits = ""
    for ch in text:
        if not ch.isdigit():
            break
        digits += ch
    return sign * int(digits) if digits else 0


def _c10_prints_warnings():
    # c10/util/Logging.cpp setLogLevelFlagFromEnv: TORCH_CPP_LOG_LEVEL INFO/0 WARNING/1 ERROR/2 FATAL/3, any case; the
    # MessageLogger drops WARNING lines below the level. Read once, at library load.
    if "c10" not in _STATIC:
        level = (os.environ.get("TORCH_CPP_LOG_LEVEL") or "").strip().upper()
        _STATIC["c10"] = level not in ("2", "3", "ERROR", "FATAL")
    return _STATIC["c10"]


def npu_fusion_attention(query, key, value, head_num, input_layout, *args, **kwargs):
    # exported by the real wheels (torch_npu/__init__.py: the op-plugin functions); transformers 5.x imports it
    # (integrations/npu_flash_attention.py:21-22) once is_torch_npu_available() is True
    raise NotImplementedError("stand-in: npu_fusion_attention is not imitated")


def _should_print_warning():
    # OptionsManager.cpp:559-570 (2.5.1): TORCH_NPU_DISABLED_WARNING=1 silences; else only RANK unset (-1) or 0 prints.
    if "print" not in _STATIC:
        silenced = any(_strtol(os.environ.get(name), 0) == 1 for name in OPTIONS["silencers"])
        _STATIC["print"] = not silenced and _strtol(os.environ.get("RANK"), -1) in (0, -1)
    return _STATIC["print"]


def _fallback_allowed():
    # OptionsManager::IsCpuFallbackEnable (master OptionsManager.cpp:60-66): read at the first fallback, then kept.
    if "allowed" not in _STATIC:
        value = os.environ.get("TORCH_NPU_FALLBACK_CPU_DISABLE") if OPTIONS["fallback_switch"] else None
        _STATIC["allowed"] = _strtol(value, 0) == 0
    return _STATIC["allowed"]


def _fallback_hook(module, inputs):
    from npu_standin import emit_c10_warning  # tests/ is on sys.path wherever the fallback hook runs

    for op in OPTIONS["fallback_ops"]:
        if not _fallback_allowed():  # CpuFallbackUtils.h:16-33 CheckCpuFallbackAllowed, before the warning
            raise RuntimeError(f"The operator '{op}' would execute its main computation on CPU through dispatcher "
                               "backend fallback because no kernel is registered for the NPU PrivateUse1 backend, but "
                               "CPU fallback is disabled by TORCH_NPU_FALLBACK_CPU_DISABLE=1.\\n[ERROR] (PID:0, "
                               "Device:0, RankID:-1) ERR01007 OPS feature not supported")
        if op not in _WARNED:
            _WARNED.add(op)
            if _should_print_warning() and _c10_prints_warnings():
                emit_c10_warning(FALLBACK_TEXT.format(op=op))
    for name, (text, route, where) in OPTIONS["kernel_wordings"].items():
        if name in _WARNED:  # TORCH_NPU_WARN_ONCE / TORCH_WARN_ONCE: a static per call site
            continue
        _WARNED.add(name)
        if route == "python":  # c10::Warning through torch's PyWarningHandler: PyErr_WarnEx(UserWarning, msg, 1)
            warnings.warn(f"{text} (Triggered internally at /op-plugin/op_plugin/ops/{where}.)", UserWarning,
                          stacklevel=2)
        elif _should_print_warning() and _c10_prints_warnings():
            emit_c10_warning(text, function=name, where=where.split("/")[-1])


def _wrap(owner, name, on_npu=None):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        moved = any(_is_npu(a) for a in args) or any(_is_npu(v) for v in kwargs.values())
        if moved and on_npu:
            on_npu(args)
        args, kwargs = _cpu(args, kwargs)
        return original(*args, **kwargs)

    wrapper.__name__ = name
    _patch(owner, name, wrapper)


def _module_moved(args):
    module = args[0]
    if not getattr(module, "_standin_on_npu", False):
        CALLS.append(f"model moved to npu ({type(module).__name__})")
        object.__setattr__(module, "_standin_on_npu", True)
        if OPTIONS["fallback_ops"] or OPTIONS["kernel_wordings"]:
            module.register_forward_pre_hook(_fallback_hook)


class _autocast(torch.autocast):  # torch.autocast("npu") is valid with the real torch_npu; here it is the CPU's
    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == "npu" else device_type, *args, **kwargs)


_patch(torch, "autocast", _autocast)
_wrap(torch.Tensor, "to")
_wrap(torch.nn.Module, "to", on_npu=_module_moved)
_wrap(torch, "zeros")
_wrap(torch, "randn")

import torch_npu.dynamo  # noqa: E402  installs the lazy torchair, as the real package does
"""

_DYNAMO = """
import sys


class _TorchairImportError(Exception):
    def __init__(self):
        super().__init__(self)
        self.err_info = ("\\nAn error occured when import `torchair` and the above is the specific error message. \\n"
                         "This error message was generated when import torchair, but throwed asynchronously here. \\n")

    def __str__(self):
        return self.err_info


class _LazyException:
    def __init__(self, e):
        self._info = _TorchairImportError()
        self._e = e

    def __getattr__(self, name):
        raise self._info from self._e

    def __call__(self, *args, **kwargs):
        raise self._info from self._e


class _LazyTorchair:
    def __init__(self):
        self._torchair = None
        self._exception = None
        self._allowed_list = ["__spec__", "__path__"]

    def __getattr__(self, name):
        if self._exception is not None:
            return self._exception()
        if self._torchair is not None:
            return getattr(self._torchair, name)
        if name not in self._allowed_list:
            raise AttributeError(f"Try to get torchair's attr `{name}` before torchair is initialized.")
        try:
            from . import torchair
        except Exception as e:
            self._exception = _LazyException(e)
            raise
        self._torchair = torchair
        return getattr(torchair, name)


sys.modules["torchair"] = _LazyTorchair()
"""

_TORCHAIR = """
import torch_npu

if torch_npu.OPTIONS["torchair_broken"]:
    raise ModuleNotFoundError("No module named 'google.protobuf'")


class OptionValue:
    def __init__(self, default, optional=None):
        self.default, self.optional, self._value = default, optional, default

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        if self.optional is not None and v not in self.optional:
            raise ValueError(f"mode value {v!r} is not in {self.optional}")
        self._value = v


class CompilerConfig:
    def __init__(self):
        object.__setattr__(self, "mode", OptionValue("max-autotune", torch_npu.OPTIONS["torchair_modes"]))

    def __setattr__(self, key, value):
        if key != "mode":
            raise ValueError(f"CompilerConfig has no option {key}")
        self.mode.value = value


def get_npu_backend(*, compiler_config=None, custom_decompositions={}):
    import warnings

    config = compiler_config or CompilerConfig()
    if torch_npu.OPTIONS["torchair_modes"] and "npugraph_ex" in torch_npu.OPTIONS["torchair_modes"]:
        # 2.13.0/2.14.0: get_npu_backend -> _check_config_support (npu_fx_compiler.py:1053), which starts with
        # warnings.filterwarnings("once", category=UserWarning) (configs/compiler_config.py:95), process-wide
        warnings.filterwarnings("once", category=UserWarning)
    mode = config.mode.value
    torch_npu.CALLS.append(f"torchair backend mode={mode}")

    def backend(gm, example_inputs):
        if torch_npu.OPTIONS["reject_flash_attention"]:  # torchair 7.0.0: no converter for the flash SDPA
            for node in gm.graph.nodes:
                if "scaled_dot_product_attention" in str(node.target):
                    raise NotImplementedError("no converter for aten._scaled_dot_product_flash_attention")
        torch_npu.CALLS.append(f"torchair compiled a graph (mode={mode})")
        if not torch_npu.OPTIONS["miscompile"]:
            return gm.forward

        def miscompiled(*args):
            import torch

            out = gm.forward(*args)
            wrong = [o * 1.5 + 0.1 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out]
            return type(out)(wrong)

        return miscompiled

    return backend
"""

_TRANSFER = """
import torch
import torch_npu

import warnings

torch_npu.CALLS.append("transfer_to_npu applied")
warnings.filterwarnings(action="once")  # as the real module does at import (l.21 in 2.5.1, l.27 in 2.13.0)
for name in torch_npu.npu.__all__:  # as the real one: torch_npu.npu's public functions copied onto torch.cuda
    torch_npu._patch(torch.cuda, name, getattr(torch_npu.npu, name))


def _jit_script(obj, *args, **kwargs):
    return obj


torch_npu._patch(torch.jit, "script", _jit_script)
"""

DEFAULTS = {
    "kernel_fallbacks": [],  # KERNEL_WORDINGS keys: op-plugin's CPU kernels, each said once on its route at a forward
    "import_fails": False,  # `import torch_npu` raises as the real one does without CANN (a failed _C load)
    "device_count": 2,
    "cann": "8.0.RC3",  # what get_cann_version(module="CANN") answers ("" as on CANN without aclsysGetCANNVersion)
    "torch_version_cann": None,  # torch.version.cann as torch_npu sets it; None: the same as "cann"
    "fallback_ops": [],
    "fallback_switch": None,  # None: as the version (2.13.0 and later read TORCH_NPU_FALLBACK_CPU_DISABLE)
    "torchair_broken": False,
    "torchair_modes": None,  # None: as the version (compiler_config.py 2.5.1 l.31; 2.13.0/2.14.0 l.39 add npugraph_ex)
    "reject_flash_attention": False,
    "miscompile": False,  # the graph engine returns wrong numbers (logits x 1.5 + 0.1): agreement must show it
    "autoload_fails": False,
    "autoload": False,  # declare the torch.backends entry point (so `import torch` imports the stand-in) and succeed
}
DEFAULTS.update(npu_profiler_standin.DEFAULTS)  # torch_npu.profiler: profiler_fails, aicpu_ops


def build(folder: Path, **options) -> Path:
    """Write the stand-in package under `folder` (a sys.path entry) with `options` over DEFAULTS; the folder."""
    unknown = set(options) - set(DEFAULTS) - {"version"}
    if unknown:
        raise TypeError(f"unknown stand-in options {sorted(unknown)}")
    settings = {**DEFAULTS, "version": torch.__version__.split("+")[0], **options, "fallback_text": FALLBACK_TEXT}
    settings["kernel_wordings"] = {name: KERNEL_WORDINGS[name] for name in settings["kernel_fallbacks"]}
    if settings["torch_version_cann"] is None:
        settings["torch_version_cann"] = settings["cann"] or "not known"
    from packaging.version import Version

    newer = Version(settings["version"]).release[:2] >= (2, 13)
    if settings["fallback_switch"] is None:
        settings["fallback_switch"] = newer
    if settings["torchair_modes"] is None:
        settings["torchair_modes"] = ["max-autotune", "reduce-overhead"] + (["npugraph_ex"] if newer else [])
    # the switches each version's libtorch_npu.so reads (strings there): 2.5.1 only TORCH_NPU_DISABLED_WARNING
    settings["silencers"] = ["TORCH_NPU_DISABLED_WARNING"] + (["TORCH_NPU_WARNING_DISABLE"] if newer else [])
    library_strings = (
        settings["silencers"] + ["RANK"] + (["TORCH_NPU_FALLBACK_CPU_DISABLE"] if settings["fallback_switch"] else [])
    )
    files = {
        "torch_npu/__init__.py": _INIT,
        "torch_npu/standin.json": json.dumps(settings),
        "torch_npu/contrib/__init__.py": "",
        "torch_npu/contrib/transfer_to_npu.py": _TRANSFER,
        "torch_npu/dynamo/__init__.py": _DYNAMO,
        "torch_npu/dynamo/torchair/__init__.py": _TORCHAIR,
        **npu_profiler_standin.files(),  # torch_npu.profiler (tests/npu_profiler_standin.py)
    }
    if settings["autoload_fails"] or settings["autoload"]:
        info = f"torch_npu-{settings['version']}.dist-info"
        files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: torch_npu\nVersion: {settings['version']}\n"
        files[f"{info}/entry_points.txt"] = "[torch.backends]\ntorch_npu = torch_npu:_autoload\n"
        files[f"{info}/RECORD"] = ""
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    library = folder / "torch_npu" / "lib" / "libtorch_npu.so"
    library.parent.mkdir(parents=True, exist_ok=True)
    library.write_bytes(b"\0stand-in\0" + b"".join(name.encode() + b"\0" for name in library_strings))
    return folder


class StandIn:
    """The installed stand-in: `calls` (the ordered log), `module` (torch_npu itself)."""

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def module(self):
        return sys.modules["torch_npu"]

    @property
    def calls(self) -> list[str]:
        module = sys.modules.get("torch_npu")
        return list(module.CALLS) if module is not None else []

    def index(self, prefix: str) -> int:
        """Position of the first call starting with `prefix` (ValueError when absent)."""
        for i, call in enumerate(self.calls):
            if call.startswith(prefix):
                return i
        raise ValueError(f"{prefix!r} not in {self.calls}")


def _forget_modules() -> None:
    names = [
        n
        for n in sys.modules
        if n in ("torch_npu", "torchair", "torch.npu") or n.startswith(("torch_npu.", "torchair."))
    ]
    for name in names:
        del sys.modules[name]


def _undo() -> None:
    module = sys.modules.get("torch_npu")
    for owner, name, old in reversed(getattr(module, "PATCHES", [])):
        if old is getattr(module, "_MISSING", None):
            delattr(owner, name)
        else:
            setattr(owner, name, old)


@pytest.fixture(name="npu_standin")
def npu_standin_fixture(tmp_path, monkeypatch):
    """A function: npu_standin(**options) installs the stand-in in this process and returns a StandIn; everything it
    patched is put back after the test. The execution mode cache is emptied on both sides (it keys on model ids)."""
    from mobilevit_npu import devices, execution

    def device_torch(self) -> torch.device:
        return torch.device("cpu", 0) if self.type == "npu" else torch.device(str(self))

    monkeypatch.setattr(devices.Device, "torch", property(device_torch))
    installed = []

    def install(**options) -> StandIn:
        folder = build(tmp_path / f"standin{len(installed)}", **options)
        _undo()
        _forget_modules()
        monkeypatch.syspath_prepend(str(folder))
        installed.append(folder)
        return StandIn(folder)

    execution._cache.clear()
    yield install
    _undo()
    _forget_modules()
    execution._cache.clear()
