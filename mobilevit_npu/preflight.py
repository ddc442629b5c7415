"""The Ascend stack, read without importing torch or torch_npu: what is installed, where each version was read, and
whether the pieces pair as Ascend documents.

`stack_facts()` is cheap (package metadata, a few small files, environment variables; no subprocess) and goes into
every report's `environment.ascend` where torch_npu is present. `stack_rows()` turns facts into rows (ok / mismatch /
missing / unknown, each with the fix); `probe_import_torch()` runs `import torch` in a subprocess (torch's autoload
then imports torch_npu, as in every script) and `npu_smi()` asks the driver's tool: only the preflight script does
those two.

Where each fact is read (formats from the real files; sources in docs/npu.md):
- torch_npu's version and the torch it requires: its METADATA (`Requires-Dist: torch (==2.5.1+cpu)` in 2.5.1,
  `torch==2.13.0.*` in 2.13.0 and 2.14.0); torchair's modes: `torch_npu/dynamo/torchair/configs/compiler_config.py`.
- CANN: `<toolkit>/<arch>-linux/ascend_toolkit_install.info` (`version=8.1.RC1`), the file torch_npu's own
  `utils/collect_env.get_cann_version` reads (any `ascend_*_install.info` under ASCEND_HOME_PATH; 2.5.1 l.71-86), and
  which sets `torch.version.cann`; else `<toolkit>/version.cfg` (`runtime_running_version=[7.5.0.1.129:8.0.RC3]`).
  The toolkit is $ASCEND_TOOLKIT_HOME, else $ASCEND_HOME_PATH, else <root>/ascend-toolkit/latest, else <root>/cann.
- driver and firmware: <root>/driver/version.info (`Version=24.1.rc2`, `compatible_version_fw=[7.0.0,7.5.99]`) and
  <root>/firmware/version.info (`Version=7.5.0.1.129`).
- Every file is read only when it is a regular file of at most MAX_INFO_BYTES (a FIFO or a device link would hang or
  fill memory); one that cannot be read (Ascend's non-root install leaves <root> mode 750 for its group) is a row with
  the fix, not a traceback, and an `error` in the facts.
- set_env.sh: <root>/cann/set_env.sh from CANN 8.5 on (the toolkit's own layout under <root>/cann), else
  <root>/ascend-toolkit/set_env.sh. It exports ASCEND_TOOLKIT_HOME, ASCEND_HOME_PATH (= the toolkit),
  ASCEND_OPP_PATH (<toolkit>/opp) and puts <toolkit>/lib64 on LD_LIBRARY_PATH; torch_npu refuses to import when
  ASCEND_HOME_PATH, its runtime/ or compiler/, or ASCEND_OPP_PATH is missing (torch_npu/utils/npu_intercept.py
  `_cann_package_check`).
- HCCL: torch_npu's _C links libhccl.so (<toolkit>/lib64); torch_npu registers the "hccl" process-group backend for
  "npu" (`torch_npu/__init__.py` l.245 in 2.5.1, `_init/registry/distributed.py` l.37-44 in 2.13.0/2.14.0).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

DEFAULT_ROOT = "/usr/local/Ascend"
PAIRING_SOURCE = (
    "Ascend/pytorch COMPATIBILITY.en.md (the version table its README links) at commit "
    "9e73e708ab9350d203475609f36f8a43f6a0c2ab"
)
# (torch-npu package, torch, CANN): every row of that table from CANN 7.0.RC1 on, active and historical.
PAIRINGS = (
    ("2.12.0", "2.12.0", "9.1.0"),
    ("2.11.0", "2.11.0", "9.1.0"),
    ("2.10.0.post4", "2.10.0", "9.1.0"),
    ("2.9.0.post6", "2.9.0", "9.1.0"),
    ("2.7.1.post8", "2.7.1", "9.1.0"),
    ("2.9.0.post2", "2.9.0", "9.0.0"),
    ("2.8.0.post4", "2.8.0", "9.0.0"),
    ("2.7.1.post4", "2.7.1", "9.0.0"),
    ("2.9.0", "2.9.0", "8.5.0"),
    ("2.8.0.post2", "2.8.0", "8.5.0"),
    ("2.7.1.post2", "2.7.1", "8.5.0"),
    ("2.6.0.post5", "2.6.0", "8.5.0"),
    ("2.8.0", "2.8.0", "8.3.RC1"),
    ("2.7.1", "2.7.1", "8.3.RC1"),
    ("2.6.0.post3", "2.6.0", "8.3.RC1"),
    ("2.1.0.post17", "2.1.0", "8.3.RC1"),
    ("2.6.0", "2.6.0", "8.2.RC1"),
    ("2.5.1.post1", "2.5.1", "8.2.RC1"),
    ("2.1.0.post13", "2.1.0", "8.2.RC1"),
    ("2.5.1", "2.5.1", "8.1.RC1"),
    ("2.4.0.post4", "2.4.0", "8.1.RC1"),
    ("2.3.1.post6", "2.3.1", "8.1.RC1"),
    ("2.1.0.post12", "2.1.0", "8.1.RC1"),
    ("2.4.0.post2", "2.4.0", "8.0.0"),
    ("2.3.1.post4", "2.3.1", "8.0.0"),
    ("2.1.0.post10", "2.1.0", "8.0.0"),
    ("2.4.0", "2.4.0", "8.0.RC3"),
    ("2.3.1.post2", "2.3.1", "8.0.RC3"),
    ("2.1.0.post8", "2.1.0", "8.0.RC3"),
    ("2.3.1", "2.3.1", "8.0.RC2"),
    ("2.2.0.post2", "2.2.0", "8.0.RC2"),
    ("2.1.0.post6", "2.1.0", "8.0.RC2"),
    ("1.11.0.post14", "1.11.0", "8.0.RC2"),
    ("2.2.0", "2.2.0", "8.0.RC1"),
    ("2.1.0.post4", "2.1.0", "8.0.RC1"),
    ("1.11.0.post11", "1.11.0", "8.0.RC1"),
    ("2.1.0", "2.1.0", "7.0.0"),
    ("2.0.1.post1", "2.0.1", "7.0.0"),
    ("1.11.0.post8", "1.11.0", "7.0.0"),
    ("2.1.0.rc1", "2.1.0", "7.0.RC1"),
    ("2.0.1", "2.0.1", "7.0.RC1"),
    ("1.11.0.post4", "1.11.0", "7.0.RC1"),
)
# The same file's "PyTorch and Python versions" table.
PYTHONS = {
    "2.13.0": ("3.10", "3.11", "3.12", "3.13", "3.14"),
    "2.12.0": ("3.10", "3.11", "3.12", "3.13", "3.14"),
    "2.11.0": ("3.10", "3.11", "3.12", "3.13", "3.14"),
    "2.10.0": ("3.10", "3.11", "3.12", "3.13"),
    "2.9.0": ("3.10", "3.11", "3.12", "3.13"),
    "2.8.0": ("3.9", "3.10", "3.11", "3.12", "3.13"),
    "2.7.1": ("3.9", "3.10", "3.11", "3.12", "3.13"),
    "2.6.0": ("3.9", "3.10", "3.11"),
    "2.5.1": ("3.9", "3.10", "3.11"),
    "2.4.0": ("3.8", "3.9", "3.10", "3.11"),
    "2.3.1": ("3.8", "3.9", "3.10", "3.11"),
    "2.2.0": ("3.8", "3.9", "3.10"),
    "2.1.0": ("3.8", "3.9", "3.10", "3.11"),
    "1.11.0": ("3.7", "3.8", "3.9", "3.10"),
}
SET_ENV_HINT = "source {script}"
CPU_TORCH_HINT = "pip install torch=={torch} --index-url https://download.pytorch.org/whl/cpu"
MAX_INFO_BYTES = 64 * 1024  # version.info, *_install.info, version.cfg: a few hundred bytes each
MAX_SOURCE_BYTES = 1024 * 1024  # torchair's compiler_config.py
# A version as the driver, firmware and CANN files write it: 24.1.rc2, 25.0.RC1.1, 7.5.0.1.129, 8.1.RC1
VERSION = re.compile(r"^\d+\.\d+(?:\.[0-9A-Za-z]+)*$")
PERMISSION_FIX = (
    "run as the user the Ascend stack was installed for, or as a member of its group (Ascend's non-root install "
    "leaves {root} readable by {group} only): sudo usermod -aG {group} $USER, then log in again"
)


def set_env_script(root: str = DEFAULT_ROOT, home: str | os.PathLike | None = None) -> str:
    """The set_env.sh to source: CANN 8.5's <root>/cann/set_env.sh where that layout is installed (the script is there,
    or the toolkit is <root>/cann), else <root>/ascend-toolkit/set_env.sh."""
    cann = os.path.join(root, "cann")
    toolkit = os.path.join(root, "ascend-toolkit", "set_env.sh")
    in_cann = home is not None and (str(home) == cann or str(home).startswith(cann + os.sep))
    if in_cann or os.path.exists(os.path.join(cann, "set_env.sh")) and not os.path.exists(toolkit):
        return os.path.join(cann, "set_env.sh")
    return toolkit


def set_env_hint(root: str = DEFAULT_ROOT, home: str | os.PathLike | None = None) -> str:
    """`source <the set_env.sh>`, as the fixes and the start-up errors name it."""
    return SET_ENV_HINT.format(script=set_env_script(root, home))


class Unreadable(Exception):
    """A file the preflight cannot read: not a regular file, too large, or not permitted; `path` names it."""

    def __init__(self, message: str, path: str | os.PathLike):
        super().__init__(message)
        self.path = str(path)


def read_small(path: str | os.PathLike, limit: int = MAX_INFO_BYTES) -> str:
    """The text of a small regular file; Unreadable (with why, in one line) otherwise. Never blocks on a FIFO."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise Unreadable(f"{path} is not a regular file", path)
        if info.st_size > limit:
            raise Unreadable(f"{path} is larger than {limit} bytes ({info.st_size})", path)
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except PermissionError as exc:
        raise Unreadable(f"{path}: permission denied ({exc.strerror or exc})", path) from exc
    except OSError as exc:
        raise Unreadable(f"{path}: {exc.strerror or exc}", path) from exc
    if len(data) > limit:
        raise Unreadable(f"{path} is larger than {limit} bytes", path)
    return data.decode("utf-8", "replace")


def _exists(path: Path) -> bool | None:
    """True / False, or None when it cannot be known (a folder on the way is not readable by this user)."""
    try:
        os.stat(path)
        return True
    except PermissionError:
        return None
    except OSError:
        return False


def _group_of(root: str) -> str:
    """The group that may read `root` (HwHiAiUser on a default install), as a name; "its group" when unknown."""
    try:
        import grp

        return grp.getgrgid(os.stat(root).st_gid).gr_name
    except (ImportError, KeyError, OSError):
        return "its group"


def permission_fix(root: str) -> str:
    return PERMISSION_FIX.format(root=root, group=_group_of(root))


def torch_for(package: str | None) -> str | None:
    """The torch the pairing table builds this torch-npu package for (None when the table does not list it)."""
    for listed, torch, _cann in PAIRINGS:
        if listed == package:
            return torch
    return None


def packages_for_torch(torch_release: str | None) -> list[str]:
    """The torch-npu packages the table lists for torch X.Y.Z, newest CANN first, each with its CANN."""
    return [f"{p} (CANN {c})" for p, t, c in PAIRINGS if torch_release and t == torch_release]


def _release(version: str | None) -> str | None:
    """X.Y.Z of a version string (local label and .postN dropped)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    return f"{match.group(1)}.{match.group(2)}.{match.group(3) or 0}" if match else None


def pairs_with_torch(torch_npu_version: str, torch_version: str) -> bool:
    """torch_npu X.Y.Z[.postN] is built for exactly torch X.Y.Z."""
    return _release(torch_npu_version) == _release(torch_version)


def expected_cann(torch_npu_version: str) -> str | None:
    """The CANN release Ascend's table pairs with this torch-npu package, or None when the table does not list it."""
    for package, _torch, cann in PAIRINGS:
        if package == torch_npu_version:
            return cann
    return None


def cann_matches(installed: str, expected: str) -> bool:
    """8.1.RC1 matches 8.1.RC1 and a build of it (8.1.RC1.alpha001), not 8.1.RC2."""
    a, b = installed.strip().lower(), expected.strip().lower()
    return a == b or a.startswith(b + ".") or a.startswith(b + "-")


# ---------------------------------------------------------------------------------------------------------------------
# Reading facts


def _key_values(path: Path) -> dict[str, str]:
    """key=value lines of an Ascend .info / .cfg file (comments and other lines skipped); Unreadable when the file is
    not a small regular file this user may read."""
    values: dict[str, str] = {}
    for line in read_small(path).splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values.setdefault(key.strip(), value.strip())
    return values


def _distribution(name: str):
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_facts() -> dict[str, Any] | None:
    dist = _distribution("torch")
    if dist is None:
        return None
    version = dist.version
    local = version.partition("+")[2].lower()
    build = "cpu"
    if local.startswith("cu"):
        build = "cuda"
    elif local.startswith("rocm"):
        build = "rocm"
    elif not local:
        for text in dist.requires or []:
            if _needs_nvidia(text):
                build = "cuda"  # PyPI's default Linux x86_64 torch: CUDA wheels as dependencies, no local label
                break
    return {"version": version, "build": build}


def _needs_nvidia(text: str) -> bool:
    """A Requires-Dist line naming an nvidia-* package outside any extra (packaging where installed; a bare Python has
    only the standard library, so the line is read by hand there)."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        name = re.match(r"\s*([A-Za-z0-9_.-]+)", text)
        return bool(name and name.group(1).lower().startswith("nvidia-") and "extra ==" not in text)
    try:
        req = Requirement(text)
    except InvalidRequirement:
        return False
    return req.name.lower().startswith("nvidia-") and (req.marker is None or req.marker.evaluate({"extra": ""}))


def _torch_npu_facts() -> dict[str, Any] | None:
    dist = _distribution("torch_npu") or _distribution("torch-npu")
    if dist is None:
        return None
    requires = None
    for text in dist.requires or []:
        match = re.match(r"\s*torch\b\s*(?:\((?P<p>[^)]*)\)|(?P<b>[^;]*))", text)
        if match and not re.match(r"\s*torch[-_]", text):
            requires = (match.group("p") or match.group("b") or "").strip() or None
            break
    try:
        spec = importlib.util.find_spec("torch_npu")  # a loaded torch_npu's own __spec__, else found on sys.path
    except (ImportError, ValueError):
        spec = None
    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    folder = Path(locations[0]) if locations else None
    return {"version": dist.version, "requires_torch": requires, "folder": str(folder) if folder else None}


def _torchair_facts(npu_facts: dict[str, Any] | None) -> dict[str, Any] | None:
    if not npu_facts or not npu_facts.get("folder"):
        return None
    config = Path(npu_facts["folder"]) / "dynamo" / "torchair" / "configs" / "compiler_config.py"
    if not _exists(config):
        return {"bundled": False, "modes": [], "read_from": None}
    try:
        text = read_small(config, MAX_SOURCE_BYTES)
    except Unreadable as exc:
        return {"bundled": True, "modes": [], "read_from": str(config), "error": str(exc)}
    match = re.search(r"mode\s*=\s*OptionValue\(\s*\"[^\"]*\"\s*,\s*\[([^\]]*)\]", text)
    modes = re.findall(r"\"([^\"]+)\"", match.group(1)) if match else []
    return {"bundled": True, "modes": modes, "read_from": str(config)}


def toolkit_home(environ: dict[str, str], root: str) -> tuple[Path | None, str]:
    """The CANN toolkit folder and how it was found."""
    for name in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        if environ.get(name):
            return Path(environ[name]), f"${name}"
    for candidate in (Path(root) / "ascend-toolkit" / "latest", Path(root) / "cann"):
        found = _exists(candidate)
        if found is None:  # not readable by this user: named, so its row says so with the fix
            return candidate, "default path (not readable)"
        if found and candidate.is_dir():
            return candidate, "default path"
    return None, "not found"


def cann_facts(home: Path | None) -> dict[str, Any] | None:
    """The CANN version and the file it was read from; None when no toolkit is there; with `error` (and version None)
    when a file is there that cannot be read."""
    if home is None:
        return None
    try:
        if not home.is_dir():
            return None
        arch = platform.machine()
        candidates = [home / f"{arch}-linux" / "ascend_toolkit_install.info"]
        candidates += sorted(p for p in home.glob("*-linux/ascend_toolkit_install.info") if p not in candidates)
    except PermissionError as exc:
        return {"version": None, "read_from": str(home), "error": f"{home}: permission denied ({exc.strerror})"}
    try:
        for info in candidates:
            if _exists(info) is not False:
                version = _key_values(info).get("version")
                if version:
                    return {"version": version, "read_from": str(info)}
        cfg = home / "version.cfg"
        if _exists(cfg) is not False:
            values = _key_values(cfg)
            for key in ("toolkit_running_version", "runtime_running_version"):
                match = re.match(r"\[[^:\]]*:([^\]]+)\]", values.get(key, ""))
                if match:
                    return {"version": match.group(1).strip(), "read_from": f"{cfg} ({key})"}
    except Unreadable as exc:
        return {"version": None, "read_from": exc.path, "error": str(exc)}
    return None


def _version_info(path: Path) -> dict[str, Any] | None:
    if _exists(path) is False:
        return None
    try:
        values = _key_values(path)
    except Unreadable as exc:
        return {"version": None, "read_from": str(path), "compatible_firmware": None, "error": str(exc)}
    version = values.get("Version") or values.get("package_version")
    return {"version": version, "read_from": str(path), "compatible_firmware": values.get("compatible_version_fw")}


def _ld_paths(environ: dict[str, str]) -> list[str]:
    return [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]


def _under(path: str, folder: Path) -> bool:
    try:
        return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep) or os.path.realpath(
            path
        ) == os.path.realpath(folder)
    except OSError:
        return False


def stack_facts(environ: dict[str, str] | None = None, root: str | None = None) -> dict[str, Any]:
    """The Ascend stack as installed here, each version with the file it was read from. Cheap: no subprocess, and
    neither torch nor torch_npu is imported."""
    env = dict(os.environ if environ is None else environ)
    root = root or DEFAULT_ROOT
    home, found_by = toolkit_home(env, root)
    npu_facts = _torch_npu_facts()
    lib64 = home / "lib64" if home else None
    hccl = lib64 / "libhccl.so" if lib64 else None
    return {
        "python": platform.python_version(),
        "torch": _torch_facts(),
        "torch_npu": npu_facts,
        "torchair": _torchair_facts(npu_facts),
        "cann": cann_facts(home),
        "toolkit": {"path": str(home) if home else None, "found_by": found_by},
        "driver": _version_info(Path(root) / "driver" / "version.info"),
        "firmware": _version_info(Path(root) / "firmware" / "version.info"),
        "set_env": {
            **{name: env.get(name) for name in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_OPP_PATH")},
            "ld_library_path_has_toolkit": bool(home) and any(_under(p, home) for p in _ld_paths(env)),
        },
        "visible_devices": env.get("ASCEND_RT_VISIBLE_DEVICES"),
        "hccl": {"library": str(hccl) if hccl and _exists(hccl) else None, "backend": "hccl"},
        "pairing_source": PAIRING_SOURCE,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Checking them


@dataclass
class Row:
    """One line of the preflight table. status: ok | mismatch | missing | unknown (cannot be checked); `blocking`:
    torch_npu cannot run while this row is not ok."""

    check: str
    status: str
    value: str
    read_from: str = ""
    fix: str | None = None
    blocking: bool = False


def _fw_in_range(firmware: str, ranges: str) -> bool | None:
    def parts(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", text)[:3])

    pairs = re.findall(r"\[([^,\]]+),([^\]]+)\]", ranges or "")
    if not pairs or not re.match(r"\d", firmware or ""):
        return None
    return any(parts(low) <= parts(firmware) <= parts(high) for low, high in pairs)


class _Basics(NamedTuple):
    """What several rows read: the torch and torch_npu facts, torch's release, the torch torch_npu pairs with, and
    the command that sources CANN's environment here."""

    torch: dict[str, Any] | None
    npu: dict[str, Any] | None
    torch_release: str | None
    npu_torch: str | None
    set_env_fix: str


def _basics(facts: dict[str, Any], root: str) -> _Basics:
    torch, npu = facts.get("torch"), facts.get("torch_npu")
    return _Basics(
        torch,
        npu,
        _release(torch["version"]) if torch else None,
        torch_for(npu["version"]) if npu else None,  # the torch the table pairs it with
        set_env_hint(root, facts.get("toolkit", {}).get("path")),
    )


def stack_rows(facts: dict[str, Any], root: str = DEFAULT_ROOT) -> list[Row]:
    """The table's rows for `facts` (stack_facts), without the two subprocess rows."""
    basics = _basics(facts, root)
    rows: list[Row] = []
    for rows_of in (
        _python_rows,
        _torch_rows,
        _torch_npu_rows,
        _torchair_rows,
        _cann_rows,
        _driver_rows,
        _set_env_rows,
        _visible_rows,
        _hccl_rows,
    ):
        rows += rows_of(facts, root, basics)
    return rows


def _python_rows(facts: dict[str, Any], root: str, b: _Basics) -> list[Row]:
    """Python against the versions the installed torch release supports."""
    rows: list[Row] = []
    torch_release = b.torch_release
    pythons = PYTHONS.get(torch_release or "")
    py = ".".join(facts["python"].split(".")[:2])
    if pythons is None:
        why = f"torch {torch_release} not listed" if torch_release else "no torch installed to check against"
        rows.append(Row("python", "unknown", facts["python"], fix=None, read_from=why))
    elif py in pythons:
        rows.append(
            Row("python", "ok", facts["python"], read_from=f"torch {torch_release}: Python {', '.join(pythons)}")
        )
    else:
        rows.append(
            Row(
                "python",
                "mismatch",
                facts["python"],
                read_from=f"torch {torch_release}: {', '.join(pythons)}",
                fix=f"use Python {' or '.join(pythons)} for torch {torch_release}",
                blocking=True,
            )
        )
    return rows


def _torch_rows(facts: dict[str, Any], root: str, b: _Basics) -> list[Row]:
    """torch: present, and a CPU build where torch_npu is installed."""
    rows: list[Row] = []
    torch, npu, npu_torch = b.torch, b.npu, b.npu_torch
    if torch is None:
        rows.append(Row("torch", "missing", "-", fix=_torch_fix(npu, npu_torch), blocking=True))
    elif npu and torch["build"] != "cpu":
        rows.append(
            Row(
                "torch",
                "mismatch",
                f"{torch['version']} ({torch['build']} build)",
                "torch METADATA",
                fix=f"torch_npu refuses a {torch['build']} build: " + _torch_fix(npu, npu_torch),
                blocking=True,
            )
        )
    else:
        rows.append(Row("torch", "ok", f"{torch['version']} ({torch['build']} build)", "torch METADATA"))
    return rows


def _torch_npu_rows(facts: dict[str, Any], root: str, b: _Basics) -> list[Row]:
    """torch_npu: present, and built for the installed torch."""
    rows: list[Row] = []
    torch, npu, torch_release, npu_torch = b.torch, b.npu, b.torch_release, b.npu_torch
    if npu is None:
        listed = packages_for_torch(torch_release)
        if listed:
            fix = f"pip install torch-npu=={listed[-1].split()[0]} (the table pairs torch {torch_release} with " + (
                f"torch-npu {', '.join(listed)})"
            )
        elif torch is None:
            fix = "install torch first (the torch row), then the torch-npu the pairing table lists for it"
        else:
            fix = _no_listed_torch_npu(torch_release)
        rows.append(Row("torch_npu", "missing", "not installed", fix=fix, blocking=True))
    else:
        value = f"{npu['version']} (requires torch {npu['requires_torch'] or '?'})"
        if torch is not None and not pairs_with_torch(npu["version"], torch["version"]):
            fixes = [_torch_fix(npu, npu_torch)]
            listed = packages_for_torch(torch_release)
            if listed:
                fixes.append(f"or, for torch {torch_release}: torch-npu {', '.join(listed)}")
            built = (
                f"built for torch {npu_torch}, not {torch_release}" if npu_torch else f"not built for {torch_release}"
            )
            fix = f"torch_npu {npu['version']} is {built}: " + "; ".join(fixes)
            rows.append(Row("torch_npu", "mismatch", value, "torch_npu METADATA", fix=fix, blocking=True))
        else:
            rows.append(Row("torch_npu", "ok", value, "torch_npu METADATA"))
    return rows


def _torchair_rows(facts: dict[str, Any], root: str, b: _Basics) -> list[Row]:
    """torchair, bundled inside torch_npu."""
    rows: list[Row] = []
    npu = b.npu
    air = facts.get("torchair")
    if npu is not None:
        if air and air["bundled"]:
            rows.append(
                Row("torchair", "ok", f"in torch_npu; modes: {', '.join(air['modes']) or '?'}", air["read_from"])
            )
        else:
            rows.append(
                Row("torchair", "missing", "not in torch_npu", fix="reinstall torch-npu (torchair ships inside it)")
            )
    return rows


def _cann_rows(facts: dict[str, Any], root: str, b: _Basics) -> list[Row]:
    """The CANN toolkit: readable, and the version the torch_npu pairs with."""
    rows: list[Row] = []
    npu, torch_release, set_env_fix = b.npu, b.torch_release, b.set_env_fix
    cann = facts.get("cann")
    toolkit = facts["toolkit"]
    if cann is not None and cann.get("error"):
        rows.append(
            Row(
                "CANN toolkit",
                "mismatch",
                f"unreadable: {cann['error']}",
                cann["read_from"],
                fix=permission_fix(root)
                if "permission denied" in cann["error"]
                else f"reinstall CANN: {cann['error']}",
                blocking=True,
            )
        )
    elif cann is None:
        rows.append(
            Row(
                "CANN toolkit",
                "missing",
                "not found",
                f"toolkit: {toolkit['path'] or 'not found'}",
                fix=f"install the CANN toolkit, then {set_env_fix}",
                blocking=True,
            )
        )
    else:
        expected = expected_cann(npu["version"]) if npu else None
        if npu is None:
            rows.append(Row("CANN toolkit", "unknown", cann["version"], cann["read_from"]))
        elif expected is None:
            rows.append(
                Row(
                    "CANN toolkit",
                    "unknown",
                    f"{cann['version']} (torch-npu {npu['version']} not listed)",
                    cann["read_from"],
                )
            )
        elif cann_matches(cann["version"], expected):
            rows.append(
                Row(
                    "CANN toolkit",
                    "ok",
                    f"{cann['version']} (pairs with torch-npu {npu['version']})",
                    cann["read_from"],
                )
            )
        else:
            others = [p for p, t, c in PAIRINGS if t == torch_release and cann_matches(cann["version"], c)]
            alternative = f", or torch-npu {' or '.join(others)} (listed for CANN {cann['version']})" if others else ""
            rows.append(
                Row(
                    "CANN toolkit",
                    "mismatch",
                    f"{cann['version']} (torch-npu {npu['version']} pairs with CANN {expected})",
                    cann["read_from"],
                    fix=f"install CANN {expected}{alternative}",
                )
            )
    return rows


def _driver_rows(facts: dict[str, Any], root: str, b: _Basics) -> list[Row]:
    """The NPU driver and firmware: present, readable, and the firmware in the driver's range."""
    rows: list[Row] = []
    driver, firmware = facts.get("driver"), facts.get("firmware")
    if driver is None:
        fix = "install the Ascend NPU driver (npu-smi info should list the devices)"
        rows.append(Row("driver", "missing", "not found", f"{root}/driver/version.info", fix=fix, blocking=True))
    elif driver.get("error"):
        rows.append(_unreadable_row("driver", driver, root, blocking=True))
    elif not VERSION.match(driver["version"] or ""):
        fix = "reinstall the Ascend NPU driver (its version.info names no version)"
        rows.append(Row("driver", "mismatch", _not_a_version(driver), driver["read_from"], fix=fix, blocking=True))
    else:
        rows.append(Row("driver", "ok", driver["version"], driver["read_from"]))
    if firmware is None:
        rows.append(
            Row("firmware", "missing", "not found", f"{root}/firmware/version.info", fix="install the NPU firmware")
        )
    elif firmware.get("error"):
        rows.append(_unreadable_row("firmware", firmware, root, blocking=False))
    elif not VERSION.match(firmware["version"] or ""):
        fix = "reinstall the NPU firmware (its version.info names no version)"
        rows.append(Row("firmware", "mismatch", _not_a_version(firmware), firmware["read_from"], fix=fix))
    else:
        ok = _fw_in_range(firmware["version"], (driver or {}).get("compatible_firmware") or "")
        ranges = (driver or {}).get("compatible_firmware")
        if ok is False:
            rows.append(
                Row(
                    "firmware",
                    "mismatch",
                    f"{firmware['version']} (driver accepts {ranges})",
                    firmware["read_from"],
                    fix="install the firmware released with this driver",
                )
            )
        else:
            status = "ok" if ok else "unknown"
            rows.append(Row("firmware", status, firmware["version"] or "?", firmware["read_from"]))
    return rows


def _set_env_rows(facts: dict[str, Any], root: str, b: _Basics) -> list[Row]:
    """Whether CANN's set_env.sh was sourced, and points at something."""
    rows: list[Row] = []
    set_env_fix = b.set_env_fix
    se = facts["set_env"]
    missing_vars = [n for n in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_OPP_PATH") if not se.get(n)]
    absent = [f"{n}={se[n]}" for n in ("ASCEND_HOME_PATH", "ASCEND_OPP_PATH") if se.get(n) and not Path(se[n]).exists()]
    if missing_vars or not se["ld_library_path_has_toolkit"]:
        what = ", ".join(missing_vars + ([] if se["ld_library_path_has_toolkit"] else ["LD_LIBRARY_PATH"]))
        rows.append(
            Row(
                "set_env.sh",
                "missing",
                f"not sourced ({what} unset or without the toolkit)",
                fix=set_env_fix,
                blocking=True,
            )
        )
    elif absent:
        rows.append(
            Row("set_env.sh", "mismatch", f"points at nothing: {', '.join(absent)}", fix=set_env_fix, blocking=True)
        )
    else:
        rows.append(Row("set_env.sh", "ok", f"sourced (ASCEND_HOME_PATH={se['ASCEND_HOME_PATH']})"))
    return rows


def _visible_rows(facts: dict[str, Any], root: str, b: _Basics) -> list[Row]:
    """ASCEND_RT_VISIBLE_DEVICES: unset, or logical ids in ascending order."""
    rows: list[Row] = []
    visible = facts.get("visible_devices")
    if visible is None:
        rows.append(Row("visible devices", "ok", "all (ASCEND_RT_VISIBLE_DEVICES unset)"))
    else:
        ids = visible.split(",")
        valid = all(re.fullmatch(r"\d+", i) for i in ids) and [int(i) for i in ids] == sorted({int(i) for i in ids})
        if valid:
            rows.append(Row("visible devices", "ok", f"ASCEND_RT_VISIBLE_DEVICES={visible}"))
        else:
            rows.append(
                Row(
                    "visible devices",
                    "mismatch",
                    f"ASCEND_RT_VISIBLE_DEVICES={visible!r}",
                    fix="logical ids, ascending, separated by commas only (e.g. 0,1,3)",
                )
            )
    return rows


def _hccl_rows(facts: dict[str, Any], root: str, b: _Basics) -> list[Row]:
    """HCCL (torchrun's backend): libhccl.so found."""
    rows: list[Row] = []
    set_env_fix = b.set_env_fix
    hccl, toolkit = facts["hccl"], facts["toolkit"]
    if hccl["library"]:
        rows.append(Row("HCCL (torchrun)", "ok", f"backend {hccl['backend']!r}", hccl["library"]))
    else:
        where = f"{toolkit['path']}/lib64" if toolkit["path"] else "the toolkit's lib64"
        rows.append(
            Row(
                "HCCL (torchrun)",
                "missing",
                "libhccl.so not found",
                where,
                fix=f"install the CANN toolkit (torch_npu links libhccl.so), then {set_env_fix}",
                blocking=True,
            )
        )
    return rows


def _torch_fix(npu: dict[str, Any] | None, npu_torch: str | None) -> str:
    """How to install the torch this torch-npu pairs with: the table's torch, else what its METADATA requires (the table
    does not list it), else a pair the table lists."""
    if npu_torch:
        return CPU_TORCH_HINT.format(torch=npu_torch)
    if npu and npu.get("requires_torch"):
        return (
            f"torch-npu {npu['version']} is not in the pairing table; its METADATA requires torch "
            f"{npu['requires_torch']}: install that CPU build (--index-url https://download.pytorch.org/whl/cpu)"
        )
    if npu:
        return f"torch-npu {npu['version']} is not in the pairing table: install a torch-npu it lists, " + _a_pair()
    return "install the CPU build of torch and the torch-npu it pairs with, " + _a_pair()


def _a_pair() -> str:
    package, torch, cann = PAIRINGS[0]
    return f"e.g. torch {torch} + torch-npu {package} + CANN {cann} ({PAIRING_SOURCE.split(' (')[0]})"


def _no_listed_torch_npu(torch_release: str | None) -> str:
    return (
        f"the pairing table lists no torch-npu for torch {torch_release or '?'}: install a pair it lists, " + _a_pair()
    )


def _not_a_version(found: dict[str, Any]) -> str:
    return f"{found['version']!r} is not a version" if found["version"] else "no version in the file"


def _unreadable_row(check_name: str, found: dict[str, Any], root: str, blocking: bool) -> Row:
    error = found["error"]
    fix = permission_fix(root) if "permission denied" in error else f"reinstall it: {error}"
    return Row(check_name, "mismatch", f"unreadable: {error}", found["read_from"], fix=fix, blocking=blocking)


def npu_smi(timeout: float = 20.0) -> Row:
    """`npu-smi info`, when the driver's tool is on PATH: the version it reports."""
    tool = shutil.which("npu-smi")
    if tool is None:
        return Row("npu-smi", "missing", "not on PATH", fix="install the Ascend driver, or add its tools to PATH")
    try:
        out = subprocess.run([tool, "info"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Row(
            "npu-smi",
            "mismatch",
            f"npu-smi info failed ({type(exc).__name__})",
            tool,
            blocking=True,
            fix="check the driver (dmesg, npu-smi info)",
        )
    if out.returncode != 0:
        first = (out.stderr or out.stdout).strip().splitlines()[:1] or [f"exit {out.returncode}"]
        return Row(
            "npu-smi",
            "mismatch",
            f"npu-smi info failed: {first[0][:120]}",
            tool,
            blocking=True,
            fix="check the driver (dmesg, npu-smi info)",
        )
    match = re.search(r"Version:\s*(\S+)", out.stdout)
    return Row("npu-smi", "ok", f"driver {match.group(1)}" if match else "runs", tool)


PROBE = """
import json, sys
import mobilevit_npu.startup  # imports torch (and, by torch's autoload, torch_npu); a failure is one line, exit 2
import torch
found = {"torch": torch.__version__, "cuda": torch.version.cuda, "torch_npu_loaded": "torch_npu" in sys.modules,
         "torch_version_cann": getattr(torch.version, "cann", None), "npu_devices": None}
if found["torch_npu_loaded"]:
    try:
        found["npu_devices"] = int(torch.npu.device_count())
    except Exception as exc:
        found["npu_devices"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(found))
"""


def probe_import_torch(environ: dict[str, str], timeout: float = 300.0, torch_installed: bool = True) -> Row:
    """`import torch` in a subprocess with `environ` (so torch's autoload imports torch_npu as in any script), through
    mobilevit_npu.startup: its outcome, torch.version.cann as torch_npu set it, and the NPUs torch_npu counts. Not run
    where torch is not installed (the torch row says how to install it)."""
    if not torch_installed:
        return Row("import torch", "missing", "not run: torch is not installed (see the torch row)")
    from mobilevit_npu import PROJECT_DIR

    env = dict(environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_DIR), env.get("PYTHONPATH", "")) if p)
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(PROJECT_DIR),
        )
    except subprocess.TimeoutExpired:
        return Row("import torch", "mismatch", f"did not finish in {timeout:.0f} s", blocking=True)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines() or [f"exit {out.returncode}"]
        return Row("import torch", "mismatch", f"failed: {lines[-1][:300]}", "subprocess (autoload)", blocking=True)
    import json

    try:
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Row("import torch", "mismatch", "no answer from the subprocess", blocking=True)
    if environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD", "1") == "0":
        value = f"ok, torch {found['torch']}; autoload off (TORCH_DEVICE_BACKEND_AUTOLOAD=0): torch_npu not loaded"
        return Row("import torch", "ok", value, "subprocess")
    if not found["torch_npu_loaded"]:
        return Row("import torch", "ok", f"ok, torch {found['torch']}; no torch_npu to autoload", "subprocess")
    value = (
        f"ok, torch_npu autoloaded; torch.version.cann={found['torch_version_cann']!r}; NPUs visible: "
        f"{found['npu_devices']}"
    )
    status = "ok" if isinstance(found["npu_devices"], int) and found["npu_devices"] > 0 else "mismatch"
    fix = None if status == "ok" else "no NPU visible to torch_npu: check npu-smi info and ASCEND_RT_VISIBLE_DEVICES"
    return Row("import torch", status, value, "subprocess (autoload)", fix=fix, blocking=status != "ok")


def verdict(rows: list[Row]) -> tuple[int, str]:
    """(exit code, reason): 2 when a blocking row is not ok (unusable), 1 when any row is a mismatch or missing, else
    0. The reason names the first row that decided it."""
    for row in rows:
        if row.blocking and row.status in ("mismatch", "missing"):
            return 2, f"unusable: {row.check} {row.status}: {row.value}" + (f" (fix: {row.fix})" if row.fix else "")
    for row in rows:
        if row.status in ("mismatch", "missing"):
            return 1, f"{row.check} {row.status}: {row.value}" + (f" (fix: {row.fix})" if row.fix else "")
    return 0, "every row ok" + (
        " (some could not be checked: unknown)" if any(r.status == "unknown" for r in rows) else ""
    )


def format_rows(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'check':<{width}}  {'status':<8}  value  [read from]", f"{'-' * width}  {'-' * 8}  {'-' * 40}"]
    for r in rows:
        where = f"  [{r.read_from}]" if r.read_from else ""
        lines.append(f"{r.check:<{width}}  {r.status:<8}  {r.value}{where}")
        if r.fix and r.status != "ok":
            lines.append(f"{'':<{width}}  {'':<8}  fix: {r.fix}")
    return "\n".join(lines)


def as_dict(rows: list[Row], code: int, reason: str, facts: dict[str, Any]) -> dict[str, Any]:
    return {"exit_code": code, "reason": reason, "rows": [asdict(r) for r in rows], "facts": facts}
