"""A disk cache of the CPU float32 reference logits, so a labelled set's reference is computed once, not per run.

For the same weights, preprocessing and image bytes the reference (CPU, float32, eager) is always the same, yet it is
most of a verification run's work. accuracy_run stores each image's reference logits here and later runs and ranks
read them back; a second run with another target computes only the target.

Layout: `<root>/<key[:32]>/<digest[:2]>/<digest>.ref`, one file per image, where `key` hashes what the reference
depends on (`reference_key`: the weights' sha256, the model config, the preprocessing config, the torch and
transformers versions, the cache format) and `digest` is the sha256 of the image file's bytes. `<key[:32]>/key.json`
says, for people, what the key was made of.

An entry is a magic line, a JSON header line (format, key, digest, torch and transformers versions, class count, the
payload's sha256) and the logits as little-endian float32 (the reference's own precision, so nothing is lost). A
reader trusts an entry only when all of that matches; a torn, truncated, corrupt or stale entry is a miss (counted
as `invalid`), recomputed and overwritten. Writers write a temp file in the entry's folder and rename it into place,
so concurrent ranks (or runs) never see half an entry: the worst case is two equal entries, one replacing the other.

The cache is an optimisation: a folder that cannot be written is reported once and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilevit_npu import models, preprocessing

logger = logging.getLogger("mobilevit_npu.refcache")

FORMAT = 1
MAGIC = b"MVREF1\n"
CACHE_ENV = "MOBILEVIT_NPU_CACHE"  # overrides the user cache folder for every cache of this project


def user_cache_dir() -> Path:
    """The project's cache folder: $MOBILEVIT_NPU_CACHE, else $XDG_CACHE_HOME/mobilevit-npu, else
    ~/.cache/mobilevit-npu."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mobilevit-npu"


def default_root() -> Path:
    return user_cache_dir() / "reference"


def file_digest(source: str) -> str | None:
    """sha256 of an image file's bytes; None for URLs (their bytes can change under the same name) and unreadable
    files (the decoder reports those)."""
    if preprocessing.is_url(str(source)):
        return None
    try:
        return models.sha256_file(Path(source))
    except OSError:
        return None


def weights_digest(model: torch.nn.Module, source: dict[str, Any]) -> str:
    """The weights file's sha256 when the model came from a folder; otherwise (synthetic weights) the sha256 of the
    state dict's tensors, so a change in how they are made changes the key too."""
    if source.get("sha256"):
        return str(source["sha256"])
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def reference_key(model: torch.nn.Module, source: dict[str, Any], preprocess: preprocessing.PreprocessConfig) -> dict:
    """What the reference logits depend on, besides the image bytes."""
    config = model.config.to_dict() if hasattr(model, "config") else {}
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    return {
        "format": FORMAT,
        "weights_sha256": weights_digest(model, source),
        "model_config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "preprocess": asdict(preprocess),
        **_versions(),
        "reference": "cpu float32 eager",
    }


@dataclass
class CacheStats:
    cached: int = 0  # reference rows read from the cache
    computed: int = 0  # reference rows computed in this run
    invalid: int = 0  # entries found but not trusted (corrupt, partial, stale): recomputed
    stored: int = 0  # entries written
    uncacheable: int = 0  # images without a content hash (URLs)
    write_errors: list[str] = field(default_factory=list)


class ReferenceCache:
    """Reference logits per image content hash under one key (see the module docstring)."""

    def __init__(self, root: str | Path, key_fields: dict[str, Any]):
        self.root = Path(root)
        self.key_fields = key_fields
        self.key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
        self.folder = self.root / self.key[:32]
        self.versions = {k: key_fields[k] for k in ("torch", "transformers")}
        self.stats = CacheStats()
        self._writable = True

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.ref"

    def get(self, digest: str | None) -> torch.Tensor | None:
        """The cached logits (float64 [classes]) of the image with this content hash, or None (absent or not
        trustworthy; counted in stats.invalid when present but bad)."""
        if digest is None:
            return None
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("reference cache: cannot read %s (%s); recomputing", path, exc)
            self.stats.invalid += 1
            return None
        logits, problem = self._decode(data, digest)
        if problem:
            logger.warning("reference cache: %s %s; recomputing", path, problem)
            self.stats.invalid += 1
            return None
        return logits

    def _decode(self, data: bytes, digest: str) -> tuple[torch.Tensor | None, str | None]:
        if not data.startswith(MAGIC):
            return None, "is not a cache entry (bad magic)"
        end = data.find(b"\n", len(MAGIC))
        if end < 0:
            return None, "is truncated (no header)"
        try:
            header = json.loads(data[len(MAGIC) : end])
        except ValueError:
            return None, "has a corrupt header"
        if not isinstance(header, dict):
            return None, "has a corrupt header"
        if header.get("format") != FORMAT or header.get("key") != self.key or header.get("digest") != digest:
            return None, "is stale (another format, key or image)"
        stale = {k: (header.get(k), v) for k, v in self.versions.items() if header.get(k) != v}
        if stale:
            return None, "is stale (" + ", ".join(f"{k} {a} != {b}" for k, (a, b) in stale.items()) + ")"
        payload = data[end + 1 :]
        classes = header.get("classes")
        if not isinstance(classes, int) or len(payload) != 4 * classes:
            return None, f"is partial ({len(payload)} payload bytes for {classes} classes)"
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            return None, "is corrupt (checksum mismatch)"
        array = np.frombuffer(payload, dtype="<f4").astype(np.float64)
        return torch.from_numpy(array), None

    def put(self, digest: str | None, logits: torch.Tensor) -> None:
        """Store one image's reference logits (any float dtype; kept as float32, the reference's precision)."""
        if digest is None or not self._writable:
            return
        payload = logits.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
        header = {
            "format": FORMAT, "key": self.key, "digest": digest, **self.versions, "classes": int(logits.numel()),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }  # fmt: skip
        path = self.path(digest)
        try:
            if not (self.folder / "key.json").is_file():
                self._write_atomic(self.folder / "key.json", json.dumps(self.key_fields, indent=2).encode())
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_atomic(path, MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
        except OSError as exc:
            self._writable = False
            self.stats.write_errors.append(f"{path}: {exc}")
            logger.warning("reference cache: cannot write under %s (%s); going on without storing", self.root, exc)
            return
        self.stats.stored += 1

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)  # atomic: readers see the old entry or the whole new one
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def lookup(self, digests: Sequence[str | None]) -> list[torch.Tensor | None]:
        """get() for each digest; counts the images that have no digest as uncacheable."""
        self.stats.uncacheable += sum(d is None for d in digests)
        return [self.get(d) for d in digests]

    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {"folder": str(self.folder), "cached": s.cached, "computed": s.computed, "invalid": s.invalid,
                "stored": s.stored, "uncacheable": s.uncacheable, "write_errors": s.write_errors[:5]}  # fmt: skip


def open_cache(spec: str | None, model: torch.nn.Module, source: dict[str, Any],
               preprocess: preprocessing.PreprocessConfig) -> ReferenceCache | None:  # fmt: skip
    """The cache --reference_cache names: None for "off", the default folder for None, else that folder."""
    if spec is not None and spec.strip().lower() == "off":
        return None
    root = Path(spec).expanduser() if spec else default_root()
    return ReferenceCache(root, reference_key(model, source, preprocess))
