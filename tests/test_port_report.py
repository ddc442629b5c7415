"""port_report.py: the model card from measured reports.

Fixtures in tests/data/reports/: cpu_*.json are trimmed from real synthetic-weight runs on this CPU; npu_*.json are
hand-written (invented values, marked `_fixture`) so the NPU paths of the card are covered. The golden cards
(golden_card.{zh,en}.md) are the npu set's cards; after a deliberate change to the card, rewrite them with
`UPDATE_GOLDEN=1 python -m pytest tests/test_port_report.py -k golden` and review the diff.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import port_report
from mobilevit_npu import PROJECT_DIR, card

DATA = Path(__file__).parent / "data" / "reports"
NPU_SET = ["reports/npu_accuracy.json", "reports/npu_perf.json", "reports/npu_labelled.json"]
CPU_SET = ["reports/cpu_accuracy.json", "reports/cpu_perf.json", "reports/cpu_labelled.json"]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working folder with the fixture reports under reports/ and the model's two config files under model/."""
    shutil.copytree(DATA, tmp_path / "reports", ignore=shutil.ignore_patterns("*.md"))
    (tmp_path / "model").mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(PROJECT_DIR / "model" / name, tmp_path / "model" / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_card(paths, lang="both", out="card.md", extra=()) -> str:
    assert port_report.main([*paths, "--lang", lang, "--output", out, *extra]) == 0
    return Path(out).read_text(encoding="utf-8")


def edit(path: str, change) -> None:
    data = json.loads(Path(path).read_text())
    change(data)
    Path(path).write_text(json.dumps(data))


def body(text: str) -> str:
    """The card without its front matter."""
    assert text.startswith("---\n")
    return text.split("\n---\n", 1)[1]


def front(text: str) -> dict:
    return yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))


# ------------------------------------------------------------------------------------------------------ golden


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_golden_card(work, lang):
    text = write_card(NPU_SET, lang)
    golden = DATA / f"golden_card.{lang}.md"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8"), f"the card differs from {golden} (see the module docstring)"


def test_both_is_the_front_matter_once_then_zh_then_en(work):
    both = write_card(NPU_SET, "both", "both.md")
    zh, en = write_card(NPU_SET, "zh", "zh.md"), write_card(NPU_SET, "en", "en.md")
    assert both.count("model-index:") == 1
    assert both == zh + "\n---\n\n" + body(en).lstrip("\n")
    assert both.index("## 运行环境") < both.index("## Environment")


def test_front_matter_is_what_a_hub_reads(work):
    from huggingface_hub import ModelCard

    text = write_card(NPU_SET, "en")
    meta = front(text)
    assert meta["license"] == "other" and meta["base_model"] == "apple/mobilevit-x-small"
    assert meta["pipeline_tag"] == "image-classification"
    assert {"NPU", "Ascend"} <= set(meta["tags"]) and "synthetic-weights" not in meta["tags"]
    results = ModelCard(text).data.eval_results  # the hub's own parser of model-index
    acc = json.loads(Path("reports/npu_accuracy.json").read_text())
    cosine = [r for r in results if r.metric_type == "cosine_min" and "npu_accuracy" in r.dataset_type]
    assert [r.metric_value for r in cosine] == [round(acc["aggregate"]["cosine_min"], 6)]
    perf = json.loads(Path("reports/npu_perf.json").read_text())
    p50 = {r.metric_name: r.metric_value for r in results if r.metric_type == "latency_p50_ms"}
    ok = [r for r in perf["results"] if r["status"] == "ok"]
    assert len(p50) == len(ok)
    for r in ok:
        assert p50[f"p50 latency (ms), {r['mode']}, batch {r['batch_size']}"] == round(r["latency_ms"]["p50"], 2)


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "report, keys, shown",
    [
        ("npu_perf.json", ["settings", "synchronized"], "settings.synchronized"),
        ("npu_accuracy.json", ["aggregate", "cosine_min"], "aggregate.cosine_min"),
        ("npu_perf.json", ["results", 0, "latency_ms", "p99"], "results[0].latency_ms.p99"),
        ("npu_labelled.json", ["dataset", "reference", "top5"], "dataset.reference.top5"),
        ("npu_accuracy.json", ["environment", "torch_npu"], "environment.torch_npu"),
        ("npu_accuracy.json", ["model_source", "sha256"], "model_source.sha256"),
        ("npu_perf.json", ["argv"], "argv"),
    ],
)
def test_missing_field_refuses_naming_report_and_field(work, capsys, report, keys, shown):
    def drop(data):
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]

    edit(f"reports/{report}", drop)
    assert port_report.main([*NPU_SET, "--output", "card.md"]) == 1
    err = capsys.readouterr().err
    assert f"reports/{report}" in err and shown in err
    assert not Path("card.md").exists()


def test_mismatched_sha256_refuses_naming_both(work, capsys):
    edit("reports/npu_perf.json", lambda d: d["model_source"].update(sha256="0" * 64))
    assert port_report.main([*NPU_SET, "--output", "card.md"]) == 1
    err = capsys.readouterr().err
    assert "reports/npu_accuracy.json" in err and "reports/npu_perf.json" in err and "0" * 64 in err
    assert not Path("card.md").exists()


def test_synthetic_and_real_weights_refuse_to_mix(work, capsys):
    assert port_report.main(["reports/npu_accuracy.json", "reports/cpu_perf.json", "--output", "card.md"]) == 1
    assert "different weights" in capsys.readouterr().err


def test_synthetic_seeds_refuse_to_mix(work, capsys):
    edit("reports/cpu_perf.json", lambda d: d["model_source"].update(seed=1))
    assert port_report.main([*CPU_SET, "--output", "card.md"]) == 1
    assert "seed 1" in capsys.readouterr().err


def test_needs_an_accuracy_and_a_perf_report(work, capsys):
    assert port_report.main(["reports/npu_accuracy.json", "--output", "card.md"]) == 1
    assert "accuracy_run_perf.py" in capsys.readouterr().err
    edit("reports/npu_perf.json", lambda d: d.update(tool="inference.py"))
    assert port_report.main(["reports/npu_accuracy.json", "reports/npu_perf.json", "--output", "card.md"]) == 1
    assert "inference.py" in capsys.readouterr().err


def test_weights_in_the_model_folder_must_be_the_measured_ones(work, capsys):
    (work / "model" / "model.safetensors").write_bytes(b"other weights")
    assert port_report.main([*NPU_SET, "--output", "card.md"]) == 1
    assert "model.safetensors" in capsys.readouterr().err


def test_unreadable_report_is_a_usage_error(work):
    Path("reports/broken.json").write_text("{")
    assert port_report.main(["reports/broken.json", "--output", "card.md"]) == 2
    assert port_report.main(["--output", "card.md"]) == 2


# ----------------------------------------------------------------------------------------------------- honesty

SYNTHETIC_EN, SYNTHETIC_ZH = "not a port result", "不是移植结果"


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_synthetic_report_is_marked_at_the_top_in_both_languages(work, lang):
    text = write_card(CPU_SET, lang)
    top = "\n".join(body(text).strip().splitlines()[:12])
    assert SYNTHETIC_EN in top and SYNTHETIC_ZH in top
    meta = front(text)
    assert "synthetic-weights" in meta["tags"] and "synthetic" in meta["model-index"][0]["name"]
    real = write_card(NPU_SET, lang, "real.md")
    assert SYNTHETIC_EN not in real and SYNTHETIC_ZH not in real


def test_cpu_target_is_not_called_npu_or_gpu(work):
    text = write_card(CPU_SET, "both")
    assert not re.search(r"\bNPU\b|\bGPU\b|Ascend|昇腾|CUDA", text), "a CPU card names an accelerator"
    meta = front(text)
    assert "CPU" in meta["tags"] and not {"NPU", "Ascend", "torch_npu"} & set(meta["tags"])
    assert "# MobileViT-X-Small on CPU" in text and "# MobileViT-X-Small 在 CPU 上" in text
    assert "Measured on CPU only" in text and "仅在 CPU 上测量" in text
    npu = write_card(NPU_SET, "both", "npu.md")
    assert "# MobileViT-X-Small on Ascend NPU" in npu and "Measured on CPU only" not in npu


def test_npu_card_shows_fallbacks_and_hf32(work):
    text = write_card(NPU_SET, "en")
    assert "`aten::_softmax_backward_data` x1" in text
    assert "CPU fallback: none, every operator ran on the NPU." in text
    assert "does not record it" in text  # npu_labelled.json has no cpu_fallbacks field
    assert "`conv_hf32=False, matmul_hf32=False`" in text


def test_commands_are_the_reports_argv(work):
    text = write_card(NPU_SET, "en")
    for path in NPU_SET:
        data = json.loads(Path(path).read_text())
        command = "python " + shlex.join([data["tool"], *data["argv"]])
        assert f"```bash\n{command}\n```" in text


# ------------------------------------------------------------------------------------------ numbers parsed back


def cells(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]  # fmt: skip


def sections(text: str) -> dict[str, str]:
    """Each report's section (### heading ending in the report's file name)."""
    out = {}
    for block in re.split(r"^### ", text, flags=re.MULTILINE)[1:]:
        match = re.search(r"[(（]([\w.]+\.json)[)）]$", block.splitlines()[0])
        out[match.group(1)] = block.split("\n## ")[0]
    return out


def parse_block(tpl: card.Template, block: str, text: str) -> dict[str, str]:
    """Read a filled template block back: its placeholders' values as they appear in `text`."""
    pattern, seen = "", set()
    for literal, name in re.findall(r"(.*?)(?:\$\{(\w+)\}|$)", tpl.blocks[block].strip("\n"), flags=re.DOTALL):
        pattern += re.escape(literal)
        if name:
            pattern += f"(?P={name})" if name in seen else f"(?P<{name}>.*?)"
            seen.add(name)
    match = re.search(pattern, text, flags=re.DOTALL)
    assert match, f"block {block} not found"
    return match.groupdict()


def decimals(cell: str) -> int:
    return len(cell.split(".")[1]) if "." in cell else 0


def assert_shown(cell: str, value: float, sig: bool = False) -> None:
    """The card's cell is the report's value, rounded as printed (fixed decimals, or 6 significant digits)."""
    cell = cell.strip("`").replace(",", "")
    if cell.endswith("%"):
        cell, value = cell[:-1], 100 * value
    shown = float(cell)
    if sig and value != 0:
        tolerance = 0.5 * 10 ** (math.floor(math.log10(abs(value))) - 5)
    else:
        tolerance = 0.5 * 10 ** -decimals(cell)
    assert abs(shown - value) <= tolerance * (1 + 1e-9) + 1e-12, f"card shows {cell}, report has {value}"


@pytest.mark.parametrize("lang", ["zh", "en"])
@pytest.mark.parametrize("which", ["npu", "cpu"])
def test_every_number_in_the_card_matches_its_report(work, lang, which):
    paths = NPU_SET if which == "npu" else CPU_SET
    text = write_card(paths, lang)
    tpl = card.load_template(lang)
    data = {Path(p).name: json.loads(Path(p).read_text()) for p in paths}
    found = sections(body(text))
    assert set(found) == set(data)
    checked = 0
    for name, report in data.items():
        rows = cells(found[name])
        if report["tool"] == "accuracy_run.py":
            head = parse_block(tpl, "accuracy", "### " + found[name])
            assert int(head["images"]) == report["aggregate"]["images"]
            skipped = report["dataset"]["skipped"] if report["dataset"] else len(report["errors"])
            assert int(head["skipped"]) == skipped
            assert head["input"] == report["input"]
            checked += 2
            by_field = {r[1].strip("`"): r for r in rows if len(r) == 3 and r[1].startswith("`")}
            for key, value in report["aggregate"].items():
                if key in by_field:
                    assert_shown(by_field[key][2], value)
                    checked += 1
            for key, value in report["thresholds"].items():
                assert_shown(by_field[key][2], value, sig=True)
            checks = {r[0].strip("`"): r for r in rows if len(r) == 4 and r[0].startswith("`")}
            for check in report["checks"] + report.get("reference_checks", []):
                if check["value"] is not None:
                    assert_shown(checks[check["name"]][2], check["value"], sig=True)
                    checked += 1
                assert checks[check["name"]][3] == tpl.words["yes" if check["passed"] else "no"]
            if report["dataset"]:
                ds = report["dataset"]
                told = parse_block(tpl, "labelled", found[name])
                assert int(told["images"]) == ds["images"] and int(told["skipped"]) == ds["skipped"]
                assert int(told["differ"]) == len(ds["disagreements"])
                assert_shown(told["agreement"], ds["agreement_top1"])
                for side, word in (("reference", "reference"), ("target", "target")):
                    row = next(r for r in rows if r[0].startswith(tpl.words[word] + " `"))
                    assert_shown(row[1], ds[side]["top1"])
                    assert_shown(row[2], ds[side]["top5"])
                    checked += 2
        else:
            perf_rows = {(r[0].strip("`"), int(r[1])): r for r in rows if len(r) == 14 and r[0].startswith("`")}
            ok = [r for r in report["results"] if r["status"] == "ok"]
            assert len(perf_rows) == len(ok)
            for res in ok:
                row = perf_rows[(res["mode"], res["batch_size"])]
                for cell, key in zip(row[2:8], ("p50", "p90", "p99", "mean", "min", "max")):
                    assert_shown(cell, res["latency_ms"][key])
                assert_shown(row[8], res["throughput_images_per_s"])
                if res["compile_s"] is None:
                    assert row[9] == tpl.words["not_compiled"]
                else:
                    assert_shown(row[9], res["compile_s"])
                assert_shown(row[10], res["agreement"]["cosine"])
                assert_shown(row[11], res["agreement"]["top1_agreement"])
                assert row[12] == tpl.words["yes" if res["exact"] else "no"]
                assert_shown(row[13], res["roofline"]["fraction_of_ceiling"])
                checked += 12
            told = parse_block(tpl, "performance", "### " + found[name])
            assert int(told["iterations"]) == report["settings"]["iterations"]
            assert int(told["warmup"]) == report["settings"]["warmup"]
            assert told["synchronized"] == report["settings"]["synchronized"]
    assert checked > 40
    assert_environment(text, tpl, data)
    assert_model(text, tpl)
    assert_no_stray_number(text, lang, data)


def assert_environment(text: str, tpl: card.Template, data: dict) -> None:
    rows = cells(body(text).split("\n## ")[1])
    header, rows = rows[0], {r[0]: r[1:] for r in rows[1:]}
    assert header[1:] == [f"`{name}`" for name in data]
    for key, label in card.CardWriter.ENV_ROWS:
        values = [report["environment"].get(key) for report in data.values()]
        if all(v is None for v in values):
            assert tpl.words[label] not in rows
            continue
        for cell, value in zip(rows[tpl.words[label]], values):
            assert cell == (f"`{value}`" if value is not None else tpl.words[f"env_null_{key}"])


def assert_model(text: str, tpl: card.Template) -> None:
    import torch
    from transformers import MobileViTConfig, MobileViTForImageClassification

    config = json.loads(Path("model/config.json").read_text())
    section = body(text).split(tpl.words["model_architecture"])[0].rsplit("\n## ", 1)[1]
    rows = {r[0]: r[1] for r in cells(body(text).split(section)[1].split("\n## ")[0])}
    torch.manual_seed(0)
    model = MobileViTForImageClassification(MobileViTConfig.from_dict(config))  # a real build, not the meta one
    assert int(rows[tpl.words["model_parameters"]].replace(",", "")) == sum(p.numel() for p in model.parameters())
    assert rows[tpl.words["model_hidden_sizes"]] == f"`{config['hidden_sizes']}`"
    assert rows[tpl.words["model_labels"]] == str(len(config["id2label"]))
    pre = json.loads(Path("model/preprocessor_config.json").read_text())
    assert rows[tpl.words["model_input"]].startswith(f"{pre['crop_size']} x {pre['crop_size']}")
    assert str(pre["size"]) in rows[tpl.words["model_input"]]


NUMBER_RE = re.compile(r"(?<![\w.\-/:+])\d[\d,]*(?:\.\d+)?%?(?![\w.]*[A-Za-z_\d])")


def numbers(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    return [m.group(0).rstrip(",") for m in NUMBER_RE.finditer(text)]


def leaves(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in leaves(v)] + [len(obj)]
    if isinstance(obj, list):
        return [x for v in obj for x in leaves(v)] + [len(obj)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [float(obj), float(obj) / 1e9]  # GFLOP
    return []


def assert_no_stray_number(text: str, lang: str, data: dict) -> None:
    """Every number in the card is in its template's own text, or a report / config value rounded as shown."""
    template_text = (PROJECT_DIR / "templates" / f"model_card.{lang}.md").read_text(encoding="utf-8")
    allowed_literal = set(numbers(template_text)) | set(re.findall(r"\d+(?:\.\d+)?", template_text))
    config = json.loads(Path("model/config.json").read_text())
    pre = json.loads(Path("model/preprocessor_config.json").read_text())
    pool = leaves(data) + leaves(pre) + leaves({k: v for k, v in config.items() if k != "id2label"})
    pool.append(float(len(config["id2label"])))
    params = re.search(r"\b(\d{1,3}(?:,\d{3})+)\b", text)
    pool.append(float(params.group(1).replace(",", "")))
    for token in numbers(text):
        if token.rstrip("%") in allowed_literal:
            continue
        ok = False
        for value in pool:
            try:
                assert_shown(token, value)
                ok = True
                break
            except AssertionError:
                continue
        assert ok, f"{token} in the card is neither in the template nor any report value"


# ----------------------------------------------------------------------------------------------------- the CLI


def test_script_runs_and_documents_both():
    out = subprocess.run([sys.executable, "port_report.py", "--help"], cwd=PROJECT_DIR, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "both = one file" in " ".join(out.split())
    assert "--model_path" in out


def test_committed_example_card_is_current(tmp_path):
    """MODEL_CARD.md is what port_report.py makes from the committed reports (regenerate it after a measurement)."""
    out = tmp_path / "card.md"
    args = ["accuracy_report.json", "perf_report.json", "--lang", "both", "--output", str(out)]
    cwd = os.getcwd()
    os.chdir(PROJECT_DIR)
    try:
        assert port_report.main(args) == 0
    finally:
        os.chdir(cwd)
    assert out.read_text(encoding="utf-8") == (PROJECT_DIR / "MODEL_CARD.md").read_text(encoding="utf-8"), (
        "MODEL_CARD.md is stale: python port_report.py accuracy_report.json perf_report.json --lang both "
        "--output MODEL_CARD.md"
    )
