"""The report format (mobilevit_npu/schema.py): every writer writes its kind through it, the reader refuses what does
not match, in one line naming the file and the field. The reports read here are written by the scripts themselves
(tests/card_fixtures.py runs them on the tiny model), never by hand."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from card_fixtures import tiny_reports  # noqa: F401  (a session fixture: the scripts' own reports)
from conftest import PHOTOS, ROOT, labelled_argv, make_labelled_set

import accuracy_run
import port_report
from mobilevit_npu import schema

EXPECTED_KINDS = {
    "accuracy_bf16.json": "accuracy",
    "accuracy_cl.json": "accuracy",
    "perf.json": "benchmark",
    "inference.json": "inference",
}


def raw(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text(encoding="utf-8"))


def test_every_writer_writes_a_versioned_report_of_its_kind(tiny_reports):  # noqa: F811
    for name, kind in EXPECTED_KINDS.items():
        data = raw(tiny_reports, name)
        assert (data["schema_version"], data["kind"]) == (schema.SCHEMA_VERSION, kind), name
        assert list(data)[:2] == ["schema_version", "kind"]
        report = schema.load(tiny_reports / name)
        assert isinstance(report, schema.KINDS[kind])
        assert report.provenance.commit and len(report.provenance.packages_sha256) == 64


def test_a_labelled_run_writes_the_labelled_kind(tmp_path, tiny_model_dir):
    dataset = make_labelled_set(tmp_path / "set", PHOTOS[:3])
    out = tmp_path / "r.json"
    code = accuracy_run.main(labelled_argv(tiny_model_dir, out, dataset, "--dtype", "bf16", "--reference_cache", "off"))
    assert code in (0, 1)
    report = schema.load(out)
    assert isinstance(report, schema.LabelledReport) and report.dataset.images == 3
    assert Path(report.images_file).is_file() and len(Path(report.images_file).read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "path",
    [
        ("verdict",),
        ("aggregate", "cosine_min"),
        ("environment", "torch"),
        ("per_image", 0, "cosine"),
        ("thresholds", "min_cosine"),
        ("provenance", "commit"),
        ("checks", 1, "rule"),
    ],
)
def test_the_reader_refuses_a_report_with_a_field_removed_naming_it(tiny_reports, tmp_path, path):  # noqa: F811
    data = raw(tiny_reports, "accuracy_cl.json")
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    dotted = ".".join(str(p) for p in path).replace(".0.", "[0].").replace(".1.", "[1].")
    with pytest.raises(schema.ReportError, match=rf"^{bad}: field `{dotted.replace('[', '[[]')}` is missing$"):
        schema.load(bad)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["aggregate"].update(cosine_min="0.99"), r"field `aggregate.cosine_min` must be a number, not a "),
        (lambda d: d["per_image"][0].update(top1_agree=1), r"field `per_image\[0\].top1_agree` must be true or false"),
        (lambda d: d.update(notes="one note"), r"field `notes` must be a list"),
        (lambda d: d["target"].update(notes="text"), r"field `target.notes` must be a list"),
        (lambda d: d.update(kind="acuracy"), r"field `kind` 'acuracy' is not a report kind"),
        (lambda d: d.update(schema_version=schema.SCHEMA_VERSION + 1), r"is newer than this code reads"),
        (lambda d: d.pop("schema_version"), r"field `schema_version` is missing"),
        (lambda d: d.update(colour="blue"), r"field `colour` is not part of the `accuracy` report format"),
        (lambda d: d["aggregate"].update(extra=1), r"field `aggregate.extra` is not part of the Aggregate format"),
    ],
)
def test_the_reader_refuses_a_mistyped_unknown_or_newer_report(tiny_reports, tmp_path, edit, message):  # noqa: F811
    data = raw(tiny_reports, "accuracy_cl.json")
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(schema.ReportError, match=message) as caught:
        schema.load(bad)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(bad))


def test_unknown_fields_are_read_when_allowed_and_nan_comes_back_as_nan(tiny_reports, tmp_path):  # noqa: F811
    data = raw(tiny_reports, "accuracy_bf16.json")  # a FAIL: a NaN figure is a finding (a PASS relies on its figures)
    data["colour"] = "blue"
    data["per_image"][0]["cosine"] = None  # what reports.json_safe writes for a NaN
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    report = schema.load(path, allow_unknown=True)
    assert math.isnan(report.per_image[0].cosine)


def test_a_writer_cannot_write_what_the_reader_refuses(tiny_reports):  # noqa: F811
    report = schema.load(tiny_reports / "accuracy_cl.json")
    broken = copy.deepcopy(report)
    broken.verdict_reasons = "not a list"
    with pytest.raises(schema.ReportError, match="field `verdict_reasons` must be a list"):
        schema.to_json(broken)
    assert schema.validate(schema.to_json(report), "written again") == report  # read, written, read: the same


def test_port_report_refuses_a_report_with_a_field_removed(tiny_reports, tmp_path, capsys):  # noqa: F811
    data = raw(tiny_reports, "accuracy_cl.json")
    del data["aggregate"]["cosine_min"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    code = port_report.main([str(bad), str(tiny_reports / "perf.json"), "--output", str(tmp_path / "card.md")])
    assert code in (1, 2) and not (tmp_path / "card.md").exists()
    assert "field `aggregate.cosine_min` is missing" in capsys.readouterr().err


def test_docs_reports_page_is_generated_from_the_schema():
    page = ROOT / "docs" / "reports.md"
    assert page.read_text(encoding="utf-8") == schema.document(), (
        "docs/reports.md is stale: python -c 'from mobilevit_npu import schema; print(schema.document(), end=\"\")' "
        "> docs/reports.md"
    )
    for kind in schema.KINDS:
        assert f"## `{kind}`" in page.read_text(encoding="utf-8")
