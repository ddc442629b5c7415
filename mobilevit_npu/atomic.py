"""The one atomic file writer: every file the toolkit writes whole (reports, JSON lines, plots, the card and its PNGs,
cache entries, compiled packages, the ONNX export, preflight's JSON) goes through here, so a reader, a crash or a full
disk never sees half a file and a failed write destroys nothing.

How a file is written (write, or staged for a file another library writes):
  - a temp file is created in the destination's own folder (missing folders are made first), so the final rename
    never crosses file systems; its name is ".NAME.XXXXXXXX.tmp", created exclusively (O_EXCL);
  - the mode: a NEW file gets what open() would give it, 0o666 less the process umask (the temp file is created with
    mode 0o666 and the kernel applies the umask, and a default ACL of the folder, itself: never mkstemp's 0600, which
    would hide a team's cache from the team); a file that is REPLACED keeps its own permission bits (a report a user
    made private stays private, a cache file made group-writable stays so);
  - the bytes are flushed and fsync'd before the rename, os.replace puts the file in place atomically (readers see the
    old file or the whole new one), and the folder is fsync'd so the rename itself survives a power loss (best effort:
    some file systems refuse to fsync a folder);
  - on any failure (an exception, KeyboardInterrupt included) the temp file is removed and the old file is untouched;
  - through a symlink, the link's target is replaced and the link kept; an existing non-regular file (character
    device such as /dev/null or /dev/full, FIFO, /dev/stdout) is written straight through, never replaced.

`write` raises OSError (the caches catch it and go on without the cache); `write_output` is the same for a path the
user named, a failure one UserError line naming the path. The output guard (common.check_outputs, which uses
check_output_path's rules) runs on every user-named path before any model work; this module writes.
Standard library only: preflight.py imports it on a bare Python.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable, Union

from mobilevit_npu.errors import UserError, first_line

Data = Union[str, bytes, Callable[[IO[bytes]], None]]  # text (UTF-8), bytes, or a function that writes into the file


def is_stream(path: str | Path) -> bool:
    """An existing path that is not a regular file or a folder (character device such as /dev/null or /dev/full, FIFO,
    socket), or one under /dev or /proc (/dev/stdout, /proc/self/fd/N): written through, never replaced."""
    if os.path.abspath(path).startswith(("/dev/", "/proc/")) and os.path.exists(path):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _fill(fh: IO[bytes], data: Data) -> None:
    if callable(data):
        data(fh)
    else:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)


def _destination(path: Path) -> Path:
    """The file that gets replaced: through a symlink, its target (the link is kept)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _temp_beside(target: Path) -> tuple[int, Path]:
    """A new, empty temp file in `target`'s folder (made if missing), opened for writing: (fd, path). Created with mode
    0o666 so the umask (and a default ACL) decide its permissions as they would for open(); O_EXCL: never an existing
    file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {target}")


def _existing_mode(target: Path) -> int | None:
    """The permission bits of the file about to be replaced; None when there is none."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return None


def _commit(tmp: Path, target: Path, mode: int | None) -> None:
    """The temp file in place: its mode set (None: as created), fsync'd, renamed over `target`, the folder fsync'd."""
    if mode is not None:
        os.chmod(tmp, mode)
    fd = os.open(tmp, os.O_RDONLY)  # a file written by another library: fsync it through a descriptor of our own
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except (
        OSError
    ):  # some file systems (and platforms) do not fsync a folder: the rename is done, durability best-effort
        pass
    finally:
        os.close(fd)


def write(path: str | Path, data: Data) -> Path:
    """Write `data` (str as UTF-8, bytes, or a function writing into a binary file) to `path` atomically, as the module
    docstring says. Raises OSError; nothing half-written is left, the old file untouched."""
    path = Path(path)
    if is_stream(path):
        # "a": /dev/stdout redirected to a file keeps what is there
        with open(path, "ab") as fh:
            _fill(fh, data)
        return path
    target = _destination(path)
    mode = _existing_mode(target)
    fd, tmp = _temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as fh:
            _fill(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        _commit(tmp, target, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """For a file another library writes by name (torch.onnx.export): yields a temp path beside `path` (an empty file
    with the mode a new file gets); when the block ends without an exception the file is fsync'd and renamed over
    `path` (keeping the replaced file's mode); on an exception it is removed and `path` untouched. Raises OSError."""
    path = Path(path)
    target = _destination(path)
    mode = _existing_mode(target)
    fd, tmp = _temp_beside(target)
    os.close(fd)
    if mode is None:  # as created: the umask's; restored in case the library recreated the file
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        yield tmp
        _commit(tmp, target, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_output(path: str | Path, data: Data) -> Path:
    """write() for a path the user named (a report, a plot, the card): a failure (a full disk, a read-only folder) is a
    UserError, one line naming the path (/dev/full: "No space left on device", raised when the bytes are flushed)."""
    try:
        return write(path, data)
    except OSError as exc:
        raise UserError(f"could not write {path}: {exc.strerror or first_line(exc)}") from exc
