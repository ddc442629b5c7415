"""labelsets and distributed: labelled folders, sharding, the resumable journal, torchrun (gloo) runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import PHOTOS, ROOT, labelled_argv, make_labelled_set, read_json

from mobilevit_npu import distributed, errors, labelsets, preprocessing, refcache, targets

WNIDS = labelsets.imagenet_wnids()


def test_wnid_list_is_imagenet_1k_order():
    assert len(WNIDS) == 1000 == len(set(WNIDS))
    assert WNIDS[0] == "n01440764" and WNIDS[281] == "n02123045" and WNIDS[999] == "n15075141"
    assert WNIDS == sorted(WNIDS)  # ImageNet-1k's class order is the sorted wnids


def make_folder(root, layout: str):
    """Five real photos as an ImageNet-style set: wnid or index subfolders, or flat <wnid>_x.png files."""
    labels = [281, 281, 504, 967, 812]
    for i, (photo, label) in enumerate(zip(PHOTOS, labels)):
        name = os.path.basename(photo)
        if layout == "wnid":
            dest = root / WNIDS[label] / name
        elif layout == "index":
            dest = root / str(label) / name
        else:
            dest = root / f"{WNIDS[label]}_{i}_{name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, dest)
    return labels


@pytest.mark.parametrize("layout", ["wnid", "index", "flat"])
def test_scan_folder_layouts(tmp_path, layout):
    labels = make_folder(tmp_path, layout)
    samples, unlabelled = labelsets.scan_folder(tmp_path)
    assert sorted(s.label for s in samples) == sorted(labels)
    assert unlabelled == []
    assert all(os.path.isfile(s.image) for s in samples)


def test_scan_folder_rejects_unknown_class_folders(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(errors.UserError, match="neither an ImageNet wnid nor a class index"):
        labelsets.scan_folder(tmp_path)


def test_flat_files_without_wnid_are_listed(tmp_path):
    make_folder(tmp_path, "flat")
    shutil.copy(PHOTOS[0], tmp_path / "holiday.png")
    samples, unlabelled = labelsets.scan_folder(tmp_path)
    assert len(samples) == 5 and [u["image"] for u in unlabelled] == [str(tmp_path / "holiday.png")]


def test_labels_csv(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("image,class_id\n" + "".join(f"{p},{i}\n" for i, p in enumerate(PHOTOS)) + "rel.png,7\n")
    samples = labelsets.read_labels_csv(csv)
    assert [s.label for s in samples] == [0, 1, 2, 3, 4, 7]
    assert samples[-1].image == str(tmp_path / "rel.png")
    csv.write_text("a.png,1000\n")
    with pytest.raises(errors.UserError, match="outside"):
        labelsets.read_labels_csv(csv)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_item_once(world):
    items = list(range(11))
    shards = [distributed.Distributed(rank=r, world_size=world).shard(items) for r in range(world)]
    assert sorted(sum(shards, [])) == items
    assert all(shards)  # every rank given work
    assert distributed.Distributed.unshard(shards) == items  # gathered results go back in the input's order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_stream_reports_bad_images_and_keeps_going(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    sources = [PHOTOS[0], str(bad), PHOTOS[1]]
    batches = list(labelsets.stream(sources, preprocessing.PreprocessConfig(), batch_size=2, workers=1))
    ok = [i for indices, _, _ in batches for i in indices]
    errors = [e for _, _, errs in batches for e in errs]
    assert ok == [0, 2] and [i for i, _ in errors] == [1]
    assert batches[0][1].shape == (1, 3, 256, 256)
    expected = torch.from_numpy(preprocessing.preprocess(PHOTOS[1], preprocessing.PreprocessConfig()))
    assert torch.equal(batches[1][1][0], expected)


def _worker_priority(_):
    labelsets._worker_init(0)
    return os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None, os.nice(0), torch.get_num_threads()


def test_decoding_workers_never_compete_with_the_model():
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process: the change cannot leak into pytest
        policy, nice, threads = pool.map(_worker_priority, [0])[0]
    assert threads == 1
    if hasattr(os, "SCHED_IDLE"):
        assert policy == os.SCHED_IDLE
    else:
        assert nice == 19


@pytest.mark.parametrize(("cores", "world", "expected"), [(2, 1, 2), (4, 2, 2), (2, 4, 1), (None, 1, 1), (64, 1, 8)])
def test_default_workers_share_the_cores_among_ranks(monkeypatch, cores, world, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    workers = labelsets.default_workers(world)
    assert workers == expected  # one per core of this rank's share, at least one, at most 8
    assert workers * world <= max(cores or 1, world)  # the ranks' workers together never outnumber the cores


def test_workers_send_uint8_crops_in_shared_memory_and_the_input_equals_in_process_decoding(monkeypatch):
    sources = PHOTOS[:3]
    cfg = preprocessing.PreprocessConfig()
    sent = []
    to_input = preprocessing.to_input
    monkeypatch.setattr(preprocessing, "to_input", lambda pixels, c: sent.append(pixels) or to_input(pixels, c))
    [(_, in_process, _)] = list(labelsets.stream(sources, cfg, batch_size=3, workers=0))
    [(indices, from_worker, _)] = list(labelsets.stream(sources, cfg, batch_size=3, workers=1))
    assert indices == [0, 1, 2]
    assert [(x.dtype, x.is_shared()) for x in sent] == [(torch.uint8, False), (torch.uint8, True)]
    assert sent[1].shape == (3, 256, 256, 3)  # HWC crops: a quarter of the float32 input's bytes
    assert torch.equal(from_worker, in_process) and from_worker.dtype == torch.float32
    expected = torch.stack([torch.from_numpy(preprocessing.preprocess(p, cfg)) for p in sources])
    assert torch.equal(from_worker, expected)  # the batch conversion is bit for bit the one-image path


def fake_process(calls):
    def process(batch, pixels):
        calls.extend(s.image for s in batch)
        return [{"image": s.image, "label": s.label, "mean": float(x.mean())} for s, x in zip(batch, pixels)]

    return process


def test_run_journals_and_resumes(tmp_path):
    make_folder(tmp_path / "set", "wnid")
    samples, _ = labelsets.scan_folder(tmp_path / "set")
    report = tmp_path / "report.json"
    dist = distributed.Distributed()
    key = {"model": "x"}
    calls: list[str] = []
    journal = labelsets.Journal(report, dist, key, resume=False)
    cfg = preprocessing.PreprocessConfig()
    records, per_rank = labelsets.run_shards(samples[:3], cfg, fake_process(calls), dist, 2, 0, journal)
    journal.close(remove=False)
    assert len(records) == 3 and per_rank == [3]
    lines = (tmp_path / "report.json.parts" / "rank0.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["record"]["image"] for e in entries] == [s.image for s in samples[:3]]
    assert all(
        e["v"] == labelsets.JOURNAL_FORMAT and e["sha256"] == refcache.file_digest(e["record"]["image"])
        for e in entries
    )
    with open(tmp_path / "report.json.parts" / "rank0.jsonl", "a") as fh:
        fh.write('{"image": "torn')  # a crash mid-line

    calls.clear()
    journal = labelsets.Journal(report, dist, key, resume=True)
    records, per_rank = labelsets.run_shards(samples, cfg, fake_process(calls), dist, 2, 0, journal)
    journal.close(remove=True)
    assert calls == [s.image for s in samples[3:]]  # finished images are not redone
    assert [r["image"] for r in records] == [s.image for s in samples] and per_rank == [5]  # resumed ones too
    assert not (tmp_path / "report.json.parts").exists()


def test_resume_refuses_a_different_run(tmp_path):
    dist = distributed.Distributed()
    labelsets.Journal(tmp_path / "r.json", dist, {"dtype": "fp32"}, resume=False).close(remove=False)
    with pytest.raises(errors.UserError, match="different run"):
        labelsets.Journal(tmp_path / "r.json", dist, {"dtype": "bf16"}, resume=True)


def torchrun(nproc: int, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(ROOT / script),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.slow
def test_inference_under_torchrun_matches_one_process(tiny_model_dir, tmp_path, nproc):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        shutil.copy(photo, folder)
    (folder / "broken.png").write_text("not a png")
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    args = ["--model_path", str(tiny_model_dir), "--image", str(folder), "--device", "cpu", "--top_k", "3"]
    import inference

    assert inference.main(["--allocator", "system", *args, "--output", str(single)]) == 1
    proc = torchrun(nproc, "inference.py", *args, "--output", str(multi))
    assert proc.returncode == 1, proc.stderr[-3000:]  # rank 0 exits 1 for the broken image, as one process does
    assert "ProcessGroupGloo" not in proc.stderr and "abort" not in proc.stderr.lower()
    one, many = read_json(single), read_json(multi)
    assert [r["image"] for r in many["results"]] == [r["image"] for r in one["results"]]
    for a, b in zip(one["results"], many["results"]):
        assert [p["class_id"] for p in a["predictions"]] == [p["class_id"] for p in b["predictions"]]
        assert abs(a["predictions"][0]["probability"] - b["predictions"][0]["probability"]) < 1e-5
    assert [e["image"] for e in many["errors"]] == [str(folder / "broken.png")]
    assert len(many["per_rank_images"]) == nproc and sum(many["per_rank_images"]) == len(PHOTOS) + 1
    assert min(many["per_rank_images"]) >= 1


# -------------------------------------------------------------------------------------------- accuracy_run --dataset


@pytest.fixture
def labelled_set(tmp_path):
    """The photos as a 5-class set in index folders (the tiny model has 10 classes), plus one broken file."""
    root = make_labelled_set(tmp_path / "set")
    (root / "2" / "broken.png").write_text("not a png")
    return root


def labelled_args(model_dir, root, report, *extra):
    # a CPU port check (float32 eager against itself is INVALID); the set holds one broken file
    return labelled_argv(model_dir, report, root, "--max_skipped", "1", "--target_mode", "channels_last", *extra)


def test_accuracy_on_a_labelled_folder(tiny_model_dir, labelled_set, tmp_path, capsys):
    import accuracy_run

    report = tmp_path / "report.json"
    assert accuracy_run.main(labelled_args(tiny_model_dir, labelled_set, report)) == 0
    data = read_json(report)["dataset"]
    assert data["images"] == 5 and data["skipped"] == 1 and data["per_rank_images"] == [6]
    assert data["agreement_top1"] == 1.0 and data["disagreements"] == []
    assert data["reference"] == data["target"]  # channels_last: the same classes as the reference
    records = [json.loads(line) for line in (tmp_path / "report.images.jsonl").read_text().splitlines()]
    assert sum("error" not in r for r in records) == 5  # per-class counts live in the per-image records
    assert read_json(report)["errors"][0]["image"].endswith("broken.png")
    lines = (tmp_path / "report.images.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert not (tmp_path / "report.json.parts").exists()  # the journal goes once the report is written
    out = capsys.readouterr().out
    assert "reference top-1" in out and "VERDICT: PASS" in out


def test_labels_csv_run(tiny_model_dir, tmp_path):
    import accuracy_run

    csv = tmp_path / "labels.csv"
    csv.write_text("image,class_id\n" + "".join(f"{p},{i}\n" for i, p in enumerate(PHOTOS[:3])))
    report = tmp_path / "r.json"
    assert (
        accuracy_run.main(
            [
                "--allocator",
                "system",
                str(tiny_model_dir),
                str(report),
                "--labels",
                str(csv),
                "--device",
                "cpu",
                "--workers",
                "0",
                "--target_mode",
                "channels_last",
            ]
        )
        == 0
    )
    assert read_json(report)["dataset"]["images"] == 3


def test_killed_run_resumes_without_redoing_images(tiny_model_dir, labelled_set, tmp_path, monkeypatch):
    import accuracy_run

    report = tmp_path / "report.json"
    seen: list[int] = []
    kill = [True]
    real = targets.Side.logits

    def logits(self, pixels, model=None):
        if self.dtype == "fp32" and self.mode == "eager" and model is None and self.device.type == "cpu":
            seen.append(pixels.shape[0])
            if kill[0] and len(seen) == 2:  # the reference's 2nd batch: the run dies after one batch is journaled
                raise KeyboardInterrupt
        return real(self, pixels, model)

    monkeypatch.setattr(targets.Side, "logits", logits)
    args = labelled_args(tiny_model_dir, labelled_set, report, "--target_mode", "channels_last")
    assert accuracy_run.main(args) == 130
    assert not report.exists()
    journaled = (tmp_path / "report.json.parts" / "rank0.jsonl").read_text().splitlines()
    assert len(journaled) == 2  # the first batch of two images

    seen.clear()
    kill[0] = False
    assert accuracy_run.main(["--allocator", "system", *args, "--resume"]) == 0
    data = read_json(report)["dataset"]
    assert data["images"] + data["skipped"] == 6
    assert sum(seen) == 3  # the resumed run ran only the 3 good images that were left (the 4th left is broken)


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.slow
def test_accuracy_under_torchrun_matches_one_process(tiny_model_dir, labelled_set, tmp_path, nproc):
    import accuracy_run

    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    rc = accuracy_run.main(labelled_args(tiny_model_dir, labelled_set, single, "--dtype", "bf16"))
    proc = torchrun(nproc, "accuracy_run.py", *labelled_args(tiny_model_dir, labelled_set, multi, "--dtype", "bf16"))
    assert proc.returncode == rc, proc.stderr[-3000:]  # the same verdict (the tiny model may well FAIL in bf16)
    assert read_json(single)["verdict"] == read_json(multi)["verdict"]
    one, many = read_json(single)["dataset"], read_json(multi)["dataset"]
    for key in ("images", "skipped", "reference", "target", "agreement_top1"):
        assert one[key] == many[key], key
    by_image = sorted(one["disagreements"], key=lambda d: d["image"])  # ranks take every N-th image: order differs
    assert by_image == sorted(many["disagreements"], key=lambda d: d["image"])
    assert len(many["per_rank_images"]) == nproc and sum(many["per_rank_images"]) == 6
    assert min(many["per_rank_images"]) >= 1  # every rank given work
    images = [json.loads(line)["image"] for line in (tmp_path / "multi.images.jsonl").read_text().splitlines()]
    assert len(images) == len(set(images)) == 6  # each image exactly once
    assert "destroy_process_group" not in proc.stderr and "abort" not in proc.stderr.lower()
