"""The card by section (issues #29 and #33): every report any script writes makes a card in both languages (each
runtime, each mode), the weights' provenance as the reports record it, a Reproduce block that makes this very card,
plots that never share a name, commits shown whole, a contended run flagged, every note in Chinese, and the card's
units small enough to read.

Every report is made by running the scripts' main() on the tiny MobileViT (tests/card_fixtures.py); the .om runtime
runs through the ais_bench stand-in (tests/offline_standins.py), which computes with the real CPU ONNX Runtime.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
from card_fixtures import TINY_RUNS, copy_set, make_reports, working_folder
from conftest import PHOTOS

import port_report
from mobilevit_npu import PROJECT_DIR, card, card_text, cardfacts, models

pytest_plugins = ["card_fixtures"]

needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason='onnx / onnxruntime not installed (pip install -e ".[bench]")',
)
ENGLISH_RUN = re.compile(r"[A-Za-z][A-Za-z'’-]*(?:[ \t]+[A-Za-z][A-Za-z'’-]*){2,}")
PERF = ["--device", "cpu", "--warmup", "1", "--batch_sizes", "1", "--allocator", "system"]
SECOND = Path(PHOTOS[1]).name  # make_reports copies PHOTOS[0] as photo.png, the next ones by name
ACC = ["--device", "cpu", "--reference_cache", "off", "--images", "photo.png", SECOND]


def write_card(paths, *extra: str, out: str = "card.md") -> str:
    assert port_report.main([*paths, "--output", out, *extra]) == 0
    return Path(out).read_text(encoding="utf-8")


def halves(text: str) -> tuple[str, str]:
    """(zh, en) of a `both` card, the front matter dropped."""
    body = text.split("\n---\n", 1)[1]
    zh, en = body.split("\n---\n\n# ", 1)
    return zh, "# " + en


def section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def prose(text: str) -> str:
    """What a reader reads as prose: code blocks and spans, link targets and 《titles》 removed."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"``.*?``|`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"《[^》]*》", "", text)


def load(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save(path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2), encoding="utf-8")


def assert_whole_in_both(text: str) -> None:
    """A card in both languages with every note translated and no English prose in the Chinese half."""
    zh, en = halves(text)
    assert "报告原文（未翻译）" not in zh
    runs = ENGLISH_RUN.findall(prose(zh))
    assert not runs, f"English in the Chinese card: {runs[:10]}"
    assert "## Accuracy" in en and "## Performance" in en and "## 精度" in zh and "## 性能" in zh


# ------------------------------------------------------------------------------------ every report makes a card


def _install_ais_bench(mp: pytest.MonkeyPatch, interface) -> None:
    mp.setitem(sys.modules, "ais_bench", types.ModuleType("ais_bench"))
    mp.setitem(sys.modules, "ais_bench.infer", types.ModuleType("ais_bench.infer"))
    mp.setitem(sys.modules, "ais_bench.infer.interface", interface)


@pytest.fixture(scope="session")
def runtime_reports(tmp_path_factory, tiny_model_dir) -> Path:
    """A folder with the tiny model and the reports of both offline runtimes: onnxruntime (exported on the fly) and an
    .om through the ais_bench stand-in, each an accuracy_run.py and an accuracy_run_perf.py report."""
    import onnxruntime
    from offline_standins import fake_ais_bench, om_spec, shared_export

    onnx = shared_export(tmp_path_factory, tiny_model_dir, "tiny", "--dynamic_batch", "--soc_version", "Ascend910B4")
    folder = tmp_path_factory.mktemp("card_runtimes")
    shutil.copy(onnx, folder / "m.onnx")
    (folder / "m.om").write_bytes(b"om")
    ort = ["--runtime", "onnxruntime"]
    om = ["--runtime", "om", "--om", "m.om", "--device", "npu"]
    runs = {
        "ort_accuracy.json": ("accuracy_run", ["model", "ort_accuracy.json", *ort, *ACC]),
        "ort_perf.json": ("accuracy_run_perf", ["model", "2", "ort_perf.json", *ort, *PERF]),
        "om_accuracy.json": ("accuracy_run", ["model", "om_accuracy.json", *ACC, *om]),
        "om_perf.json": ("accuracy_run_perf", ["model", "2", "om_perf.json", *PERF, *om]),
    }
    with pytest.MonkeyPatch.context() as mp:
        _install_ais_bench(mp, fake_ais_bench(onnxruntime, {"m.om": om_spec(onnx, 1)}))
        make_reports(folder, tiny_model_dir, runs)
    return folder


@needs_ort
@pytest.mark.parametrize("runtime", ["ort", "om"])
def test_a_card_from_each_offline_runtime_in_both_languages(runtime, runtime_reports, tmp_path, monkeypatch):
    """Today: `internal error: the card would show "['CPUExecutionProvider']"` (onnxruntime) and '[1,' (the .om's
    input shape); the notes of both runtimes fell back to 报告原文（未翻译）."""
    monkeypatch.chdir(copy_set(runtime_reports, tmp_path / "work"))
    text = write_card([f"{runtime}_accuracy.json", f"{runtime}_perf.json"])
    assert_whole_in_both(text)
    zh, en = halves(text)
    if runtime == "ort":
        assert "session providers CPUExecutionProvider" in en and "`CPUExecutionProvider`" in zh
    else:
        assert "input pixel_values 1×3×256×256 float32" in en and "形状 `1×3×256×256`" in zh
        assert "推定值" in zh  # the precision_mode's source, translated inside the note


def _modes(compiled: bool) -> list[str]:
    """The modes accuracy_run.py verifies, uncompiled or compiled (those build with inductor: the slow test)."""
    from mobilevit_npu import modes

    return [name for name in modes.mode_names(verify=True) if modes.mode(name).compiled == compiled]


def _run_script(script: str, argv: list[str], folder: Path) -> int:
    import importlib

    with working_folder(folder):
        return importlib.import_module(script).main(argv)


def _mode_reports(folder: Path, names: list[str]) -> list[tuple[str, str]]:
    """accuracy_run.py --target_mode M for each mode, and one accuracy_run_perf.py over those it ran:
    [(accuracy report, benchmark report)]. A mode this device or torch cannot run is a one-line refusal (exit 2)
    and no report: there is nothing to make a card of."""
    ran = []
    for mode in names:
        name = f"mode_{mode}.json"
        code = _run_script("accuracy_run", ["model", name, "--target_mode", mode, *ACC], folder)
        assert code in (0, 1, 2) and (code == 2) != (folder / name).exists(), (mode, code)
        if code != 2:
            ran.append(mode)
    modes = ",".join(dict.fromkeys(["eager", *ran]))
    assert _run_script("accuracy_run_perf", ["model", "2", "perf_modes.json", "--modes", modes, *PERF], folder) == 0
    return [(f"mode_{mode}.json", "perf_modes.json") for mode in ran]


@pytest.fixture(scope="session")
def mode_reports(tmp_path_factory, tiny_reports) -> tuple[Path, list[tuple[str, str]]]:
    folder = copy_set(tiny_reports, tmp_path_factory.mktemp("card_modes") / "work")
    return folder, _mode_reports(folder, _modes(compiled=False))


@pytest.mark.parametrize("mode", _modes(compiled=False))
def test_a_card_from_each_mode_in_both_languages(mode, mode_reports, tmp_path, monkeypatch):
    folder, pairs = mode_reports
    pair = next((p for p in pairs if p[0] == f"mode_{mode}.json"), None)
    if pair is None:
        pytest.skip(f"{mode} does not run on this CPU's torch (a one-line refusal, no report)")
    monkeypatch.chdir(folder)
    assert_whole_in_both(write_card(list(pair), out=str(tmp_path / "card.md")))


@pytest.mark.slow
def test_a_card_from_each_compiled_mode_in_both_languages(tiny_set, tiny_compile_cache):
    """The compiled targets load the builds the session's benchmark made (conftest.compiled_tiny: the same weights,
    batch 1), so this test builds nothing of its own."""
    for pair in _mode_reports(tiny_set, _modes(compiled=True)):
        assert_whole_in_both(write_card(list(pair), out=f"card_{pair[0]}.md"))


def test_a_card_from_the_inference_benchmark(tiny_set):
    """inference.py --benchmark writes a benchmark report too: it makes a card like accuracy_run_perf.py's."""
    argv = ["--model_path", "model", "--benchmark", "--iterations", "2", "--warmup", "0", "--device", "cpu"]
    assert _run_script("inference", [*argv, "--output", "bench.json"], tiny_set) == 0
    assert_whole_in_both(write_card(["accuracy_cl.json", "bench.json"]))


def test_the_labelled_set_and_every_tiny_report_make_one_card(tiny_set):
    assert_whole_in_both(write_card(list(TINY_RUNS)[:4]))


# ----------------------------------------------------------------------------------------------------- provenance


@pytest.fixture(scope="session")
def xsmall_reports(tmp_path_factory, synthetic_model_dir) -> Path:
    """The full-size X-Small architecture (the published checkpoint's) with local synthetic weights, measured as a
    local folder: real-weights reports whose folder is not the hub's."""
    folder = tmp_path_factory.mktemp("card_xsmall")
    runs = {
        "local_accuracy.json": (
            "accuracy_run",
            ["model", "local_accuracy.json", "--target_mode", "channels_last", *ACC],
        ),
        "local_perf.json": ("accuracy_run_perf", ["model", "2", "local_perf.json", "--modes", "eager", *PERF]),
    }
    make_reports(folder, synthetic_model_dir, runs)
    return folder


def test_a_local_folder_is_never_called_the_hub_checkpoint(xsmall_reports, tmp_path, monkeypatch):
    """Today: the intro said the weights are apple/mobilevit-x-small, base_model named it, and Reproduce told the reader
    to download the hub checkpoint and check the local file's hash against it, which cannot match."""
    from huggingface_hub import metadata_load

    monkeypatch.chdir(copy_set(xsmall_reports, tmp_path / "work"))
    report = load("local_accuracy.json")["model_source"]
    assert report["hub_id"] is None and report["revision"] is None and report["sha256"]
    text = write_card(["local_accuracy.json", "local_perf.json"], out="README.md")
    assert "base_model" not in metadata_load(Path("README.md"))
    zh, en = halves(text)
    intro, reproduce = section(en, "Introduction"), section(en, "Reproduce")
    assert f"a local file, `model/{report['weights']}`" in intro and "do not say it was downloaded" in intro
    assert "huggingface.co/apple/mobilevit-x-small" not in intro  # the published figures stay, the claim goes
    assert "74.8%" in intro
    assert "download" not in reproduce and f"sha256sum model/{report['weights']}" in reproduce
    assert f"must print {report['sha256']}" in reproduce
    assert "本地文件" in section(zh, "简介") and "hf download" not in section(zh, "复现")


def _hub_layout(root: Path, source: Path, revision: str) -> Path:
    """A folder laid out as huggingface_hub's cache holds a snapshot: models--ORG--NAME/snapshots/COMMIT."""
    snapshot = root / "hub" / "models--apple--mobilevit-x-small" / "snapshots" / revision
    shutil.copytree(source, snapshot)
    return snapshot


def test_hub_weights_are_named_with_their_commit(xsmall_reports, tmp_path, monkeypatch):
    """Weights read from the hub cache: the reports record the repository and commit, and the card names both (intro,
    base_model) and reproduces them at that commit."""
    from huggingface_hub import metadata_load

    work = copy_set(xsmall_reports, tmp_path / "work")
    monkeypatch.chdir(work)
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = _hub_layout(tmp_path, work / "model", revision)
    assert (
        _run_script("accuracy_run", [str(snapshot), "hub_accuracy.json", "--target_mode", "channels_last", *ACC], work)
        == 0
    )
    source = load("hub_accuracy.json")["model_source"]
    assert (source["hub_id"], source["revision"]) == ("apple/mobilevit-x-small", revision)
    text = write_card(["hub_accuracy.json", "local_perf.json"], out="README.md")  # the same bytes: one model
    assert metadata_load(Path("README.md"))["base_model"] == "apple/mobilevit-x-small"
    zh, en = halves(text)
    assert (
        "[apple/mobilevit-x-small](https://huggingface.co/apple/mobilevit-x-small) from the Hugging Face Hub at commit"
        in en
    )
    assert f"`{revision}`" in section(en, "Introduction") and f"`{revision}`" in section(zh, "简介")
    assert f"measured its commit {revision}" in section(en, "Reproduce")


def test_a_download_records_the_hub_id_and_the_commit(tmp_path, monkeypatch, synthetic_model_dir):
    """The empty default folder is filled from the hub: the report says which repository and which commit. The
    download is a stand-in for huggingface_hub.snapshot_download(local_dir=...), writing what it writes: the files
    and, per file, .cache/huggingface/download/FILE.metadata (commit, etag = the LFS file's sha256, time;
    huggingface_hub 2.4.0 _local_folder.py:36-45)."""
    import huggingface_hub

    revision = "fedcba9876543210fedcba9876543210fedcba98"

    def snapshot_download(repo_id, local_dir=None, endpoint=None, allow_patterns=None, **_):
        assert repo_id == models.HUB_MODEL_ID
        for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
            shutil.copy(synthetic_model_dir / name, Path(local_dir) / name)
        meta = Path(local_dir) / ".cache" / "huggingface" / "download"
        meta.mkdir(parents=True)
        digest = hashlib.sha256((Path(local_dir) / "model.safetensors").read_bytes()).hexdigest()
        (meta / "model.safetensors.metadata").write_text(f"{revision}\n{digest}\n1712656091.123\n")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    shutil.copy(PHOTOS[0], "photo.png")
    shutil.copy(PHOTOS[1], SECOND)
    assert _run_script("accuracy_run", ["./model", "a.json", "--target_mode", "channels_last", *ACC], tmp_path) == 0
    source = load("a.json")["model_source"]
    assert (source["hub_id"], source["revision"]) == (models.HUB_MODEL_ID, revision)


# -------------------------------------------------------------------------------------------------- the sections


def test_the_imagenet_sentence_is_not_beside_the_cards_own_top1(tiny_set):
    """Today: 'No report behind this card measured ImageNet accuracy' was printed beside the labelled top-1."""
    zh, en = halves(write_card(["labelled.json", "perf.json"]))
    assert "No report behind this card measured" not in en and "都没有测量 ImageNet 准确率" not in zh
    assert "this card's own measurement" in section(en, "Introduction") and "`labelled.json`" in section(
        en, "Introduction"
    )
    zh, en = halves(write_card(["accuracy_cl.json", "perf.json"], out="other.md"))
    assert "No report behind this card measured ImageNet accuracy." in en


def test_the_reproduce_block_makes_this_card(tiny_set):
    """Today: the last step was always `--output MODEL_CARD.md`, whatever made the card."""
    Path("out").mkdir()
    text = write_card(["accuracy_cl.json", "perf.json"], "--lang", "en", "--assets", "figs", out="out/card.md")
    steps = section(text, "Reproduce")
    assert "python port_report.py accuracy_cl.json perf.json --output out/card.md --lang en --assets figs" in steps
    assert "MODEL_CARD.md" not in steps
    assert "python accuracy_run.py model accuracy_cl.json --device cpu --target_mode channels_last" in steps


def test_two_reports_of_one_name_never_share_a_plot(tiny_set):
    """Today: a/perf.json and b/perf.json both linked card_assets/latency-perf.png, which held one of them."""
    for where, iterations in (("a", "2"), ("b", "3")):  # two runs: the same argv twice in one second is one run
        Path(where).mkdir()
        shutil.copytree("model", f"{where}/model")
        argv = ["model", iterations, "perf.json", "--modes", "eager", *PERF]
        assert _run_script("accuracy_run_perf", argv, Path(where)) == 0
    text = write_card(["accuracy_cl.json", "a/perf.json", "b/perf.json"], "--lang", "en")
    links = re.findall(r"!\[[^\]]*\]\((card_assets/latency-[^)]+)\)", text)
    assert len(links) == 2 and len(set(links)) == 2, links
    assert Path(links[0]).read_bytes() != Path(links[1]).read_bytes()
    assert "card_assets/latency-perf.png" not in links  # one of them would have kept the bare name, the other lost


def test_commits_are_listed_whole_with_their_dirty_mark(tiny_set):
    """Today: one report from a dirty checkout and one from the clean commit read as two `0123456789ab` entries."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name, mark in (("accuracy_cl.json", "+dirty"), ("perf.json", "")):
        data = load(name)
        data["provenance"]["commit"] = commit + mark
        save(name, data)
    text = write_card(["accuracy_cl.json", "perf.json"], "--lang", "en")
    differ = section(text, "Reproduce").split("The reports come from", 1)[1]
    assert "`accuracy_cl.json` `0123456789ab+dirty`" in differ and "`perf.json` `0123456789ab` " in differ
    environment = section(text, "Environment")
    assert "`0123456789ab+dirty`" in environment


def test_a_contended_run_and_a_share_over_the_ceiling_are_known_issues(tiny_set):
    """Today: a run at load 9 on 2 cores printed 219 % of its ceiling, and the card said 'no known issue'."""
    data = load("perf.json")
    data["environment"]["load_average"] = [9.0, 8.5, 7.0]
    data["environment"]["cpu_count"] = 2
    row = next(r for r in data["results"] if r["status"] == "ok" and r["roofline"])
    row["roofline"]["fraction_of_ceiling"] = 2.19
    save("perf.json", data)
    zh, en = halves(write_card(["accuracy_cl.json", "perf.json"]))
    known = section(en, "Known issues")
    assert "loaded machine (load average 9.00 over 2 CPU cores)" in known
    assert f"`{row['mode']}` at batch {row['batch_size']} ran at 219.0% of the matmul ceiling" in known
    performance = section(en, "Performance")
    assert "| 219.0% |" in performance and "Shares over 100%" in performance and "under contention" in performance
    assert "9.00" in section(zh, "已知问题") and "算力利用率超过 100%" in section(zh, "性能")


def test_every_note_a_runtime_or_a_torchrun_writes_has_its_chinese():
    """The notes only an NPU, a CANN build or torchrun writes, through the zh phrase table (no device here)."""
    from mobilevit_npu import runtime_ort

    writer = card_text.Section(None, card_text.load_template("zh"), {})
    notes = [
        f"{runtime_ort.DISABLE_CPU_EP_FALLBACK}=1: every node runs on the CANN provider",
        "onnxruntime 1.19.0 CANNExecutionProvider on npu:0, precision_mode must_keep_origin_dtype; session "
        "providers ['CANNExecutionProvider']",
        "onnxruntime 1.19.0 names it precision_mode_v2: origin",
        "--precision_mode allow_fp32_to_fp16 ignored: only the CANN execution provider takes it",
        "CUDA execution provider: TF32 as onnxruntime's use_tf32 default (on Ampere and newer)",
        "ais_bench InferSession on npu:0: m.om, input pixel_values [-1, 256, 256, 3] uint8 (AIPP: uint8 RGB NHWC in); "
        "ATC precision_mode allow_fp32_to_fp16 (--precision_mode)",
        "level L1 dumps torch APIs only: no module rows, so no first failing module; each of the 2 ranks dumped its "
        "own first batch (rank folders); rank 0's here",
        "an .om's precision is fixed by ATC's --precision_mode",
        "exported here: exporter: dynamo (torch's current exporter, torch.onnx.export(dynamo=True)), opset 18, 2.0 s; "
        "no warnings",
    ]
    for note in notes:
        shown = writer.phrase(note)
        assert "报告原文" not in shown and not ENGLISH_RUN.findall(prose(shown)), (note, shown)


def test_the_zh_card_uses_the_ascend_terms_and_one_set_of_signs(tiny_set):
    zh, _ = halves(write_card(["accuracy_bf16.json", "perf.json"]))
    assert "自动迁移到 NPU" in zh and "算力利用率" in zh
    template = (PROJECT_DIR / "mobilevit_npu" / "templates" / "model_card.zh.md").read_text(encoding="utf-8")
    for calque in ("转储", "挂钩", "占算力上限比例", "落到 NPU 上", "秩之间"):
        assert calque not in template, calque
    assert not re.search(r"[＜＞≦≧]", template)  # ≥ ≤ < >, one set, as in the English card
    assert not re.search(r"[\u4e00-\u9fff][(),:;][^`\s]|[\u4e00-\u9fff][(:;,]", prose(zh)), "half-width punctuation"


# --------------------------------------------------------------------------------------------------- the structure


def _units(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.end_lineno - node.lineno + 1


def test_the_card_is_split_by_section_into_small_units():
    """Issue #29: no class over 400 lines, no function over 120, in the card's modules and port_report.py."""
    files = [*sorted((PROJECT_DIR / "mobilevit_npu").glob("card*.py")), PROJECT_DIR / "port_report.py"]
    assert len(files) >= 6  # card, card_text, card_intro, card_known, card_accuracy, card_performance, ...
    for path in files:
        for node, lines in _units(path):
            limit = 400 if isinstance(node, ast.ClassDef) else 120
            assert lines <= limit, f"{path.name}: {node.name} is {lines} lines (limit {limit})"


def test_refusals_live_in_cardfacts():
    """The writing modules raise no CardError of their own but internal ones: every refusal of reports that make no
    one card is cardfacts' (checked before a word is written)."""
    for path in sorted((PROJECT_DIR / "mobilevit_npu").glob("card_*.py")) + [PROJECT_DIR / "mobilevit_npu/card.py"]:
        for raised in re.findall(r"raise CardError\(\s*f?\"([^\"]*)", path.read_text(encoding="utf-8")):
            assert raised.startswith("internal error"), (path.name, raised)
    assert callable(cardfacts.refuse_untellable) and card.build_card
