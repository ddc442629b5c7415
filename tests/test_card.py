"""The model card (mobilevit_npu/card.py, cardfacts.py; port_report.py): from reports the scripts write.

Every report here is made by running the writers on a tiny MobileViT with healthy weights (tests/card_fixtures.py),
never written by hand; a refusal test damages a copy of one the way a careless user or a stale tool would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import port_report
from mobilevit_npu import PROJECT_DIR, card, cardfacts, metrics, schema

pytest_plugins = ["card_fixtures"]  # the fixtures: reports made by the writers

TINY = ["accuracy_bf16.json", "accuracy_cl.json", "labelled.json", "perf.json"]
SYNTHETIC = ["synthetic_accuracy.json", "synthetic_perf.json"]


def write_card(paths, lang="both", out="card.md", extra=()) -> str:
    assert port_report.main([*paths, "--lang", lang, "--output", out, *extra]) == 0
    return Path(out).read_text(encoding="utf-8")


def halves(text: str) -> tuple[str, str]:
    """(zh, en) of a `both` card: the front matter dropped, split at the rule between the two languages."""
    body = text.split("\n---\n", 1)[1]
    zh, en = body.split("\n---\n\n# ", 1)
    return zh.strip() + "\n", "# " + en


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.json"))}


def load(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save(path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ what it shows


def test_card_has_every_section_in_both_languages(tiny_set):
    zh, en = halves(write_card(TINY))
    for heading in (
        "## 简介",
        "## 快速上手",
        "## 已知问题",
        "## 运行环境",
        "## 精度",
        "## 性能",
        "## 模型",
        "## 复现",
        "## 数据来源",
        "## 引用",
    ):
        assert heading in zh
    for heading in (
        "## Introduction",
        "## Quick start",
        "## Known issues",
        "## Environment",
        "## Accuracy",
        "## Performance",
        "## Model",
        "## Reproduce",
        "## Sources",
        "## Citation",
    ):
        assert heading in en
    for half in (zh, en):
        # the tiny MobileViT is not apple/mobilevit-x-small: no published figures, no paper cited with them
        assert "74.8%" not in half and "@inproceedings{mehta2022mobilevit" not in half
        assert "--device npu:0" in half and "--device cuda" in half and "--device cpu" in half
        assert "transfer_to_npu" in half
    assert "Published, not measured here" not in en and "公开数据，非本项目实测" not in zh


def test_parameter_count_is_the_models(tiny_set):
    from transformers import MobileViTConfig, MobileViTForImageClassification

    _, en = halves(write_card(TINY))
    model = MobileViTForImageClassification(MobileViTConfig.from_dict(load("model/config.json")))
    count = sum(p.numel() for p in model.parameters())
    assert f"has {count:,} parameters" in en
    assert f"| parameters | {count:,} |" in en


def test_per_image_table_names_the_classes(tiny_set):
    zh, en = halves(write_card(TINY))
    report = load("accuracy_bf16.json")
    labels = load("model/config.json")["id2label"]
    for m in report["per_image"]:
        shown = os.path.relpath(m["image"], PROJECT_DIR) if os.path.isabs(m["image"]) else m["image"]
        line = next(line for line in en.splitlines() if line.startswith(f"| `{shown}` |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"`{m['top1_reference']} {labels[str(m['top1_reference'])]}`"
        assert cells[2] == f"`{m['top1_target']} {labels[str(m['top1_target'])]}`"
        assert abs(float(cells[4]) - m["top1_reference_margin"]) <= 0.5e-4
        assert f"| `{shown}` | `{m['top1_reference']} " in zh


def test_layers_give_first_worst_and_count_below(tiny_set):
    zh, en = halves(write_card(TINY))
    layers = load("accuracy_bf16.json")["layers"]
    below = [m for m in layers["modules"] if m["cosine_min"] < layers["threshold"]]
    worst = min(layers["modules"], key=lambda m: m["cosine_min"])
    assert below, "the bf16 fixture is meant to have modules below the threshold"
    assert f"{len(below)} of {layers['modules_compared']} fell below it" in en
    assert f"the first (in execution order) is `{layers['first_divergent']['name']}`" in en
    assert f"the worst is `{worst['name']}` (cosine {worst['cosine_min']:.6f})" in en
    assert f"{layers['modules_compared']} 个模块中有 {len(below)} 个低于该值" in zh
    # known issues repeat it, and the failed verdict
    known_en = en.split("## Known issues")[1].split("\n## ")[0]
    assert f"{len(below)} of {layers['modules_compared']} module outputs fell below" in known_en
    assert "the verdict is **FAIL**" in known_en


def test_perf_rows_say_dtype_build_and_images_per_s_from_their_statistic(tiny_set):
    _, en = halves(write_card(TINY))
    report = load("perf.json")
    section = en.split("### Benchmark on")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    stat = header[3].split()[0]
    assert header[4] == f"images/s (at {stat})"
    assert header[13] == f"agrees (cosine ≥ {metrics.EXACT_COSINE:g}, same top-1)"
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0].strip("`"), int(cells[2]))] = cells
    assert len(rows) == len([r for r in report["results"] if r["status"] == "ok"])
    for res in report["results"]:
        cells = rows[(res["mode"], res["batch_size"])]
        assert cells[1] == f"`{res['dtype']}`"
        assert float(cells[3]) == pytest.approx(res["latency_ms"][stat], abs=0.005)
        assert float(cells[4]) == pytest.approx(res["throughput_images_per_s"], abs=0.005)
        assert res["throughput_images_per_s"] == pytest.approx(res["batch_size"] * 1000 / res["latency_ms"][stat])
        assert cells[10] == "nothing to build"  # eager and channels_last build nothing
    ceilings = {res["dtype"]: res["roofline"]["ceiling_gflop_per_s"] for res in report["results"]}
    for dtype, gflops in ceilings.items():
        assert f"% of ceiling, `{dtype}` rows:" in section and f"{gflops:.1f} GFLOP/s" in section


def test_title_says_what_the_card_is(tiny_set):
    zh, en = halves(write_card(TINY))
    assert en.splitlines()[0] == "# MobileViT on CPU: a measurement of this stack"  # tiny: not the X-Small
    assert zh.splitlines()[0] == "# MobileViT 在 CPU 上的软件栈实测"
    assert "port result" not in en.splitlines()[0]


def test_synthetic_card_is_marked_and_publishes_no_results(synthetic_set):
    from huggingface_hub import ModelCard, metadata_load

    text = write_card(SYNTHETIC, out="MODEL_CARD.md")
    zh, en = halves(text)
    assert en.splitlines()[0] == "# MobileViT-X-Small on CPU: a measurement of this stack (synthetic weights)"
    assert "not a port result" in "\n".join(en.splitlines()[:6]) and "不是移植结果" in "\n".join(zh.splitlines()[:6])
    meta = metadata_load(Path("MODEL_CARD.md"))
    assert "synthetic-weights" in meta["tags"] and "CPU" in meta["tags"]
    assert "model-index" not in meta and "datasets" not in meta
    loaded = ModelCard.load("MODEL_CARD.md")
    assert loaded.data.license == "other" and loaded.data.base_model is None  # synthetic: no hub checkpoint
    assert loaded.data.eval_results is None
    assert "# synthetic weights (seed 0): nothing to download" in en
    # the X-Small's architecture: its published figures, cited, in both languages
    for half in (zh, en):
        assert "74.8%" in half and "https://arxiv.org/abs/2110.02178" in half
        assert "@inproceedings{mehta2022mobilevit" in half and "https://github.com/apple/ml-cvnets" in half


def test_front_matter_of_real_weights_loads_with_huggingface_hub(tiny_set):
    from huggingface_hub import ModelCard, metadata_load

    write_card(TINY, out="README.md")
    meta = metadata_load(Path("README.md"))
    assert meta["license_name"] == "apple-sample-code-license" and meta["pipeline_tag"] == "image-classification"
    assert "datasets" not in meta and "model-index" not in meta  # no report ran on a hub dataset: no id to give
    assert not {"NPU", "Ascend", "GPU"} & set(meta["tags"]) and "synthetic-weights" not in meta["tags"]
    assert ModelCard.load("README.md").data.library_name == "transformers"


def test_reproduce_block_prints_commit_packages_and_commands(tiny_set):
    _, en = halves(write_card(TINY))
    report = load("perf.json")
    section = en.split("## Reproduce")[1].split("\n## ")[0]
    assert report["provenance"]["packages_sha256"] in section
    commit = report["provenance"]["commit"]
    assert (f"commit `{commit}`" in section) if commit != "not a git checkout" else ("not a git checkout" in section)
    digest = load("accuracy_bf16.json")["model_source"]["sha256"]
    assert f"must print {digest}" in section
    assert "python accuracy_run.py model accuracy_bf16.json --device cpu --dtype bf16" in section
    assert "python accuracy_run_perf.py model 3 perf.json" in section
    assert (
        "python port_report.py accuracy_bf16.json accuracy_cl.json labelled.json perf.json --output card.md" in section
    )


def test_plots_are_written_beside_the_card_and_linked_relatively(tiny_set):
    text = write_card(TINY, out="out/card.md")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "card_assets/latency-perf.png" in links and "card_assets/layers-accuracy_bf16.png" in links
    for link in set(links):
        assert not os.path.isabs(link)
        data = (Path("out") / link).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert text.count("card_assets/layers-accuracy_bf16.png") == 2  # once per language
    assert "card_assets/layers-accuracy_cl.png" not in text  # no --layers, no plot


def test_en_rules_are_the_reports_rules(tiny_set):
    """The card renders each check's rule from its definition (the thresholds); in English it must read exactly as
    the report's own rule, so the two definitions cannot drift apart."""
    _, en = halves(write_card(TINY))
    for name in ("accuracy_bf16.json", "accuracy_cl.json"):
        for check in load(name)["checks"] + load(name)["reference_checks"]:
            assert f"| `{check['name']}` | {check['rule']} |" in en


# --------------------------------------------------------------------------------------------------- no holes

REPR = re.compile(r"\{'|\{\"|\['|\[\d|(?<![\w`])None(?![\w`])|(?<![\w`])nan(?![\w`])|\w+\(\w+=")
ENGLISH_RUN = re.compile(r"[A-Za-z][A-Za-z'’-]*(?:[ \t]+[A-Za-z][A-Za-z'’-]*){2,}")


def prose(text: str) -> str:
    """The text a reader reads as prose: code blocks, code spans, link targets and 《titles》 removed."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"``.*?``|`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"《[^》]*》", "", text)


@pytest.mark.parametrize("which", ["tiny", "synthetic"])
def test_no_python_rendering_in_either_language(which, request):
    request.getfixturevalue(f"{which}_set")
    text = write_card(TINY if which == "tiny" else SYNTHETIC)
    for lang, half in zip(("zh", "en"), halves(text)):
        for line in half.splitlines():
            assert not REPR.search(re.sub(r"\]\([^)]*\)", "]", line)), f"{lang}: a Python rendering in: {line}"


@pytest.mark.parametrize("which", ["tiny", "synthetic"])
def test_no_absolute_local_path(which, request, tmp_path):
    request.getfixturevalue(f"{which}_set")
    text = write_card(TINY if which == "tiny" else SYNTHETIC)
    for local in (str(PROJECT_DIR), os.getcwd(), str(Path.home()), "/tmp/", str(tmp_path)):
        assert local not in text
    without_urls = re.sub(r"https?://\S+", "", text).replace("/usr/local/Ascend/", "")  # CANN's documented home
    assert not re.search(r"(?<![\w.`])/(?:home|tmp|work|root|usr|var|Users)/", without_urls)


def test_zh_half_has_no_english_prose(tiny_set):
    zh, _ = halves(write_card(TINY))
    runs = ENGLISH_RUN.findall(prose(zh))
    assert not runs, f"English in the Chinese card: {runs[:10]}"
    assert "报告原文（未翻译）" not in zh  # every note the writers make has its Chinese
    assert not re.search(r"[\u4e00-\u9fff][(),:;][^`\s]|[\u4e00-\u9fff][(:;,]", prose(zh)), "half-width punctuation"
    for phrase in ("运行在", "放过", "无编译", "| 项目 |", "(已调优)", "256 x 256"):
        assert phrase not in zh


def test_zh_synthetic_half_has_no_english_prose(synthetic_set):
    zh, _ = halves(write_card(SYNTHETIC))
    assert not ENGLISH_RUN.findall(prose(zh))


# --------------------------------------------------------------------------------------------------- refusals


def test_the_same_file_twice_is_refused_and_nothing_changes(tiny_set, capsys):
    before = hashes(tiny_set)
    for argv in (
        ["accuracy_bf16.json", "accuracy_bf16.json", "perf.json"],
        ["accuracy_bf16.json", "perf.json", "accuracy_bf16.json", "perf.json"],
        ["accuracy_bf16.json", "./accuracy_bf16.json", "perf.json"],
    ):
        assert port_report.main([*argv, "--output", "card.md"]) == 2
        assert "given twice" in capsys.readouterr().err
    os.link("perf.json", "perf_link.json")
    assert port_report.main(["accuracy_bf16.json", "perf.json", "perf_link.json", "--output", "card.md"]) == 2
    assert not Path("card.md").exists() and not Path("card_assets").exists()
    assert hashes(tiny_set) == {**before, "perf_link.json": before["perf.json"]}


def test_a_copy_of_a_report_is_refused(tiny_set, capsys):
    Path("copy.json").write_bytes(Path("accuracy_bf16.json").read_bytes())
    before = hashes(tiny_set)
    assert port_report.main(["accuracy_bf16.json", "copy.json", "perf.json", "--output", "card.md"]) == 1
    err = capsys.readouterr().err
    assert "copy.json" in err and "accuracy_bf16.json" in err and "identical content" in err
    assert not Path("card.md").exists() and hashes(tiny_set) == before


def test_two_reports_of_one_run_are_refused(tiny_set, capsys):
    save("rewritten.json", load("accuracy_bf16.json"))  # the same run, re-serialised: other bytes, same facts
    before = hashes(tiny_set)
    assert port_report.main(["accuracy_bf16.json", "rewritten.json", "perf.json", "--output", "card.md"]) == 1
    err = capsys.readouterr().err
    assert "rewritten.json" in err and "same run" in err and "`argv`" in err
    assert not Path("card.md").exists() and hashes(tiny_set) == before


def test_two_runs_of_one_kind_make_one_card(tiny_set):
    text = write_card(TINY)
    assert text.count("### `cpu` `float32` `eager` against") == 3  # bf16, channels_last, labelled: each once


@pytest.mark.parametrize("how", ["path", "symlink", "hardlink"])
def test_output_that_is_an_input_is_refused(tiny_set, capsys, how):
    before = hashes(tiny_set)
    target = {"path": "accuracy_bf16.json", "symlink": "alias.md", "hardlink": "hard.md"}[how]
    if how == "symlink":
        os.symlink("accuracy_bf16.json", "alias.md")
    if how == "hardlink":
        os.link("accuracy_bf16.json", "hard.md")
    assert port_report.main([*TINY, "--output", target]) == 2
    assert "accuracy_bf16.json" in capsys.readouterr().err
    after = hashes(tiny_set)
    assert {k: after[k] for k in before} == before and not Path("card_assets").exists()


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d["aggregate"].update(cosine_min="0.99"), "aggregate.cosine_min"),
        (lambda d: d["target"].update(notes="one note"), "target.notes"),
        (lambda d: d["checks"][0].pop("rule"), "checks[0].rule"),
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d.update(kind="accuracyy"), "kind"),
        (lambda d: d["skipped"].update(count={"count": 0}), "skipped.count"),
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d["environment"].pop("torch"), "environment.torch"),
    ],
)
def test_a_report_that_does_not_match_the_format_is_refused(tiny_set, capsys, change, field):
    data = load("accuracy_bf16.json")
    change(data)
    save("accuracy_bf16.json", data)
    assert port_report.main([*TINY, "--output", "card.md"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "accuracy_bf16.json" in err and field in err
    assert not Path("card.md").exists()


def test_unknown_fields_only_with_allow_unknown_fields(tiny_set, capsys):
    data = load("perf.json")
    data["results"][0]["surprise"] = "x"
    save("perf.json", data)
    assert port_report.main([*TINY, "--output", "card.md"]) == 2
    assert "results[0].surprise" in capsys.readouterr().err
    text = write_card(TINY, extra=["--allow_unknown_fields"])
    assert "surprise" not in text


def test_first_divergent_without_its_fields_is_refused(tiny_set, capsys):
    data = load("accuracy_bf16.json")
    data["layers"]["first_divergent"].pop("cosine_min")
    save("accuracy_bf16.json", data)
    assert port_report.main([*TINY, "--output", "card.md"]) in (1, 2)
    err = capsys.readouterr().err
    assert "accuracy_bf16.json" in err and "first_divergent" in err and "cosine_min" in err
    assert not Path("card.md").exists()


def test_reports_of_different_weights_are_refused(tiny_set, synthetic_reports, capsys):
    assert (
        port_report.main(["accuracy_bf16.json", str(synthetic_reports / "synthetic_perf.json"), "--output", "card.md"])
        == 1
    )
    err = capsys.readouterr().err
    assert "different weights" in err and "seed 0" in err
    assert not Path("card.md").exists()


def test_a_kind_the_card_does_not_take_is_refused(tiny_set, capsys):
    assert port_report.main(["inference.json", *TINY, "--output", "card.md"]) == 1
    err = capsys.readouterr().err
    assert "inference.json" in err and "'inference'" in err
    assert port_report.main(["accuracy_bf16.json", "--output", "card.md"]) == 1
    assert "benchmark" in capsys.readouterr().err


def test_weights_in_the_model_folder_must_be_the_measured_ones(tiny_set, capsys):
    Path("model/model.safetensors").write_bytes(b"other weights")
    assert port_report.main([*TINY, "--output", "card.md"]) == 1
    assert "model.safetensors" in capsys.readouterr().err


def test_unreadable_report_is_a_usage_error(tiny_set, capsys):
    Path("broken.json").write_text("{")
    assert port_report.main(["broken.json", "perf.json", "--output", "card.md"]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert port_report.main(["--output", "card.md"]) == 2


# ------------------------------------------------------------------------------- every field read is written


class Recorder:
    """A typed report seen through attribute and item access: every field path the card reads is recorded."""

    def __init__(self, obj, path: str, seen: set):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_seen", seen)

    def _wrap(self, value, path):
        if dataclasses.is_dataclass(value) or isinstance(value, (list, dict)):
            return Recorder(value, path, self._seen)
        return value

    def __getattr__(self, name):
        value = getattr(self._obj, name)
        if name.isupper() or callable(value) and not dataclasses.is_dataclass(value):
            return value
        path = f"{self._path}.{name}"
        self._seen.add(path)
        return self._wrap(value, path)

    def __getitem__(self, key):
        value = self._obj[key]
        path = f"{self._path}[]" if isinstance(key, int) else f"{self._path}.{key}"
        self._seen.add(path)
        return self._wrap(value, path)

    def get(self, key, default=None):
        self._seen.add(f"{self._path}.{key}")
        return self._wrap(self._obj.get(key, default), f"{self._path}.{key}")

    def items(self):
        return [(k, self._wrap(v, f"{self._path}.{k}")) for k, v in self._obj.items()]

    def __contains__(self, key):
        return key in self._obj

    def __iter__(self):
        for value in self._obj:
            yield self._wrap(value, f"{self._path}[]")

    def __len__(self):
        return len(self._obj)

    def __bool__(self):
        return bool(self._obj)

    def __repr__(self):
        return repr(self._obj)


def _declared(tp, parts: list[str]) -> bool:
    """Whether the path (after the kind) names a field schema declares (untyped objects end the check)."""
    for part in parts:
        while typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if part == "[]":
            if typing.get_origin(tp) not in (list, tuple):
                return False
            tp = typing.get_args(tp)[0]
            continue
        if typing.get_origin(tp) is dict or tp is typing.Any or tp is dict:
            return True
        if not dataclasses.is_dataclass(tp):
            return False
        hints = schema._hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
    return True


def _written(values: list, parts: list[str]) -> bool:
    """Whether some writer-made report holds the path (a list: any of its items)."""
    for part in parts:
        nxt = []
        for v in values:
            if part == "[]" and isinstance(v, list):
                nxt.extend(v)
            elif isinstance(v, dict) and part in v:
                nxt.append(v[part])
        values = nxt
        if not values:
            return False
    return True


def test_every_field_the_card_reads_is_declared_and_written(tiny_set, synthetic_reports, monkeypatch):
    seen: set = set()
    real_load = schema.load

    def recording_load(path, allow_unknown=False):
        report = real_load(path, allow_unknown)
        return Recorder(report, report.KIND, seen)

    monkeypatch.setattr(cardfacts.schema, "load", recording_load)
    write_card(TINY)
    for name in SYNTHETIC:
        (Path(name)).write_bytes((synthetic_reports / name).read_bytes())
    write_card(SYNTHETIC, out="synthetic.md")
    assert len(seen) > 60
    written: dict[str, list] = {}
    for path in [*TINY, *SYNTHETIC]:
        data = load(path)
        written.setdefault(data["kind"], []).append(data)
    for path in sorted(seen):
        kind, *parts = re.split(r"\.|(?=\[\])", path)
        parts = [p for p in parts if p]
        assert _declared(schema.KINDS[kind], parts), f"the card reads {path}, which schema does not declare"
        assert _written(written[kind], parts), f"the card reads {path}, which no writer-made report holds"


# --------------------------------------------------------------------------------------------------- the CLI


def test_help_documents_every_flag():
    out = subprocess.run(
        [sys.executable, "port_report.py", "--help"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--lang", "--output", "--assets", "--model_path", "--allow_unknown_fields"):
        assert flag in out
    assert "both = one file" in " ".join(out.split())


def test_templates_have_the_same_blocks_and_words():
    zh, en = card.load_template("zh"), card.load_template("en")
    assert set(zh.blocks) == set(en.blocks)
    assert set(en.words) <= set(zh.words)
    assert not en.phrases and zh.phrases


def test_committed_card_is_current(tmp_path):
    """MODEL_CARD.md is what port_report.py makes from the committed reports (regenerate it after a measurement)."""
    out = tmp_path / "MODEL_CARD.md"
    cwd = os.getcwd()
    os.chdir(PROJECT_DIR)
    try:
        assert port_report.main(["accuracy_report.json", "perf_report.json", "--output", str(out)]) == 0
    finally:
        os.chdir(cwd)
    assert out.read_text(encoding="utf-8") == (PROJECT_DIR / "MODEL_CARD.md").read_text(encoding="utf-8"), (
        "MODEL_CARD.md is stale: python port_report.py accuracy_report.json perf_report.json"
    )
    for png in (tmp_path / card.ASSETS_DIR).iterdir():
        assert (PROJECT_DIR / card.ASSETS_DIR / png.name).read_bytes() == png.read_bytes()


@pytest.mark.slow
def test_a_compile_cache_hit_is_shown_as_a_load(tiny_set, tiny_compile_cache, compiled_tiny):
    """Two runs of the compiled mode over one compile cache: the first compiles (a miss: the session's
    accuracy_run_perf.py run of the tiny model, conftest.compiled_tiny, whose cache this test's is a copy of), the
    second loads."""
    import shutil

    from card_fixtures import make_reports
    from conftest import COMPILED_RUN

    shutil.copy(compiled_tiny[0] / COMPILED_RUN, tiny_set / "first.json")
    argv = ["--device", "cpu", "--modes", "compiled", "--batch_sizes", "1", "--warmup", "0"]
    make_reports(tiny_set, None, {"second.json": ("accuracy_run_perf", ["model", "2", "second.json", *argv])})
    runs = ("first.json", "second.json")
    assert [load(n)["results"][0]["compile_cache"] for n in runs] == ["miss", "hit"]
    _, en = halves(write_card(["accuracy_cl.json", "first.json", "second.json"]))
    first, second = en.split("### Benchmark on")[1:3]
    assert "| compiled in " in first and "(stored in the compile cache)" in first
    assert "| loaded from the compile cache in " in second and "compiled in" not in second.split("| --- |")[1]


@pytest.mark.slow
def test_msprobe_summary_in_both_languages(tiny_set):
    """An accuracy run with --msprobe (msprobe's own dump and compare): its counts by result and first failing rows,
    in both halves, the Chinese one without English prose."""
    from card_fixtures import make_reports

    argv = [
        "--device",
        "cpu",
        "--dtype",
        "bf16",
        "--layers",
        "--reference_cache",
        "off",
        "--msprobe",
        "probe",
        "--msprobe_images",
        "1",
    ]
    make_reports(tiny_set, None, {"probe.json": ("accuracy_run", ["model", "probe.json", *argv])})
    probe = load("probe.json")["msprobe"]
    zh, en = halves(write_card(["probe.json", "perf.json"]))
    for half, sep in ((en, ", "), (zh, "、")):
        assert sep.join(f"`{k}` {n}" for k, n in probe["counts"].items()) in half
        for row_ in probe["first_failing"]:
            assert f"`{row_['name']}`" in half
        assert f"`{probe['first_failing_module']}`" in half.split("\n## ")[3]  # known issues
    assert not ENGLISH_RUN.findall(prose(zh))
    assert "报告原文（未翻译）" not in zh


def as_npu_run(path: str, operators: list[str], conv_hf32: bool) -> None:
    """No NPU here: a writer-made report given the fields an NPU run changes, each written the way the package
    writes it on an npu (devices.environment, devices.fp32_precision, npu.CpuFallbacks.summary)."""
    from mobilevit_npu import npu

    data = load(path)
    for env in (data["environment"], data.get("reference_environment")):
        if env is not None and env is data["environment"]:
            env.update(device="npu:0", device_name="Ascend910B4", torch_npu="2.5.1", cann="8.0.RC2")
            env["fp32_precision"] = {"conv_hf32": conv_hf32, "matmul_hf32": False}
    if data["kind"] == "benchmark":
        data["device"] = "npu:0"
    else:
        data["target"]["device"] = "npu:0"
    data["cpu_fallbacks"] = {
        "device": "npu:0",
        "status": npu.OBSERVED,
        "operators": operators,
        "note": npu.NOTE,
        "error_switch": None,
    }
    save(path, data)


def test_real_weights_on_an_npu_make_a_port_result_with_its_known_issues(tiny_set):
    from huggingface_hub import metadata_load

    as_npu_run("accuracy_cl.json", ["aten::_softmax_backward_data"], conv_hf32=True)
    as_npu_run("perf.json", [], conv_hf32=True)
    zh, en = halves(write_card(["accuracy_cl.json", "perf.json"], out="README.md"))
    assert en.splitlines()[0] == "# MobileViT on Ascend NPU: port result"  # the tiny MobileViT, not the X-Small
    assert zh.splitlines()[0] == "# MobileViT 在昇腾 NPU 上的移植结果"
    assert {"NPU", "Ascend", "torch_npu"} <= set(metadata_load(Path("README.md"))["tags"])
    known = en.split("## Known issues")[1].split("\n## ")[0]
    assert "1 operator(s) ran on the CPU: `aten::_softmax_backward_data`" in known
    assert "`conv_hf32=True`" in known and "reduced-precision" in known
    assert "no operator fell back to the CPU" in en  # the benchmark's own line, shown with its section
    known_zh = zh.split("## 已知问题")[1].split("\n## ")[0]
    assert "1 个算子在 CPU 上运行：`aten::_softmax_backward_data`" in known_zh
    assert not ENGLISH_RUN.findall(prose(zh))


def test_accuracy_figures_are_the_reports(tiny_set):
    """Every metric and threshold row shows its report field, rounded as printed, in both languages."""
    zh, en = halves(write_card(TINY))
    report = load("accuracy_bf16.json")
    for half in (zh, en):
        section = half.split("（accuracy_bf16.json）" if half is zh else "(accuracy_bf16.json)")[1].split("\n### ")[0]
        rows = {}
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 3 and cells[1].startswith("`"):
                rows[cells[1].strip("`")] = cells[2]
        checked = 0
        for key, value in {**report["aggregate"], **report["thresholds"]}.items():
            if key not in rows:
                continue
            cell = rows[key]
            shown, scale = (float(cell[:-1]), 100) if cell.endswith("%") else (float(cell), 1)
            decimals = len(cell.rstrip("%").split(".")[1]) if "." in cell else 0
            assert abs(shown - scale * value) <= 0.5 * 10**-decimals + 1e-12, (key, cell, value)
            checked += 1
        assert checked >= 15
