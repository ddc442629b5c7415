"""Typed report sections (issue #29): every writer builds the schema's dataclasses, so the dataclass is what gets
serialised and read back; `settings`, `roofline` and the layer rows are typed; schema_version 2 reads version 1 and
names the change; the header names the preprocessing backend the run matched (issue #30); verify's two paths (images,
labelled sets) share one judge-and-write tail."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
from conftest import PHOTOS

from mobilevit_npu import bench, devices, flops, layerwise, models, preprocessing, schema, verify


def round_trip(report: schema.Header) -> schema.Header:
    """The report as a writer writes it (to_json, strict JSON), then read back by the one reader."""
    text = json.dumps(schema.to_json(report), allow_nan=False)
    return schema.parse(text.encode("utf-8"), "round trip")


def settings(tmp_path: Path, model_dir: Path, **extra) -> verify.Settings:
    return verify.Settings(
        report=str(tmp_path / "report.json"),
        argv=["test"],
        model_path=str(model_dir),
        device="cpu",
        dtype="bf16",  # a port check: bfloat16 weights against the float32 reference
        allocator="system",
        **extra,
    )


@pytest.fixture(scope="module")
def accuracy_runs(tmp_path_factory, tiny_model_dir):
    """The two verification paths on the tiny model: images (two photos, --layers) and a labelled set (three photos,
    one unreadable file). Their outcomes, and the folders their reports went to."""
    images_dir = tmp_path_factory.mktemp("images")
    images = verify.run(settings(images_dir, tiny_model_dir, images=PHOTOS[:2], layers=True))
    dataset = tmp_path_factory.mktemp("set")
    for label, photo in enumerate(PHOTOS[:3]):
        (dataset / str(label)).mkdir()
        (dataset / str(label) / Path(photo).name).write_bytes(Path(photo).read_bytes())
    (dataset / "0" / "broken.jpg").write_bytes(b"not a jpeg")
    labelled_dir = tmp_path_factory.mktemp("labelled")
    labelled = verify.run(
        settings(labelled_dir, tiny_model_dir, dataset=str(dataset), batch_size=2, workers=0, max_skipped=1)
    )
    return {"images": (images, images_dir), "labelled": (labelled, labelled_dir)}


@pytest.fixture(scope="module")
def bench_report(tiny_model_dir):
    """A benchmark report as accuracy_run_perf.py builds it: two modes, a measured roofline (a fixed ceiling: the
    matmul timing is tested apart), one unavailable row."""
    loaded = models.load_model(str(tiny_model_dir), None, "fp32")
    device = devices.Device("cpu")
    mp = pytest.MonkeyPatch()
    mp.setattr(flops, "matmul_ceiling", lambda device, dtype, repeats=3: 100e9)
    try:
        results = bench.run_benchmark(
            loaded, device, modes=("eager", "channels_last"), iterations=2, warmup=0, images=PHOTOS[:1], progress=False
        )
    finally:
        mp.undo()
    results.append(bench._result("npugraph", 1, "fp32", False, status="unavailable", reason="npu only"))
    asked = {"iterations": 2, "warmup": 0, "batch_sizes": [1], "modes": ["eager"], "dtype": "fp32", "end_to_end": False}
    return bench.build_report(
        "accuracy_run_perf.py", ["x"], loaded, device, results, asked, devices.environment(device)
    )


# ------------------------------------------------------------------------------------------ what is written


@pytest.mark.parametrize("path", ["images", "labelled"])
def test_an_accuracy_report_reads_back_as_the_dataclass_its_writer_built(accuracy_runs, path):
    outcome, folder = accuracy_runs[path]
    built = outcome.report
    assert built == round_trip(built)  # every section a dataclass: a dict anywhere would not compare equal
    assert built == schema.load(folder / "report.json")  # and what the run wrote is that dataclass
    assert isinstance(built.environment, schema.Environment) and isinstance(built.provenance, schema.Provenance)
    assert isinstance(built.skipped, schema.SkipBudget) and isinstance(built.speed, schema.Speed)


def test_a_benchmark_report_reads_back_as_the_dataclass_its_writer_built(bench_report):
    assert bench_report == round_trip(bench_report)
    assert isinstance(bench_report.settings, schema.BenchSettings)
    assert bench_report.settings.iterations == 2 and bench_report.settings.interleaved is True
    ok = [r for r in bench_report.results if r.status == "ok"]
    assert ok and all(isinstance(r.roofline, flops.Roofline) for r in ok)
    assert ok[0].roofline.ceiling_gflop_per_s == pytest.approx(100.0)  # the fixed 100 GFLOP/s ceiling
    assert bench_report.results[-1].roofline is None and bench_report.results[-1].status == "unavailable"


def test_the_layer_rows_are_typed_and_name_the_module(accuracy_runs):
    layers = accuracy_runs["images"][0].report.layers
    assert isinstance(layers, layerwise.LayerReport) and layers.worst
    assert all(isinstance(row, layerwise.LayerRow) for row in layers.worst)
    module = {m.name: m for m in layers.modules}[layers.worst[0].name]  # a row is its LayerStat, in short
    assert (layers.worst[0].order, layers.worst[0].cosine_min) == (module.order, module.cosine_min)


def test_a_writer_cannot_emit_a_field_the_schema_lacks(bench_report):
    with pytest.raises(TypeError, match="latency_p50"):
        bench._result("eager", 1, "fp32", False, latency_p50=3.0)  # a row field the schema lacks
    asked = {"iterations": 2, "warmup": 0, "batch_sizes": [1], "modes": ["eager"], "dtype": "fp32", "end_to_end": False}
    with pytest.raises(TypeError, match="threads"):
        bench.build_report(
            "x", [], _Loaded(), devices.Device("cpu"), [], {**asked, "threads": 4}, bench_report.environment
        )
    with pytest.raises(schema.ReportError, match="Speed.cache_hits"):  # a computing module's dict, checked by name
        schema.typed(schema.Speed, {**dataclasses.asdict(_speed()), "cache_hits": 3})
    with pytest.raises(TypeError):
        layerwise.LayerRow(name="a", order=0, cosine_min=1.0, max_abs_error=0.0, worst_image=None, nonfinite=0)


class _Loaded:
    name = "tiny"
    source = {"synthetic": True, "seed": 0}
    preprocess = preprocessing.PreprocessConfig()


def _speed() -> schema.Speed:
    return schema.Speed(
        concurrent=False,
        reference_cached=0,
        reference_computed=1,
        reference_images_per_s=1.0,
        target_images_per_s=1.0,
        target_images_per_s_after_first_batch=None,
        target_first_batch_s=1.0,
        target_images=1,
        reference_s=1.0,
        target_s=1.0,
        cache=None,
    )


# ------------------------------------------------------------------------------------------------ versions


def as_version_1(data: dict) -> dict:
    """A version 2 report as version 1 wrote it: no `preprocessing`, no `environment.ascend` off Ascend."""
    old = copy.deepcopy(data)
    old["schema_version"] = 1
    del old["preprocessing"]
    if old["environment"].get("ascend") is None:
        old["environment"].pop("ascend", None)
    return old


def test_a_version_1_report_is_read_with_its_typed_sections(bench_report, accuracy_runs):
    for report in (bench_report, accuracy_runs["images"][0].report):
        data = schema.to_json(report)
        old = schema.parse(json.dumps(as_version_1(data)).encode(), "old.json")
        assert old.preprocessing is None  # what version 1 lacked reads as null
        assert dataclasses.replace(old, preprocessing=report.preprocessing) == report  # the rest is as written
    assert isinstance(old.layers.worst[0], layerwise.LayerRow)


def test_a_version_1_report_lacking_preprocessing_is_refused_as_version_2(bench_report):
    data = schema.to_json(bench_report)
    del data["preprocessing"]
    with pytest.raises(schema.ReportError, match=r"field `preprocessing` is missing"):
        schema.parse(json.dumps(data).encode(), "new.json")


@pytest.mark.parametrize("version", [0, schema.SCHEMA_VERSION + 1])
def test_a_version_the_reader_does_not_know_is_refused_in_one_line(bench_report, version):
    data = {**schema.to_json(bench_report), "schema_version": version}
    with pytest.raises(schema.ReportError) as err:
        schema.parse(json.dumps(data).encode(), "r.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("r.json: ")
    assert f"{version}" in str(err.value)


def test_the_reports_page_names_every_version_and_its_change():
    page = schema.document()
    assert f"Current `schema_version`: **{schema.SCHEMA_VERSION}**" in page
    for version, change in schema.CHANGES.items():
        assert f"- **{version}**: {change}" in page
    assert "`BenchSettings`" in page and "`Roofline`" in page and "`LayerRow`" in page and "`Preprocessing`" in page


def test_the_committed_reports_are_read_by_this_reader():
    root = Path(__file__).resolve().parents[1]
    for name in ("accuracy_report.json", "perf_report.json"):
        report = schema.load(root / name)  # version 1 (or 2 once regenerated): both read
        assert report.environment.torch


# ------------------------------------------------------------------------------------------ the backend


def test_the_header_names_the_preprocessing_backend_the_run_matched(accuracy_runs, tiny_model_dir):
    outcome, folder = accuracy_runs["images"]
    expected = preprocessing.PreprocessConfig.from_folder(tiny_model_dir)
    written = json.loads((folder / "report.json").read_text(encoding="utf-8"))["preprocessing"]
    assert written == {"processor": expected.processor, "backend": expected.backend, "pipeline": expected.describe()}
    assert written["backend"] == preprocessing.default_backend()


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_the_header_follows_the_backend_of_the_model_loaded(backend):
    loaded = _Loaded()
    loaded.preprocess = dataclasses.replace(preprocessing.PreprocessConfig(), backend=backend)
    header = schema.header("t", [], loaded, devices.environment(devices.Device("cpu")))
    assert header["preprocessing"].backend == backend
    assert f"({backend} backend)" in header["preprocessing"].pipeline


# ------------------------------------------------------------------------------------------------ verify's shared tail


def test_both_verification_paths_write_the_same_report_shape(accuracy_runs):
    images, images_dir = accuracy_runs["images"]
    labelled, labelled_dir = accuracy_runs["labelled"]
    a = json.loads((images_dir / "report.json").read_text(encoding="utf-8"))
    b = json.loads((labelled_dir / "report.json").read_text(encoding="utf-8"))
    assert (a["kind"], b["kind"]) == ("accuracy", "labelled")
    assert list(b) == [*a, "dataset", "images_file"]  # the accuracy report's fields, in order, then the set's own
    for key in ("skipped", "speed", "environment", "target", "thresholds", "aggregate"):
        assert list(a[key]) == list(b[key]), key  # each section written whole by both
    # judged, budgeted, written and returned by the one tail
    assert images.written == [str(images_dir / "report.json")]
    assert labelled.written == [str(labelled_dir / "report.json"), b["images_file"]]
    assert (labelled.skipped["count"], labelled.skipped["of"]) == (1, 4)  # the broken file, against --max_skipped 1
    assert b["skipped"] == labelled.skipped and b["errors"][0]["image"].endswith("broken.jpg")
    assert b["verdict"] == labelled.comparison.verdict and a["verdict"] == images.comparison.verdict
    assert images.layers is images.report.layers and labelled.layers is None


def test_the_shared_tail_judges_a_self_comparison_invalid_on_both_paths(tmp_path, tiny_model_dir):
    """The tail's judging (verify._Run.judged) is the same on both paths: cpu float32 eager is no port check."""
    out = verify.run(dataclasses.replace(settings(tmp_path, tiny_model_dir, images=PHOTOS[:1]), dtype="fp32"))
    assert out.comparison.verdict == "INVALID" and out.report.verdict == "INVALID"
    assert schema.load(tmp_path / "report.json") == out.report


def test_the_header_is_the_schemas_fields_in_order(tiny_model_dir):
    loaded = _Loaded()
    env = devices.environment(devices.Device("cpu"))
    assert [f.name for f in dataclasses.fields(schema.Header)] == list(schema.header("t", [], loaded, env))
