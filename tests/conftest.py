"""Shared fixtures: tiny and full-size MobileViT folders built in-process and saved, then loaded the real way."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

# The suite builds into a temp folder of its own (every process it starts inherits it), never into the user's shared
# /tmp/torchinductor_<user>, and removes it at the end (pytest_sessionfinish). Set before torch is imported.
# The folder is named for this process: a run killed before its end (a timeout, ^C twice) leaves its folder behind,
# and the next run removes it once that process is gone.
_SUITE_PREFIX = "mobilevit-npu-tests-"


def _remove_folders_of_dead_runs() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{_SUITE_PREFIX}*-*"):
        pid = folder.name[len(_SUITE_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # that run is over: its folder is an orphan
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive (another user's process: EPERM): not ours to touch
            pass


# Under pytest-xdist (the readme's `-n 2`) the workers share the folder of the run that started them: it is passed on
# in the environment (the controller imports this file before it starts its workers), so one inductor cache serves
# every worker, and the builds shared_once makes are made once for all of them. Only the run that made the folder
# removes it.
_SUITE_ENV = "MOBILEVIT_NPU_TEST_SUITE_TMP"
_SUITE_TMP = os.environ.get(_SUITE_ENV, "") if os.environ.get("PYTEST_XDIST_WORKER") else ""
_SUITE_OWNER = not os.path.isdir(_SUITE_TMP)
if _SUITE_OWNER:
    _remove_folders_of_dead_runs()
    _SUITE_TMP = tempfile.mkdtemp(prefix=f"{_SUITE_PREFIX}{os.getpid()}-")
    os.environ[_SUITE_ENV] = _SUITE_TMP
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_SUITE_TMP, "inductor")
os.environ["TRITON_CACHE_DIR"] = os.path.join(_SUITE_TMP, "triton")

# pytest-xdist's workers share the cores: each computes on its share of them (and so does every script it starts), so
# their OpenMP threads never spin against each other's (two workers of two threads each on two cores run a test 10-40x
# slower). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

import pytest  # noqa: E402
import torch  # noqa: E402


def _inductor_defaults_into_the_suite_folder() -> None:
    """What inductor keeps in /tmp/torchinductor_<user> whatever TORCHINDUCTOR_CACHE_DIR says goes to the suite's
    folder too: AOTInductor's precompiled headers (~140 MB each; torch 2.13 _inductor/codecache.py:3539-3543, "we
    explicitly use default_cache_dir here because these headers need to be global") and the on-disk caches that call
    runtime_utils.default_cache_dir (_inductor/cache.py:417, runtime/caching/implementations.py:207)."""
    import importlib

    inductor = os.path.join(_SUITE_TMP, "inductor")
    for name in ("runtime.cache_dir_utils", "runtime.runtime_utils", "codecache"):
        try:
            module = importlib.import_module(f"torch._inductor.{name}")
        except ImportError:  # an older torch without that module
            continue
        if hasattr(module, "default_cache_dir"):
            module.default_cache_dir = lambda: inductor
        if hasattr(module, "_HEADER_DIR"):
            module._HEADER_DIR = os.path.join(inductor, "precompiled_headers")
            module._HEADER_LOCK_DIR = os.path.join(module._HEADER_DIR, "locks")


_inductor_defaults_into_the_suite_folder()

from mobilevit_npu import compilers, refcache, synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session, exitstatus):
    """The suite's own inductor/triton builds go with it (the pytest tmp folders: tmp_path_retention_policy)."""
    if _SUITE_OWNER:
        shutil.rmtree(_SUITE_TMP, ignore_errors=True)


def _file(item) -> str:
    return item.nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadfile --no-loadscope-reorder`, the readme's command: each test file one unit of
    work, sent in collection order), the order that keeps a worker from waiting for the session's compiled builds
    (compiled_tiny, ~4 minutes on 2 cores, built by whichever worker asks first): the first file that uses them, its
    tests that use them first, then every file that does not, then the other files that do. One worker builds while
    the other runs the files in between; by the time either reaches the last files, the build is there."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    uses = {id(item): "compiled_tiny" in getattr(item, "fixturenames", ()) for item in items}
    files: dict[str, bool] = {}
    for item in items:
        files[_file(item)] = files.get(_file(item), False) or uses[id(item)]
    first = next((name for name, used in files.items() if used), None)

    def order(item) -> tuple[int, int]:
        name = _file(item)
        if name == first:
            return 0, 0 if uses[id(item)] else 1
        return (2 if files[name] else 1), 0

    items.sort(key=order)  # stable: each file's own order otherwise kept (every worker sorts alike)


def shared_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A session's expensive build, made once for the whole run: `build(folder)` fills a new folder, returned. Under
    pytest-xdist every worker asks for it; the first builds it in the run's shared folder while holding a lock, the
    others wait and get the same folder (so a compile cache built by one worker is keyed on the very weights every
    worker loads). A build that failed is not kept: the next worker to ask builds again, and fails the same way."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    import fcntl  # xdist's workers: POSIX only here, as is the suite's torchrun

    shared = Path(_SUITE_TMP) / "shared"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


DATA_DIR = ROOT / "mobilevit_npu" / "data" / "images"  # the sample photos the package ships
PHOTOS = sorted(str(p) for p in DATA_DIR.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


@pytest.fixture(autouse=True)
def private_caches(tmp_path_factory, monkeypatch):
    """Each test gets empty reference and compile caches of its own: none touches the user's, none sees another's."""
    monkeypatch.setenv(refcache.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv(compilers.COMPILE_CACHE_ENV, raising=False)


def tiny_config(num_labels: int = 10, image_size: int = 256, **extra):
    """The tiny MobileViT config (every stage, 2 heads, narrow): the one declaration the fixtures and the family matrix
    (tests/test_families.py, at image_size 64) build from."""
    from transformers import MobileViTConfig

    return MobileViTConfig(
        image_size=image_size,
        patch_size=2,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48],
        num_attention_heads=2,
        mlp_ratio=2.0,
        expand_ratio=2.0,
        id2label={i: f"class {i}" for i in range(num_labels)},
        label2id={f"class {i}": i for i in range(num_labels)},
        **extra,
    )


def save_folder(model, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    shutil.copy(ROOT / "model" / "preprocessor_config.json", folder / "preprocessor_config.json")
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny MobileViT (10 classes) with healthy synthetic weights, saved as a Hugging Face folder."""

    def build(folder: Path) -> None:
        torch.manual_seed(0)
        save_folder(synthetic.build_synthetic_model(config=tiny_config(), images=PHOTOS[:2]), folder)

    return shared_once(tmp_path_factory, "tiny", build)


@pytest.fixture(scope="session")
def default_init_model_dir(tmp_path_factory) -> Path:
    """A tiny MobileViT with transformers' own random init: logits ~0, the trap that must never PASS a check."""
    from transformers import MobileViTForImageClassification

    torch.manual_seed(0)
    return save_folder(MobileViTForImageClassification(tiny_config()).eval(), tmp_path_factory.mktemp("default_init"))


@pytest.fixture(scope="session")
def synthetic_model_dir(tmp_path_factory) -> Path:
    """The full-size X-Small with healthy synthetic weights (1000 ImageNet labels), saved and loadable."""
    return shared_once(tmp_path_factory, "xsmall", synthetic.save_synthetic_model)


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A writable copy of the tiny folder, for tests that damage it."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dest)
    return dest


def make_labelled_set(root: Path, photos=PHOTOS, classes: int = 3) -> Path:
    """A labelled set as accuracy_run --dataset reads it: photo i in the class-index folder root/<i % classes>
    (the tiny model has 10 classes). The one builder every labelled-set test uses."""
    for i, photo in enumerate(photos):
        (root / str(i % classes)).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, root / str(i % classes))
    return root


def labelled_argv(model_dir, report, dataset, *extra: str) -> list[str]:
    """accuracy_run's argv for a labelled-set run on the CPU in this process: batches of 2, no worker processes, the
    system allocator (mallopt is process-wide); `extra` adds the flags a test is about."""
    common = ["--device", "cpu", "--batch_size", "2", "--workers", "0", "--allocator", "system"]
    return [str(model_dir), str(report), "--dataset", str(dataset), *common, *extra]


# The tiny model's compiled modes, built once per session (each AOTInductor build costs 30-200 s on 2 cores): what
# the benchmark builds at batch 1, the batch accuracy_run's image targets are built for, so a target run over a copy
# of this compile cache loads the very package the benchmark built and measured (the same compilers.aoti_key).
COMPILED_RUN = "compiled.json"


@pytest.fixture(scope="session")
def compiled_tiny(tmp_path_factory, tiny_model_dir):
    """accuracy_run_perf.py run once (the script, in this process) on a copy of the tiny model with --modes compiled,
    fast (and bf16 where this CPU runs it) at batch 1 into a compile cache of its own: every build is a real one (a
    miss). Returns (the folder holding model/, the report and compile_cache/; {mode: the report's result})."""
    import accuracy_run_perf
    from mobilevit_npu import devices, execution

    def build(folder: Path) -> None:
        shutil.copytree(tiny_model_dir, folder / "model")
        modes = [m for m in ("compiled", "fast", "bf16") if m in execution.available_modes(devices.Device("cpu"))]
        argv = ["model", "2", COMPILED_RUN, "--device", "cpu", "--modes", ",".join(modes), "--batch_sizes", "1"]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(refcache.CACHE_ENV, str(folder / "cache"))
            mp.setenv(compilers.COMPILE_CACHE_ENV, str(folder / "compile_cache"))
            mp.chdir(folder)
            execution._cache.clear()  # built here, not taken from this process's in-memory cache
            try:
                code = accuracy_run_perf.main([*argv, "--warmup", "0", "--allocator", "system"])
            finally:
                execution._cache.clear()
        assert code == 0, f"accuracy_run_perf.py {' '.join(argv)} exited {code}"

    folder = shared_once(tmp_path_factory, "compiled_tiny", build)
    return folder, {r["mode"]: r for r in read_json(folder / COMPILED_RUN)["results"]}


@pytest.fixture
def tiny_compile_cache(tmp_path, compiled_tiny, monkeypatch) -> Path:
    """A private copy of compiled_tiny's compile cache, made this test's compile cache ($MOBILEVIT_NPU_COMPILE_CACHE):
    a compiled target of the tiny model at batch 1 loads the benchmark's build instead of building it again."""
    from mobilevit_npu import execution

    cache, built = tmp_path / "compile_cache", compiled_tiny[0] / "compile_cache"
    if built.is_dir():  # absent where torch has no AOTInductor (torch.compile's builds are not kept on disk)
        shutil.copytree(built, cache)
    monkeypatch.setenv(compilers.COMPILE_CACHE_ENV, str(cache))
    execution._cache.clear()
    return cache


def read_json(path) -> dict:
    """A JSON file; a report (it names the `tool` that wrote it) is first checked against its kind's definition in
    mobilevit_npu.schema, so every test that reads a report also checks the writer kept to the format."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if isinstance(data, dict) and "tool" in data:
        from mobilevit_npu import schema

        schema.validate(data, str(path))
    return data
