"""The one atomic writer (mobilevit_npu.atomic, issue 29): fsync before the rename, the umask's mode for a new file
and the old mode kept for a replaced one, nothing half-written and no temp file left on a failure, and every file the
production code writes whole goes through it (an ast scan of the sources)."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from mobilevit_npu import atomic, compilers, refcache, reports
from mobilevit_npu.errors import UserError


@pytest.fixture
def umask():
    """Set the process umask for one test, restored after."""
    saved = []

    def set_(value: int) -> None:
        saved.append(os.umask(value))

    yield set_
    if saved:
        os.umask(saved[0])


@pytest.fixture
def fsynced(monkeypatch):
    """The paths of the files and folders fsync'd, as the descriptor named them at the time."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def cache_entry(root: Path) -> Path:
    """An entry written by the reference cache's writer (EntryCache.put_array)."""
    cache = refcache.EntryCache(root, {"test": 1})
    digest = "ab" * 32
    cache.put_array(digest, np.arange(4, dtype="<f4"))
    assert cache.stats.stored == 1, cache.stats.write_errors
    return cache.path(digest)


def compiled_package(root: Path, tmp_path: Path) -> Path:
    """A package copied into the compile cache by compilers._store_package."""
    built = tmp_path / "built.pt2"
    built.write_bytes(b"package bytes")
    package = root / "aoti-x.pt2"
    compilers._store_package(built, root, package, root / "aoti-x.json", {"key": "x"})
    assert package.read_bytes() == b"package bytes" and json.loads((root / "aoti-x.json").read_text()) == {"key": "x"}
    return package


# --------------------------------------------------------------------------------------------------- fsync


def test_every_writer_fsyncs_the_file_before_the_rename_and_then_its_folder(tmp_path, fsynced):
    """The reference cache's copy of the writer skipped fsync: a power loss could leave an empty entry behind a
    completed rename."""
    written = [
        reports.write_text_atomic(tmp_path / "r" / "report.json", "{}\n"),
        cache_entry(tmp_path / "cache"),
        compiled_package(tmp_path / "compiled", tmp_path),
    ]
    for path in written:
        path = Path(os.path.realpath(path))
        temp = [p for p in fsynced if Path(p).parent == path.parent and Path(p).name.startswith(f".{path.name}.")]
        assert temp, (path, fsynced)  # the temp file, under its temp name: fsync'd before os.replace
        assert str(path.parent) in fsynced  # then the folder, so the rename survives a power loss
    assert not any(temp_files(Path(p).parent) for p in written)


# ---------------------------------------------------------------------------------------------------- mode


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_a_new_file_gets_the_umasks_mode_in_every_writer(mask, mode, tmp_path, umask):
    umask(mask)
    written = [
        reports.write_text_atomic(tmp_path / "report.json", "{}"),
        reports.write_text_atomic(tmp_path / "plot.png", b"\x89PNG"),
        cache_entry(tmp_path / "cache"),
        compiled_package(tmp_path / "compiled", tmp_path),
    ]
    with atomic.staged(tmp_path / "model.onnx") as tmp:
        Path(tmp).write_bytes(b"onnx")  # a library writing the file by name (torch.onnx.export)
    written.append(tmp_path / "model.onnx")
    assert {oct(stat.S_IMODE(Path(p).stat().st_mode)) for p in written} == {oct(mode)}  # never mkstemp's 0600


def test_a_replaced_file_keeps_its_own_mode(tmp_path, umask):
    umask(0o022)
    private = tmp_path / "private.json"
    private.write_text("old")
    private.chmod(0o600)  # the user made the report private: a rerun keeps it so
    shared = tmp_path / "shared.onnx"
    shared.write_text("old")
    shared.chmod(0o664)
    reports.write_text_atomic(private, "new")
    with atomic.staged(shared) as tmp:
        Path(tmp).write_bytes(b"new")
    assert private.read_text() == "new" and stat.S_IMODE(private.stat().st_mode) == 0o600
    assert shared.read_text() == "new" and stat.S_IMODE(shared.stat().st_mode) == 0o664


def test_through_a_symlink_the_target_is_replaced_and_the_link_kept(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    atomic.write(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


# ------------------------------------------------------------------------------------------------ failures


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt(), Interrupted()])
def test_a_failed_write_leaves_the_old_file_and_no_temp_file(failure, tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old report")

    def half_then_fail(fh):
        fh.write(b"half a rep")
        raise failure

    with pytest.raises(type(failure)):
        atomic.write(path, half_then_fail)
    assert path.read_text() == "old report" and temp_files(tmp_path) == []
    with pytest.raises(type(failure)):
        with atomic.staged(path) as tmp:
            Path(tmp).write_bytes(b"half an export")
            raise failure
    assert path.read_text() == "old report" and temp_files(tmp_path) == []


def test_a_user_named_path_fails_in_one_line_naming_it(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old report")

    def full(fh):
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError) as failed:
        atomic.write_output(path, full)
    assert str(failed.value) == f"could not write {path}: No space left on device"
    assert path.read_text() == "old report" and temp_files(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_device_is_written_through_never_replaced():
    with pytest.raises(OSError) as failed:
        atomic.write("/dev/full", "x" * 10)
    assert failed.value.errno == 28 and not Path("/dev/full").is_file()
    atomic.write("/dev/null", "anything")
    assert Path("/dev/null").is_char_device()


# ---------------------------------------------------------------------------------- every writer goes through it

# Direct writes that are not a whole file written once, each with why it stays outside the writer.
ALLOWED = {
    ("mobilevit_npu/labelsets.py", "Journal.__init__"): "the --resume journal: appended record by record, fsync'd",
    ("mobilevit_npu/labelsets.py", "Journal._take_lock"): "the journal's lock file: held open for a flock",
    ("mobilevit_npu/labelsets.py", "_cut_torn_tail"): "truncates a crashed journal's torn last line in place",
    ("export_onnx.py", "_check_outputs"): "a writability probe: an empty temp file created and removed at once",
}
SOURCES = sorted(
    p
    for folder in (ROOT, ROOT / "mobilevit_npu", ROOT / "benchmarks")
    for p in folder.glob("*.py")
    if p != ROOT / "mobilevit_npu" / "atomic.py"
)
WRITE_METHODS = {"write_text", "write_bytes"}
WRITE_FUNCTIONS = {
    ("os", "replace"),
    ("os", "rename"),
    ("os", "renames"),
    ("shutil", "copy"),
    ("shutil", "copy2"),
    ("shutil", "copyfile"),
    ("shutil", "move"),
    ("tempfile", "mkstemp"),
    ("tempfile", "NamedTemporaryFile"),
    ("json", "dump"),
    ("pickle", "dump"),
    ("np", "save"),
    ("np", "savez"),
    ("torch", "save"),
}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _mode_writes(node: ast.AST | None) -> bool:
    if node is None:
        return False
    return any(set(text) & set("wax+") for text in _strings(node)) or not _strings(node)  # a computed mode: flagged


def _argument(call: ast.Call, index: int, name: str) -> ast.AST | None:
    if len(call.args) > index:
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == name), None)


def direct_write(call: ast.Call) -> str | None:
    """What the call writes directly, or None."""
    func = call.func
    if isinstance(func, ast.Name) and func.id == "open":
        return "open(..., write mode)" if _mode_writes(_argument(call, 1, "mode")) else None
    if not isinstance(func, ast.Attribute):
        return None
    owner = func.value.id if isinstance(func.value, ast.Name) else None
    if func.attr in WRITE_METHODS:
        return f".{func.attr}()"
    if (owner, func.attr) in WRITE_FUNCTIONS:
        return f"{owner}.{func.attr}()"
    if owner == "os" and func.attr == "fdopen":
        return "os.fdopen(..., write mode)" if _mode_writes(_argument(call, 1, "mode")) else None
    if owner == "os" and func.attr == "open":
        flags = _argument(call, 1, "flags")
        names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "") for n in ast.walk(flags or call)}
        return "os.open(..., write flags)" if names & WRITE_FLAGS else None
    if func.attr == "open" and owner not in ("io", "Image", "gzip", "tarfile", "zipfile"):  # Path.open(mode)
        return "Path.open(write mode)" if _mode_writes(_argument(call, 0, "mode")) else None
    return None


def scan(path: Path, relative: str | None = None) -> list[tuple[str, str, int, str]]:
    """(file, enclosing Class.function, line, what) for every direct write in a source file, in source order."""
    found = []
    relative = relative or path.relative_to(ROOT).as_posix()

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Call) and (what := direct_write(child)):
                found.append((relative, ".".join(scope) or "<module>", child.lineno, child.col_offset, what))
            visit(child, scope)

    visit(ast.parse(path.read_text(encoding="utf-8")), [])
    return [(file, scope, line, what) for file, scope, line, _, what in sorted(found, key=lambda f: (f[2], f[3]))]


def test_the_scan_sees_each_kind_of_direct_write(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os, json, tempfile\n"
        "def f(p, fh):\n"
        "    open(p, 'w'); open(p, mode='ab'); open(p); open(p, 'rb')\n"
        "    p.write_text('x'); p.write_bytes(b'x'); p.open('r+'); p.open()\n"
        "    os.replace(p, p); tempfile.mkstemp(); json.dump({}, fh); os.fdopen(3, 'wb'); os.fdopen(3, 'rb')\n"
        "    os.open(p, os.O_WRONLY | os.O_CREAT); os.open(p, os.O_RDONLY)\n"
    )
    assert [what for _, _, _, what in scan(sample, "sample.py")] == [
        "open(..., write mode)",
        "open(..., write mode)",
        ".write_text()",
        ".write_bytes()",
        "Path.open(write mode)",
        "os.replace()",
        "tempfile.mkstemp()",
        "json.dump()",
        "os.fdopen(..., write mode)",
        "os.open(..., write flags)",
    ]


def test_every_production_write_goes_through_the_one_writer():
    found = [hit for path in SOURCES for hit in scan(path)]
    stray = [f"{file}:{line} {scope}: {what}" for file, scope, line, what in found if (file, scope) not in ALLOWED]
    assert stray == [], "write through mobilevit_npu.atomic (or reports.write_*), not directly:\n" + "\n".join(stray)
    used = {(file, scope) for file, scope, _, _ in found}
    assert set(ALLOWED) <= used, f"allowed writers no longer there: {set(ALLOWED) - used}"  # the list stays true


def test_every_script_that_writes_a_named_file_guards_it_first():
    """The output guard (common.check_outputs) is called by every script that writes a file the user named."""
    scripts = sorted([*ROOT.glob("*.py"), ROOT / "benchmarks" / "bench_peers.py"])
    writers = ("write_report", "write_text_atomic", "write_json_atomic", "verify.run", "atomic.write")
    for script in scripts:
        if script.name in ("common.py", "setup.py"):
            continue
        text = script.read_text(encoding="utf-8")
        if any(w in text for w in writers):
            assert "check_outputs(" in text, f"{script.name} writes a named file without common.check_outputs"
