"""Reports: JSON-safe conversion and atomic writers (temp file + fsync + rename: never half a report)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mobilevit_npu.errors import UserError

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


def write_jsonl_atomic(path: str | Path, records: Sequence[dict]) -> Path:
    """All records as JSON lines, through a temp file and a rename."""
    return write_text_atomic(path, "".join(json_line(record) for record in records))


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


def header(tool: str, argv: Sequence[str], loaded: Any, environment: dict[str, Any]) -> dict[str, Any]:
    """The keys every report starts with, spelt the same everywhere: which script and arguments made it, which
    weights (models.LoadedModel.source: path, file and sha256, or the synthetic seed), and where it ran."""
    return {
        "tool": tool,
        "argv": list(argv),
        "model_source": {"name": loaded.name, **loaded.source},
        "synthetic": bool(loaded.source.get("synthetic")),
        "environment": environment,
    }
