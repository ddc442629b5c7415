"""preflight.py against fake Ascend installs: trees and package metadata written in the real files' formats, each
mismatch named by its row; and the real run here (no Ascend stack), which prints its table and exits 2.

Formats copied from real installs (quoted in public issue threads and vendor guides, see docs/npu.md):
- <toolkit>/<arch>-linux/ascend_toolkit_install.info: package_name/version/innerversion/compatible_version/arch/os/path
  (vllm-ascend issue environment dumps, e.g. CANN 8.1.RC1 x86_64);
- <toolkit>/version.cfg: "# version: 1.0" then runtime_running_version=[<inner>:<release>] lines;
- /usr/local/Ascend/driver/version.info and firmware/version.info (driver 24.1.rc2 / firmware 7.5.0.1.129 dumps);
- torch_npu's METADATA: "Requires-Dist: torch (==2.5.1+cpu)" in the 2.5.1 wheel, "torch==2.13.0.*" in 2.13.0;
- torchair's compiler_config.py mode line, as in the 2.5.1 and 2.13.0 wheels.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

import preflight as script
from mobilevit_npu import devices, preflight

TOOLKIT_INFO = """package_name=Ascend-cann-toolkit
version={cann}
innerversion=V100R001C21SPC001B238
compatible_version=[V100R001C15],[V100R001C18],[V100R001C19],[V100R001C20],[V100R001C21]
arch={arch}
os=linux
path=/usr/local/Ascend/ascend-toolkit/{cann}/{arch}-linux
"""
VERSION_CFG = """# version: 1.0
runtime_running_version=[7.7.0.1.238:{cann}]
compiler_running_version=[7.7.0.1.238:{cann}]
hccl_running_version=[7.7.0.1.238:{cann}]
"""
DRIVER_INFO = """Version=24.1.rc2
ascendhal_version=7.35.23
aicpu_version=1.0
tdt_version=1.0
log_version=1.0
prof_version=2.0
dvppkernels_version=1.1
tsfw_version=1.0
Innerversion=V100R001C18SPC001B202
compatible_version=[V100R001C15],[V100R001C18],[V100R001C19]
compatible_version_fw=[7.0.0,7.5.99]
package_version=24.1.rc2
"""
FIRMWARE_INFO = """Version={firmware}
firmware_version=1.0
package_version=24.1.rc2
compatible_version_drv=[23.0.0,23.0.0.],[24.0,24.0.],[24.1,24.1.]
"""
TORCH_NPU_METADATA = """Metadata-Version: 2.1
Name: torch-npu
Version: {npu}
Summary: NPU bridge for PyTorch
Home-page: https://gitee.com/ascend/pytorch
Requires-Dist: {requires}
"""
COMPILER_CONFIG = """class CompilerConfig(NpuBaseConfig):
    def __init__(self):
        self.mode = OptionValue("max-autotune", {modes})
"""


def fake_site(folder, torch="2.5.1+cpu", npu="2.5.1", requires="torch (==2.5.1+cpu)", modes=None):
    """A sys.path entry holding torch's and torch_npu's metadata and torch_npu's torchair config (nothing importable
    as torch: preflight only reads metadata and files)."""
    modes = modes or ["max-autotune", "reduce-overhead"]
    (folder / f"torch-{torch}.dist-info").mkdir(parents=True)
    (folder / f"torch-{torch}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: torch\nVersion: {torch}\n"
    )
    if npu:
        info = folder / f"torch_npu-{npu}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(TORCH_NPU_METADATA.format(npu=npu, requires=requires))
        config = folder / "torch_npu" / "dynamo" / "torchair" / "configs" / "compiler_config.py"
        config.parent.mkdir(parents=True)
        (folder / "torch_npu" / "__init__.py").write_text("")
        config.write_text(COMPILER_CONFIG.format(modes=json.dumps(modes)))
    return folder


def fake_ascend(root, cann="8.1.RC1", firmware="7.5.0.1.129", hccl=True, info=True):
    """/usr/local/Ascend as the installers leave it: ascend-toolkit/latest (install.info, version.cfg, lib64, opp,
    runtime, compiler), driver/version.info, firmware/version.info."""
    toolkit = root / "ascend-toolkit" / "latest"
    arch = platform.machine()
    for sub in ("lib64", "opp", "runtime", "compiler", f"{arch}-linux"):
        (toolkit / sub).mkdir(parents=True, exist_ok=True)
    if info:
        (toolkit / f"{arch}-linux" / "ascend_toolkit_install.info").write_text(
            TOOLKIT_INFO.format(cann=cann, arch=arch)
        )
    (toolkit / "version.cfg").write_text(VERSION_CFG.format(cann=cann))
    if hccl:
        (toolkit / "lib64" / "libhccl.so").write_bytes(b"\x7fELF")
    (root / "driver").mkdir(parents=True)
    (root / "driver" / "version.info").write_text(DRIVER_INFO)
    (root / "firmware").mkdir(parents=True)
    (root / "firmware" / "version.info").write_text(FIRMWARE_INFO.format(firmware=firmware))
    return toolkit


def sourced(toolkit) -> dict[str, str]:
    """What `source set_env.sh` exports (the toolkit's lib64 on LD_LIBRARY_PATH, ASCEND_OPP_PATH=<toolkit>/opp)."""
    return {
        "ASCEND_TOOLKIT_HOME": str(toolkit),
        "ASCEND_HOME_PATH": str(toolkit),
        "ASCEND_OPP_PATH": str(toolkit / "opp"),
        "LD_LIBRARY_PATH": f"{toolkit}/lib64:{toolkit}/lib64/plugin/opskernel:/usr/local/Ascend/driver/lib64",
    }


@pytest.fixture
def stack(tmp_path, monkeypatch):
    """A function: stack(site=..., ascend=..., env=...) builds a fake install, puts its environment in place, and
    returns (root, rows, exit code, reason) from preflight.main without the subprocess rows."""

    def build(site=None, ascend=None, env=None, unsourced=False):
        site_dir = fake_site(tmp_path / "site", **(site or {}))
        monkeypatch.syspath_prepend(str(site_dir))
        root = tmp_path / "Ascend"
        toolkit = fake_ascend(root, **(ascend or {}))
        for name in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_OPP_PATH", "ASCEND_RT_VISIBLE_DEVICES"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("LD_LIBRARY_PATH", "")
        if not unsourced:
            for name, value in sourced(toolkit).items():
                monkeypatch.setenv(name, value)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        out = tmp_path / "preflight.json"
        code = script.main(["--ascend_root", str(root), "--skip_import_check", "--json", str(out)])
        data = json.loads(out.read_text())
        return root, {r["check"]: r for r in data["rows"]}, code, data["reason"]

    return build


def test_a_stack_that_pairs_is_all_ok(stack, capsys):
    _, rows, code, reason = stack()
    assert code == 0, reason
    assert {r["status"] for r in rows.values()} == {"ok"}, rows
    assert (
        rows["CANN toolkit"]["value"].startswith("8.1.RC1")
        and "ascend_toolkit_install.info" in (rows["CANN toolkit"]["read_from"])
    )
    assert rows["torch_npu"]["value"] == "2.5.1 (requires torch ==2.5.1+cpu)"
    assert rows["torchair"]["value"] == "in torch_npu; modes: max-autotune, reduce-overhead"
    assert rows["firmware"]["value"] == "7.5.0.1.129" and rows["driver"]["value"] == "24.1.rc2"
    out = capsys.readouterr().out
    assert (
        "9e73e708ab9350d203475609f36f8a43f6a0c2ab" in out
        and out.strip().splitlines()[-1] == "result: exit 0: every row ok"
    )


@pytest.mark.parametrize(
    ("options", "row", "status", "code", "fix"),
    [
        ({"ascend": {"cann": "8.0.RC2"}}, "CANN toolkit", "mismatch", 1, "install CANN 8.1.RC1"),
        ({"ascend": {"cann": "8.2.RC1"}}, "CANN toolkit", "mismatch", 1, "or torch-npu 2.5.1.post1"),
        ({"site": {"torch": "2.6.0+cpu"}}, "torch_npu", "mismatch", 2, "built for torch 2.5.1"),
        ({"site": {"torch": "2.5.1+cu121"}}, "torch", "mismatch", 2, "download.pytorch.org/whl/cpu"),
        ({"site": {"npu": None}}, "torch_npu", "missing", 2, "pip install torch-npu==2.5.1"),
        ({"ascend": {"firmware": "7.7.0.1.231"}}, "firmware", "mismatch", 1, "firmware released with this driver"),
        ({"unsourced": True}, "set_env.sh", "missing", 2, "set_env.sh"),
        ({"env": {"ASCEND_RT_VISIBLE_DEVICES": "1,0"}}, "visible devices", "mismatch", 1, "ascending"),
        ({"ascend": {"hccl": False}}, "HCCL (torchrun)", "missing", 2, "libhccl.so"),
        ({"ascend": {"info": False}}, "CANN toolkit", "ok", 0, None),  # read from version.cfg instead
    ],
)
def test_each_mismatch_is_named_by_its_row(stack, options, row, status, code, fix):
    _, rows, got, reason = stack(**options)
    assert rows[row]["status"] == status, rows[row]
    assert got == code, reason
    others = {name: r["status"] for name, r in rows.items() if name != row and r["status"] not in ("ok", "unknown")}
    assert others == {} or got == 2, others  # the row named is the one that decided
    if fix:
        assert fix in rows[row]["fix"] and row in reason
    else:
        assert "version.cfg" in rows[row]["read_from"]


def test_a_torch_npu_not_in_the_table_is_unknown_not_ok(stack):
    _, rows, code, _ = stack(
        site={
            "torch": "2.14.0+cpu",
            "npu": "2.14.0",
            "requires": "torch==2.14.0.*",
            "modes": ["max-autotune", "reduce-overhead", "npugraph_ex"],
        }
    )
    assert rows["CANN toolkit"]["status"] == "unknown" and "not listed" in rows["CANN toolkit"]["value"]
    assert "npugraph_ex" in rows["torchair"]["value"] and code == 0


def test_the_pairing_table_holds_the_readme_stack():
    assert preflight.expected_cann("2.5.1") == "8.1.RC1"
    assert preflight.expected_cann("2.5.1.post1") == "8.2.RC1"
    assert preflight.expected_cann("2.13.0") is None and preflight.expected_cann("2.14.0") is None
    assert preflight.cann_matches("8.1.RC1.alpha001", "8.1.RC1") and not preflight.cann_matches("8.1.RC2", "8.1.RC1")


def test_stack_facts_go_into_the_environment_where_torch_npu_is_installed(tmp_path, monkeypatch):
    cpu = devices.Device("cpu")
    assert devices.environment(cpu).ascend is None  # this CPU box: no Ascend stack in the report
    monkeypatch.syspath_prepend(
        str(fake_site(tmp_path / "site", torch="2.13.0+cpu", npu="2.13.0", requires="torch==2.13.0.*"))
    )
    toolkit = fake_ascend(tmp_path / "Ascend", cann="8.2.RC1")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(toolkit))
    ascend = devices.environment(cpu).ascend
    assert ascend["torch_npu"]["version"] == "2.13.0" and ascend["torch_npu"]["requires_torch"] == "==2.13.0.*"
    assert ascend["cann"]["version"] == "8.2.RC1" and ascend["toolkit"]["found_by"] == "$ASCEND_TOOLKIT_HOME"
    assert ascend["cann_in_use"] == {"version": "8.2.RC1", "read_from": ascend["cann"]["read_from"]}
    assert ascend["transfer_to_npu"] is None and ascend["pairing_source"] == preflight.PAIRING_SOURCE


def test_stack_facts_import_nothing():
    code = textwrap.dedent("""
        import sys
        from mobilevit_npu import preflight
        preflight.stack_facts()
        print(sorted(m for m in ("torch", "torch_npu", "transformers") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_preflight_here_prints_its_table_and_exits_2(tmp_path):
    """This machine has no Ascend stack: every row printed, `import torch` in a subprocess, exit 2 with the reason."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_")}
    out = subprocess.run(
        [sys.executable, "preflight.py", "--ascend_root", str(tmp_path / "none")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    checks = [line.split()[0] for line in lines[3:] if line and not line.startswith(" ")]
    for name in (
        "python",
        "torch",
        "torch_npu",
        "CANN",
        "driver",
        "firmware",
        "set_env.sh",
        "visible",
        "HCCL",
        "npu-smi",
        "import",
    ):
        assert name in checks, lines
    assert lines[-1].startswith("result: exit 2: unusable: torch_npu missing: not installed")
    assert any(line.startswith("import torch") and " ok " in line for line in lines), lines


def test_usage_errors_exit_2(tmp_path):
    assert script.main(["--no_such_flag"]) == 2
    assert script.main(["--json", str(tmp_path), "--skip_import_check"]) == 2  # a folder cannot take the JSON


def test_a_failing_autoload_is_a_row_not_a_crash(tmp_path):
    """A torch_npu whose autoload fails (CANN not sourced): the preflight itself still runs (torch_npu is never loaded
    in its process), and the `import torch` row carries startup's one line."""
    import npu_standin

    folder = npu_standin.build(tmp_path / "site", autoload_fails=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_") and k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    env["PYTHONPATH"] = f"{folder}{os.pathsep}{ROOT}"
    out = subprocess.run(
        [sys.executable, "preflight.py", "--ascend_root", str(tmp_path / "none")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stdout + out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("import torch"))
    assert "mismatch" in row and "failed: error: torch could not load its torch_npu extension" in row
    assert "libhccl.so" in row and "set_env.sh" in row
