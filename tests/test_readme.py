"""readme.md, readme.zh.md and docs/: CI runs exactly the readme's commands, the commands shown run (or at least parse),
docs/architecture.md's module map names every module, the Chinese readme covers the same sections, and the tables
generated from the code (thresholds, the committed perf_report.json) equal what the code gives.

Markers in the Markdown (an HTML comment on the line right before a fenced block):
  <!-- ci: NAME -->   readme.md only: the block .ci/run runs (setup, lint, only, test, compat)
  <!-- runnable -->   run as written by test_runnable_block, in a sandbox (a temp copy of the working tree)
  <!-- module map --> before the module table (docs/architecture.md)
Generated sections sit between `<!-- generated: NAME -->` and `<!-- end generated -->`; after a change to their
source, `python tests/test_readme.py --write` rewrites them.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "readme.md"
README_ZH = ROOT / "readme.zh.md"
DOCS = ROOT / "docs"
CI_STEPS = ("setup", "lint", "only", "test")
CI_COMPAT_STEPS = ("compat", "test")

FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    marker: str | None  # the HTML comment on the line right before the fence
    text: list[str]

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def markdown_files() -> list[Path]:
    return [README, README_ZH, *sorted(DOCS.glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the marker comment right before it (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{path.name}:{i + 1}: a fenced block is never closed"
        before = MARKER.match(lines[i - 1].strip()) if i else None
        found.append(Block(path, i + 1, opening.group(1), before.group(1) if before else None, lines[i + 1 : end]))
        i = end + 1
    return found


def commands(block: Block) -> list[str]:
    """The shell commands of a block: continuation lines joined, blank and comment-only lines dropped."""
    out, pending = [], ""
    for raw in block.text:
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            out.append(pending.strip())
        pending = ""
    return out


def without_comment(command: str) -> str:
    """The command with a trailing `# comment` removed (quotes respected), whitespace normalised."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return shlex.join(list(lexer))


def ci_blocks() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for block in blocks(README):
        if block.marker and block.marker.startswith("ci:"):
            name = block.marker[3:].strip()
            assert name not in found, f"readme.md: two '<!-- ci: {name} -->' blocks"
            found[name] = commands(block)
    return found


def script_commands(path: Path) -> list[tuple[Block, str, list[str]]]:
    """(block, script, arguments) for every line of a shell block that runs a root script or `-m benchmarks.X`."""
    out = []
    for block in blocks(path):
        if block.lang not in ("bash", "sh", "shell", "console"):
            continue
        for command in commands(block):
            words = shlex.split(command, comments=True)
            for k, word in enumerate(words):
                if re.fullmatch(r"[\w.-]+\.py", word) and (ROOT / word).is_file():
                    out.append((block, word[:-3], words[k + 1 :]))
                    break
                if word == "-m" and words[k + 1 : k + 2] and words[k + 1].startswith("benchmarks."):
                    out.append((block, words[k + 1], words[k + 2 :]))
                    break
    return out


def root_scripts() -> list[str]:
    """The scripts a user runs: root *.py files with a main(), common.py (their kit) aside."""
    found = []
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if path.stem != "common" and any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            found.append(path.stem)
    return found


def section(path: Path, marker: str) -> list[str]:
    """The lines of the Markdown table that follows `<!-- marker -->`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == f"<!-- {marker} -->"]
    assert len(starts) == 1, f"{path.name}: needs exactly one '<!-- {marker} -->' line, has {len(starts)}"
    table = []
    for line in lines[starts[0] + 1 :]:
        if not line.startswith("|"):
            if table:
                break
            continue
        table.append(line)
    return table


def first_cells(table: list[str]) -> list[str]:
    return [row.split("|")[1].strip() for row in table[2:]]


# --- CI runs exactly the readme's commands ---------------------------------------------------------------------------


def test_readme_setup_is_two_commands_and_test_is_one():
    ci = ci_blocks()
    assert set(ci) == {"setup", "lint", "only", "test", "compat"}, sorted(ci)
    assert len(ci["setup"]) == 2 and ci["setup"][1] == 'pip install -e ".[dev]"', ci["setup"]
    assert ci["setup"][0].startswith("pip install torch=="), ci["setup"]
    assert ci["test"] == ["python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder"]
    # elsewhere than CI's machine, a plain `pip install torch==X` on Linux pulls the CUDA build: the readme says so
    install = README.read_text(encoding="utf-8").split("## Install")[1].split("\n## ")[0]
    assert re.search(r"--index-url\s+https://download\.pytorch\.org/whl/cpu", install)
    assert "ruff check ." in ci["lint"] and "ruff format --check ." in ci["lint"]


@pytest.mark.parametrize("compat", ["1", "0"])
def test_ci_extracts_the_readme_commands(compat):
    """.ci/run's own reading of readme.md (`--print`) is this test's reading, step by step, in order."""
    env = {**os.environ, "CI_COMPAT": compat}
    proc = subprocess.run(["bash", ".ci/run", "--print"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    printed = [tuple(line.split("\t", 1)) for line in proc.stdout.splitlines()]
    ci = ci_blocks()
    steps = CI_STEPS + (CI_COMPAT_STEPS if compat == "1" else ())
    assert printed == [(step, command) for step in steps for command in ci[step]]


def test_ci_fails_on_a_missing_readme_block(tmp_path):
    """A readme without the test block makes .ci/run fail before it installs anything, not run less."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "readme.md").write_text(README.read_text(encoding="utf-8").replace("<!-- ci: test -->", ""))
    proc = subprocess.run(["bash", ".ci/run", "--print"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "'<!-- ci: test -->'" in proc.stderr


FAKE_README = """# fake

<!-- ci: setup -->
```bash
echo "setup $VIRTUAL_ENV" >> ci.log
```

<!-- ci: lint -->
```bash
echo lint >> ci.log
```

<!-- ci: only -->
```bash
export FAKE_ONLY=1
```

<!-- ci: test -->
```bash
echo "test $FAKE_ONLY" >> ci.log
{test_exit}
```

<!-- ci: compat -->
```bash
echo compat >> ci.log
```
"""


def run_ci_on(tmp_path: Path, test_exit: str) -> subprocess.CompletedProcess:
    """.ci/run itself on a readme whose blocks only log that they ran (a real venv is made; nothing is installed)."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "readme.md").write_text(FAKE_README.format(test_exit=test_exit))
    newcomer = tmp_path / ".venv"  # the venv the readme's Install makes: CI must neither use nor change it
    newcomer.mkdir()
    (newcomer / "pyvenv.cfg").write_text("home = /nowhere\n")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CI_COMPAT")}
    proc = subprocess.run(["bash", ".ci/run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert sorted(p.name for p in newcomer.iterdir()) == ["pyvenv.cfg"], "CI touched the working copy's .venv"
    assert (newcomer / "pyvenv.cfg").read_text() == "home = /nowhere\n"
    return proc


def ci_log(tmp_path: Path) -> list[str]:
    """ci.log's lines, the venv's path checked (outside the working copy, removed after CI) and shortened to "venv"."""
    lines = (tmp_path / "ci.log").read_text().splitlines()
    for line in lines:
        if line.startswith("setup "):
            venv = Path(line.split(" ", 1)[1])
            assert tmp_path not in venv.parents, f"CI's venv {venv} is inside the working copy"
            assert not venv.exists(), f"CI left its venv {venv} behind"
    return ["setup venv" if line.startswith("setup ") else line for line in lines]


@pytest.mark.slow
def test_ci_runs_each_block_once_in_order_in_a_fresh_venv(tmp_path):
    proc = run_ci_on(tmp_path, "true")
    assert proc.returncode == 0, proc.stderr
    assert ci_log(tmp_path) == ["setup venv", "lint", "test 1", "compat", "test 1"]
    assert len(re.findall(r"^suite on transformers .*: \d+ s$", proc.stdout, flags=re.M)) == 2, proc.stdout


@pytest.mark.slow
def test_ci_fails_when_the_test_command_fails(tmp_path):
    """pytest's exit 5 (no test collected) stops CI like any failure: nothing after it runs."""
    proc = run_ci_on(tmp_path, "(exit 5)")
    assert proc.returncode == 5
    assert ci_log(tmp_path) == ["setup venv", "lint", "test 1"]


def shell_lines(text: str) -> list[str]:
    return [line.split("#", 1)[0] for line in text.splitlines() if not line.lstrip().startswith("#")]


def test_ci_installs_nothing_the_readme_lacks():
    readme_commands = {c for block in blocks(README) for c in commands(block)}
    ci_text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for line in shell_lines(ci_text):
        if re.search(r"\b(pip|uv|conda)\b.*\binstall\b", line):
            assert line.strip() in readme_commands, f".ci/run installs what readme.md does not: {line.strip()}"
        # the suite and the linters come from the readme's blocks, never from a line of .ci/run's own
        assert not re.search(r"\bpytest\b|\bruff\b", line), f".ci/run runs its own: {line.strip()}"
        assert "|| true" not in line and "set +e" not in line, f".ci/run ignores a failure: {line.strip()}"


# --- the dependencies: declared once, and they cover what the code and the suite import ----------------------------


def declared(extra_names: tuple[str, ...]) -> set[str]:
    """Canonical distribution names in pyproject's dependencies plus the given extras (self-references expanded)."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    own = canonicalize_name(project["name"])
    names, todo, seen = set(), [*project["dependencies"]], set()
    todo += [r for e in extra_names for r in project["optional-dependencies"][e]]
    while todo:
        req = Requirement(todo.pop())
        name = canonicalize_name(req.name)
        if name == own:
            for extra in set(req.extras) - seen:
                seen.add(extra)
                todo += project["optional-dependencies"][extra]
        else:
            names.add(name)
    return names


def third_party_imports(paths: list[Path]) -> dict[str, str]:
    """Top-level module -> the first file importing it, for modules that are installed here and not the project's."""
    local = {p.stem for p in ROOT.glob("*.py")} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    local |= {"mobilevit_npu", "benchmarks", "tests"}
    found: dict[str, str] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in local and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def distribution_of(module: str) -> set[str] | None:
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    dists = packages_distributions().get(module)
    return {canonicalize_name(d) for d in dists} if dists else None


@pytest.mark.parametrize(
    "where, extras",
    [("package and scripts", ("bench", "msprobe")), ("tests and benchmarks", ("dev",))],
)
def test_declared_dependencies_cover_the_imports(where, extras):
    """Every installed third-party module imported is declared directly: the runtime's in dependencies or an extra,
    the suite's in `dev` (the bug this caught: onnx imported by the tests, installed only by a separate file)."""
    if where == "package and scripts":
        paths = [*ROOT.glob("*.py"), *(ROOT / "mobilevit_npu").rglob("*.py")]
    else:
        paths = [*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    names = declared(extras)
    missing = []
    for module, first in sorted(third_party_imports(paths).items()):
        dists = distribution_of(module)
        if dists is not None and not dists & names:  # not installed here (torch_npu, ais_bench): nothing to say
            missing.append(f"{module} ({'/'.join(sorted(dists))}, imported by {first})")
    assert not missing, f"imported but not declared in pyproject.toml for {where}: {', '.join(missing)}"


# --- the readme: every script, its command, its exit codes, the module map ------------------------------------------


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150


def test_every_script_has_a_command_and_an_exit_code_row():
    shown = {script for _, script, _ in script_commands(README)}
    rows = set(first_cells(section(README, "exit codes")))
    for script in root_scripts():
        assert script in shown, f"readme.md shows no command for {script}.py"
        assert f"`{script}.py`" in rows, f"readme.md's exit-code table has no row for {script}.py"
    assert rows <= {f"`{s}.py`" for s in root_scripts()}, "an exit-code row names a script that does not exist"


def test_module_map_names_every_module():
    import mobilevit_npu

    path = ROOT / "docs" / "architecture.md"

    modules = {m.name for m in pkgutil.iter_modules(mobilevit_npu.__path__)}
    listed = first_cells(section(path, "module map"))
    assert len(listed) == len(set(listed)), f"{path.name}: a module listed twice"
    names = {cell.strip("`") for cell in listed}
    assert not modules - names, f"{path.name}: modules without a line in the module map: {sorted(modules - names)}"
    assert not names - modules, (
        f"{path.name}: the module map names modules that do not exist: {sorted(names - modules)}"
    )


# --- the Chinese readme is a full translation ----------------------------------------------------------------------


def headings(path: Path) -> list[int]:
    levels, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(#+) ", line)):
            levels.append(len(m.group(1)))
    return levels


def links(path: Path) -> list[str]:
    return sorted(set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))))


def test_chinese_readme_has_the_same_sections_and_commands():
    assert headings(README_ZH) == headings(README), "readme.zh.md's headings differ from readme.md's in number or level"
    en = [[without_comment(c) for c in commands(b)] for b in blocks(README)]
    zh = [[without_comment(c) for c in commands(b)] for b in blocks(README_ZH)]
    assert zh == en, "readme.zh.md's fenced commands differ from readme.md's"
    assert len(section(README_ZH, "exit codes")) == len(section(README, "exit codes"))
    assert set(links(README_ZH)) - {"readme.zh.md", "readme.md"} == set(links(README)) - {"readme.zh.md", "readme.md"}


def prose(path: Path) -> str:
    """The text outside fenced blocks and `code` spans."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return re.sub(r"`[^`]*`", "", text)


def test_chinese_prose_uses_full_width_punctuation():
    cjk = "\u4e00-\u9fff"
    half = re.findall(rf"[{cjk}][,;:?!()]|[,;:?!(][{cjk}]", prose(README_ZH))
    assert not half, f"half-width punctuation in Chinese prose: {half[:10]}"


# --- every command shown parses, the runnable ones run -------------------------------------------------------------


def all_script_commands():
    return [
        pytest.param(s, a, id=f"{b.id}:{s}") for p in markdown_files() if p.exists() for b, s, a in script_commands(p)
    ]


@pytest.mark.parametrize("script, args", all_script_commands())
def test_shown_command_parses(script, args):
    """Every `python SCRIPT.py ...` (or `python -m benchmarks.X ...`) line in the readmes and docs is accepted by that
    script's own parser."""
    parser = importlib.import_module(script).build_parser()
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{script}.py rejects {shlex.join(args)} (exit {exc.code})")


def runnable_blocks():
    found = []
    for path in markdown_files():
        if path.exists():
            found += [pytest.param(b, id=b.id, marks=pytest.mark.slow) for b in blocks(path) if b.marker == "runnable"]
    return found


def test_there_are_runnable_blocks():
    ids = [p.id for p in runnable_blocks()]
    assert any(i.startswith("readme.md:") for i in ids), "readme.md has no <!-- runnable --> block"
    for param in runnable_blocks():
        block = param.values[0]
        assert block.lang == "bash", f"{block.id}: a runnable block must be ```bash"
        assert block.path != README_ZH, "readme.zh.md repeats readme.md's commands; mark them runnable only there"


SANDBOX_SKIP = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"
)


def sandbox(tmp_path: Path) -> Path:
    """A copy of the working tree (sources, package data, model/, the committed reports): the commands write into the
    copy, never over the committed reports, card or its assets."""
    box = tmp_path / "repo"
    shutil.copytree(ROOT, box, ignore=SANDBOX_SKIP, symlinks=True)
    return box


def digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


@pytest.mark.parametrize("block", runnable_blocks())
def test_runnable_block(block, tmp_path):
    """The block runs as written (bash -e, one command after another, `python` the interpreter running the tests) in a
    sandbox; it exits 0 and changes nothing in the repository."""
    box = sandbox(tmp_path)
    # what a command could overwrite: the committed reports, card and readmes, and model/ (sources are not outputs,
    # and in a shared working tree others may be editing them meanwhile)
    watched = [p for p in ROOT.iterdir() if p.suffix in (".json", ".md", ".png")] + sorted((ROOT / "model").iterdir())
    before = digest(watched)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    script = "set -euo pipefail\n" + "\n".join(commands(block))
    proc = subprocess.run(["bash", "-c", script], cwd=box, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert digest(watched) == before, f"{block.id} changed committed files"


# --- sections generated from the code and the committed reports ----------------------------------------------------


def threshold_table() -> str:
    from mobilevit_npu import metrics

    dtypes = list(metrics.DEFAULT_THRESHOLDS)
    rows = ["| threshold | " + " | ".join(dtypes) + " | why |", "|---|" + "---|" * len(dtypes) + "---|"]
    for name, reason in metrics.THRESHOLD_REASONS.items():
        values = [f"{getattr(metrics.DEFAULT_THRESHOLDS[d], name):g}" for d in dtypes]
        rows.append(f"| `--{name}` | " + " | ".join(values) + f" | {reason} |")
    return "\n".join(rows)


def perf_table() -> str:
    import json

    report = json.loads((ROOT / "perf_report.json").read_text(encoding="utf-8"))
    env = report["environment"]
    results = [r for r in report["results"] if r.get("status") == "ok"]
    sizes = sorted({r["batch_size"] for r in results})
    eager = {r["batch_size"]: r for r in results if r["mode"] == "eager"}
    head = (
        "| mode | "
        + " | ".join(f"batch {b} p50 | vs eager | images/s | % ceiling" for b in sizes)
        + " | exact (cosine) |"
    )
    rows = [head, "|---|" + "---|---|---|---|" * len(sizes) + "---|"]
    for mode in dict.fromkeys(r["mode"] for r in results):
        cells = []
        for b in sizes:
            r = next((x for x in results if x["mode"] == mode and x["batch_size"] == b), None)
            if r is None:
                cells += ["-", "-", "-", "-"]
                continue
            p50 = r["latency_ms"]["p50"]
            ratio = p50 / eager[b]["latency_ms"]["p50"] if b in eager else None
            fraction = (r.get("roofline") or {}).get("fraction_of_ceiling")
            cells += [f"{p50:.1f} ms", f"{ratio:.2f}x" if ratio else "-", f"{r['throughput_images_per_s']:.1f}"]
            cells.append(f"{fraction:.0%}" if fraction is not None else "-")
        cos = min(x["agreement"]["cosine"] for x in results if x["mode"] == mode)
        exact = all(x.get("exact") for x in results if x["mode"] == mode)
        rows.append(f"| {mode} | " + " | ".join(cells) + f" | {'yes' if exact else 'no'} ({cos:.5f}) |")
    settings, allocator = report.get("settings") or {}, env.get("allocator") or {}
    ceilings: dict[str, list[str]] = {}  # the matmul ceiling measured at the start of the run -> its modes
    for r in results:
        ceiling = (r.get("roofline") or {}).get("ceiling_gflop_per_s")
        if ceiling and r["mode"] not in ceilings.setdefault(f"{ceiling:.0f}", []):
            ceilings[f"{ceiling:.0f}"].append(r["mode"])
    load = env.get("load_average") or []
    machine = [
        f"Command: `python accuracy_run_perf.py {shlex.join(report['argv'])}`.",
        f"Machine: {env.get('cpu')}, {env.get('cpu_count')} cores; torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}; {allocator.get('name')}{' (tuned)' if allocator.get('tuned') else ''}"
        + (f"; load average {load[0]:.1f} at the start." if load else "."),
        f"{settings.get('iterations')} timed calls after {settings.get('warmup')} warm-up per mode and batch size, "
        f"{'interleaved' if settings.get('interleaved') else 'one mode after another'}"
        + (f"; images/s = {settings['throughput'].split(':')[0]}." if settings.get("throughput") else "."),
        "`% ceiling`: the model's FLOPs at p50 against the dense matmul throughput measured at the start, in GFLOP/s: "
        + "; ".join(f"{value} ({', '.join(modes)})" for value, modes in ceilings.items())
        + ".",
    ]
    return "\n".join(machine) + "\n\n" + "\n".join(rows)


GENERATED = {
    "thresholds": (DOCS / "accuracy.md", threshold_table),
    "perf_report": (DOCS / "performance.md", perf_table),
}
GENERATED_BLOCK = r"(<!-- generated: {name}\b.*?-->\n)(.*?)(<!-- end generated -->)"


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_section_matches_its_source(name):
    path, render = GENERATED[name]
    found = re.search(GENERATED_BLOCK.format(name=name), path.read_text(encoding="utf-8"), flags=re.S)
    assert found, f"{path.name} has no '<!-- generated: {name} ... -->' section"
    assert found.group(2) == render() + "\n", (
        f"{path.name}'s {name} section is stale: python tests/test_readme.py --write"
    )


def write_generated() -> None:
    for name, (path, render) in GENERATED.items():
        text = path.read_text(encoding="utf-8")
        pattern = GENERATED_BLOCK.format(name=name)
        assert re.search(pattern, text, flags=re.S), f"{path.name} has no '<!-- generated: {name} ... -->' section"
        body = render() + "\n"
        path.write_text(re.sub(pattern, lambda m, body=body: m.group(1) + body + m.group(3), text, flags=re.S))
        print(f"wrote {path.relative_to(ROOT)} ({name})")


# --- links ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} does not exist")
    broken = [t for t in links(path) if "://" not in t and not (path.parent / t).exists()]
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_docs_index_lists_every_page():
    listed = set(links(DOCS / "index.md"))
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert not pages - listed, f"docs/index.md does not list {sorted(pages - listed)}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_readme.py --write   (rewrites the generated sections of docs/)")
    sys.path[:0] = [str(ROOT)]
    write_generated()
