"""The real torch_npu is the contract: every NPU name the project uses, with the arguments it passes, must be defined in
the Python source of the real wheels (torch-npu 2.5.1, the model card's stack; 2.13.0, which pairs with CI's torch; and
2.14.0, the newest). Beyond names: the HCCL backend the project asks for is the one each wheel registers, torchair's
modes are those compilers.py picks from, and the C++ behaviour the stand-in imitates (fallback wordings, the switches
torch_npu reads) is read from each wheel's libtorch_npu.so.

The wheels are fetched with `pip download --no-deps` into MOBILEVIT_NPU_WHEELS (default ~/.cache/mobilevit-npu/wheels)
and only their .py files are unpacked. Locally an unreachable index skips these tests; in CI (CI=1 or
MOBILEVIT_REQUIRE_NPU_WHEELS=1) it fails them.
"""

from __future__ import annotations

import shutil
import textwrap

import npu_contract as contract
import npu_standin as standin
import pytest

from mobilevit_npu import compilers, distributed, npu

pytestmark = pytest.mark.npu_contract


@pytest.fixture(scope="module", params=contract.VERSIONS)
def real_source(request) -> contract.Source:
    try:
        wheel = contract.fetch_wheel(request.param)
    except contract.WheelUnavailable as exc:
        if contract.required():
            pytest.fail(f"CI must check the NPU contract, but the wheel could not be fetched: {exc}")
        pytest.skip(f"torch-npu {request.param} wheel not reachable here ({exc}); CI runs this")
    source = contract.Source(contract.unpack_sources(wheel))
    source.version = request.param
    source.wheel = wheel
    return source


@pytest.fixture(scope="module")
def real_library(real_source) -> bytes:
    return contract.library_bytes(real_source.wheel)


@pytest.fixture(scope="module")
def project_uses() -> list[contract.Use]:
    return contract.collect_uses()


def test_the_collector_sees_the_project_npu_calls(project_uses):
    """A floor, so the contract cannot pass by collecting nothing: the start-up sequence and the graph backend."""
    dotted = {u.dotted() for u in project_uses}
    expected = [
        "torch_npu.npu.set_compile_mode",
        "torch_npu.npu.set_device",
        "torch_npu.contrib.transfer_to_npu",
        "torchair.get_npu_backend",
        "torch_npu.npu.conv.allow_hf32",
        "torch_npu.npu.matmul.allow_hf32",
    ]
    for name in expected:
        assert name in dotted, f"{name} not collected from the project source"
    assert len(project_uses) >= 20


def test_every_npu_use_is_defined_in_the_real_wheel(real_source, project_uses):
    problems = [p for u in project_uses if (p := contract.check_use(real_source, u))]
    assert not problems, f"torch-npu {real_source.version}:\n" + "\n".join(problems)


def _mutated_project(tmp_path, old: str, new: str):
    dest = tmp_path / "project"
    shutil.copytree(contract.ROOT / "mobilevit_npu", dest / "mobilevit_npu")
    changed = 0
    for path in (dest / "mobilevit_npu").rglob("*.py"):
        text = path.read_text()
        if old in text:
            path.write_text(text.replace(old, new, 1))
            changed += 1
    assert changed == 1, f"{old!r} should occur in exactly one module"
    return contract.collect_uses(dest)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("api.set_compile_mode(jit_compile=", "api.set_compile_mode(jit_compiled=", "no parameter 'jit_compiled'"),
        ("(device).get_device_name(", "(device).get_devices_name(", "defines no 'get_devices_name'"),
        ("conv.allow_hf32 =", "conv.allow_hf16 =", "no attribute 'allow_hf16'"),
        ('.mode = "reduce-overhead"', '.mode = "reduce_overhead"', "not one of"),
    ],
)
def test_a_misspelt_name_or_keyword_fails_the_contract(tmp_path, real_source, old, new, message):
    problems = [p for u in _mutated_project(tmp_path, old, new) if (p := contract.check_use(real_source, u))]
    assert any(message in p for p in problems), problems


def test_collector_follows_bindings_through_the_project(tmp_path):
    """torch.npu, torch_npu, torchair, a project function returning the NPU module, and an instance's attributes."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(
        textwrap.dedent("""
        import sys, importlib, torch
        def api():
            torch_npu = sys.modules.get("torch_npu") or importlib.import_module("torch_npu")
            return torch_npu.npu
        def use(device):
            api().synchronize(device, 3, flag=True)
            torch.npu.conv.allow_hf32 = False
            import torchair
            cfg = torchair.CompilerConfig()
            cfg.mode = "reduce-overhead"
            other = torch.cuda
            other.synchronize()
    """)
    )
    uses = {(u.dotted(), u.kind): u for u in contract.collect_uses(tmp_path)}
    sync = uses[("torch_npu.npu.synchronize", "call")]
    assert (sync.nargs, sync.keywords) == (2, ("flag",))
    assert uses[("torch_npu.npu.conv.allow_hf32", "set")].value is False
    assert uses[("torchair.CompilerConfig().mode", "set")].value == "reduce-overhead"
    assert not any("cuda" in name for name, _ in uses)


def test_signature_binding_rules():
    import ast

    fn = ast.parse("def f(self, a, b=1, *, c, d=2): pass").body[0]
    check = contract.signature_problem
    assert check(fn, True, 1, ("c",), False) is None
    assert "needs c" in check(fn, True, 1, (), False)
    assert "at most 2 positional" in check(fn, True, 3, ("c",), False)
    assert "no parameter 'e'" in check(fn, True, 1, ("c", "e"), False)


def test_the_hccl_backend_the_project_asks_for_is_registered_for_npu(real_source):
    """distributed.py's backend name for npu, against torch_npu's Backend.register_backend calls (2.5.1
    torch_npu/__init__.py l.245; 2.13.0/2.14.0 torch_npu/_init/registry/distributed.py l.37-44)."""
    backends = contract.registered_backends(real_source)
    assert "npu" in backends.get(distributed.BACKENDS["npu"], []), backends
    assert "nccl" not in backends and "gloo" not in backends  # what it read are torch_npu's own registrations


def test_npugraph_picks_from_the_modes_each_torchair_has(real_source):
    """compilers.py sets CompilerConfig.mode to npugraph_ex and falls back to reduce-overhead on ValueError."""
    config = real_source.resolve(("torchair", "CompilerConfig", "()", "mode"))
    choices = contract.option_choices(real_source, config)
    assert "reduce-overhead" in choices and "max-autotune" in choices
    assert (compilers.NPUGRAPH_EX in choices) == (real_source.version != "2.5.1"), choices


def test_the_standin_wordings_are_the_real_ones(real_source, real_library):
    """Each text the stand-in and npu.py rely on is a string constant of this version's libtorch_npu.so."""
    pieces = [
        "' is not currently supported ",
        "on the NPU backend and will fall back to run on the CPU.",
        " This may have performance implications.",
    ]  # fmt: skip  VariableFallbackKernel.cpp:250-254
    for piece in pieces:
        assert piece.encode() in real_library, piece
    assert b"TORCH_NPU_DISABLED_WARNING\0" in real_library
    newer = real_source.version != "2.5.1"
    for name, text in standin.WORDINGS.items():
        if name != "dispatcher":
            assert (text.encode() in real_library) == newer, name
    assert (b"TORCH_NPU_FALLBACK_CPU_DISABLE\0" in real_library) == newer
    assert (b", but CPU fallback is disabled by TORCH_NPU_FALLBACK_CPU_DISABLE=1." in real_library) == newer
    assert (b"TORCH_NPU_WARNING_DISABLE\0" in real_library) == newer


def test_npu_reads_the_switches_from_the_real_library(real_source, real_library, tmp_path, monkeypatch):
    """npu.installed_reads finds the switch in this wheel's library exactly where the library holds it."""
    library = tmp_path / "torch_npu" / "lib" / "libtorch_npu.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(real_library)
    (tmp_path / "torch_npu" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "torch_npu", raising=False)
    assert npu.installed_reads(npu.SWITCH) == (real_source.version != "2.5.1")
    assert npu.installed_reads("TORCH_NPU_DISABLED_WARNING")


# --- issue 31: the second fallback family, the routes, the switches, the stack read without a profiler ---------------

SECOND_FAMILY_MARK = b" is not supported by NPU currently."


def _library_strings(library: bytes, mark: bytes) -> set[str]:
    """Every NUL-terminated string constant of the library that holds `mark`."""
    found = set()
    start = library.find(mark)
    while start >= 0:
        begin = library.rfind(b"\0", 0, start) + 1
        end = library.find(b"\0", start)
        found.add(library[begin:end].decode("utf-8", "replace"))
        start = library.find(mark, end)
    return found


def test_every_second_family_wording_is_known_and_parsed(real_library):
    """op-plugin's own CPU kernels: each wheel's library holds exactly the 16 strings the round-two tests list, and
    npu.fallback_operators names the operator of each (as printed, with c10's "Warning: " in front)."""
    SECOND_FAMILY = standin.SECOND_FAMILY
    strings = _library_strings(real_library, SECOND_FAMILY_MARK)
    assert strings == set(SECOND_FAMILY), strings ^ set(SECOND_FAMILY)
    for text in strings:
        assert npu.fallback_operators(f"Warning: {text}") == [f"aten::{SECOND_FAMILY[text]}"], text
    for text, _route, _where in standin.KERNEL_WORDINGS.values():  # the stand-in prints real strings
        assert text in strings


def test_the_switches_the_project_reads_are_the_libraries(real_source, real_library):
    """The silencers npu.py honours are strings of the library (TORCH_NPU_WARNING_DISABLE from 2.13.0); the fallback
    switch is not consulted by op-plugin (its kernels are not gated: no CheckCpuFallbackAllowed near them)."""
    for name in npu.SILENCERS:
        assert (name.encode() + b"\0" in real_library) == (name == npu.SILENCERS[0] or real_source.version != "2.5.1")


def test_npu_fusion_attention_is_exported_as_the_standin_does(real_source, real_library):
    """transformers 5.x imports npu_fusion_attention from torch_npu: each wheel registers the npu:: op whose schema
    starts with (query, key, value, head_num, input_layout) and exports torch.ops.npu's ops as torch_npu attributes
    (2.5.1 torch_npu/__init__.py `for name in dir(torch.ops.npu)`; 2.13.0/2.14.0 _init/core/_exports.py)."""
    assert b"\0npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout" in (
        real_library
    )
    docs = real_source.files["torch_npu._op_plugin_docs"].read_text(encoding="utf-8")
    assert '"npu_fusion_attention"' in docs
    import inspect

    params = list(inspect.signature(_standin_npu_fusion_attention()).parameters)[:5]
    assert params == ["query", "key", "value", "head_num", "input_layout"]


def _standin_npu_fusion_attention():
    namespace: dict = {}
    source = standin._INIT
    start = source.index("def npu_fusion_attention(")
    end = source.index("\n\n\n", start)
    exec(source[start:end], namespace)  # the stand-in's definition alone
    return namespace["npu_fusion_attention"]


def test_torchair_adds_a_once_filter_where_the_standin_does(real_source):
    """torchair 2.13.0/2.14.0: get_npu_backend -> _check_config_support -> warnings.filterwarnings("once", UserWarning)
    (configs/compiler_config.py:95); 2.5.1's has none. The stand-in does it from 2.13.0 on."""
    import ast

    tree = ast.parse(real_source.files["torchair.configs.compiler_config"].read_text(encoding="utf-8"))
    once = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", None) == "filterwarnings"
        and node.args
        and getattr(node.args[0], "value", None) == "once"
    ]
    assert bool(once) == (real_source.version != "2.5.1")
    assert ('warnings.filterwarnings("once", category=UserWarning)' in standin._TORCHAIR) is True


def test_the_stack_facts_read_the_real_wheels_metadata_and_torchair(real_source, tmp_path, monkeypatch):
    """preflight.stack_facts, without importing anything (no profiler, no CANN): the wheel's own METADATA and
    torchair's compiler_config.py, unpacked as pip installs them."""
    import zipfile

    from mobilevit_npu import preflight

    site = tmp_path / "site"
    with zipfile.ZipFile(real_source.wheel) as zf:
        for name in zf.namelist():
            if name.endswith(".dist-info/METADATA") or name in (
                "torch_npu/__init__.py",
                "torch_npu/dynamo/torchair/configs/compiler_config.py",
            ):
                zf.extract(name, site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(__import__("sys").modules, "torch_npu", raising=False)
    facts = preflight.stack_facts({}, str(tmp_path / "no-ascend"))
    assert facts["torch_npu"]["version"] == real_source.version
    assert facts["torch_npu"]["requires_torch"].lstrip("=").startswith(real_source.version)
    modes = facts["torchair"]["modes"]
    assert "max-autotune" in modes and ("npugraph_ex" in modes) == (real_source.version != "2.5.1")
    rows = {r.check: r for r in preflight.stack_rows(facts, str(tmp_path / "no-ascend"))}
    listed = preflight.expected_cann(real_source.version)
    assert (rows["CANN toolkit"].status == "missing") and (listed is None) == (real_source.version != "2.5.1")
