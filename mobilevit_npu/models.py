"""Model folders: resolve a path or hub id, fetch from the hub (HF_ENDPOINT honoured), load with transformers'
AutoModelForImageClassification; the loaded model carries its family (mobilevit_npu.families)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobilevit_npu import devices, families, flags, preprocessing, reports
from mobilevit_npu.errors import UserError, first_line

logger = logging.getLogger("mobilevit_npu.models")


DEFAULT_MODEL_DIR, HUB_MODEL_ID = flags.DEFAULT_MODEL_DIR, flags.HUB_MODEL_ID  # torch-free for --help
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DTYPES = dict(zip(flags.DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))  # names: flags (--help)


def dtype_name(dtype: str) -> str:
    """fp32 -> float32, fp16 -> float16, bf16 -> bfloat16 (torch's own names, for reports)."""
    return str(DTYPES[dtype]).removeprefix("torch.")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: preprocessing.PreprocessConfig
    source: dict[str, Any]  # {"path": ..., "weights": file name, "sha256": ...} or {"synthetic": True, ...}
    id2label: dict[int, str]
    family: families.Family | None = None  # set by finish() from the model's config

    @property
    def name(self) -> str:
        return self.source.get("path") or self.source.get("name") or "model"


def _weights_file(folder: Path) -> Path | None:
    """The folder's weights file, None when it has none; a UserError when one of WEIGHT_FILES is there but is not a
    regular file (a FIFO, a link to a device, a folder, a dangling link): said as such, from its stat alone (a FIFO
    is never opened: that would wait for a writer)."""
    for name in WEIGHT_FILES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
        if os.path.lexists(candidate):
            try:
                preprocessing.require_regular_file(candidate)
            except FileNotFoundError:
                raise UserError(
                    f"model folder: {candidate} is a link to {os.path.realpath(candidate)}, which does not exist"
                ) from None
            except OSError as exc:
                raise UserError(f"model folder: {first_line(exc)}") from exc
    return None


def download_command(repo_id: str, folder: str) -> str:
    """The shell command that fetches a checkpoint, in the CLI spelling of the installed huggingface_hub."""
    from packaging.version import Version

    version = devices.package_version("huggingface_hub")
    cli = "hf download" if version and Version(version) >= Version("0.34") else "huggingface-cli download"
    return f"HF_ENDPOINT=https://hf-mirror.com {cli} {repo_id} --local-dir {folder}"


def hub_offline() -> str | None:
    """The setting that puts huggingface_hub in offline mode ("HF_HUB_OFFLINE=1"), or None: its constants.py reads
    HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE, true for 1/ON/YES/TRUE (huggingface_hub 0.26.0 constants.py:129, 2.4.0
    :194), once at its import; read here the same way, at call time."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:
            return f"{name}={value}" if value.upper() in ("1", "ON", "YES", "TRUE") else None
    return None


def _cannot_fetch(repo_id: str, why: str, shown_as: str) -> UserError:
    offline = hub_offline()
    where = f"{offline} keeps huggingface_hub offline, and its cache holds no {repo_id}" if offline else why
    return UserError(
        f"could not download {repo_id}: {where}. Fetch the weights where the hub is reachable, then pass the folder: "
        f"{download_command(repo_id, shown_as)}; or run without weights: --synthetic (synthetic weights, real latency, "
        "meaningless predictions)"
    )


def fetch_from_hub(repo_id: str, folder: Path | None = None, shown_as: str = DEFAULT_MODEL_DIR) -> Path:
    """Download a checkpoint with huggingface_hub (HF_ENDPOINT honoured). Offline: UserError with the command and
    --synthetic."""
    from huggingface_hub import snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    if hub_offline():
        logger.info("looking for %s in huggingface_hub's cache (%s: no download)", repo_id, hub_offline())
    else:
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
        why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        raise _cannot_fetch(repo_id, why, shown_as) from exc
    finally:
        hub_logger.setLevel(hub_level)
    path = Path(path)
    if _weights_file(path) is None:  # offline, huggingface_hub hands back the existing folder instead of failing
        raise _cannot_fetch(repo_id, f"the hub is unreachable or holds no {' or '.join(WEIGHT_FILES)}", shown_as)
    return path


def sha256_file(path: Path) -> str:
    """sha256 of a regular file's bytes (OSError for a device, FIFO or folder: hashing /dev/zero never ends)."""
    preprocessing.require_regular_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the weights a module holds: every state dict entry's name, dtype, shape and raw bytes, in name
    order. The one identity of loaded weights (reference cache key, compile cache key, ONNX sidecars): it covers what
    was loaded, not the file it came from. bfloat16 has no numpy dtype, so each tensor is hashed as its bytes
    (a uint8 view of the flattened contiguous CPU copy), which works for every dtype."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def hub_snapshot(folder: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) of a folder in the hub cache (huggingface_hub 2.4.0's `models--ORG--NAME/snapshots/COMMIT`:
    file_download.py:747-755 `repo_folder_name`, _snapshot_download.py:429), else None."""
    parts = Path(os.path.abspath(folder)).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/", 1), parts[-1]
    return None


def hub_origin(folder: Path, weights: Path, sha256: str, fetched: str | None = None) -> dict[str, str | None]:
    """Where the weights came from, for the report's model_source: {"hub_id", "revision"} when they are the hub's,
    {} for a local folder. A folder in the hub cache (huggingface_hub's `models--ORG--NAME/snapshots/COMMIT` layout,
    file_download.py `repo_folder_name`) names both; a folder this run downloaded into (`fetched`: the repo id) names
    the commit in huggingface_hub's local-dir metadata (`.cache/huggingface/download/FILE.metadata`: commit, etag,
    time; huggingface_hub 2.4.0 _local_folder.py:36-45 and 296-320), trusted only when its etag, the sha256 of an
    LFS file, is the file's. Read here, never written: nothing is claimed that the folder does not show."""
    snapshot = hub_snapshot(folder)
    if snapshot is not None:
        return {"hub_id": snapshot[0], "revision": snapshot[1]}
    if fetched is None:
        return {}
    revision = None
    metadata = Path(folder) / ".cache" / "huggingface" / "download" / f"{weights.name}.metadata"
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
        if len(lines) >= 2 and lines[1].strip() == sha256:
            revision = lines[0].strip() or None
    except (OSError, UnicodeDecodeError):
        pass
    return {"hub_id": fetched, "revision": revision}


def resolve_model_folder(model_path: str) -> Path:
    """The local folder to load: the path itself, or a hub download for a hub id / the empty default folder."""
    return _local_folder(model_path)[0]


def _local_folder(model_path: str) -> tuple[Path, str | None]:
    """(the local folder to load, the hub id when this call downloaded it into that folder, else None)."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        if _weights_file(path) is None:
            if os.path.normpath(model_path) == os.path.normpath(DEFAULT_MODEL_DIR):
                return fetch_from_hub(HUB_MODEL_ID, path, shown_as=model_path), HUB_MODEL_ID
            raise UserError(
                f"{path} holds no weights ({' or '.join(WEIGHT_FILES)}). "
                f"Fetch them with: {download_command(HUB_MODEL_ID, str(path))}"
            )
        return path, None
    if path.exists():
        raise UserError(f"{path} is a file; --model_path takes a model folder or a hub id")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model_path) and not model_path.startswith((".", "/")):
        return fetch_from_hub(model_path), model_path
    where = ""
    if os.path.normpath(model_path) == os.path.normpath(DEFAULT_MODEL_DIR):
        where = f" in {os.getcwd()} (the default is relative to the working folder)"
    raise UserError(
        f"model folder {model_path} does not exist{where}. Pass a folder that holds the weights, or the hub id "
        f"{HUB_MODEL_ID} to download them (--model_path for inference.py, MODEL_PATH for the others), or fetch them "
        f"first: {download_command(HUB_MODEL_ID, model_path)}"
    )


def _load_failure(exc: Exception, folder: Path, weights: Path) -> str:
    """Why from_pretrained failed, in one line: the first mismatched tensors with both shapes, or the library's own
    message cut at a sentence end (never mid-sentence)."""
    mismatched = shape_mismatches(folder, weights)
    if mismatched:
        shown = "; ".join(f"{key}: checkpoint {list(got)} vs model {list(want)}" for key, got, want in mismatched[:3])
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        return (
            f"{len(mismatched)} tensor(s) do not fit the shapes config.json gives: {shown}{more}; are config.json "
            "and the weights from the same model?"
        )
    why = first_line(exc) or type(exc).__name__
    if weights.suffix == ".bin" and not zipfile.is_zipfile(weights):
        first_sentence = why.split(". ")[0].rstrip(".") + "."  # its advice (weights_only=False) is for real pickles
        return f"not a torch.save archive: corrupt, truncated or not a checkpoint (torch.load: {first_sentence})"
    return f"corrupt, truncated or mismatched ({why})"


def checkpoint_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in a safetensors or torch.save file, read without building the model ({} when unreadable)."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as fh:
                return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
        state = torch.load(str(weights), map_location="cpu", weights_only=True, mmap=True)
        return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
    except Exception:  # noqa: BLE001 - an unreadable file has its own error
        return {}


def shape_mismatches(folder: Path, weights: Path) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(key, checkpoint shape, model shape) for every tensor whose shape differs from the model config.json builds."""
    from transformers import AutoConfig, AutoModelForImageClassification

    found = checkpoint_shapes(weights)
    if not found:
        return []
    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):  # shapes only: no memory, no init
            model = AutoModelForImageClassification.from_config(config)
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception:  # noqa: BLE001 - a bad config.json is reported by from_pretrained itself
        return []
    return [(key, shape, expected[key]) for key, shape in found.items() if key in expected and expected[key] != shape]


def check_loaded_keys(info: dict[str, Any], weights: Path) -> None:
    """UserError (exit 2) naming them when from_pretrained's loading info (output_loading_info=True: a dict with
    "missing_keys" and "unexpected_keys" in transformers 4.47.1, modeling_utils.py:4356, and 5.x,
    utils/loading_report.py LoadStateDictInfo.to_dict) lists any: a tensor missing from the checkpoint is left at
    transformers' random init, different in every process, so the model is not the checkpoint's; a tensor the model
    does not have means the checkpoint is for another architecture or config. BatchNorm's num_batches_tracked counter
    is not a weight (older checkpoints lack it)."""

    def keys(name: str) -> list[str]:
        return sorted(k for k in info.get(name) or () if not str(k).endswith("num_batches_tracked"))

    def shown(found: list[str]) -> str:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        return ", ".join(found[:3]) + more

    missing, unexpected = keys("missing_keys"), keys("unexpected_keys")
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) the model needs are missing (they would be random): {shown(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) the model does not have: {shown(unexpected)}")
    if parts:
        raise UserError(
            f"{weights} does not fit config.json: {'; '.join(parts)}. Is this the complete checkpoint of this model?"
        )


def load_model(model_path: str, device: devices.Device | None = None, dtype: str = "fp32") -> LoadedModel:
    """Load an image-classifier folder (or hub id) onto the device in eval mode, through
    AutoModelForImageClassification (the class config.json's model_type and architectures name)."""
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    folder, fetched = _local_folder(model_path)
    for name in ("config.json", "preprocessor_config.json", *WEIGHT_FILES):
        if os.path.lexists(folder / name):
            try:
                preprocessing.require_regular_file(folder / name)
            except OSError as exc:
                raise UserError(f"model folder: {first_line(exc)}") from exc
    config = reports.read_json(folder / "config.json", "config.json")
    families.resolve(config, str(folder / "config.json"))  # one line for a folder that is no image classifier
    preprocess = preprocessing.PreprocessConfig.from_folder(folder)
    weights = _weights_file(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # missing-key chatter is checked below instead
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForImageClassification.from_pretrained(str(folder), output_loading_info=True)
    except Exception as exc:  # safetensors/pickle errors on corrupt or truncated files, shape mismatches
        raise UserError(f"could not load the weights in {weights}: {_load_failure(exc, folder, weights)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    check_loaded_keys(info, weights)
    digest = sha256_file(weights)
    source = {"path": str(folder), "weights": weights.name, "sha256": digest}
    source.update(hub_origin(folder, weights, digest, fetched))
    return finish(model, preprocess, source, device, dtype)


def finish(model, preprocess, source, device: devices.Device | None, dtype: str) -> LoadedModel:
    model.eval()
    model.to(dtype=DTYPES[dtype])
    if device is not None:
        model.to(device.torch)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    family = families.resolve(model.config)
    return LoadedModel(model=model, preprocess=preprocess, source=source, id2label=id2label, family=family)


def load_named(named: Any, device: devices.Device | None, dtype: str = "fp32") -> LoadedModel:
    """The model a script's settings name (attributes `model_path`, `synthetic`, `seed` and optionally
    `max_image_pixels` / `max_aspect_ratio`): the synthetic weights (seeded) or the folder / hub id, on `device` in
    `dtype`, with the image limits in its preprocessing config (they travel into DataLoader workers too)."""
    import dataclasses

    from mobilevit_npu import synthetic  # synthetic builds on this module

    if getattr(named, "synthetic", False):
        logger.info("building the synthetic full-size X-Small (%s is not read)", named.model_path)
        loaded = synthetic.synthetic_model(device, dtype, seed=named.seed)
    else:
        loaded = load_model(named.model_path, device, dtype)
    limits = {k: v for k in ("max_image_pixels", "max_aspect_ratio") if (v := getattr(named, k, None)) is not None}
    if limits:
        loaded.preprocess = dataclasses.replace(loaded.preprocess, **limits)
    return loaded
