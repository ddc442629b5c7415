"""Disk caches keyed by image content: the CPU float32 reference logits, and (opt-in) the decoded crops.

For the same weights, preprocessing and image bytes the reference (CPU, float32, eager) is always the same, yet it is
most of a verification run's work. accuracy_run stores each image's reference logits here and later runs and ranks
read them back; a second run with another target computes only the target. With the reference cached, decoding the
JPEGs is what is left besides the target (3-5 ms per image on one core); `PixelCache` keeps each image's decoded,
resized and cropped pixels (HWC uint8, 196 KB at 256x256), so later runs over the same set read them instead.

Layout: `<root>/<key[:32]>/<digest[:2]>/<digest>.<suffix>`, one file per image, where `key` hashes what the entries
depend on and `digest` is the sha256 of the image file's bytes. The pixels depend on `pixels_key`: the preprocessing
config, the code that decodes and crops (its source), and the decoder (Pillow and its libjpeg: Pillow 13 changed the
order of its resize passes for tall images, so the same JPEG gives other pixels under Pillow 12). The reference
depends on `reference_key`: the digest of the weights actually loaded (models.weights_digest: a tensor left out of
the checkpoint changes it), the model config, its structure and code, the pixels' key, the torch and transformers
versions and the cache format. `<key[:32]>/key.json` says, for people, what the key was made of.

An entry is a magic line, a JSON header line (format, key, digest, versions, dtype and shape, the payload's sha256)
and the array's raw bytes (logits as little-endian float32, the reference's own precision, so nothing is lost). A
reader trusts an entry only when all of that matches; a torn, truncated, corrupt or stale entry is a miss (counted
as `invalid`), recomputed and overwritten. Writers write a temp file in the entry's folder and rename it into place,
so concurrent ranks (or runs, or decoding workers) never see half an entry: the worst case is two equal entries, one
replacing the other.

A cache is an optimisation: a folder that cannot be written is reported once and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import logging
import marshal
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilevit_npu import atomic, flags, models, preprocessing
from mobilevit_npu.errors import UserError

logger = logging.getLogger("mobilevit_npu.refcache")

FORMAT = 2  # 2: entries give dtype and shape; keys cover the decoder (Pillow, libjpeg) and the pixel code
MAGIC = b"MVCACHE2\n"
# The cache folders' names and defaults: in flags (torch-free: --help shows them without importing torch).
CACHE_ENV, user_cache_dir, default_root, default_pixel_root = (
    flags.CACHE_ENV,
    flags.user_cache_dir,
    flags.default_root,
    flags.default_pixel_root,
)


def file_digest(source: str) -> str | None:
    """sha256 of an image file's bytes; None for URLs (their bytes can change under the same name) and unreadable
    files (the decoder reports those)."""
    if preprocessing.is_url(str(source)):
        return None
    try:
        return models.sha256_file(Path(source))
    except OSError:
        return None


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _pixel_code() -> str:
    """sha256 of the source of every function that turns image bytes into the model's input (of their bytecode where
    the source is not shipped)."""
    functions = (
        preprocessing.load_image,
        preprocessing.to_rgb,
        preprocessing.crop_pixels,
        preprocessing.resize_shape,
        preprocessing.resized_size,
        preprocessing.center_crop,
        preprocessing.torchvision_resize,
        preprocessing.torchvision_center_crop,
        preprocessing._native_uint8,
        preprocessing.to_input,
        preprocessing._input_table,
        preprocessing._tv_normalize,
    )
    digest = hashlib.sha256()
    for function in functions:
        try:
            digest.update(inspect.getsource(function).encode())
        except (OSError, TypeError):
            digest.update(marshal.dumps(function.__code__))
    return digest.hexdigest()


def pixels_key(preprocess: preprocessing.PreprocessConfig) -> dict:
    """What an image's decoded crop depends on, besides its bytes."""
    import PIL
    from PIL import features

    return {
        "format": FORMAT,
        "preprocess": asdict(preprocess),
        "code_sha256": _pixel_code(),
        "resize_kernel": preprocessing.resize_kernel(preprocess),  # torch's kernels for the torchvision backend
        "pillow": PIL.__version__,
        "libjpeg": _feature_version(features, "jpg"),  # the API version (6.2, 8.0) ...
        "libjpeg_turbo": _feature_version(features, "libjpeg_turbo"),  # ... and the decoder's own release
    }


def _feature_version(features, name: str) -> str:
    try:
        return str(features.version(name) or "none")
    except (AttributeError, ValueError):  # an old Pillow without this query
        return "unknown"


# Attributes that name where a model came from, or what it has said, not what it computes: left out of every key, so
# the same model copied to another folder keeps its cache entries.
UNKEYED_ATTRIBUTES = ("name_or_path", "warnings_issued")


def config_fields(config: Any) -> dict[str, Any]:
    """A model config as the keys see it: its to_dict() less the private fields ("_name_or_path", the attention
    implementation chosen at load) and the transformers version that wrote it (the installed one is keyed apart)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in data.items() if not str(k).startswith("_") and k != "transformers_version"}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def config_digest(module: torch.nn.Module) -> str | None:
    """sha256 over the config (config.json as loaded: hidden_act, eps, sizes...) of every module inside `module` that
    holds one (a Hugging Face model and its parts), None when none does (a rebuilt fast model: its structure says it,
    see structure_digest)."""
    configs = []
    for name, sub in module.named_modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            configs.append([name, config_fields(config)])
    return _digest(configs) if configs else None


def _plain(value: Any, depth: int = 0) -> Any:
    """An attribute as JSON: numbers, strings, sequences and dicts of them as they are; a dtype or device by name; a
    config by its fields; a function by its qualified name; any other object by its type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 4:
        return f"<{type(value).__qualname__}>"
    if isinstance(value, (tuple, list)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a transformers config
        return config_fields(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"<{getattr(value, '__module__', '?')}.{value.__qualname__}>"
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def structure_digest(module: torch.nn.Module) -> str:
    """sha256 over what a module computes besides its weights and its code: every submodule's name and class and its
    public plain attributes (a convolution's stride and groups, a norm's eps, the number of heads, a residual switch,
    a fast model's activation class). Two models of one code and one weights file whose config.json differs (only
    hidden_act, say: SiLUActivation and GELUActivation live in one source file) differ here."""
    parts = []
    for name, sub in module.named_modules():
        attributes = {
            k: _plain(v)
            for k, v in vars(sub).items()
            if not k.startswith("_") and k not in UNKEYED_ATTRIBUTES and not isinstance(v, torch.Tensor)
        }
        parts.append([name, f"{type(sub).__module__}.{type(sub).__qualname__}", attributes])
    return _digest(parts)


def code_digest(module: torch.nn.Module) -> str:
    """sha256 over the source files of every module class inside `module` (the wrapper, the fast path, transformers'
    modeling file): a change in any of them changes what the module computes (and what export traces)."""
    digest = hashlib.sha256()
    files = set()
    for sub in module.modules():
        with contextlib.suppress(TypeError, OSError):
            files.add(inspect.getfile(type(sub)))
    for name in sorted(files):
        with contextlib.suppress(OSError):
            digest.update(Path(name).read_bytes())
    return digest.hexdigest()


def reference_key(model: torch.nn.Module, source: dict[str, Any], preprocess: preprocessing.PreprocessConfig) -> dict:
    """What the reference logits depend on, besides the image bytes: the weights loaded, the model's config, structure
    and code, the preprocessing (the pixels' key), torch and transformers. Not the batch shape: the reference is
    computed on whichever rows miss the cache, so one run already mixes batch shapes (CPU float32 eager, the same
    logits up to float32 rounding)."""
    config = model.config if hasattr(model, "config") else {}
    return {
        "format": FORMAT,
        "weights_sha256": models.weights_digest(model),  # the weights loaded, not the file
        "model_config_sha256": _digest(config_fields(config)),
        "structure_sha256": structure_digest(model),
        "code_sha256": code_digest(model),
        "pixels": pixels_key(preprocess),
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

    def add(self, other: CacheStats) -> None:
        """Count another copy's work too (a decoding worker's)."""
        for name in ("cached", "computed", "invalid", "stored", "uncacheable"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.write_errors += other.write_errors


class EntryCache:
    """Arrays of one dtype per image content hash, under one key (see the module docstring)."""

    suffix, what = "entry", "entry"
    dtype = np.dtype("<f4")
    # the versions in the key that each header repeats, so a stale entry says which one changed
    version_fields = ("torch", "transformers", "pillow", "libjpeg", "libjpeg_turbo")

    def __init__(self, root: str | Path, key_fields: dict[str, Any]):
        self.root = Path(root)
        self.key_fields = key_fields
        self.key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
        self.folder = self.root / self.key[:32]
        self.versions = {k: key_fields[k] for k in self.version_fields if k in key_fields}
        self.stats = CacheStats()
        self._writable = True
        self._readable = True
        self.quiet = False  # a decoding worker's copy: its failures travel to the caller's copy (merge), said there
        if self.root.exists() and not self.root.is_dir():
            self._unusable(NotADirectoryError(errno.ENOTDIR, "not a folder", str(self.root)))

    def _unusable(self, exc: OSError) -> None:
        """The cache's location itself is bad (a file where its folder should be, no permission): said once, and
        the run goes on without the cache (no per-image warnings, nothing counted as invalid)."""
        if self._readable or self._writable:
            self.stats.write_errors.append(f"{exc.filename or self.root}: {exc.strerror or exc}")
        if (self._readable or self._writable) and not self.quiet:
            logger.warning(
                "%s cache: cannot use %s (%s: %s); going on without it",
                self.what,
                self.root,
                errno.errorcode.get(exc.errno or 0, type(exc).__name__),
                exc.strerror or exc,
            )
        self._readable = self._writable = False

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.{self.suffix}"

    def get_array(self, digest: str | None) -> np.ndarray | None:
        """The cached array of the image with this content hash (read-only, a view of the file's bytes), or None
        (absent or not trustworthy; counted in stats.invalid when present but bad)."""
        if digest is None or not self._readable:
            return None
        path = self.path(digest)
        try:
            preprocessing.require_regular_file(path)  # a FIFO or device planted in the cache is not read
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except (NotADirectoryError, PermissionError) as exc:  # the location, not this entry
            self._unusable(exc)
            return None
        except OSError as exc:
            logger.warning("%s cache: cannot read %s (%s); recomputing", self.what, path, exc)
            self.stats.invalid += 1
            return None
        array, problem = self._decode(data, digest)
        if problem:
            logger.warning("%s cache: %s %s; recomputing", self.what, path, problem)
            self.stats.invalid += 1
            return None
        return array

    def _decode(self, data: bytes, digest: str) -> tuple[np.ndarray | None, str | None]:
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
        payload = memoryview(data)[end + 1 :]
        shape = header.get("shape")
        if header.get("dtype") != self.dtype.str or not (
            isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
        ):
            return None, "has a corrupt header (dtype or shape)"
        if len(payload) != self.dtype.itemsize * math.prod(shape):
            return None, f"is partial ({len(payload)} payload bytes for shape {shape})"
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            return None, "is corrupt (checksum mismatch)"
        return np.frombuffer(payload, dtype=self.dtype).reshape(shape), None

    def put_array(self, digest: str | None, array: np.ndarray) -> None:
        """Store one image's array (converted to the cache's dtype)."""
        if digest is None or not self._writable:
            return
        payload = np.ascontiguousarray(array, dtype=self.dtype).tobytes()
        header = {
            "format": FORMAT,
            "key": self.key,
            "digest": digest,
            **self.versions,
            "dtype": self.dtype.str,
            "shape": list(array.shape),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path = self.path(digest)
        try:
            if not (self.folder / "key.json").is_file():
                self._write_atomic(self.folder / "key.json", json.dumps(self.key_fields, indent=2).encode())
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_atomic(path, MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
        except OSError as exc:
            self._writable = False
            self.stats.write_errors.append(f"{path}: {exc}")
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            if not self.quiet:
                logger.warning(
                    "%s cache: cannot write under %s (%s: %s); going on without it",
                    self.what,
                    self.root,
                    name,
                    exc.strerror or exc,
                )
            return
        self.stats.stored += 1

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> Path:
        """Through the one atomic writer (mobilevit_npu.atomic): readers see the old entry or the whole new one, a new
        entry gets the umask's mode (a team cache stays readable as the user says). OSError on failure."""
        return atomic.write(path, data)

    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {
            "folder": str(self.folder),
            "cached": s.cached,
            "computed": s.computed,
            "invalid": s.invalid,
            "stored": s.stored,
            "uncacheable": s.uncacheable,
            "write_errors": s.write_errors[:5],
        }


class ReferenceCache(EntryCache):
    """Reference logits (float32 on disk, float64 [classes] tensors out) per image content hash."""

    suffix, what = "ref", "reference"

    def get(self, digest: str | None) -> torch.Tensor | None:
        array = self.get_array(digest)
        return None if array is None else torch.from_numpy(array.astype(np.float64))  # the one copy: writable

    def put(self, digest: str | None, logits: torch.Tensor) -> None:
        """Store one image's reference logits (any float dtype; kept as float32, the reference's precision)."""
        self.put_array(digest, logits.detach().to("cpu", torch.float32).numpy())

    def lookup(self, digests: Sequence[str | None]) -> list[torch.Tensor | None]:
        """get() for each digest; counts the images that have no digest as uncacheable."""
        self.stats.uncacheable += sum(d is None for d in digests)
        return [self.get(d) for d in digests]


class PixelCache(EntryCache):
    """Decoded crops (preprocessing.crop_pixels: HWC uint8) per image content hash; read and filled by the decoding
    workers, each on its own copy (`for_worker`), whose counts come back with the batches."""

    suffix, what = "pix", "pixel"
    dtype = np.dtype("|u1")

    def for_worker(self) -> PixelCache:
        """A copy for a decoding worker: it says nothing itself; its counts and failures come back with each batch
        and `merge` reports the first failure once for all workers."""
        copy = PixelCache(self.root, self.key_fields)
        copy.quiet = True
        copy._readable, copy._writable = self._readable, self._writable
        return copy

    def merge(self, counts: CacheStats | None) -> None:
        """Add a worker's counts; the first write failure any worker met is said here, once."""
        if counts is None:
            return
        first = not self.stats.write_errors and counts.write_errors
        self.stats.add(counts)
        if first:
            logger.warning(
                "pixel cache: cannot write under %s (%s); the workers go on without it",
                self.root,
                counts.write_errors[0],
            )

    def pixels(self, source: str, digest: str | None, cfg: preprocessing.PreprocessConfig) -> np.ndarray:
        """The image's crop: from the cache when it holds it, else decoded (an OSError if it cannot be) and stored."""
        if digest is None:
            self.stats.uncacheable += 1
        elif (array := self.get_array(digest)) is not None:
            self.stats.cached += 1
            return array.copy()  # writable, as a decoded crop is (torch.from_numpy wants that)
        array = preprocessing.preprocess(source, cfg, pixels=True)
        self.stats.computed += 1
        self.put_array(digest, array)
        return array


def _spec(spec: str | None, flag: str) -> str | None:
    """A cache flag's value, with an empty one refused (it would mean the working folder)."""
    if spec is not None and not spec.strip():
        raise UserError(f"{flag} is an empty path; give a folder, or off")
    return spec


def open_cache(
    spec: str | None, model: torch.nn.Module, source: dict[str, Any], preprocess: preprocessing.PreprocessConfig
) -> ReferenceCache | None:
    """The cache --reference_cache names: None for "off", the default folder for None, else that folder (an empty
    value is a UserError)."""
    root = reference_root(spec)
    return None if root is None else ReferenceCache(root, reference_key(model, source, preprocess))


def reference_root(spec: str | None) -> Path | None:
    """The folder --reference_cache names: None for "off", the default folder for None, else that folder (an empty
    value is a UserError). The output guard checks it too."""
    spec = _spec(spec, "--reference_cache")
    if spec is not None and spec.strip().lower() == "off":
        return None
    return Path(spec).expanduser() if spec else default_root()


def pixel_cache_wanted(spec: str | None) -> bool:
    return spec is not None and spec.strip().lower() != "off"


def open_pixel_cache(spec: str | None, preprocess: preprocessing.PreprocessConfig) -> PixelCache | None:
    """The cache --pixel_cache names: None for None or "off", the default folder for "on", else that folder (an
    empty value is a UserError)."""
    root = pixel_root(spec)
    return None if root is None else PixelCache(root, pixels_key(preprocess))


def pixel_root(spec: str | None) -> Path | None:
    """The folder --pixel_cache names: None for None or "off", the default folder for "on", else that folder (an
    empty value is a UserError). The output guard checks it too."""
    spec = _spec(spec, "--pixel_cache")
    if not pixel_cache_wanted(spec):
        return None
    return default_pixel_root() if spec.strip().lower() == "on" else Path(spec).expanduser()
