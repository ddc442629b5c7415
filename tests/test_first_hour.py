"""The first hour of a new user (issue #33, help and docs) and the seams of the scripts (issue #29): every --help is
quick (no torch), says each default once and each long list once; the docs agree with the code they describe; the
console says what it cuts and why a figure does not count; an offline hub says so and names --synthetic."""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import accuracy_run
import inference
from mobilevit_npu import compilers, modes, npu, thresholds

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("inference", "accuracy_run", "accuracy_run_perf", "port_report", "export_onnx", "preflight")
README, README_ZH = ROOT / "readme.md", ROOT / "readme.zh.md"
HELP_WRAPPER = """
import runpy, sys
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("TORCH-IMPORTED" if "torch" in sys.modules else "torch-free", code, file=sys.stderr)
"""


def script_help(script: str) -> str:
    """`python SCRIPT.py --help` in a fresh interpreter (80 columns): its output; fails if torch was imported."""
    done = subprocess.run(
        [sys.executable, "-c", HELP_WRAPPER.format(script=f"{script}.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "COLUMNS": "80"},
    )
    status = done.stderr.strip().splitlines()[-1]
    assert status == "torch-free 0", f"{script}.py --help: {status}\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {script: script_help(script) for script in SCRIPTS}


def option_blocks(text: str) -> dict[str, str]:
    """Each option's help, whitespace joined: the line starting "  -x" or "  name" and the lines indented under it."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            current = line.split()[0].rstrip(",")
            blocks[current] = line.strip()
        elif current and re.match(r"^ {3,}\S", line):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


# --- --help: quick, each default once, long lists once ---------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_no_torch(helps, script):
    """--help builds the parser from torch-free modules (flags, thresholds, modes, runtime_registry): it used to take
    6-12 s importing torch."""
    assert helps[script].startswith("usage: ")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_each_default_once(helps, script):
    said = re.compile(r"\(default|default:|default by")
    for option, text in option_blocks(helps[script]).items():
        assert "(default: None)" not in text, f"{script}.py --help, {option}: {text}"
        assert len(said.findall(text)) <= 1, f"{script}.py --help, {option} says its default twice: {text}"
        if "required" in text:
            assert "(default" not in text, f"{script}.py --help, {option}: required and a default: {text}"


def test_help_lists_the_precision_modes_once(helps):
    from mobilevit_npu import flags

    for script in ("accuracy_run", "export_onnx"):
        for mode in flags.PRECISION_MODES:
            assert len(re.findall(rf"\b{mode}\b", helps[script])) <= 2, (script, mode)
            # once in the list, at most once more as the default named in prose; never in the usage or the flag line
            usage = helps[script].split("\n\n")[0]
            assert mode not in usage, f"{script}.py --help lists the precision modes in its usage"
    invocation = [line for line in helps["accuracy_run"].splitlines() if re.match(r"^  --precision", line)]
    assert invocation and all("allow_mix_precision" not in line for line in invocation), invocation


def test_help_usage_is_one_line(helps):
    for script in SCRIPTS:
        usage = helps[script].split("\n\n")[0]
        assert usage.count("\n") == 0, f"{script}.py --help's usage runs over lines:\n{usage}"


def test_help_of_a_flag_with_a_default_that_is_zero_still_says_it(helps):
    assert "(default: 0)" in option_blocks(helps["accuracy_run"])["--max_skipped"]
    assert "(default: ./model)" in option_blocks(helps["inference"])["--model_path"]


# --- docs agree with the code -----------------------------------------------------------------------------------------


def test_npugraph_is_described_as_the_compiler_builds_it(helps):
    """npugraph runs torchair's npugraph_ex where the torchair has it, else reduce-overhead (compilers.compile_for):
    --help, the registry and docs/performance.md said reduce-overhead only, docs/npu.md npugraph_ex."""
    summary = modes.mode("npugraph").summary
    row = next(line for line in (ROOT / "docs" / "performance.md").read_text().splitlines() if "| `npugraph`" in line)
    npu_md = (ROOT / "docs" / "npu.md").read_text()
    for where, text in (("modes.py", summary), ("performance.md", row), ("npu.md", npu_md)):
        assert compilers.NPUGRAPH_EX in text and "reduce-overhead" in text, f"{where}: {text[:300]}"
    assert compilers.NPUGRAPH_EX in " ".join(option_blocks(helps["accuracy_run_perf"])["--modes"].split())


def test_the_fallback_console_lines_in_the_docs_are_the_code_s():
    """docs/npu.md shows the console line every npu run ends with: each as npu.CpuFallbacks.line() prints it."""
    from mobilevit_npu import devices

    def line(status, operators=(), silenced_by=None) -> str:
        fallbacks = npu.CpuFallbacks.__new__(npu.CpuFallbacks)
        fallbacks.device, fallbacks.status, fallbacks.silenced_by = devices.Device("npu:0"), status, silenced_by
        fallbacks._operators, fallbacks._lock = set(operators), threading.Lock()
        return fallbacks.line()

    doc = (ROOT / "docs" / "npu.md").read_text(encoding="utf-8")
    for shown in (
        line(npu.OBSERVED),
        line(npu.OBSERVED, ("aten::sinc", "aten::median.dim")),
        line(npu.SILENCED, silenced_by="TORCH_NPU_DISABLED_WARNING=1"),
    ):
        assert f"\n{shown}\n" in doc, f"docs/npu.md does not show the console line {shown!r}"


def test_nothing_says_fallbacks_come_with_call_counts():
    """The report's note (npu.NOTE): operators once each, not call counts. A comment said "with counts"."""
    assert "not call counts" in npu.NOTE
    files = [*ROOT.glob("*.py"), *(ROOT / "mobilevit_npu").glob("*.py"), *(ROOT / "docs").glob("*.md"), README]
    said = [str(f.relative_to(ROOT)) for f in files if re.search(r"fallback.{0,80}with counts", f.read_text(), re.S)]
    assert not said, f"fallbacks described as counted in {said}"


@pytest.mark.parametrize(
    "report, doc", [("accuracy_report.json", "accuracy.md"), ("perf_report.json", "performance.md")]
)
def test_the_docs_show_the_command_that_made_the_committed_report(report, doc):
    """The command shown as the one that made a committed report is its argv: where the prose names the committed
    report, the next fenced block of commands starts with that command (docs/accuracy.md showed another one there)."""
    data = json.loads((ROOT / report).read_text(encoding="utf-8"))
    command = f"python {data['tool']} {shlex.join(data['argv'])}"
    raw = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    assert command in " ".join(raw.split()), f"docs/{doc} does not show {command!r}, the argv of the committed {report}"
    for match in re.finditer(rf"committed `{re.escape(report)}`", raw):
        block = re.search(r"```bash\n(.*?)```", raw[match.end() : match.end() + 600], re.S)
        if block:
            first = block.group(1).strip().splitlines()[0].split("  #")[0].strip()
            assert first == command, f"docs/{doc}: after naming the committed {report}, it shows {first!r}"


def test_model_readme_names_every_script_that_takes_synthetic():
    taking = set()
    for script in SCRIPTS:
        parser = __import__(script).build_parser()
        if "--synthetic" in parser._option_string_actions:
            taking.add(f"{script}.py")
    text = " ".join((ROOT / "model" / "README.md").read_text(encoding="utf-8").split())
    sentence = next(s for s in re.split(r"(?<=[.?])\s", text) if "`--synthetic`" in s)
    named = set(re.findall(r"`(\w+\.py)`", sentence))
    assert named == taking, (
        f"model/README.md names {sorted(named)} as taking --synthetic; the parsers: {sorted(taking)}"
    )


def run_section(path: Path, heading: str) -> str:
    text = path.read_text(encoding="utf-8")
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_says_which_benchmark_makes_the_card():
    """The Run section shows inference.py --benchmark and accuracy_run_perf.py: it says which one the card is made
    from, and the card command reads what that command wrote."""
    run = run_section(README, "Run")
    prose = " ".join(re.sub(r"```.*?```", "", run, flags=re.S).split())
    sentence = next((s for s in re.split(r"(?<=[.;])\s", prose) if "card" in s and "accuracy_run_perf.py" in s), "")
    assert "perf_report.json" in sentence, (
        f"readme.md's Run section does not say which benchmark the card uses: {prose}"
    )
    assert "inference.py --benchmark" in prose
    commands = re.findall(r"^python (\S+) (.*?)(?:\s+#.*)?$", run.split("```bash", 1)[1].split("```", 1)[0], re.M)
    perf = next(args for script, args in commands if script == "accuracy_run_perf.py")
    card = next(args for script, args in commands if script == "port_report.py")
    assert shlex.split(perf)[2] in shlex.split(card), "the card command does not read accuracy_run_perf.py's report"


def test_inference_exits_2_when_no_image_can_be_read_and_the_tables_say_so(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    code = inference.main(["--model_path", str(tiny_model_dir), "--device", "cpu", "--image", str(bad)])
    assert code == 2
    assert "error: no images found or none could be read" in capsys.readouterr().err
    for path, words in ((README, "no image could be read"), (README_ZH, "没有一张图片能读取")):
        row = next(
            line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("| `inference.py`")
        )
        assert words in row.split("|")[4], f"{path.name}: inference.py's exit 2 leaves out unreadable images: {row}"
    assert "no image could be read" in inference.__doc__


# --- the console ---------------------------------------------------------------------------------------------------


def test_accuracy_console_marks_what_it_cuts_and_says_why_rel_err_is_not_judged():
    import torch

    from mobilevit_npu import metrics

    torch.manual_seed(0)
    ref = torch.randn(2, 6, dtype=torch.float64) * 3
    tgt = ref + 1e-3 * torch.randn(2, 6, dtype=torch.float64)
    long_name = "an_image_file_whose_name_runs_well_past_forty_characters.jpg"
    comparison = metrics.compare_logits(ref, tgt, "fp32", names=[long_name, "b.jpg"])
    labels = {i: f"a class name longer than fifteen characters, number {i}" for i in range(6)}
    text = accuracy_run.format_console(comparison, None, "cpu float32 eager  vs  cpu float32 channels_last", labels)
    rows = [line for line in text.splitlines() if line.startswith(("an_image", "b.jpg"))]
    assert len(rows) == 2
    assert rows[0].startswith(long_name[:37] + "...")
    for row in rows:
        assert row.count("...") >= 2, f"a label cut without an ellipsis: {row}"
    rel = next(i for i, line in enumerate(text.splitlines()) if "mean rel err" in line)
    assert thresholds.RELATIVE_ERROR_NOT_JUDGED in text.splitlines()[rel + 1]


def test_an_offline_hub_says_so_and_names_synthetic(monkeypatch, tmp_path, capsys, caplog):
    import shutil

    shutil.copytree(ROOT / "model", tmp_path / "model")  # the configs, no weights: the scripts would fetch them
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there, whatever the hub's mode
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    photo = ROOT / "mobilevit_npu" / "data" / "images" / "chelsea.png"
    with caplog.at_level("INFO"):
        code = inference.main(["--image", str(photo), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "HF_HUB_OFFLINE=1" in err and "--synthetic" in err, err
    assert "unreachable" not in err and "fetching" not in caplog.text, (err, caplog.text)


# --- seams (issue #29) ----------------------------------------------------------------------------------------------


def test_no_long_function_in_the_scripts_or_the_preflight():
    for path in (
        "accuracy_run.py",
        "export_onnx.py",
        "inference.py",
        "accuracy_run_perf.py",
        "common.py",
        "mobilevit_npu/preflight.py",
        "mobilevit_npu/labelsets.py",
        "mobilevit_npu/flags.py",
    ):
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                size, limit = node.end_lineno - node.lineno + 1, 400 if isinstance(node, ast.ClassDef) else 120
                assert size <= limit, f"{path}:{node.lineno} {node.name} is {size} lines"


def test_one_idea_one_name_across_production_modules():
    """The names the before-stop hook listed twice: one definition kept and called, or names that say what each does
    (preflight.stack_rows, probe.check_dumpable, labelsets.run_shards, probe.dump_and_compare, baseline.load_baseline,
    baseline.format_change, preflight.format_rows, probe.summarize_compare, profiling.profile_from_ops)."""
    names = ("_number", "_positive_int", "format_table", "check", "run", "load", "summarize")
    defined: dict[str, list[str]] = {name: [] for name in names}
    for path in [*ROOT.glob("*.py"), *(ROOT / "mobilevit_npu").glob("*.py")]:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in defined:
                defined[node.name].append(str(path.relative_to(ROOT)))
    twice = {name: where for name, where in defined.items() if len(where) > 1}
    assert not twice, f"defined at the top of several production modules: {twice}"


def test_the_memory_bounds_have_their_own_module_and_no_torch():
    code = (
        "import sys; from mobilevit_npu import bounds, flags, thresholds; import common; "
        "print('torch' in sys.modules, bounds.bounded_batch.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "mobilevit_npu.bounds"], done.stderr[-2000:]
    from mobilevit_npu import bounds, labelsets

    assert labelsets.bounded_batch is bounds.bounded_batch  # the old import keeps working
