"""Ascend specifics the reports need beyond the device seam: which operators torch_npu ran on the CPU.

Where torch_npu says so (read from the real sources, cited by version and line in docs/npu.md):
- The dispatcher's CPU fallback warns through TORCH_NPU_WARN (torch_npu 2.5.1 @9e105eaa
  `torch_npu/csrc/aten/VariableFallbackKernel.cpp:237-257`), whose `warn_()` hands the warning to a private base
  `c10::WarningHandler` (`torch_npu/csrc/core/npu/NPUException.cpp:34-46`). That handler is c10's default one: it
  logs `[W<mmdd> hh:mm:ss.ns <file>:<line>] Warning: <text> (function <fn>)` to the process's stderr (torch
  `c10/util/Exception.cpp` WarningHandler::process, `c10/util/Logging.cpp` MessageLogger). It never reaches Python's
  `warnings`, so only the file descriptor can see it.
- Once per operator per process (`has_op_name_warned`, same file); only where `RANK` is unset, 0 or -1; never with
  `TORCH_NPU_DISABLED_WARNING=1` (`OptionsManager.cpp:559-570` in 2.5.1; 2.13.0/2.14.0 also read
  `TORCH_NPU_WARNING_DISABLE`, as master's `OptionsManager.cpp:624-636`).
- torch_npu 2.13.0 and 2.14.0 print more wordings: op-plugin's explicit CPU paths (TORCH_NPU_WARN_ONCE in
  `op_plugin/ops/opapi/*KernelNpuOpApi.cpp`, some naming several operators in one line) and the sparse CSR reductions
  behind the fallback switch; the same builds read `TORCH_NPU_FALLBACK_CPU_DISABLE=1`, which turns a gated fallback
  into an error naming the operator (`torch_npu/csrc/framework/utils/CpuFallbackUtils.h:16-33` on master; the
  strings are in those wheels' libtorch_npu.so, not in 2.5.1's).

- op-plugin's own CPU kernels say "Warning: kernel [sinc] is not supported by NPU currently. Now this kernel is running
  on CPU." (16 strings in each of the 2.5.1, 2.13.0 and 2.14.0 libtorch_npu.so; op-plugin @517f2e7d
  `op_plugin/ops/aclops/{Complex,Gcd,IsNegInf,IsPosInf,Median,Polar,Sinc}KernelNpu.cpp`,
  `op_plugin/ops/opapi/AdaptiveMaxPool3d{,Backward}KernelNpuOpApi.cpp`). Two routes: TORCH_NPU_WARN_ONCE (complex,
  gcd, isneginf, isposinf, nanmedian, sinc) goes to fd 2 like the dispatcher's; TORCH_WARN_ONCE (PolarKernelNpu.cpp:23,
  34, MedianKernelNpu.cpp:155, the AdaptiveMaxPool3d OpApi kernels) is c10's own warning, which torch hands to Python
  as a `UserWarning` ("... (Triggered internally at ...)") when the operator was called from Python. op-plugin never
  consults TORCH_NPU_FALLBACK_CPU_DISABLE (no CheckCpuFallbackAllowed in it): these run on the CPU whatever the switch.
- c10 drops every WARNING line when TORCH_CPP_LOG_LEVEL is ERROR or FATAL (2 or 3, any case: torch
  `c10/util/Logging.cpp` setLogLevelFlagFromEnv; torch's docs, "Debugging Environment Variables"), so the fd 2 route
  is silenced by it too.

`CpuFallbacks` therefore redirects file descriptor 2 into a pipe for the model work, reads it on a thread, records the
operators those lines name and passes every other byte on to the real stderr at once; and it takes the fallback
`UserWarning`s off Python's warnings (shown always while it runs, whatever the filters), recording their operators.
Python's warning filters are put back as they were when the block ends (torchair 2.13/2.14 calls
`warnings.filterwarnings("once", ...)` for the whole process when it builds or compiles a graph).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import importlib.util
import mmap
import os
import re
import select
import subprocess
import sys
import threading
import warnings
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # not imported: the forwarder process imports this module with the standard library only
    from mobilevit_npu import devices

# Each wording torch_npu prints, with the group that names the operator(s). Sources: see the module docstring.
FALLBACK_PATTERNS = (
    # 2.5.1, 2.13.0, 2.14.0: the dispatcher fallback (VariableFallbackKernel.cpp, npu_cpu_fallback)
    re.compile(
        r"The operator '(?P<ops>[^']+)' is not currently supported on the NPU backend and will fall back to "
        r"run on the CPU"
    ),
    # 2.13.0, 2.14.0: op-plugin, e.g. "aten::logit, aten::logit_ and aten::logit.out is currently not supported ..."
    re.compile(
        r"The operator (?P<ops>\S.*?) is currently not supported on the NPU backend\.\s*Now this operator will "
        r"fallback to run on the CPU"
    ),
    # 2.13.0, 2.14.0: op-plugin, an operator that runs on the NPU only under conditions (_masked_softmax)
    re.compile(
        r"The operator (?P<ops>\S.*?) need to be met the following conditions to run on the NPU backend: .*?"
        r"Now this operator will fallback to run on the CPU"
    ),
    # 2.13.0, 2.14.0: explicit CPU kernels behind the switch (SparseCsrReductionFallbackKernelNpu.cpp)
    re.compile(
        r"Since the NPU interface does not support operator '(?P<ops>[^']+)', the operator will fall back to "
        r"CPU"
    ),
)
# op-plugin's own CPU kernels, in every wheel (see the module docstring): "Warning: kernel [sinc] is not supported
# by NPU currently. Now this kernel is running on CPU." ("currently.Now" for gcd.out), and without "kernel [...]"
# for the AdaptiveMaxPool3d OpApi kernels ("adaptive_max_pool3d.out is not supported by NPU currently. ..."). The
# name is an aten overload as op-plugin spells it; it is recorded as aten::<name>.
KERNEL_PATTERN = re.compile(
    r"(?:kernel \[(?P<kernel>[A-Za-z_][\w.]*)\]|(?P<bare>\b[A-Za-z_][\w.]*)) is not supported by NPU currently\.\s*"
    r"Now this kernel is running on CPU"
)
# The start of every fallback message (Python's warning filters match a message from its start).
WARNING_MESSAGE = (
    r".*(?:is not currently supported on the NPU backend|is currently not supported on the NPU backend"
    r"|need to be met the following conditions to run on the NPU backend|the operator will fall back to CPU"
    r"|is not supported by NPU currently)"
)
# The error a gated fallback raises with TORCH_NPU_FALLBACK_CPU_DISABLE=1 (CpuFallbackUtils.h:23-32).
REFUSED_PATTERN = re.compile(
    r"The operator '(?P<ops>[^']+)' would execute its main computation on CPU through .*?"
    r"CPU fallback is disabled by TORCH_NPU_FALLBACK_CPU_DISABLE=1",
    re.S,
)
OPERATOR = re.compile(r"[A-Za-z_]\w*::\w+(?:\.\w+)?")

SWITCH = "TORCH_NPU_FALLBACK_CPU_DISABLE"
SILENCERS = ("TORCH_NPU_DISABLED_WARNING", "TORCH_NPU_WARNING_DISABLE")
LOG_LEVEL = "TORCH_CPP_LOG_LEVEL"  # c10: INFO/0, WARNING/1, ERROR/2, FATAL/3, case-insensitive
QUIET_LOG_LEVELS = ("2", "3", "ERROR", "FATAL")

OBSERVED = "observed"
SILENCED = "silenced"
OTHER_RANK = "not observable on this rank"
NOT_NPU = "not an npu"
NOTE = (
    "torch_npu prints each CPU fallback once per operator per process (not once per call): these are the operators "
    "that fell back, not call counts"
)
HOLD_S = 0.05  # a partial line waits this long for its end before it is passed on as it is


def fallback_operators(text: str) -> list[str]:
    """The operators a line of torch_npu's output names as falling back to the CPU (several for op-plugin's
    multi-operator lines), in order; [] for any other line."""
    found: list[str] = []
    for pattern in FALLBACK_PATTERNS:
        for match in pattern.finditer(text):
            found += [op for op in OPERATOR.findall(match.group("ops")) if op not in found]
    for match in KERNEL_PATTERN.finditer(text):
        op = f"aten::{match.group('kernel') or match.group('bare')}"
        if op not in found:
            found.append(op)
    return found


def _is_fallback_line(text: str) -> bool:
    return bool(fallback_operators(text))


def refused_operators(text: str) -> list[str]:
    """The operators an error raised under TORCH_NPU_FALLBACK_CPU_DISABLE=1 names ([] for any other text)."""
    return [m.group("ops") for m in REFUSED_PATTERN.finditer(text)]


def refusal(exc: BaseException) -> str | None:
    """The one-line error for an exception raised because TORCH_NPU_FALLBACK_CPU_DISABLE=1 refused a CPU fallback (the
    operators it names), or None for any other exception."""
    ops = refused_operators(str(exc))
    if not ops:
        return None
    return f"{', '.join(ops)} has no NPU kernel and {SWITCH}=1 (--fail_on_cpu_fallback) refused to run it on the CPU"


def _leading_int(value: str | None, default: int) -> int:
    """strtol(value, NULL, 10) as torch_npu reads its switches: the leading integer, 0 when there is none."""
    if value is None:
        return default
    match = re.match(r"\s*([+-]?\d+)", value)
    return int(match.group(1)) if match else 0


def _library() -> Path | None:
    """The installed torch_npu's lib/libtorch_npu.so, found without importing torch_npu; None when absent."""
    try:
        spec = importlib.util.find_spec("torch_npu")  # a loaded torch_npu's own __spec__, else found on sys.path
    except (ImportError, ValueError):
        return None
    for folder in list(getattr(spec, "submodule_search_locations", None) or []):
        library = Path(folder) / "lib" / "libtorch_npu.so"
        if library.is_file():
            return library
    return None


@cache
def _holds_string(library: str, mtime_ns: int, name: str) -> bool | None:
    try:
        with open(library, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(name.encode() + b"\0") >= 0
    except (OSError, ValueError):
        return None


def library_reads(name: str) -> bool | None:
    """Whether the installed torch_npu's libtorch_npu.so holds `name` as a string constant of its own: the environment
    switches torch_npu reads are such constants (std::getenv("TORCH_NPU_FALLBACK_CPU_DISABLE")). None when torch_npu
    or its library is absent."""
    library = _library()
    if library is None:
        return None
    return _holds_string(str(library), library.stat().st_mtime_ns, name)


def installed_reads(name: str) -> bool:
    """True when the installed torch_npu reads the environment switch `name` (TORCH_NPU_FALLBACK_CPU_DISABLE: 2.13.0 and
    2.14.0, not 2.5.1)."""
    return bool(library_reads(name))


def fallback_switch(environ: dict[str, str] | None = None) -> str | None:
    """The switch in force, "TORCH_NPU_FALLBACK_CPU_DISABLE=1", when it is set (torch_npu's GetBoolTypeOption: a nonzero
    leading integer) and the installed torch_npu reads it; else None."""
    env = os.environ if environ is None else environ
    if _leading_int(env.get(SWITCH), 0) != 0 and installed_reads(SWITCH):
        return f"{SWITCH}=1"
    return None


def arm_fallback_error(argv_flag: bool) -> str | None:
    """--fail_on_cpu_fallback: set TORCH_NPU_FALLBACK_CPU_DISABLE=1 where the installed torch_npu reads it, so a gated
    fallback is an error naming the operator; the switch in force ("TORCH_NPU_FALLBACK_CPU_DISABLE=1") or None.
    torch_npu reads it once, at its first fallback (a function-local static), so this works any time before the model
    runs; mobilevit_npu.startup already sets it from sys.argv before `import torch` autoloads torch_npu."""
    if argv_flag and installed_reads(SWITCH):
        os.environ[SWITCH] = "1"
    return fallback_switch()


def silencer(environ: dict[str, str] | None = None) -> str | None:
    """The setting that keeps torch_npu's fd 2 fallback lines from being printed ("TORCH_NPU_DISABLED_WARNING=1",
    "TORCH_CPP_LOG_LEVEL=ERROR"), or None: torch_npu's own switches (OptionsManager::ShouldPrintWarning: exactly 1) and
    c10's log level, which drops WARNING lines at ERROR and FATAL."""
    env = os.environ if environ is None else environ
    for name in SILENCERS:
        reads = name == SILENCERS[0] or installed_reads(name)
        if reads and _leading_int(env.get(name), 0) == 1:
            return f"{name}={env.get(name)}"
    level = (env.get(LOG_LEVEL) or "").strip()
    if level.upper() in QUIET_LOG_LEVELS:
        return f"{LOG_LEVEL}={level}"
    return None


def observability(device: devices.Device, environ: dict[str, str] | None = None) -> str:
    """What torch_npu's fallback lines can tell in this process: observed, silenced, not observable on this rank, or not
    an npu (OptionsManager::ShouldPrintWarning / GetRankId, c10's TORCH_CPP_LOG_LEVEL)."""
    env = os.environ if environ is None else environ
    if device.type != "npu":
        return NOT_NPU
    if silencer(env) is not None:
        return SILENCED
    if _leading_int(env.get("RANK"), -1) not in (0, -1):
        return OTHER_RANK
    return OBSERVED


def added_filters(before: list) -> list[str]:
    """The warning filters in force now that were not in `before`, as "action (Category)" strings."""
    return [
        f"{f[0]}" + (f" ({f[2].__name__})" if f[2] is not Warning else "") for f in warnings.filters if f not in before
    ]


class WarningTap:
    """torch_npu's fallback messages that arrive as Python warnings (c10's TORCH_WARN_ONCE in op-plugin, handed to
    Python by torch's PyWarningHandler): while it runs they are always shown to it, whatever the filters, and kept off
    the console; `on_match(text)` gets each. Every other warning goes on as before. `stop()` puts the filters back."""

    def __init__(self, on_match):
        self.on_match = on_match
        self._context = None

    def start(self) -> WarningTap:
        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.filterwarnings("always", message=WARNING_MESSAGE)
        self.baseline = list(warnings.filters)  # what a filter added during the block is told apart from
        previous = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if fallback_operators(text):
                with contextlib.suppress(Exception):
                    self.on_match(text)
                return
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        return self

    def stop(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


# ---------------------------------------------------------------------------------------------------------------------
# The file-descriptor tap


class StderrTap:
    """File descriptor `fd` (2) redirected into a pipe for the model work. The pipe is read by a forwarder process (a
    bare `python -S` running `_forwarder_main`) that passes every line on to the original file at once (a partial line
    after HOLD_S) except the lines `is_match` picks, which it hands back through a second pipe to a thread here that
    calls `on_match(line)`. Being a process of its own, the forwarder still drains the pipe after this process dies,
    so nothing written just before a crash (C++'s last words before abort()) is lost. Where it cannot start, a thread
    does its job. `stop()` puts the original descriptor back; so does interpreter exit (atexit); a fork's child leaves
    it alone. While it runs, faulthandler (when enabled) writes straight to the original stderr."""

    _active: list[StderrTap] = []
    _hooks_installed = False

    def __init__(self, on_match, fd: int = 2, is_match=None):
        self.on_match = on_match
        self.custom = is_match is not None  # a custom matcher cannot travel to the forwarder: a thread reads then
        self.is_match = is_match or _is_fallback_line
        self.fd = fd
        self.forwarder: subprocess.Popen | None = None
        self._saved: int | None = None
        self._thread: threading.Thread | None = None
        self._fault_fd: int | None = None
        self._pid = os.getpid()

    def start(self) -> StderrTap:
        _flush_python_streams()
        read_end, write_end = os.pipe()
        self._saved = os.dup(self.fd)
        out = os.dup(self._saved)  # the reader's own copy: it may outlive stop() while a child holds the pipe
        try:
            self._thread = self._start_forwarder(read_end, out)
        except (OSError, ValueError):  # no interpreter to start: read the pipe on a thread instead
            self._thread = threading.Thread(
                target=self._read_here, args=(read_end, out), name="stderr-tap", daemon=True
            )
            self._thread.start()
        os.dup2(write_end, self.fd)
        os.close(write_end)
        if faulthandler.is_enabled():
            self._fault_fd = os.dup(self._saved)
            faulthandler.enable(file=self._fault_fd, all_threads=True)
        StderrTap._active.append(self)
        _install_hooks()
        return self

    def _start_forwarder(self, read_end: int, out: int) -> threading.Thread:
        if self.custom:
            raise ValueError("a custom matcher runs in this process")
        side_read, side_write = os.pipe()
        root = str(Path(__file__).resolve().parents[1])
        code = f"import sys; sys.path.insert(0, {root!r}); import mobilevit_npu.npu as n; n._forwarder_main()"
        try:
            self.forwarder = subprocess.Popen(
                [sys.executable, "-S", "-c", code, str(read_end), str(out), str(side_write)],
                pass_fds=(read_end, out, side_write),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=out,
                start_new_session=True,  # a Ctrl-C for this process must not stop the forwarding
            )
        finally:
            os.close(side_write)
        os.close(read_end)
        os.close(out)
        thread = threading.Thread(target=self._read_matches, args=(side_read,), name="stderr-tap", daemon=True)
        thread.start()
        return thread

    def stop(self, timeout: float = 5.0) -> None:
        """Restore the original descriptor, then wait for the pipe to drain (at most `timeout` seconds: a child
        process that inherited the pipe keeps it open, and the forwarder goes on until it closes)."""
        if self._saved is None:
            return
        _flush_python_streams()
        os.dup2(self._saved, self.fd)
        os.close(self._saved)
        self._saved = None
        if self._fault_fd is not None:  # back on the descriptor just restored (its earlier file is not known)
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                faulthandler.enable(file=self.fd, all_threads=True)
            os.close(self._fault_fd)
            self._fault_fd = None
        if self in StderrTap._active:
            StderrTap._active.remove(self)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.forwarder is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.forwarder.wait(timeout=0.5)

    def _read_matches(self, side_read: int) -> None:
        with os.fdopen(side_read, "rb") as side:
            for line in side:
                self._call(line.rstrip(b"\n"))

    def _read_here(self, read_end: int, out: int) -> None:
        _pump(read_end, out, self.is_match, self._call)

    def _call(self, line: bytes) -> bool:
        try:
            self.on_match(line.decode("utf-8", "replace"))
        except Exception:  # a failing callback must not stop the reading
            pass
        return True


def _pump(read_end: int, out: int, is_match, on_match) -> None:
    """Copy `read_end` to `out` line by line until EOF, handing the lines `is_match` picks to `on_match` instead. A
    partial line waits HOLD_S for its end, then goes on as it is (its end follows it)."""
    pending = b""  # the current line, not yet passed on
    passed = b""  # the start of the current line, already passed on
    try:
        while True:
            if pending:
                ready, _, _ = select.select([read_end], [], [], HOLD_S)
                if not ready:
                    _write_all(out, pending)
                    passed, pending = passed + pending, b""
                    continue
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if passed:
                    _write_all(out, line + b"\n")
                    if _matches(is_match, passed + line):
                        on_match(passed + line)
                    passed = b""
                elif _matches(is_match, line):
                    on_match(line)
                else:
                    _write_all(out, line + b"\n")
        if pending:
            if not passed and _matches(is_match, pending):
                on_match(pending)
            else:
                _write_all(out, pending)
    finally:
        os.close(read_end)
        os.close(out)


def _matches(is_match, line: bytes) -> bool:
    try:
        return bool(is_match(line.decode("utf-8", "replace")))
    except Exception:  # never eat output because a matcher failed
        return False


def _forwarder_main() -> None:
    """The forwarder process: argv = read end, original stderr, side pipe (fds)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    read_end, out, side = (int(a) for a in sys.argv[1:4])

    def to_side(line: bytes) -> None:
        _write_all(side, line + b"\n")

    try:
        _pump(read_end, out, _is_fallback_line, to_side)
    finally:
        os.close(side)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError:  # the original stderr is gone (closed terminal): nothing left to show it on
            return
        view = view[written:]


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _restore_all() -> None:
    for tap in list(StderrTap._active):
        if tap._pid == os.getpid():
            tap.stop(timeout=1.0)


def _forget_in_child() -> None:
    # A forked child shares the parent's pipe as its stderr (the parent's thread forwards it); it has no thread and must
    # not restore anything at its exit.
    StderrTap._active = []


def _install_hooks() -> None:
    if StderrTap._hooks_installed:
        return
    StderrTap._hooks_installed = True
    atexit.register(_restore_all)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_in_child)


# ---------------------------------------------------------------------------------------------------------------------


class CpuFallbacks:
    """`with CpuFallbacks(device) as fb:` around the model work records the operators torch_npu says fell back to the
    CPU, from its own stderr lines (kept off the console: `line()` names them). Off npu, silenced, or on a rank other
    than 0 it captures nothing and says so (`summary()["status"]`)."""

    def __init__(self, device: devices.Device):
        self.device = device
        self.status = observability(device)
        self.silenced_by = silencer() if self.status == SILENCED else None
        self._warnings: WarningTap | None = None
        self.filters_restored: list[str] = []  # warning filters added during the block (torchair's "once"), undone
        self.error_switch = fallback_switch() if device.type == "npu" else None
        self._operators: set[str] = set()
        self.refused: list[str] = []  # operators refused under the switch (from the exception that ended the block)
        self._lock = threading.Lock()
        self._tap: StderrTap | None = None

    @property
    def operators(self) -> list[str]:
        """The operators seen falling back, sorted, each once."""
        with self._lock:
            return sorted(self._operators)

    def _line(self, text: str) -> bool:
        ops = fallback_operators(text)
        if ops:
            with self._lock:
                self._operators.update(ops)
        return bool(ops)

    def __enter__(self) -> CpuFallbacks:
        if self.status == OBSERVED and os.name == "posix":
            self._tap = StderrTap(self._line).start()
        if self.status != NOT_NPU:  # c10's TORCH_WARN_ONCE reaches Python on every rank, whatever torch_npu's switches
            self._warnings = WarningTap(self._line).start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._tap is not None:
            self._tap.stop()
            self._tap = None
        if self._warnings is not None:
            self.filters_restored = added_filters(self._warnings.baseline)
            self._warnings.stop()
            self._warnings = None
        if exc is not None:
            self.refused = refused_operators(str(exc))

    def summary(self) -> dict[str, Any]:
        """The report's `cpu_fallbacks` section (schema.FallbackReport), as a dict: the report's writer types it."""
        from dataclasses import asdict

        from mobilevit_npu import schema

        return asdict(
            schema.FallbackReport(
                device=str(self.device),
                status=self.status,
                operators=self.operators,
                note=NOTE,
                error_switch=self.error_switch,
            )
        )

    def line(self) -> str | None:
        """One console line (None off npu)."""
        if self.status == NOT_NPU:
            return None
        where = f"CPU fallbacks on {self.device}"
        ops = self.operators
        if self.status == SILENCED:
            seen = f"; {len(ops)} seen as Python warnings: {', '.join(ops)}" if ops else ""
            return f"{where}: not observable (torch_npu's warnings are silenced by {self.silenced_by}){seen}"
        if self.status == OTHER_RANK:
            seen = f"; {len(ops)} seen as Python warnings: {', '.join(ops)}" if ops else ""
            return f"{where}: not observable on this rank (torch_npu prints them on rank 0 only){seen}"
        if not ops:
            return f"{where}: none seen (every operator ran on the NPU)"
        return f"{where}: {len(ops)} operator(s) ran on the CPU: {', '.join(ops)} (once per operator, not per call)"

    def fail_reason(self) -> str | None:
        """--fail_on_cpu_fallback: the one-line reason the run fails, or None. A fallback seen on any route fails it (a
        refusal under the switch, an fd 2 line, a Python warning); so does a run that could not see its fallbacks
        (silenced warnings), even with the switch armed: op-plugin's CPU kernels never consult it, so only their
        warnings can show them. Ranks other than 0 leave the decision to rank 0, which runs the same operators."""
        if self.status == NOT_NPU:
            return None
        if self.refused:
            return f"{', '.join(self.refused)} refused to fall back to the CPU ({self.error_switch or SWITCH + '=1'})"
        ops = self.operators
        if ops:
            return f"{len(ops)} operator(s) fell back to the CPU: {', '.join(ops)} (--fail_on_cpu_fallback)"
        if self.status == SILENCED:
            if self.error_switch:
                armed = f"; {SWITCH} gates only the dispatcher's fallback, not op-plugin's CPU kernels"
            else:
                armed = "" if installed_reads(SWITCH) else f" and this torch_npu has no {SWITCH}"
            return (
                f"CPU fallbacks cannot be checked: torch_npu's warnings are silenced ({self.silenced_by}){armed} "
                "(--fail_on_cpu_fallback)"
            )
        return None
