"""Shared code for the mobilevit-npu scripts: arguments, device, model loading, preprocessing, reports.

The scripts (inference.py, accuracy_run.py, accuracy_run_perf.py) stay thin and call into this module. Nothing here
touches an accelerator at import time: torch_npu is imported only when an NPU is asked for or auto-detected.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger("mobilevit_npu")

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = "./model"
HUB_MODEL_ID = "apple/mobilevit-x-small"
BUNDLED_IMAGES_DIR = PROJECT_DIR / "tests" / "data"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
URL_TIMEOUT_S = 20.0
URL_MAX_BYTES = 50 * 1024 * 1024


class UserError(Exception):
    """Bad usage, model or device: the scripts print the message (no traceback) and exit 2."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most `limit` characters ("" for an empty message): enough to say
    why in a report or an error without a library's multi-page explanation."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help text, and the script docstring kept as written."""


def script_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as the description, the rest (examples...) as the epilog."""
    summary, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=summary, epilog=rest, formatter_class=HelpFormatter)


def int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum, with a usage error (exit 2) otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def add_device_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("device")
    group.add_argument(
        "--device",
        default="auto",
        help="where to run: auto | cpu | cuda[:N] | npu[:N] | mps. auto picks npu (torch_npu present and a device "
        "visible), else cuda, else mps, else cpu. A device that is asked for and absent is an error (exit 2).",
    )
    group.add_argument(
        "--jit_compile",
        "--jit-compile",
        action="store_true",
        help="NPU only: keep CANN's online operator compilation on (torch.npu.set_compile_mode(jit_compile=True)). "
        "Off by default, which uses prebuilt binary kernels and avoids minutes of first-run compilation on 910B.",
    )
    return group


def add_dtype_arg(group: argparse._ArgumentGroup, help_text: str = "precision of the model on the device") -> None:
    group.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help=help_text)


def add_model_args(parser: argparse.ArgumentParser, positional: bool = False) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    help_text = (
        "Hugging Face model folder (config.json, model.safetensors or pytorch_model.bin, preprocessor_config.json) "
        f"or a hub id such as {HUB_MODEL_ID}. When the default folder holds no weights they are fetched from the "
        "hub (HF_ENDPOINT is honoured, so a mirror works)."
    )
    if positional:
        group.add_argument("model_path", help=help_text)
    else:
        group.add_argument("--model_path", "--model-path", default=DEFAULT_MODEL_DIR, help=help_text)
    return group


# --------------------------------------------------------------------------------------------------------------------
# Device: one seam for every backend call (npu, cuda, mps, cpu)
# --------------------------------------------------------------------------------------------------------------------


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
            f"torch_npu is installed but failed to import ({type(exc).__name__}: {exc}). "
            "Source CANN first: source /usr/local/Ascend/ascend-toolkit/set_env.sh"
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
    importlib.import_module("torch_npu.contrib.transfer_to_npu")
    api.set_compile_mode(jit_compile=jit_compile)
    api.set_device(index)


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
    api = backend_api(device)
    if device.type in ("npu", "cuda"):
        return int(api.max_memory_allocated(device.index))
    if device.type == "mps":
        return int(api.current_allocated_memory())
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
    """CANN version through torch_npu when it is loaded (never imports it)."""
    torch_npu = sys.modules.get("torch_npu")
    if torch_npu is None:
        return None
    for getter in ("npu.utils.get_cann_version", "utils.get_cann_version"):
        obj = torch_npu
        try:
            for part in getter.split("."):
                obj = getattr(obj, part)
            version = obj(module="CANN")
        except Exception:  # older torch_npu lacks it or CANN < 8.1.RC1 answers ""
            continue
        if version:
            return str(version)
    return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: Device) -> dict[str, Any]:
    """What every report carries about where it ran."""
    import transformers

    torch_npu = sys.modules.get("torch_npu")
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_npu": getattr(torch_npu, "__version__", None) if torch_npu else package_version("torch_npu"),
        "cann": cann_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }


# --------------------------------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: PreprocessConfig
    source: dict[str, Any]  # {"path": ..., "weights": file name, "sha256": ...} or {"synthetic": True, ...}
    id2label: dict[int, str]

    @property
    def name(self) -> str:
        return self.source.get("path") or self.source.get("name") or "model"


def _weights_file(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def download_command(repo_id: str, folder: str) -> str:
    """The shell command that fetches a checkpoint, in the CLI spelling of the installed huggingface_hub."""
    from packaging.version import Version

    version = package_version("huggingface_hub")
    cli = "hf download" if version and Version(version) >= Version("0.34") else "huggingface-cli download"
    return f"HF_ENDPOINT=https://hf-mirror.com {cli} {repo_id} --local-dir {folder}"


def fetch_from_hub(repo_id: str, folder: Path | None = None, shown_as: str = DEFAULT_MODEL_DIR) -> Path:
    """Download a checkpoint with huggingface_hub (HF_ENDPOINT honoured). Offline: UserError with the command."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise UserError("huggingface_hub is not installed: pip install huggingface_hub") from exc
    endpoint = os.environ.get("HF_ENDPOINT") or None
    logger.info("fetching %s from %s", repo_id, endpoint or "https://huggingface.co")
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # offline it warns, then hands back the local folder: handled below
    try:
        path = snapshot_download(
            repo_id,
            local_dir=str(folder) if folder else None,
            endpoint=endpoint,
            allow_patterns=["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"],
        )
    except Exception as exc:  # network errors, 404s and offline mode all land here
        raise UserError(
            f"could not download {repo_id} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"Fetch the weights by hand, then pass the folder: {download_command(repo_id, shown_as)}"
        ) from exc
    finally:
        hub_logger.setLevel(hub_level)
    path = Path(path)
    if _weights_file(path) is None:  # offline, huggingface_hub hands back the existing folder instead of failing
        raise UserError(
            f"could not download {repo_id}: the hub is unreachable or holds no {' or '.join(WEIGHT_FILES)}. "
            f"Fetch the weights by hand, then pass the folder: {download_command(repo_id, shown_as)}"
        )
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model_folder(model_path: str) -> Path:
    """The local folder to load: the path itself, or a hub download for a hub id / the empty default folder."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        if _weights_file(path) is None:
            if os.path.normpath(model_path) == os.path.normpath(DEFAULT_MODEL_DIR):
                return fetch_from_hub(HUB_MODEL_ID, path, shown_as=model_path)
            raise UserError(
                f"{path} holds no weights ({' or '.join(WEIGHT_FILES)}). "
                f"Fetch them with: {download_command(HUB_MODEL_ID, str(path))}"
            )
        return path
    if path.exists():
        raise UserError(f"{path} is a file; --model_path takes a model folder or a hub id")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model_path) and not model_path.startswith((".", "/")):
        return fetch_from_hub(model_path)
    raise UserError(f"model folder {model_path} does not exist")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise UserError(f"{what} missing: {path}") from exc
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} is not valid JSON: {path} ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{what} is not a JSON object: {path}")
    return data


def load_model(model_path: str, device: Device | None = None, dtype: str = "fp32") -> LoadedModel:
    """Load a MobileViTForImageClassification folder (or hub id) onto the device in eval mode."""
    from transformers import MobileViTForImageClassification
    from transformers.utils import logging as hf_logging

    folder = resolve_model_folder(model_path)
    config = read_json(folder / "config.json", "config.json")
    if config.get("model_type") != "mobilevit":
        raise UserError(f"{folder} is not a MobileViT model (config.json model_type={config.get('model_type')!r})")
    preprocess = PreprocessConfig.from_folder(folder)
    weights = _weights_file(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # missing-key chatter is checked below instead
    hf_logging.disable_progress_bar()
    try:
        model, info = MobileViTForImageClassification.from_pretrained(str(folder), output_loading_info=True)
    except Exception as exc:  # safetensors/pickle errors on corrupt or truncated files, shape mismatches
        first = first_line(exc) or type(exc).__name__
        raise UserError(f"could not load the weights in {weights}: corrupt, truncated or mismatched ({first})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("num_batches_tracked")]
    if missing:
        logger.warning("%d weights missing from %s and left at random init, e.g. %s", len(missing), weights, missing[0])
    source = {"path": str(folder), "weights": weights.name, "sha256": sha256_file(weights)}
    return _finish(model, preprocess, source, device, dtype)


def _finish(model, preprocess, source, device: Device | None, dtype: str) -> LoadedModel:
    model.eval()
    model.to(dtype=DTYPES[dtype])
    if device is not None:
        model.to(device.torch)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    return LoadedModel(model=model, preprocess=preprocess, source=source, id2label=id2label)


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing (the model's own preprocessor_config.json; both the legacy and the current form)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConfig:
    shortest_edge: int = 288
    crop_height: int = 256
    crop_width: int = 256
    resample: int = Image.Resampling.BILINEAR
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_flip_channel_order: bool = True

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        size = cfg.get("size", cls.shortest_edge)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise UserError(f"preprocessor size {size} is not supported: MobileViT resizes by shortest_edge")
            size = size["shortest_edge"]
        crop = cfg.get("crop_size", cls.crop_height)
        if isinstance(crop, dict):
            crop_h, crop_w = crop["height"], crop["width"]
        else:
            crop_h = crop_w = crop
        return cls(
            shortest_edge=int(size),
            crop_height=int(crop_h),
            crop_width=int(crop_w),
            resample=int(cfg.get("resample", Image.Resampling.BILINEAR)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_center_crop=bool(cfg.get("do_center_crop", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_flip_channel_order=bool(cfg.get("do_flip_channel_order", True)),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> PreprocessConfig:
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            logger.warning("%s missing: using MobileViT's defaults (288 / 256 / bilinear / BGR)", path)
            return cls()
        try:
            return cls.from_dict(read_json(path, "preprocessor_config.json"))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} is not a MobileViT preprocessor config ({exc})") from exc


def resize_shape(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after a shortest-edge resize, rounded as transformers does (int(), not round())."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. Transparency is composited on white (as transformers' convert_to_rgb does); 16- and
    32-bit integer and float greyscale are scaled to 8 bits instead of being clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            array = array / 257.0
        elif image.mode == "F" and array.size and np.nanmax(array) <= 1.0:
            array = array * 255.0
        elif image.mode == "I" and array.size and array.max() > 255:
            array = array / 257.0
        array = np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)
        return Image.fromarray(array).convert("RGB")  # 2-D uint8 is mode L
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """GET an http(s) image with a timeout and a size cap. Failures are OSError, like a bad file."""
    import requests

    try:
        with requests.get(url, timeout=timeout, stream=True) as response:
            response.raise_for_status()
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise OSError(f"{url} is {int(declared)} bytes, over the {max_bytes}-byte cap")
            data = bytearray()
            for chunk in response.iter_content(1 << 16):
                data.extend(chunk)
                if len(data) > max_bytes:
                    raise OSError(f"{url} is over the {max_bytes}-byte cap")
            return bytes(data)
    except requests.RequestException as exc:
        raise OSError(f"could not fetch {url}: {exc}") from exc


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def load_image(source: str | Path) -> Image.Image:
    """Open a file or URL, apply its EXIF orientation and convert it to RGB. Every failure is an OSError."""
    source = str(source)
    try:
        stream = io.BytesIO(fetch_url(source)) if is_url(source) else source
        with Image.open(stream) as opened:
            opened.load()  # decode now, so a truncated file fails here
            image = ImageOps.exif_transpose(opened)
            return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise OSError(f"refused: {exc} (PIL's decompression-bomb guard)") from exc
    except (ValueError, SyntaxError) as exc:  # some PIL plugins raise these on corrupt data
        raise OSError(f"cannot decode image: {exc}") from exc


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image to a CHW float32 array exactly as MobileViTImageProcessor makes it."""
    if cfg.do_resize:
        size = resize_shape(image.width, image.height, cfg.shortest_edge)
        if size != image.size:
            image = image.resize(size, resample=Image.Resampling(cfg.resample))
    array = np.asarray(image)
    if cfg.do_center_crop:
        array = center_crop(array, cfg.crop_height, cfg.crop_width)
    array = array.astype(np.float32)
    if cfg.do_rescale:
        array = array * np.float32(cfg.rescale_factor)
    if cfg.do_flip_channel_order:
        array = array[:, :, ::-1]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def center_crop(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HWC centre crop with transformers' offsets; pads with zeros where the crop is larger than the image."""
    h, w = array.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return array[top : top + crop_h, left : left + crop_w]
    out_h, out_w = max(h, crop_h), max(w, crop_w)
    padded = np.zeros((out_h, out_w) + array.shape[2:], dtype=array.dtype)
    pad_top, pad_left = (out_h - h) // 2, (out_w - w) // 2
    padded[pad_top : pad_top + h, pad_left : pad_left + w] = array
    top, left = (out_h - crop_h) // 2, (out_w - crop_w) // 2
    return padded[top : top + crop_h, left : left + crop_w]


def preprocess(source: str | Path, cfg: PreprocessConfig) -> np.ndarray:
    return preprocess_image(load_image(source), cfg)


@dataclass
class Decoded:
    source: str
    pixels: torch.Tensor  # [3, H, W] float32 on the CPU
    preprocess_ms: float
    position: int  # index in the caller's full list (ranks' results merge back in order)

    @property
    def batch(self) -> torch.Tensor:
        return self.pixels.unsqueeze(0)


def read_images(
    sources: Sequence[str], cfg: PreprocessConfig, positions: Sequence[int] | None = None
) -> tuple[list[Decoded], list[dict]]:
    """Preprocess each image, timing it; the ones that fail come back as {"image", "error", "position"}."""
    ok, errors = [], []
    for source, position in zip(sources, positions if positions is not None else range(len(sources))):
        start = time.perf_counter()
        try:
            array = preprocess(source, cfg)
        except OSError as exc:
            errors.append({"image": source, "error": str(exc) or type(exc).__name__, "position": position})
            continue
        ok.append(Decoded(source, torch.from_numpy(array), (time.perf_counter() - start) * 1000.0, position))
    return ok, errors


# --------------------------------------------------------------------------------------------------------------------
# Inputs: paths, directories, globs, URLs
# --------------------------------------------------------------------------------------------------------------------


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def expand_images(specs: Sequence[str]) -> list[str]:
    """Paths, directories (their images, sorted), globs and URLs, in the order given. A spec that names nothing
    stays in the list as given, so the caller reports it as an error for that image."""
    out: list[str] = []
    for spec in specs:
        if is_url(spec):
            out.append(spec)
        elif os.path.isdir(spec):
            out.extend(sorted(str(p) for p in Path(spec).iterdir() if p.is_file() and is_image_name(p.name)))
        elif glob.has_magic(spec):
            out.extend(sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)))
        else:
            out.append(spec)
    return out


def bundled_images() -> list[str]:
    """The photos in tests/data, as paths relative to the working directory when they lie below it."""
    folder = BUNDLED_IMAGES_DIR
    with contextlib.suppress(ValueError):
        folder = BUNDLED_IMAGES_DIR.relative_to(Path.cwd())
    return expand_images([str(folder)])


# --------------------------------------------------------------------------------------------------------------------
# Synthetic full-size weights with healthy activations
# --------------------------------------------------------------------------------------------------------------------


def x_small_config():
    """The apple/mobilevit-x-small configuration, read from the committed model/config.json."""
    from transformers import MobileViTConfig

    return MobileViTConfig.from_pretrained(str(PROJECT_DIR / "model"))


def _calibration_batch(images: Iterable[str], cfg: PreprocessConfig) -> torch.Tensor:
    """The photos plus their mirror images and two shifted crops each: varied real statistics for BatchNorm."""
    tensors = []
    for path in images:
        image = load_image(path)
        tensors.append(torch.from_numpy(preprocess_image(image, cfg)))
        tensors.append(torch.from_numpy(preprocess_image(ImageOps.mirror(image), cfg)))
        wide = PreprocessConfig(**{**dataclasses.asdict(cfg), "shortest_edge": cfg.shortest_edge + 64})
        tensors.append(torch.from_numpy(preprocess_image(image, wide)))
        tensors.append(torch.from_numpy(preprocess_image(ImageOps.flip(image), wide)))
    return torch.stack(tensors)


@torch.no_grad()
def build_synthetic_model(
    config=None, seed: int = 0, images: Sequence[str] | None = None, logit_std: float = 3.0
) -> torch.nn.Module:
    """A MobileViTForImageClassification whose activations are healthy, for machines without the real weights.

    transformers' random init draws BatchNorm scales near 0, so activations die (logits ~0, float denormals make CPU
    inference ~5x slower). Here: He-initialised convs and linears, BatchNorm/LayerNorm scale 1, BatchNorm running
    statistics calibrated on real photos, and the classifier scaled so the logits spread (std `logit_std` across
    classes) as a trained model's do. Deterministic for a given seed, config and photos.
    """
    from transformers import MobileViTForImageClassification

    config = config or x_small_config()
    generator = torch.Generator().manual_seed(seed)
    model = MobileViTForImageClassification(config).eval()
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = module.weight[0].numel()
            gain = 1.0 if getattr(module, "groups", 1) > 1 else math.sqrt(2.0)
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * gain / math.sqrt(fan_in))
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.02)
        elif isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)):
            module.weight.fill_(1.0)
            module.bias.zero_()
    batch = _calibration_batch(images or bundled_images(), PreprocessConfig())
    calibrate_batchnorm(model, batch)
    logits = model(pixel_values=batch).logits
    classifier = model.classifier
    scale = logit_std / float(logits.std(dim=1).mean())
    classifier.weight.mul_(scale)
    classifier.bias.copy_(torch.randn(classifier.bias.shape, generator=generator) * 0.1 * logit_std)
    return model.eval()


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """Set every BatchNorm's running mean/var to the statistics of `batch`, layer by layer, in one forward pass."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass gives the exact batch statistics
        m.train()
    try:
        model(pixel_values=batch)
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)


def synthetic_model(device: Device | None = None, dtype: str = "fp32", seed: int = 0) -> LoadedModel:
    """The full-size synthetic X-Small, ready to run; reports name it "synthetic"."""
    model = build_synthetic_model(seed=seed)
    source = {"synthetic": True, "name": f"synthetic mobilevit-x-small (seed {seed})", "seed": seed}
    return _finish(model, PreprocessConfig.from_folder(PROJECT_DIR / "model"), source, device, dtype)


def save_synthetic_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the synthetic X-Small as a Hugging Face folder (config, safetensors, preprocessor config)."""
    folder = Path(folder)
    build_synthetic_model(seed=seed).save_pretrained(str(folder))
    src = PROJECT_DIR / "model" / "preprocessor_config.json"
    (folder / "preprocessor_config.json").write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


def json_safe(obj: Any) -> Any:
    """Dataclasses to dicts, numpy scalars to Python, NaN/inf to None (a NaN in a report is a bug; null says so)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON through a temp file in the same folder, then rename: a crash never leaves half a report."""
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False, ensure_ascii=False) + "\n")


def json_line(obj: Any) -> str:
    """One JSON-lines record (strict JSON: NaN and infinities become null), newline included."""
    return json.dumps(json_safe(obj), allow_nan=False) + "\n"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` through a temp file in the same folder, fsync'd, then rename: readers see all of it or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a report is as readable as any file the user writes
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")


def run_main(body, argv=None, usage_codes: bool = False) -> int:
    """Run a script body, turning UserError into a one-line message and exit code 2 (no traceback). With
    `usage_codes`, argparse's exits (--help 0, usage errors 2) come back as return codes, for main([...]) callers."""
    try:
        return body(argv)
    except SystemExit as exc:
        if not usage_codes:
            raise
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@dataclass
class Timer:
    """Wall-clock timer that synchronizes the device before each read."""

    device: Device
    start_s: float = 0.0
    elapsed_ms: float = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self.start_s = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.elapsed_ms = (time.perf_counter() - self.start_s) * 1000.0
