"""Compiling for a device: the one place that picks torch.compile's backend and options per device, used by every
compiled benchmark mode and by accuracy_run's compiled target (so the verdict covers the code path that is timed),
and the AOTInductor build used for `fast` on CPU.

- npu: torchair's GE backend (CompilerConfig defaults), or its "reduce-overhead" mode (aclgraph) for `npugraph`;
- cuda: inductor mode="reduce-overhead" (CUDA graphs);
- cpu: inductor with torch._inductor.config.freezing=True (options={"freezing": True} is silently ignored), plus the
  C++ wrapper where asked (`cpp_wrapper`: ~150 kernel calls per forward, so Python between them shows at batch 1);
- mps: inductor defaults.

Compile once: on CPU every compiled mode is an AOTInductor package (`build_aoti`), kept on disk
(`compile_cache_dir()`: $MOBILEVIT_NPU_COMPILE_CACHE, else the project cache folder's `compiled/`; "off" disables it),
keyed by everything that changes what the package computes (`aoti_key`): the module's weights, its config.json as
loaded, its structure and code, the input's shape, strides and dtype, the device, the CPU's vector ISA, the torch,
transformers and Python versions, the C++ compiler and the build options. A package whose checksum or load fails is
rebuilt. torch.compile itself cannot be cached here: with freezing the prepacked weights are mkldnn tensors, which
inductor's FX graph cache cannot pickle ("Bypassing FX Graph Cache because 'mkldnn tensors unpickleable'"), so it
traces and optimises again on every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from packaging.version import Version

from mobilevit_npu import atomic, devices, models, refcache, reports, timing
from mobilevit_npu.errors import Unavailable, first_line

logger = logging.getLogger("mobilevit_npu.compilers")

Forward = Callable[[torch.Tensor], torch.Tensor]
COMPILE_CACHE_ENV = "MOBILEVIT_NPU_COMPILE_CACHE"
AOTI_CONFIGS = {"freezing": True}
# Autotuned GEMMs: inductor times its own C++ GEMM template against aten's (oneDNN/MKL) for every matmul and keeps the
# faster, with bias, activation and residual fused in; its report table is not printed (0 rows).
# Its other report, a JSON line per GEMM after "Autotune Choices Stats:" written straight to sys.stderr, is
# max_autotune_report_choices_stats (torch 2.13: _inductor/config.py:551, select_algorithm.py:4212 and 6013): off.
AOTI_AUTOTUNE = {
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


def _unique_function(fn: Callable, name: str) -> Callable:
    """A copy of `fn` with its own code object. Dynamo keeps its compiled graphs on the code object, so two
    wrappers made from one `def` could otherwise hand each other their graphs (frozen weights included)."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


# npugraph asks for aclgraph: torchair's "npugraph_ex" mode where the installed torchair offers it (torch-npu 2.13.0 and
# 2.14.0: configs/compiler_config.py l.39, which deprecates "reduce-overhead" in its favour, l.116-121), else
# "reduce-overhead" (2.5.1: l.31). The notes say which ran.
NPUGRAPH_EX = "npugraph_ex"
NPU_GRAPH_MODES = {
    "max-autotune": "torchair GE graph (CompilerConfig defaults)",
    "reduce-overhead": 'torchair mode="reduce-overhead" (aclgraph, the NPU\'s CUDA graphs)',
    NPUGRAPH_EX: "torchair mode=\"npugraph_ex\" (aclgraph, the NPU's CUDA graphs; this torchair's "
    'successor of "reduce-overhead")',
}


def _why(exc: BaseException) -> str:
    """Type and first line of an exception and of its cause: torchair's _TorchairImportError says only "an error
    occurred when importing torchair"; the cause (a missing protobuf, say) is the useful part."""
    text = f"{type(exc).__name__}: {first_line(exc)}"
    cause = exc.__cause__ or getattr(exc, "inner_exception", None)  # dynamo's BackendCompilerFailed keeps it there
    if cause is not None:
        text += f"; caused by {type(cause).__name__}: {first_line(cause)}"
    return text


def _torchair_backend(npu_mode: str):
    """(torchair's backend for torch.compile in `npu_mode`, the torchair mode used): max-autotune is the GE graph;
    reduce-overhead asks for aclgraph, as npugraph_ex where this torchair has it.
    Unavailable when torchair cannot be used: torch_npu installs a lazy placeholder as `torchair`, so `import
    torchair` succeeds even when it is broken and the failure comes at the first attribute use, as
    _TorchairImportError (not an ImportError); a torchair without the mode raises ValueError when it is set."""
    try:
        import torchair  # noqa: PLC0415 - ships inside torch_npu, imported only on the NPU path

        config = torchair.CompilerConfig()
        used = "max-autotune"
        if npu_mode != "max-autotune":
            try:
                config.mode = NPUGRAPH_EX
                used = NPUGRAPH_EX
            except ValueError:  # OptionValue refuses a mode it does not list: an older torchair
                config.mode = "reduce-overhead"
                used = "reduce-overhead"
        # torchair 2.13.0/2.14.0's get_npu_backend calls warnings.filterwarnings("once", UserWarning) for the whole
        # process (configs/compiler_config.py:95, through npu_fx_compiler.py:1053): the filters are put back after it
        with warnings.catch_warnings():
            return torchair.get_npu_backend(compiler_config=config), used
    except Exception as exc:  # anything torchair raises makes this mode unavailable, never the run
        raise Unavailable(f"torchair cannot provide {npu_mode!r} ({_why(exc)})") from exc


def _backend(
    device: devices.Device, cpp_wrapper: bool, npu_mode: str = "max-autotune"
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(torch.compile keywords, inductor config patch for the compiling calls, notes) for the device."""
    if device.type == "npu":
        backend, used = _torchair_backend(npu_mode)
        return {"backend": backend}, {}, [NPU_GRAPH_MODES[used]]
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}, {}, ['inductor mode="reduce-overhead" (CUDA graphs)']
    if device.type == "cpu":
        notes = ["inductor, torch._inductor.config.freezing=True (weights constant-folded and prepacked)"]
        patch = {"freezing": True}
        if cpp_wrapper:
            patch["cpp_wrapper"] = True
            notes.append("inductor cpp_wrapper=True")
        return {}, patch, notes
    return {}, {}, ["inductor defaults"]


def compile_for(
    fn: Forward,
    device: devices.Device,
    name: str,
    example: torch.Tensor,
    cpp_wrapper: bool = False,
    npu_mode: str = "max-autotune",
) -> tuple[Forward, float, list[str]]:
    """`fn` compiled for `device` with a static shape, and its first (compiling) call made on `example`:
    (compiled callable, compile seconds, notes). `npu_mode` picks torchair's mode on npu. Unavailable when the
    device's compiler cannot build it."""
    kwargs, patch, notes = _backend(device, cpp_wrapper, npu_mode)

    def forward(pixel_values: torch.Tensor, _fn=fn) -> torch.Tensor:
        return _fn(pixel_values)

    compiled = torch.compile(_unique_function(forward, name), dynamic=False, fullgraph=True, **kwargs)
    try:
        with _inductor_patch(patch), torch.no_grad():
            compile_ms = timing.timed_call(lambda: compiled(example), device)[1]
    except Exception as exc:  # a backend that cannot compile this model: report it, keep the other modes
        raise Unavailable(f"torch.compile failed ({_why(exc)})") from exc
    return compiled, compile_ms / 1000.0, notes


def aoti_available() -> bool:
    """torch.export + AOTInductor packaging in the form used here (torch >= 2.6; 2.5 has another signature)."""
    import torch._inductor as inductor

    api = hasattr(inductor, "aoti_compile_and_package") and hasattr(inductor, "aoti_load_package")
    return Version(torch.__version__).release[:2] >= (2, 6) and api


def compile_cache_dir() -> Path | None:
    """Where compiled artefacts are kept: $MOBILEVIT_NPU_COMPILE_CACHE ("off": nowhere), else
    refcache.user_cache_dir() / "compiled"."""
    spec = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if spec.lower() == "off":
        return None
    return Path(spec).expanduser() if spec else refcache.user_cache_dir() / "compiled"


def named_compile_cache_dir() -> Path | None:
    """compile_cache_dir() where the user named it ($MOBILEVIT_NPU_COMPILE_CACHE or $MOBILEVIT_NPU_CACHE set), else
    None: what the output guard (common.check_outputs) checks against the model folder and the inputs."""
    named = os.environ.get(COMPILE_CACHE_ENV, "").strip() or os.environ.get(refcache.CACHE_ENV, "").strip()
    return compile_cache_dir() if named else None


def _cpu_isa() -> str:
    with contextlib.suppress(Exception):
        from torch._inductor import cpu_vec_isa

        return str(cpu_vec_isa.pick_vec_isa())
    return "unknown"


def _cpp_compiler() -> str | None:
    """The C++ compiler AOTInductor builds the package's shared library with, and its version: inductor's own choice
    (torch/_inductor/cpp_builder.py: get_cpp_compiler l.372, get_compiler_version_info l.639, torch 2.13), the
    version line of its `-v` output; None where this torch cannot say."""
    with contextlib.suppress(Exception):
        from torch._inductor import cpp_builder

        compiler = cpp_builder.get_cpp_compiler()
        info = str(cpp_builder.get_compiler_version_info(compiler))
        version = next((line for line in re.split(r"[\n_]", info) if " version " in line), info[-200:])
        return f"{compiler}: {version.strip()}"
    return None


def aoti_configs(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """AOTI_CONFIGS plus `extra`, less any option this torch's inductor does not have (older releases lack some)."""
    import torch._inductor.config as inductor_config

    return {k: v for k, v in {**AOTI_CONFIGS, **(extra or {})}.items() if hasattr(inductor_config, k)}


def aoti_key(
    module: torch.nn.Module, device: devices.Device, example: torch.Tensor, configs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What an AOTInductor package depends on: the module's weights, its model config (config.json as loaded), its
    structure (every submodule's class and settings: refcache.structure_digest) and the source of every module class
    in it, the input's shape, strides and dtype, the device and its CPU ISA, torch, transformers, Python, the C++
    compiler and the build options."""
    import transformers  # noqa: PLC0415 - only for its version

    cpu = device.type == "cpu"
    return {
        "kind": "aoti",
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "code_sha256": refcache.code_digest(module),
        "config_sha256": refcache.config_digest(module),
        "structure_sha256": refcache.structure_digest(module),
        "weights_sha256": models.weights_digest(module),
        "shape": list(example.shape),
        "strides": list(example.stride()),
        "dtype": str(example.dtype),
        "device": str(device),
        "cpu": devices.cpu_name() if cpu else None,
        "isa": _cpu_isa() if cpu else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpp_compiler": _cpp_compiler() if cpu else None,
        "inductor_configs": configs if configs is not None else aoti_configs(),
    }


def _load_cached(package: Path, meta_path: Path, key: str, example: torch.Tensor) -> Forward | None:
    """The cached package's runner after a first call, or None when it is absent or damaged (then rebuilt)."""
    if not (package.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(reports.read_bounded(meta_path, "compile cache entry", reports.MAX_CONFIG_BYTES))
        if meta.get("key") != key or meta.get("sha256") != models.sha256_file(package):
            raise ValueError("checksum or key mismatch")
        runner = torch._inductor.aoti_load_package(str(package))
        runner(example)
        return runner
    except Exception as exc:  # a truncated zip, a missing or foreign .so: any failure means rebuild
        logger.warning(
            "compile cache: %s is damaged (%s: %s); rebuilding", package, type(exc).__name__, first_line(exc)
        )
        return None


def build_aoti(
    module: Forward, device: devices.Device, example: torch.Tensor, autotune: bool = False
) -> tuple[Forward, float, list[str], str]:
    """`module` exported with torch.export and built by AOTInductor (weights frozen) into a package, loaded back as a
    C++ runner: no dynamo guard checks and no Python between kernels on each call, ~5% off `fast`'s batch-1 latency
    on CPU against torch.compile with the C++ wrapper. The package is kept in the compile cache (see the module
    docstring) and a later build with the same key loads it instead. Returns (runner, seconds for export, build, load
    and the first call, or for loading and the first call on a hit; notes; "hit" | "miss" | "off"). With `autotune`,
    AOTI_AUTOTUNE too (GEMMs timed and picked while building: a slower build, cached like any other)."""
    configs = aoti_configs(AOTI_AUTOTUNE if autotune else None)
    notes = ["AOTInductor: torch.export + aoti_compile_and_package, freezing"]
    if autotune:
        notes.append("inductor max_autotune: each GEMM the faster of its C++ template and aten's, epilogues fused")
    root = compile_cache_dir() if isinstance(module, torch.nn.Module) else None

    def build_uncached() -> Forward:
        with tempfile.TemporaryDirectory(prefix="mobilevit_aoti_") as folder:
            runner = _aoti_build(module, example, os.path.join(folder, "fast.pt2"), configs)
        runner(example)
        return runner

    if root is None:
        runner, ms = timing.timed_call(build_uncached, device)
        return runner, ms / 1000.0, notes, "off"

    fields = aoti_key(module, device, example, configs)
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    package, meta_path = root / f"aoti-{key[:32]}.pt2", root / f"aoti-{key[:32]}.json"
    runner, ms = timing.timed_call(lambda: _load_cached(package, meta_path, key, example), device)
    if runner is not None:
        return runner, ms / 1000.0, notes + [f"compile cache hit: {package}"], "hit"

    def build() -> tuple[Forward, str | None]:
        """Build in a private temp folder (the package writer reports a full disk as a RuntimeError, or aborts in
        C++, so it never writes into the cache), then copy the package into the cache: a failure there is a plain
        OSError with its errno, and the runner already built is used without the cache."""
        with tempfile.TemporaryDirectory(prefix="mobilevit_aoti_") as scratch:
            built = Path(scratch) / "fast.pt2"
            runner = _aoti_build(module, example, str(built), configs)
            runner(example)
            try:
                _store_package(
                    built, root, package, meta_path, {"key": key, "fields": fields, "sha256": models.sha256_file(built)}
                )
            except OSError as exc:
                return runner, _cache_write_error(root, exc)
        return runner, None

    runner_and_error, ms = timing.timed_call(build, device)
    runner, error = runner_and_error
    if error is not None:
        logger.warning("compile cache: %s; the build is used without the cache", error)
        return runner, ms / 1000.0, notes + [f"compile cache not writable: {error}"], "off"
    return runner, ms / 1000.0, notes + [f"compile cache miss: built and stored {package}"], "miss"


def _cache_write_error(root: Path, exc: OSError) -> str:
    """One line: the path and the errno of a failed cache write (ENOSPC, EROFS, EACCES...)."""
    import errno as errno_names

    name = errno_names.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__
    return f"cannot write under {exc.filename or root} ({name}: {exc.strerror or first_line(exc)})"


def _store_package(built: Path, root: Path, package: Path, meta_path: Path, meta: dict[str, Any]) -> None:
    """Copy a built package and its meta into the cache folder through the one atomic writer (mobilevit_npu.atomic: a
    temp name in the same folder, fsync'd, then a rename; cache files get the user's umask), the package first: a
    reader of the old meta with the new package sees a checksum mismatch. OSError on any failure, nothing
    half-written left."""

    def copy(out) -> None:
        with open(built, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)

    atomic.write(package, copy)
    atomic.write(meta_path, json.dumps(meta, indent=2).encode())


def _aoti_build(module: Forward, example: torch.Tensor, package_path: str, configs: dict[str, Any]) -> Forward:
    """Export and build under no_grad: inductor applies `freezing` only when grad is off (compile_fx checks
    torch.is_grad_enabled()), so a build with grad on silently skips weight prepacking and the oneDNN fusions."""
    with torch.no_grad(), warnings.catch_warnings():
        # autotuning's benchmark set-up calls the deprecated Tensor.storage() (torch 2.13
        # _inductor/select_algorithm.py:4799): its TypedStorage warning says nothing about this build
        warnings.filterwarnings(
            "ignore", message="TypedStorage is deprecated", category=UserWarning, module=r"torch\._inductor\."
        )
        program = torch.export.export(module, (example,))
        package = torch._inductor.aoti_compile_and_package(
            program, package_path=package_path, inductor_configs=dict(configs)
        )
    return torch._inductor.aoti_load_package(package)  # the shared library is loaded: the file can go


def _inductor_patch(options: dict[str, Any]):
    if not options:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(**options)
