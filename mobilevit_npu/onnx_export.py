"""The offline artefacts: the model as ONNX at an opset ATC accepts (the TorchScript exporter, which writes opsets 11-15
for this model; torch's current exporter where asked for, at opset 18+), and what Ascend's ATC needs to make an .om of
it (the command line, the precision mode, the AIPP config). Running the file is mobilevit_npu.runtime_ort's.

Sources for the Ascend side (CANN 8.0.0 ATC guide, hiascend.com/document/detail/{zh,en}/canncommercial/800/devaids/):
  --framework (atc/atlasatcparam_16_0014): "5: ONNX" and, for it, operators of the ai.onnx domain at opsets v11 to v15
  (zh/canncommercial/800/devaids/devtools/atc/atlasatcparam_16_0014.html: 支持ai.onnx算子域中opset v11~v15版本的算子;
  the same words in the 8.0.0 alpha003 community guide); --precision_mode values and force_fp16 as ATC's default
  (atlasatcparam_16_0068, aoepar_16_044: "must_keep_origin_dtype > allow_fp32_to_fp16 > allow_mix_precision >
  force_fp16" in accuracy); the AIPP template (atlasatc_16_0025), its RGB888_U8 sample ("if the original model
  requires the BGR format, set rbuv_swap_switch to true", atlasatc_16_0029) and its normalisation formula
  pixel_out = (pixel_in - mean_chn_i - min_chn_i) * var_reci_chn_i (atlasatc_16_0022). With AIPP the model's input
  becomes uint8 NHWC whatever --input_format says (atlasatc_16_0025, restriction 9).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilevit_npu import devices, execution, families, preprocessing
from mobilevit_npu.errors import UserError, first_line
from mobilevit_npu.flags import (  # noqa: F401  (re-exported: onnx_export.PRECISION_MODES, ...)
    ATC_OPSET_SOURCE,
    ATC_OPSETS,
    DEFAULT_OPSET,
    DEFAULT_PRECISION_MODE,
    PRECISION_MODES,
)

logger = logging.getLogger("mobilevit_npu.onnx_export")

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter writes 18 whatever it is asked for (torch 2.13, this model)
SOC_PLACEHOLDER = "<SOC_VERSION>"  # never a valid ATC value: ATC refuses it until the user puts the chip's name in
# ATC --soc_version names: those torch_npu knows (socVersionMap, torch_npu/csrc/core/npu/NpuVariables.cpp l.13-38,
# Ascend/pytorch at 00acf37e: Ascend910PremiumA, Ascend910ProA, Ascend910A, Ascend910B, Ascend310P1-P4, Ascend910B1-B4,
# Ascend910B2C, Ascend910B4-1, Ascend310B1-B4, Ascend910_9391 ...) are all "Ascend", three digits, then letters,
# digits, "_" or "-": the pattern a --soc_version must match, so the printed command never holds shell syntax.
SOC_VERSION_RE = re.compile(r"Ascend[0-9]{3}[A-Za-z0-9_-]{0,32}")
SOC_VERSION_EXAMPLES = ("Ascend310P3", "Ascend910B4", "Ascend910_9391")
DYNAMIC_BATCH_GEARS = (1, 2, 4, 8, 16, 32)  # ATC --dynamic_batch_size profiles for a dynamic-batch export
# PRECISION_MODES (ATC --precision_mode -> the dtype whose thresholds judge it), ATC_OPSETS and DEFAULT_OPSET are
# declared in flags, torch-free, so --help lists them without importing torch.


def verdict_dtype(precision_mode: str) -> str:
    """The dtype whose thresholds judge a graph compiled with this CANN precision mode (fp32 only when nothing is
    lowered)."""
    try:
        return PRECISION_MODES[precision_mode]
    except KeyError:
        raise UserError(f"unknown precision mode {precision_mode!r}: use {', '.join(PRECISION_MODES)}") from None


@dataclass
class Exported:
    path: Path
    exporter: str  # "dynamo" (torch.export-based) | "torchscript"
    why: str  # why this exporter ran
    opset: int
    dynamic_batch: bool
    batch_size: int | None  # None when dynamic
    seconds: float
    captured: list[str] = field(default_factory=list)  # warnings and log lines the exporters printed, kept quiet

    def summary(self) -> str:
        # torch.onnx logs a line per torchvision operator it cannot register when torchvision is absent: benign
        telling = [c for c in self.captured if "torchvision is not installed" not in c] or self.captured
        first = telling[0] if len(telling[0]) <= 100 else telling[0][:97] + "..."
        shown = (
            f"; {len(self.captured)} exporter warning(s) kept quiet (e.g. {first})"
            if (self.captured)
            else "; no warnings"
        )
        return f"exporter: {self.exporter} ({self.why}), opset {self.opset}, {self.seconds:.1f} s{shown}"


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.name}: {record.getMessage().splitlines()[0] if record.getMessage() else ''}")


@contextlib.contextmanager
def _native_output(sink: list[str]):
    """File descriptors 1 and 2 into a temporary file for the block, restored on every exit: the TorchScript exporter
    writes from C++ (torch._C._jit_onnx_log: "Torch IR graph at exception: ..." and the whole graph, ~900 lines for
    this model, on any export error), past Python's sys.stdout. What was written goes to `sink` as one line, all of
    it to the debug log."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            lines = [line for line in text.splitlines() if line.strip()]
            if lines:
                first = lines[0] if len(lines[0]) <= 100 else lines[0][:97] + "..."
                sink.append(f"native output, {len(lines)} line(s): {first}")
                logger.debug("exporter's native output:\n%s", text)


@contextlib.contextmanager
def _quiet(sink: list[str]):
    """Collect the exporters' warnings, log lines and prints (Python's and native ones) into `sink` instead of the
    console."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")
    saved = []
    handler = _Collect(sink)
    for name in names:
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate, lg.level, list(lg.handlers)))
        lg.handlers = [handler]
        lg.propagate = False
        lg.setLevel(logging.WARNING)
    out = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), _native_output(sink):
            warnings.simplefilter("always")
            yield
    finally:
        for lg, propagate, level, handlers in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        seen = set()
        for w in caught:
            text = f"{w.category.__name__}: {str(w.message).splitlines()[0] if str(w.message) else ''}"
            if text not in seen:
                seen.add(text)
                sink.append(text)
        logger.debug("exporter output: %s", out.getvalue())


def _example(batch_size: int | None, height: int, width: int) -> torch.Tensor:
    # A dynamic export traces batch 2: torch.export specialises a dimension of size 1 to the constant 1.
    return torch.rand(batch_size or 2, 3, height, width, generator=torch.Generator().manual_seed(0))


def _export(module, example, path: Path, opset: int, dynamic: bool, dynamo: bool) -> None:
    """torch.onnx.export with torch's current exporter (`dynamo`: torch.export-based, dynamic shapes as Dims) or the
    TorchScript one (dynamic axes; `dynamo=False` where torch has the keyword, its default before 2.9)."""
    if dynamo:
        shapes = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic else None
        kwargs: dict[str, Any] = {"dynamo": True, "dynamic_shapes": shapes, "external_data": False, "verbose": False}
    else:
        axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
        kwargs = {"dynamic_axes": axes, **({"dynamo": False} if "dynamo" in _export_parameters() else {})}
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        **kwargs,
    )


def _export_parameters() -> set[str]:
    import inspect

    return set(inspect.signature(torch.onnx.export).parameters)


def file_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    batch_size: int | None = 1,
    dynamic_batch: bool = False,
    image_size: tuple[int, int] = (256, 256),
    exporter: str = "auto",
) -> Exported:
    """Export `model` (float32, CPU) as ONNX: input pixel_values [N, 3, H, W], output logits [N, classes], N fixed to
    `batch_size` or dynamic. `exporter` auto: the TorchScript exporter below opset 18 (ATC's range is 11-15, and the
    torch.export-based exporter writes 18 whatever it is asked for), else the torch.export-based one (dynamo=True)
    when onnxscript is there, falling back to TorchScript; the reason is kept in Exported.why. The TorchScript
    exporter is torch.onnx.export(dynamo=False): the default up to torch 2.8, still there (deprecated) in 2.13."""
    if importlib.util.find_spec("onnx") is None:
        raise UserError('the onnx package is not installed: pip install -e ".[bench]"')
    try:
        family = families.for_model(model)
    except TypeError:  # a plain module (tests, fastpath's restatement): no family rules apply
        family = None
    if family is not None and family.onnx_refusal and opset < DYNAMO_MIN_OPSET:
        raise UserError(f"{family.title} cannot be exported at opset {opset}: {family.onnx_refusal}")
    restated = family.export_patch(model) if family is not None and family.export_patch else contextlib.nullcontext()
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise UserError(f"folder {path.parent} does not exist")
    module = execution.Logits(model.to("cpu", torch.float32).eval()).eval()
    example = _example(None if dynamic_batch else batch_size, *image_size)
    captured: list[str] = []
    start = time.perf_counter()
    why = ""
    ran = "torchscript"
    if exporter in ("auto", "dynamo"):
        problem = None
        if importlib.util.find_spec("onnxscript") is None:
            problem = "onnxscript is not installed (pip install onnxscript)"
        elif opset < DYNAMO_MIN_OPSET:
            problem = f"it writes opset {DYNAMO_MIN_OPSET}+ for this model, not {opset}"
        elif "dynamo" not in _export_parameters():
            problem = f"torch {torch.__version__} has no dynamo=True export"
        if problem is None:
            try:
                with _quiet(captured), torch.no_grad(), restated:
                    _export(module, example, path, opset, dynamic_batch, dynamo=True)
                got = file_opset(path)
                if got != opset:
                    raise RuntimeError(f"it wrote opset {got}, not {opset}")
                ran, why = "dynamo", "torch's current exporter, torch.onnx.export(dynamo=True)"
            except Exception as exc:  # an operator or shape it cannot export: the TorchScript exporter still can
                problem = f"{type(exc).__name__}: {first_line(exc, 200)}"
        if ran != "dynamo":
            if exporter == "dynamo":
                raise UserError(f"the torch.export-based exporter failed: {problem}")
            why = (
                f"opset {opset}: the torch.export-based exporter {problem.replace('it writes', 'writes')}"
                if opset < DYNAMO_MIN_OPSET
                else f"the torch.export-based exporter was not used: {problem}"
            )
    else:
        why = "asked for with exporter='torchscript'"
    if ran == "torchscript":
        try:
            with _quiet(captured), torch.no_grad(), restated:
                _export(module, example, path, opset, dynamic_batch, dynamo=False)
        except Exception as exc:
            raise UserError(
                f"ONNX export failed ({type(exc).__name__}: {first_line(exc)}){_operator_hint(exc)}"
            ) from exc
    return Exported(
        path,
        ran,
        why,
        file_opset(path),
        dynamic_batch,
        None if dynamic_batch else batch_size,
        time.perf_counter() - start,
        captured,
    )


def _operator_hint(exc: Exception) -> str:
    """For an operator the TorchScript exporter has no symbolic for at the asked opset (its UnsupportedOperatorError:
    "Exporting the operator 'aten::col2im' to ONNX opset version 15 is not supported. Support for this operator was
    added in version 18", torch/onnx/errors.py), the operator and opset in words, and what ATC takes."""
    import re

    found = re.search(r"operator '([\w:.]+)' to ONNX opset version (\d+).*?added in version (\d+)", str(exc), re.S)
    if not found:
        return ""
    op, asked, needed = found.groups()
    lo, hi = ATC_OPSETS
    return f"; {op} needs opset {needed}, ATC takes {lo}-{hi} ({ATC_OPSET_SOURCE})"


def describe(path: str | Path) -> dict[str, Any]:
    """Input/output names, shapes (a dynamic dimension by its name) and element types, and the opset, from the file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def tensors(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            out.append({"name": v.name, "shape": shape, "dtype": dtype})
        return out

    initializers = {i.name for i in model.graph.initializer}
    return {
        "inputs": tensors([v for v in model.graph.input if v.name not in initializers]),
        "outputs": tensors(model.graph.output),
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }


# --------------------------------------------------------------------------------------------------------- ATC / AIPP


def check_soc_version(value: str) -> str:
    """`value` when it is an Ascend SoC name (SOC_VERSION_RE), else a UserError (one line) naming examples."""
    if not SOC_VERSION_RE.fullmatch(value):
        raise UserError(
            f'--soc_version {value!r} is not an Ascend SoC name ("Ascend", three digits, then letters, digits, _ '
            f"or -: {', '.join(SOC_VERSION_EXAMPLES)}); give the chip's name as npu-smi info shows it"
        )
    return value


def soc_version(flag: str | None) -> tuple[str, str]:
    """(value, where it came from) for ATC's --soc_version: the flag (checked: check_soc_version), else the visible
    NPU's SoC name (torch_npu.npu.get_device_name, i.e. aclrtGetSocName), else the placeholder, clearly marked."""
    if flag:
        return check_soc_version(flag), "--soc_version"
    if importlib.util.find_spec("torch_npu") is None:
        return SOC_PLACEHOLDER, "no torch_npu here to ask; put in the chip's name (npu-smi info)"
    try:
        api = devices.npu_api()
        if api.is_available() and api.device_count() > 0:
            return str(api.get_device_name(0)), "the visible NPU (torch_npu.npu.get_device_name)"
        reason = "no NPU visible"
    except UserError as exc:
        reason = str(exc)
    return SOC_PLACEHOLDER, f"{reason}; put in the chip's name (npu-smi info)"


@dataclass(frozen=True)
class PixelMap:
    """What a processor does to a pixel after the resize and crop, read off the processor itself: model channel k is
    `scale[k] * rgb[order[k]] + offset[k]` (order (0, 1, 2): RGB kept; (2, 1, 0): BGR), on a height x width crop."""

    order: tuple[int, int, int]
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    height: int
    width: int

    @property
    def swap(self) -> bool:
        return self.order == (2, 1, 0)

    def describe(self) -> str:
        what = "swaps RGB to BGR and " if self.swap else ""
        if all(o == 0 for o in self.offset) and len(set(self.scale)) == 1:
            return f"{what}scales by {self.scale[0]:.10g}"
        return f"{what}maps each channel k to scale_k * pixel + offset_k (the processor's rescale and mean/std)"


_pixel_maps: dict[str, PixelMap] = {}


def pixel_map(cfg: preprocessing.PreprocessConfig) -> PixelMap:
    """pixel_map_of, once per preprocessing config (the .om runtime asks for every batch)."""
    key = repr(cfg)
    if key not in _pixel_maps:
        _pixel_maps[key] = pixel_map_of(cfg)
    return _pixel_maps[key]


def pixel_map_of(cfg: preprocessing.PreprocessConfig) -> PixelMap:
    """The processor's per-pixel arithmetic after the crop, measured through preprocessing.preprocess_image on solid
    colours (a solid image stays solid through resize and crop), so it is whatever the restated processor does:
    rescale (with EfficientNet's offset), mean/std (twice with its include_top), the channel order. UserError, one
    line, where AIPP cannot do it: a crop size that depends on the image, channels mixed, or arithmetic that is not
    per-channel affine."""
    from PIL import Image

    def out(rgb: tuple[int, int, int], size: tuple[int, int] = (400, 300)) -> np.ndarray:
        return np.asarray(preprocessing.preprocess_image(Image.new("RGB", size, rgb), cfg), dtype=np.float64)

    zero, full = out((0, 0, 0)), out((255, 255, 255))
    if out((0, 0, 0), (300, 400)).shape != zero.shape:
        raise UserError("AIPP needs one input size, and this processor's output size depends on the image's shape")
    low, high = zero[:, zero.shape[1] // 2, zero.shape[2] // 2], full[:, full.shape[1] // 2, full.shape[2] // 2]
    order = []
    for k in range(3):
        moved = [c for c in range(3) if out(tuple(255 if i == c else 0 for i in range(3)))[k].mean() != low[k]]
        if len(moved) != 1:
            raise UserError("AIPP cannot restate this processor: a model channel mixes the photo's channels")
        order.append(moved[0])
    scale = (high - low) / 255.0
    mid = out((128, 128, 128))[:, zero.shape[1] // 2, zero.shape[2] // 2]
    if not np.allclose(mid, low + 128 * scale, rtol=0, atol=1e-5) or np.any(scale <= 0):
        raise UserError("AIPP cannot restate this processor: its pixel arithmetic is not (x - min) * scale per channel")
    order_t = tuple(order)
    if order_t not in ((0, 1, 2), (2, 1, 0)):
        raise UserError(f"AIPP cannot restate the channel order {order_t} (only RGB, or BGR by rbuv_swap_switch)")
    return PixelMap(order_t, tuple(float(v) for v in scale), tuple(float(v) for v in low), *zero.shape[1:])


def aipp_config(cfg: preprocessing.PreprocessConfig, source: str = "preprocessor_config.json", title: str = "") -> str:
    """A static AIPP config (prototxt) doing on the NPU what the host's preprocessing does after the crop, as
    pixel_map reads it off the processor: the colour order (RGB in; the model's BGR via rbuv_swap_switch) and the
    per-channel arithmetic: pixel_out = (pixel_in - mean_chn_i - min_chn_i) * var_reci_chn_i with mean_chn 0,
    min_chn = -offset / scale (the processor's mean over its rescale) and var_reci_chn = scale (rescale / std).
    The host still decodes, resizes and centre-crops: the resize depends on each image's aspect ratio, and a static
    AIPP has one fixed source size, so its own crop stays off."""
    m = pixel_map(cfg)
    lines = [
        f"# AIPP for {title or 'MobileViT'}, from {source}: {m.width}x{m.height} crop; AIPP {m.describe()}.",
        f"# Feed the .om uint8 RGB, NHWC [N, {m.height}, {m.width}, 3], resized and centre-cropped on the host.",
        "# pixel_out = (pixel_in - mean_chn_i - min_chn_i) * var_reci_chn_i, after the channel swap (CANN ATC guide).",
        "aipp_op {",
        "    aipp_mode: static",
        "    related_input_rank: 0",
        "    input_format: RGB888_U8",
        f"    src_image_size_w: {m.width}",
        f"    src_image_size_h: {m.height}",
        "    crop: false",
        "    csc_switch: false",
        f"    rbuv_swap_switch: {'true' if m.swap else 'false'}",
    ]
    lines += [f"    mean_chn_{i}: 0" for i in range(3)]
    lines += [f"    min_chn_{i}: {(0.0 if m.offset[i] == 0 else -m.offset[i] / m.scale[i])!r}" for i in range(3)]
    lines += [f"    var_reci_chn_{i}: {m.scale[i]!r}" for i in range(3)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def aipp_host_input(pixels: torch.Tensor, cfg: preprocessing.PreprocessConfig) -> np.ndarray:
    """The .om-with-AIPP input for a batch the host preprocessed in full (float, model order, NCHW): back to uint8
    RGB NHWC, exactly (the values are offset + k * scale for whole k), through pixel_map's inverse."""
    m = pixel_map(cfg)
    x = pixels.detach().to("cpu", torch.float64)
    scale = torch.tensor(m.scale, dtype=torch.float64).reshape(1, 3, 1, 1)
    offset = torch.tensor(m.offset, dtype=torch.float64).reshape(1, 3, 1, 1)
    x = (x - offset) / scale
    if m.swap:
        x = x.flip(1)
    return np.ascontiguousarray(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())


def atc_command(
    onnx_path: str | Path,
    input_shape: list[int | str],
    soc: str,
    precision_mode: str,
    aipp_path: str | Path | None = None,
    output: str | Path | None = None,
) -> str:
    """The ATC command that turns the ONNX file into an .om: framework 5 (ONNX), NCHW, the input's shape (a dynamic
    batch as -1 with --dynamic_batch_size profiles), the SoC, an explicit --precision_mode and the AIPP config. Each
    argument is shell-quoted (shlex.quote): pasted into a shell, the command is exactly these arguments, whatever
    the paths hold (a space, a quote, a ';'), and the placeholder reaches ATC (which refuses it), not a redirection."""
    verdict_dtype(precision_mode)  # refuses unknown modes
    onnx_path = Path(onnx_path)
    output = Path(output) if output else onnx_path.with_suffix("")
    dynamic = not isinstance(input_shape[0], int)
    dims = ",".join(["-1" if dynamic else str(input_shape[0])] + [str(d) for d in input_shape[1:]])
    parts = [
        "atc",
        "--framework=5",
        f"--model={onnx_path}",
        f"--output={output}",
        "--input_format=NCHW",
        f"--input_shape={INPUT_NAME}:{dims}",
    ]
    if dynamic:
        parts.append(f"--dynamic_batch_size={','.join(str(g) for g in DYNAMIC_BATCH_GEARS)}")
    parts += [f"--soc_version={soc}", f"--precision_mode={precision_mode}"]
    if aipp_path:
        parts.append(f"--insert_op_conf={aipp_path}")
    return " ".join(shlex.quote(part) for part in parts)
