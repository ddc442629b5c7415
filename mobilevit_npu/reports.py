"""Reports: JSON-safe conversion and the report writers (through mobilevit_npu.atomic, the one atomic writer: temp file
+ fsync + rename, never half a report)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mobilevit_npu import atomic
from mobilevit_npu.errors import UserError, first_line

logger = logging.getLogger("mobilevit_npu.reports")


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


def file_stem(text: str) -> str:
    """`text` as a file-name stem: each run of characters outside [A-Za-z0-9_.-] becomes one '-' (plot and trace
    names made from report paths and mode names)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def file_identity(path: str | Path) -> tuple[str, tuple[int, int] | None]:
    """(the real path, (st_dev, st_ino) when it exists): two names for one file (a symlink, a hard link, `a/../a`)
    share one or the other. The guards against overwriting an input compare these."""
    try:
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


def is_within(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or lies inside it, both through their symlinks (os.path.realpath: `a/../b`, a link
    to the folder or into it all count). The output guard refuses an output that is, or is inside, an input folder."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def check_output_path(path: str | Path, what: str = "output") -> None:
    """Raise UserError (one line) now, before any model work, when `path` cannot take a report: a folder, a missing
    folder under a file, a folder that cannot be written; a device or FIFO must be writable."""
    text = str(path)
    path = Path(path)
    if not text or text.endswith(("/", os.sep)) or path.is_dir():
        raise UserError(f"{what} {text or repr(text)} is a folder, not a file")
    if atomic.is_stream(path):  # written through, never replaced: it need only be writable
        if path.exists() and not os.access(path, os.W_OK):
            raise UserError(f"{what} {path} is not writable")
        return
    folder = Path(os.path.realpath(path)).parent  # through a symlink, the target's folder gets the temp file
    while not folder.exists():  # write_text_atomic creates missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{what} {path} cannot be created: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} cannot be written: no write permission in {folder}")


def write_text_atomic(path: str | Path, text: str | bytes) -> Path:
    """Write `text` (UTF-8; bytes as they are, a PNG say) through the one atomic writer (mobilevit_npu.atomic: a temp
    file in the same folder, fsync'd, renamed; a new file gets the umask's mode, a replaced one keeps its own; through
    a symlink the target is replaced; a device or FIFO is written through). A failure is a UserError naming the path
    (/dev/full: "No space left on device", raised when the written bytes are flushed)."""
    return atomic.write_output(path, text)


def write_jsonl_atomic(path: str | Path, records: Sequence[dict]) -> Path:
    """All records as JSON lines, through a temp file and a rename."""
    return write_text_atomic(path, "".join(json_line(record) for record in records))


# How many bytes each kind of input file may hold before it is refused unread (read_bounded): far above any real one
# (a labelled report of 100,000 images is about 70 MB; ImageNet-22k's config.json, id2label included, about 1 MB; the
# labels CSV of ImageNet's 50,000 validation images about 2 MB), far below what would exhaust memory when parsed.
MAX_REPORT_BYTES = 512 * 2**20
MAX_CONFIG_BYTES = 64 * 2**20  # config.json, preprocessor_config.json and the other JSON files the toolkit reads
MAX_CSV_BYTES = 1024 * 2**20


def read_bounded(path: str | Path, what: str, max_bytes: int) -> bytes:
    """The bytes of an input file, read only when it is a regular file of at most `max_bytes`; otherwise a UserError in
    one line naming `what` and the path. Every file the toolkit reads goes through here: a FIFO is never opened (its
    open blocks until a writer comes), a link to /dev/zero is never read (it never ends), a huge file is refused
    before it is read into memory."""
    from mobilevit_npu import preprocessing

    try:
        preprocessing.require_regular_file(path)  # a stat: nothing is opened
        # O_NONBLOCK: a FIFO put in its place after the stat opens at once instead of blocking; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path} is not a regular file: refused before reading it")
            if st.st_size > max_bytes:
                raise UserError(_too_big(path, what, st.st_size, max_bytes))
            data = fh.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise UserError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        if exc.errno is None:  # require_regular_file's refusal, the path first: "X is a FIFO, not a regular file..."
            raise UserError(f"{what} {first_line(exc)}") from exc
        raise UserError(f"cannot read {what} {path}: {exc.strerror or first_line(exc)}") from exc
    if len(data) > max_bytes:  # grew while being read
        raise UserError(_too_big(path, what, len(data), max_bytes))
    return data


def _too_big(path: str | Path, what: str, size: int, max_bytes: int) -> str:
    return (
        f"{what} {path} holds {size:,} bytes, over the {max_bytes:,} such a file may hold: refused before reading "
        "it (is it the right file?)"
    )


def read_json(path: Path, what: str, max_bytes: int | None = None) -> dict[str, Any]:
    """A JSON object from a file read through read_bounded (at most MAX_CONFIG_BYTES unless `max_bytes`); a UserError
    (one line) for anything else."""
    data = read_bounded(path, what, MAX_CONFIG_BYTES if max_bytes is None else max_bytes)
    try:
        parsed = json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; nesting beyond the stack
        raise UserError(f"{what} is not valid JSON: {path} ({first_line(exc) or type(exc).__name__})") from exc
    if not isinstance(parsed, dict):
        raise UserError(f"{what} is not a JSON object: {path}")
    return parsed


def write_report(path: str | Path, report: Any) -> Path:
    """A typed report (a schema kind), checked against its definition, written atomically."""
    from mobilevit_npu import schema

    return write_json_atomic(path, schema.to_json(report))


PROVENANCE_PACKAGES = (
    "torch",
    "torch_npu",
    "transformers",
    "numpy",
    "pillow",
    "onnxruntime",
    "openvino",
    "mindstudio-probe",
    "huggingface_hub",
    "safetensors",
)


@functools.lru_cache(maxsize=1)
def provenance() -> Any:  # schema.Provenance
    """The project's git commit ("+dirty" with uncommitted changes, "not a git checkout" for an installed copy) and a
    sha256 over every installed distribution's name and version, so two reports can be told to come from one setup."""
    import importlib.metadata

    from mobilevit_npu import PROJECT_DIR

    commit = "not a git checkout"
    if (PROJECT_DIR / ".git").exists():
        try:
            head = subprocess.run(
                ["git", "-C", str(PROJECT_DIR), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(PROJECT_DIR), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            commit = head + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            commit = "git unavailable"
    installed = sorted(
        {f"{(d.metadata['Name'] or '').lower()}=={d.version}" for d in importlib.metadata.distributions()}
    )
    versions = {}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    from mobilevit_npu import schema

    return schema.Provenance(
        commit=commit, packages_sha256=hashlib.sha256("\n".join(installed).encode()).hexdigest(), packages=versions
    )
