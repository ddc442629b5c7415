"""Model folders: resolve a path or hub id, fetch from the hub (HF_ENDPOINT honoured), load with transformers."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobilevit_npu import devices, preprocessing, reports
from mobilevit_npu.errors import UserError, first_line

logger = logging.getLogger("mobilevit_npu.models")


DEFAULT_MODEL_DIR = "./model"
HUB_MODEL_ID = "apple/mobilevit-x-small"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: str) -> str:
    """fp32 -> float32, fp16 -> float16, bf16 -> bfloat16 (torch's own names, for reports)."""
    return str(DTYPES[dtype]).removeprefix("torch.")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: preprocessing.PreprocessConfig
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

    version = devices.package_version("huggingface_hub")
    cli = "hf download" if version and Version(version) >= Version("0.34") else "huggingface-cli download"
    return f"HF_ENDPOINT=https://hf-mirror.com {cli} {repo_id} --local-dir {folder}"


def fetch_from_hub(repo_id: str, folder: Path | None = None, shown_as: str = DEFAULT_MODEL_DIR) -> Path:
    """Download a checkpoint with huggingface_hub (HF_ENDPOINT honoured). Offline: UserError with the command."""
    from huggingface_hub import snapshot_download

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


def load_model(model_path: str, device: devices.Device | None = None, dtype: str = "fp32") -> LoadedModel:
    """Load a MobileViTForImageClassification folder (or hub id) onto the device in eval mode."""
    from transformers import MobileViTForImageClassification
    from transformers.utils import logging as hf_logging

    folder = resolve_model_folder(model_path)
    config = reports.read_json(folder / "config.json", "config.json")
    if config.get("model_type") != "mobilevit":
        raise UserError(f"{folder} is not a MobileViT model (config.json model_type={config.get('model_type')!r})")
    preprocess = preprocessing.PreprocessConfig.from_folder(folder)
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
    return finish(model, preprocess, source, device, dtype)


def finish(model, preprocess, source, device: devices.Device | None, dtype: str) -> LoadedModel:
    model.eval()
    model.to(dtype=DTYPES[dtype])
    if device is not None:
        model.to(device.torch)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    return LoadedModel(model=model, preprocess=preprocess, source=source, id2label=id2label)
