"""The execution modes, each declared once: how it is built, what judges it, where it runs and how it is named.

execution builds a mode from its declaration, targets verifies it, probe dumps it, bench times it, and the scripts'
--help and choices list it, all from REGISTRY below. Adding a mode is one `Mode(...)` entry here (its builder flags
are execution's: the Hugging Face model or the fast path, compiled or not, channels-last, an autocast dtype, an NPU
graph mode), plus its tests and docs; see docs/architecture.md, "Add an execution mode".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from mobilevit_npu.errors import first_line

if TYPE_CHECKING:
    from mobilevit_npu import devices

# This module imports no torch (what needs it imports it inside): the scripts' --help and choices read the registry,
# and --help never imports torch (mobilevit_npu/flags.py, tests/test_first_hour.py).
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # torch's names (models.DTYPES' keys)
LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class Mode:
    """One execution mode. The builder flags (model, compiled, channels_last, autocast, npu_graph, autotune) are read
    by execution._prepare; the rest by the verifier, msprobe, the benchmark, the card and --help."""

    name: str
    summary: str  # how it runs, one phrase: --help and docs
    label: tuple[str, str]  # its name in a sentence, English and Chinese (LANGUAGES): "bfloat16 autocast"
    model: str = "hf"  # "hf": the Hugging Face model; "fast": fastpath.FastMobileViT (where the family has it)
    compiled: bool = False  # built by compilers: AOTInductor on CPU where torch has it, else torch.compile / torchair
    channels_last: bool = False  # the model and its input in channels-last memory (uncompiled)
    autocast: Optional[str] = None  # "bf16" | "fp16": autocast to this dtype over float32 weights (not exact)
    npu_graph: Optional[str] = None  # torchair mode for compilers.compile_for (else its default, the GE graph)
    autotune: bool = False  # CPU AOTInductor: autotuned GEMMs, small 1x1 convolutions as linears (fast only)
    only_on: tuple[str, ...] = ()  # the device types it runs on (empty: all), refused elsewhere with `only_on_reason`
    only_on_reason: str = ""
    refused_on: tuple[tuple[str, str], ...] = ()  # (device type, why) where it never runs
    needs: Optional[Callable[[devices.Device], Optional[str]]] = None  # a device-level check: why not, or None
    msprobe: bool = False  # msprobe can dump it (an eager module, or the eager twin under the same autocast)
    benchmark: bool = True  # accuracy_run_perf.py --modes offers it
    verify: bool = True  # accuracy_run.py --target_mode offers it

    @property
    def exact(self) -> bool:
        """Computes what float32 eager computes (up to summation order); an autocast mode does not."""
        return self.autocast is None

    @property
    def twin(self) -> bool:
        """--layers (and msprobe) watch an eager twin: a compiled graph has no modules to hook, and the fast path has
        other modules than the model's."""
        return self.compiled or self.model == "fast"

    def weights(self, dtype: str) -> str:
        """The dtype the weights are cast to: --dtype, float32 under autocast."""
        return "fp32" if self.autocast else dtype

    def judged_by(self, dtype: str) -> str:
        """The dtype whose thresholds (metrics.DEFAULT_THRESHOLDS) judge it, and in which it computes."""
        return self.autocast or dtype

    def text(self, lang: str = "en") -> str:
        return self.label[LANGUAGES.index(lang)]

    def bench_dtype(self, dtype: str) -> str:
        """The benchmark row's `dtype`: --dtype, or "<autocast dtype> autocast" ("bf16 autocast")."""
        return f"{self.autocast} autocast" if self.autocast else dtype

    def side_dtype(self, dtype: str) -> str:
        """The accuracy report's target dtype: torch's name, or the autocast label ("bfloat16 autocast")."""
        return f"{TORCH_DTYPE_NAMES[self.autocast]} autocast" if self.autocast else TORCH_DTYPE_NAMES[dtype]

    def weights_text(self, dtype: str) -> str:
        """What the target's weights are, for the console: "float32 (bfloat16 autocast inside the model)"."""
        if self.autocast:
            return f"float32 ({self.text()} inside the model)"
        return TORCH_DTYPE_NAMES[dtype]

    def side_label(self, device: object, dtype: str) -> str:
        """The target as the console, the report's `label` and the card name it."""
        if self.autocast:
            model = "fast model" if self.model == "fast" else "Hugging Face model"
            return f"{device} {self.text()} ({self.name} mode: {model}, float32 weights)"
        return f"{device} {TORCH_DTYPE_NAMES[dtype]} {self.name}"

    def device_refusal(self, device: devices.Device) -> Optional[str]:
        """Why this mode cannot run on `device` (one line), or None."""
        if self.only_on and device.type not in self.only_on:
            return self.only_on_reason or f"{self.name} runs on {', '.join(self.only_on)} only"
        for kind, why in self.refused_on:
            if device.type == kind:
                return why
        if self.autocast:
            why = autocast_refusal(device.type, self.autocast)
            if why:
                return why
        return self.needs(device) if self.needs else None

    def refusal(self, device: devices.Device, dtype: str) -> Optional[str]:
        """Why this mode cannot run on `device` with weights in `dtype` (one line), or None."""
        if self.autocast and dtype != "fp32":
            return f"{self.name} is autocast over float32 weights: run it with --dtype fp32"
        return self.device_refusal(device)


def autocast_refusal(device_type: str, dtype: str) -> Optional[str]:
    """None where the installed torch autocasts to `dtype` on `device_type`; else torch's own reason, one line.

    Asks torch.autocast itself: it raises for a device type without autocast, and warns and disables itself for a
    dtype the device does not list (torch/amp/autocast_mode.py, torch 2.13.0 l.248-301: CPU lists bfloat16 and
    float16; a PrivateUse1 backend lists its `get_amp_supported_dtype()`, which torch_npu 2.5.1 defines in
    torch_npu/npu/autocast_utils.py l.8-11: float16 always, bfloat16 where torch.npu.is_bf16_supported(). The 2.4/2.5
    era source, with its per-device branches, has the same CPU list: `if self.device == "cpu": supported_dtype =
    [torch.bfloat16, torch.float16]`; older releases had bfloat16 only: "CPU Autocast only supports dtype of
    torch.bfloat16 currently"). What it answers for the installed torch is what counts."""
    import torch

    from mobilevit_npu import models

    missing = (
        f"not on this device: torch {torch.__version__} has no {TORCH_DTYPE_NAMES[dtype]} autocast on {device_type}"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            context = torch.autocast(device_type=device_type, dtype=models.DTYPES[dtype])
        except (RuntimeError, AssertionError, ValueError) as exc:
            return f"{missing} ({first_line(exc)})"
    if getattr(context, "_enabled", True):
        return None
    return f"{missing} ({first_line(str(caught[0].message)) if caught else 'autocast disabled itself'})"


def _native_bf16(device: devices.Device) -> Optional[str]:
    from mobilevit_npu import devices

    if device.type == "cpu" and not devices.cpu_bf16_supported():
        return "this CPU has no native bfloat16 (oneDNN reports none)"
    return None


_NOT_ON_MPS_BF16 = ("mps", "bf16 autocast is not benchmarked on MPS")  # both bf16 autocast modes


REGISTRY: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode(
            "eager",
            "the Hugging Face model as loaded",
            ("eager", "eager（即时执行）"),
            msprobe=True,
        ),
        Mode(
            "channels_last",
            "the same model and input in channels-last memory, NHWC; not on npu",
            ("channels-last", "channels-last 内存布局"),
            channels_last=True,
            refused_on=(
                (
                    "npu",
                    'NPU tensors refuse channels-last memory (torch_npu: "Only c10::MemoryFormat::Contiguous is '
                    'supported for creating a npu tensor")',
                ),
            ),
            msprobe=True,
        ),
        Mode(
            "compiled",
            "the Hugging Face model compiled: inductor + freezing on CPU, built ahead of time by AOTInductor and kept "
            "in the compile cache; CUDA graphs on CUDA; torchair GE graph on NPU",
            ("compiled", "编译"),
            compiled=True,
        ),
        Mode(
            "fast",
            "fastpath's exact restatement of the model, channels-last, compiled; on CPU with autotuned GEMMs and the "
            "small 1x1 convolutions as linears",
            ("fast path", "fast 快速路径"),
            model="fast",
            compiled=True,
            autotune=True,
        ),
        Mode(
            "bf16",
            "fast under bfloat16 autocast, judged with bf16's thresholds; not exact, its agreement says by how much",
            ("bfloat16 autocast", "bfloat16 自动混合精度"),
            model="fast",
            compiled=True,
            autocast="bf16",
            refused_on=(_NOT_ON_MPS_BF16,),
            needs=_native_bf16,
            msprobe=True,
        ),
        Mode(
            "fp16",
            "fast under float16 autocast, judged with fp16's thresholds; not exact, its agreement says by how much",
            ("float16 autocast", "float16 自动混合精度"),
            model="fast",
            compiled=True,
            autocast="fp16",
            msprobe=True,
        ),
        Mode(
            "bf16_eager",
            "the Hugging Face model as loaded, uncompiled, under bfloat16 autocast (torch.autocast: what torch_npu's "
            "amp runs op by op), judged with bf16's thresholds; on a CPU without native bfloat16 too (slower, the same "
            "rounding)",
            ("eager bfloat16 autocast", "eager bfloat16 自动混合精度"),
            autocast="bf16",
            refused_on=(_NOT_ON_MPS_BF16,),
            msprobe=True,
        ),
        Mode(
            "fp16_eager",
            "the Hugging Face model as loaded, uncompiled, under float16 autocast (torch.autocast: what torch_npu's "
            "amp runs op by op), judged with fp16's thresholds",
            ("eager float16 autocast", "eager float16 自动混合精度"),
            autocast="fp16",
            msprobe=True,
        ),
        Mode(
            "npugraph",
            "npu only: the Hugging Face model compiled by torchair into aclgraph, the NPU's CUDA graphs: torchair's "
            "npugraph_ex mode where it has it (torch-npu 2.13.0, 2.14.0), else reduce-overhead (2.5.1; "
            "compilers.compile_for)",
            ("aclgraph", "aclgraph 图模式"),
            compiled=True,
            npu_graph="reduce-overhead",
            only_on=("npu",),
            only_on_reason="npugraph is torchair's aclgraph (npugraph_ex / reduce-overhead mode): npu only",
        ),
    )
}


def mode(name: str) -> Mode:
    """The mode called `name` (KeyError for an unknown one: callers refuse it with their own flag's words)."""
    return REGISTRY[name]


def mode_names(*, benchmark: bool = False, verify: bool = False) -> tuple[str, ...]:
    """Every mode's name in declaration order; only the benchmark's or the verifier's when asked."""
    return tuple(m.name for m in REGISTRY.values() if (not benchmark or m.benchmark) and (not verify or m.verify))


def available(device: devices.Device) -> list[str]:
    """The benchmark modes `--modes all` expands to on this device (refused ones left out; a family without the fast
    path still gets `fast` back as unavailable, with its reason)."""
    return [m.name for m in REGISTRY.values() if m.benchmark and m.device_refusal(device) is None]


def label(name: str, lang: str = "en") -> str:
    """A mode's name in a sentence of the card's language (LANGUAGES); an unknown name (an offline runtime's) as is."""
    mode = REGISTRY.get(name)
    return mode.text(lang) if mode else name


def help_text(*, benchmark: bool = False, verify: bool = False) -> str:
    """The modes with what each does, for --help: "eager (the Hugging Face model as loaded); channels_last (...)"."""
    return "; ".join(f"{n} ({REGISTRY[n].summary})" for n in mode_names(benchmark=benchmark, verify=verify))


def msprobe_names() -> tuple[str, ...]:
    """The verification modes msprobe can dump."""
    return tuple(n for n in mode_names(verify=True) if REGISTRY[n].msprobe)


def spoken(items: tuple[str, ...] | list[str], last: str = "or") -> str:
    """The items as a sentence lists them: "a, b or c"."""
    items = list(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}" if len(items) > 1 else "".join(items)
