"""The offline artefacts: the model as ONNX (torch's current exporter where it works, else the TorchScript one), its
check with ONNX Runtime on the CPU against the CPU float32 model, and what Ascend's ATC needs to make an .om of it (the
command line, the precision mode, the AIPP config).

Sources for the Ascend side (CANN 8.0.0 ATC guide, hiascend.com/document/detail/en/canncommercial/800/devaids/atc/):
  --framework=5 is ONNX (atlasatcparam_16_0010); --precision_mode values and force_fp16 as ATC's default
  (atlasatcparam_16_0068, aoepar_16_044: "must_keep_origin_dtype > allow_fp32_to_fp16 > allow_mix_precision >
  force_fp16" in accuracy); the AIPP template (atlasatc_16_0025), its RGB888_U8 sample ("if the original model
  requires the BGR format, set rbuv_swap_switch to true", atlasatc_16_0029) and its normalisation formula
  pixel_out = (pixel_in - mean_chn_i - min_chn_i) * var_reci_chn_i (atlasatc_16_0022). With AIPP the model's input
  becomes uint8 NHWC whatever --input_format says (atlasatc_16_0025, restriction 9).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilevit_npu import devices, preprocessing
from mobilevit_npu.errors import UserError, first_line

logger = logging.getLogger("mobilevit_npu.onnx_export")

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18  # the torch.export-based exporter's own opset: it cannot convert this model down to 17
DYNAMO_MIN_OPSET = 18
SOC_PLACEHOLDER = "<SOC_VERSION>"  # never a valid ATC value: ATC refuses it until the user puts the chip's name in
DYNAMIC_BATCH_GEARS = (1, 2, 4, 8, 16, 32)  # ATC --dynamic_batch_size profiles for a dynamic-batch export

# ATC --precision_mode (and the CANN execution provider's precision_mode) -> the dtype whose thresholds judge it.
# must_keep_origin_dtype keeps the fp32 graph in fp32; force_fp32 (= cube_fp16in_fp32out) lets matrix operators take
# float16 inputs; the others lower some or all operators to float16 / bfloat16.
PRECISION_MODES = {
    "must_keep_origin_dtype": "fp32",
    "force_fp32": "fp16",
    "cube_fp16in_fp32out": "fp16",
    "allow_fp32_to_fp16": "fp16",
    "allow_mix_precision": "fp16",
    "allow_mix_precision_fp16": "fp16",
    "force_fp16": "fp16",
    "allow_mix_precision_bf16": "bf16",
    "allow_fp32_to_bf16": "bf16",
}
DEFAULT_PRECISION_MODE = "must_keep_origin_dtype"  # the only mode that keeps every fp32 operator in fp32


def verdict_dtype(precision_mode: str) -> str:
    """The dtype whose thresholds judge a graph compiled with this CANN precision mode (fp32 only when nothing is
    lowered)."""
    try:
        return PRECISION_MODES[precision_mode]
    except KeyError:
        raise UserError(f"unknown precision mode {precision_mode!r}: use {', '.join(PRECISION_MODES)}") from None


class Logits(torch.nn.Module):
    """The Hugging Face model as a plain function of one tensor: pixel_values -> logits."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values=pixel_values).logits


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
        shown = f"; {len(self.captured)} exporter warning(s) kept quiet (e.g. {first})" if (
            self.captured) else "; no warnings"  # fmt: skip
        return f"exporter: {self.exporter} ({self.why}), opset {self.opset}, {self.seconds:.1f} s{shown}"


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.name}: {record.getMessage().splitlines()[0] if record.getMessage() else ''}")


@contextlib.contextmanager
def _quiet(sink: list[str]):
    """Collect the exporters' warnings, log lines and progress prints into `sink` instead of the console."""
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
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
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


def _export_dynamo(module, example, path: Path, opset: int, dynamic: bool) -> None:
    dynamic_shapes = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic else None
    torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes, external_data=False,
                      verbose=False)  # fmt: skip


def _export_torchscript(module, example, path: Path, opset: int, dynamic: bool) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    kwargs: dict[str, Any] = {"dynamo": False} if "dynamo" in _export_parameters() else {}
    torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      opset_version=opset, dynamic_axes=dynamic_axes, **kwargs)  # fmt: skip


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
    `batch_size` or dynamic. `exporter` auto: the torch.export-based exporter (dynamo=True) when onnxscript is there
    and the opset is one it emits, else the TorchScript exporter; the reason is kept in Exported.why."""
    if importlib.util.find_spec("onnx") is None:
        raise UserError("the onnx package is not installed: pip install onnx onnxruntime (requirements-bench.txt)")
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise UserError(f"folder {path.parent} does not exist")
    module = Logits(model.to("cpu", torch.float32).eval()).eval()
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
            problem = f"it emits opset {DYNAMO_MIN_OPSET}+ and cannot convert this model down to {opset}"
        elif "dynamo" not in _export_parameters():
            problem = f"torch {torch.__version__} has no dynamo=True export"
        if problem is None:
            try:
                with _quiet(captured), torch.no_grad():
                    _export_dynamo(module, example, path, opset, dynamic_batch)
                got = file_opset(path)
                if got != opset:
                    raise RuntimeError(f"it wrote opset {got}, not {opset}")
                ran, why = "dynamo", "torch's current exporter, torch.onnx.export(dynamo=True)"
            except Exception as exc:  # an operator or shape it cannot export: the TorchScript exporter still can
                problem = f"{type(exc).__name__}: {first_line(exc, 200)}"
        if ran != "dynamo":
            if exporter == "dynamo":
                raise UserError(f"the torch.export-based exporter failed: {problem}")
            why = f"the torch.export-based exporter was not used: {problem}"
    else:
        why = "asked for with exporter='torchscript'"
    if ran == "torchscript":
        try:
            with _quiet(captured), torch.no_grad():
                _export_torchscript(module, example, path, opset, dynamic_batch)
        except Exception as exc:
            raise UserError(f"ONNX export failed ({type(exc).__name__}: {first_line(exc)})") from exc
    return Exported(path, ran, why, file_opset(path), dynamic_batch, None if dynamic_batch else batch_size,
                    time.perf_counter() - start, captured)  # fmt: skip


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


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes, in name order): the weights' identity when there
    is no weights file (synthetic weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------- ATC / AIPP


def soc_version(flag: str | None) -> tuple[str, str]:
    """(value, where it came from) for ATC's --soc_version: the flag, else the visible NPU's SoC name
    (torch_npu.npu.get_device_name, i.e. aclrtGetSocName), else the placeholder, clearly marked."""
    if flag:
        return flag, "--soc_version"
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


def aipp_config(cfg: preprocessing.PreprocessConfig, source: str = "preprocessor_config.json") -> str:
    """A static AIPP config (prototxt) doing on the NPU what the host's preprocessing does after the crop: the colour
    order (RGB in, the model's BGR out via rbuv_swap_switch) and x rescale_factor (var_reci_chn; no mean, no min).
    The host still decodes, resizes (shortest edge) and centre-crops: the resize depends on each image's aspect
    ratio, and a static AIPP has one fixed source size, so its own crop stays off."""
    scale = cfg.rescale_factor if cfg.do_rescale else 1.0
    swap = "true" if cfg.do_flip_channel_order else "false"
    lines = [
        f"# AIPP for MobileViT, from {source}: shortest edge {cfg.shortest_edge}, crop {cfg.crop_width}x"
        f"{cfg.crop_height}, x{scale:.10g}, {'RGB->BGR' if cfg.do_flip_channel_order else 'RGB kept'}, no mean/std.",
        "# Feed the .om uint8 RGB, NHWC [N, 256, 256, 3], already resized and centre-cropped on the host.",
        "# pixel_out = (pixel_in - mean_chn_i - min_chn_i) * var_reci_chn_i, after the channel swap (CANN ATC guide).",
        "aipp_op {",
        "    aipp_mode: static",
        "    related_input_rank: 0",
        "    input_format: RGB888_U8",
        f"    src_image_size_w: {cfg.crop_width}",
        f"    src_image_size_h: {cfg.crop_height}",
        "    crop: false",
        "    csc_switch: false",
        f"    rbuv_swap_switch: {swap}",
    ]
    lines += [f"    mean_chn_{i}: 0" for i in range(3)]
    lines += [f"    min_chn_{i}: 0.0" for i in range(3)]
    lines += [f"    var_reci_chn_{i}: {scale!r}" for i in range(3)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def aipp_host_input(pixels: torch.Tensor, cfg: preprocessing.PreprocessConfig) -> np.ndarray:
    """The .om-with-AIPP input for a batch the host preprocessed in full (float, model order, NCHW): back to uint8
    RGB NHWC, exactly (the values are k * rescale_factor for whole k)."""
    x = pixels.detach().to("cpu", torch.float64)
    if cfg.do_rescale:
        x = x / cfg.rescale_factor
    if cfg.do_flip_channel_order:
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
    batch as -1 with --dynamic_batch_size profiles), the SoC, an explicit --precision_mode and the AIPP config."""
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
        f'--input_shape="{INPUT_NAME}:{dims}"',
    ]
    if dynamic:
        parts.append(f'--dynamic_batch_size="{",".join(str(g) for g in DYNAMIC_BATCH_GEARS)}"')
    # the placeholder quoted, so a pasted command reaches ATC (which refuses it) instead of a shell redirection
    parts += [f"--soc_version='{soc}'" if soc == SOC_PLACEHOLDER else f"--soc_version={soc}",
              f"--precision_mode={precision_mode}"]
    if aipp_path:
        parts.append(f"--insert_op_conf={aipp_path}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------- verification


def photo_batches(cfg: preprocessing.PreprocessConfig, batch_size: int | None, images=None):
    """The bundled photos (or `images`) preprocessed: one batch of all of them (batch_size None: a dynamic export), or
    batches of batch_size with the last one filled up by cycling. Returns (batches, image names)."""
    sources = list(images) if images else preprocessing.bundled_images()
    items, skipped = preprocessing.read_images(sources, cfg)
    for s in skipped:
        logger.warning("skipping %s: %s", s["image"], s["error"])
    if not items:
        raise UserError("no photos to check the export on")
    pixels = torch.stack([i.pixels for i in items])
    names = [i.source for i in items]
    if batch_size is None:
        return [pixels], names
    batches = []
    for start in range(0, len(items), batch_size):
        idx = [(start + k) % len(items) for k in range(batch_size)]
        batches.append(pixels[idx])
    return batches, names


def ort_cpu_logits(path: str | Path, batches: list[torch.Tensor], rows: int) -> torch.Tensor:
    """The file's logits through ONNX Runtime on the CPU, first `rows` rows of the concatenated batches."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: b.numpy()})[0] for b in batches]
    return torch.from_numpy(np.concatenate(out))[:rows]
