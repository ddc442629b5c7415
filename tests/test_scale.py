"""Verification at scale: the reference cache, the pipeline (Pair), the allocator in every report, compile once."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import PHOTOS, ROOT, read_json
from torch._dynamo.utils import counters

import accuracy_run
from mobilevit_npu import atomic, compilers, devices, execution, labelsets, preprocessing, refcache, targets

# --------------------------------------------------------------------------------------------------------------------
# refcache: entries, corruption, staleness, concurrency
# --------------------------------------------------------------------------------------------------------------------

KEY = {"format": refcache.FORMAT, "weights_sha256": "ab" * 32, "torch": torch.__version__, "transformers": "x"}


def logits(seed: int, classes: int = 1000) -> torch.Tensor:
    return torch.randn(classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()


def test_entry_round_trip_is_exact(tmp_path):
    cache = refcache.ReferenceCache(tmp_path, KEY)
    assert cache.get("00" * 32) is None and cache.stats.invalid == 0  # absent: a plain miss
    row = logits(1)
    cache.put("00" * 32, row)
    again = refcache.ReferenceCache(tmp_path, KEY).get("00" * 32)
    assert again.dtype == torch.float64 and torch.equal(again, row)  # float32 logits survive bit for bit
    assert (cache.folder / "key.json").is_file() and cache.stats.stored == 1


def entry(cache: refcache.ReferenceCache, digest: str) -> Path:
    cache.put(digest, logits(2))
    return cache.path(digest)


def rewrite_header(path: Path, **changes) -> None:
    """A well-formed entry whose header says something else (checksum still right): stale, not corrupt."""
    data = path.read_bytes()
    end = data.index(b"\n", len(refcache.MAGIC))
    header = {**json.loads(data[len(refcache.MAGIC) : end]), **changes}
    path.write_bytes(refcache.MAGIC + json.dumps(header).encode() + b"\n" + data[end + 1 :])


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-7]), id="truncated"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-4] + b"\x00\x00\xc0\x7f"), id="flipped-payload"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p: p.write_bytes(refcache.MAGIC + b"{not json"), id="torn-header"),
        pytest.param(lambda p: p.write_text("hello"), id="foreign-file"),
        pytest.param(lambda p: rewrite_header(p, torch="1.0.0"), id="stale-torch"),
        pytest.param(lambda p: rewrite_header(p, transformers="0.1"), id="stale-transformers"),
        pytest.param(lambda p: rewrite_header(p, key="0" * 64), id="other-key"),
        pytest.param(lambda p: rewrite_header(p, digest="1" * 64), id="other-image"),
    ],
)
def test_damaged_or_stale_entries_are_never_trusted(tmp_path, damage):
    cache = refcache.ReferenceCache(tmp_path, KEY)
    path = entry(cache, "aa" * 32)
    damage(path)
    assert cache.get("aa" * 32) is None
    assert cache.stats.invalid == 1
    cache.put("aa" * 32, logits(3))  # recomputed and overwritten: trusted again
    assert torch.equal(cache.get("aa" * 32), logits(3))


def test_key_covers_weights_preprocessing_and_versions(tiny_model_dir):
    from mobilevit_npu import models

    loaded = models.load_model(str(tiny_model_dir))
    base = refcache.reference_key(loaded.model, loaded.source, loaded.preprocess)
    assert base["weights_sha256"] == models.weights_digest(loaded.model)  # the weights loaded, not the file
    assert {"torch", "transformers", "pixels", "model_config_sha256"} <= set(base)
    assert {"preprocess", "code_sha256", "pillow", "libjpeg"} <= set(base["pixels"])  # the decoder too
    other_cfg = preprocessing.PreprocessConfig(shortest_edge=300)
    assert refcache.reference_key(loaded.model, loaded.source, other_cfg) != base
    assert refcache.pixels_key(other_cfg) != refcache.pixels_key(loaded.preprocess)
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1e-3)
    changed = refcache.reference_key(loaded.model, loaded.source, loaded.preprocess)["weights_sha256"]
    assert changed != base["weights_sha256"]  # same file, other tensors in memory: another key


def test_weights_digest_hashes_bfloat16_and_tells_dtypes_apart():
    from mobilevit_npu import models

    module = Small().eval()
    fp32 = models.weights_digest(module)
    bf16 = models.weights_digest(module.to(torch.bfloat16))  # no numpy bfloat16: hashed as raw bytes
    assert bf16 != fp32 and models.weights_digest(module) == bf16
    with torch.no_grad():
        module.conv.weight.view(-1)[0] += 1.0  # one bfloat16 element moved
    assert models.weights_digest(module) != bf16


def test_file_digest_is_the_content_not_the_name(tmp_path):
    copy = tmp_path / "renamed.png"
    shutil.copy(PHOTOS[0], copy)
    assert refcache.file_digest(str(copy)) == refcache.file_digest(PHOTOS[0]) != refcache.file_digest(PHOTOS[1])
    assert refcache.file_digest("https://example.com/x.jpg") is None
    assert refcache.file_digest(str(tmp_path / "missing.png")) is None


def _writer(root: str, seed: int, rounds: int) -> None:
    cache = refcache.ReferenceCache(root, KEY)
    for r in range(rounds):
        for i in range(20):
            cache.put(f"{i:064x}", logits(seed * 1000 + r))


def test_concurrent_writers_never_leave_a_bad_entry(tmp_path):
    """Two processes (ranks) rewrite the same 20 entries over and over while this one reads them: every read is a
    complete entry written by one of them, or a plain miss before the first write; no temp file is left behind."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), seed, 15)) for seed in (1, 2)]
    for p in procs:
        p.start()
    valid = {tuple(logits(s * 1000 + r).tolist()) for s in (1, 2) for r in range(15)}
    reader = refcache.ReferenceCache(tmp_path, KEY)
    reads = 0
    while any(p.is_alive() for p in procs) or reads == 0:
        for i in range(20):
            row = reader.get(f"{i:064x}")
            if row is not None:
                assert tuple(row.tolist()) in valid
                reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert reader.stats.invalid == 0 and reads > 0
    assert not list(tmp_path.rglob("*.tmp"))


def test_unwritable_cache_is_reported_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    cache = refcache.ReferenceCache(blocker / "cache", KEY)
    cache.put("bb" * 32, logits(4))
    assert cache.stats.stored == 0 and cache.stats.write_errors
    assert cache.get("bb" * 32) is None


def test_open_cache_off_and_default(tmp_path, tiny_model_dir, monkeypatch):
    from mobilevit_npu import models

    loaded = models.load_model(str(tiny_model_dir))
    assert refcache.open_cache("off", loaded.model, loaded.source, loaded.preprocess) is None
    monkeypatch.setenv(refcache.CACHE_ENV, str(tmp_path / "c"))
    cache = refcache.open_cache(None, loaded.model, loaded.source, loaded.preprocess)
    assert cache.root == tmp_path / "c" / "reference"
    monkeypatch.delenv(refcache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert refcache.default_root() == tmp_path / "xdg" / "mobilevit-npu" / "reference"


# --------------------------------------------------------------------------------------------------------------------
# Pair: cached reference, concurrency of the sides
# --------------------------------------------------------------------------------------------------------------------


class SlowSide:
    """A stand-in side: fixed logits per input row after `delay` seconds, recording when it ran."""

    def __init__(self, device: str, delay: float, offset: float = 0.0):
        self.device, self.delay, self.offset, self.spans, self.calls = devices.Device(device), delay, offset, [], 0

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        self.calls += 1
        time.sleep(self.delay)
        self.spans.append((start, time.perf_counter(), threading.get_ident()))
        return pixels.flatten(1)[:, :10].double() + self.offset


class MeetingSide(SlowSide):
    """A side that can only finish once the other side has started too (a shared barrier): run one after the other,
    the first waits for a partner that never comes and the barrier breaks. No clock is read."""

    def __init__(self, device: str, barrier: threading.Barrier, offset: float = 0.0):
        super().__init__(device, 0.0, offset)
        self.barrier = barrier

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        self.barrier.wait()  # BrokenBarrierError after its timeout when the sides run in turn
        return super().logits(pixels)


def test_pair_runs_the_sides_concurrently_on_different_devices():
    barrier = threading.Barrier(2, timeout=30)
    reference, target = MeetingSide("cpu", barrier), MeetingSide("cuda", barrier, offset=1.0)
    pair = targets.Pair(reference, target)
    assert pair.concurrent
    pixels = torch.rand(4, 3, 8, 8)
    ref, tgt, cached = pair.run(pixels)
    pair.close()
    assert not barrier.broken and reference.calls == target.calls == 1  # both were inside logits() at once
    assert reference.spans[0][2] != target.spans[0][2]  # on two threads
    assert torch.equal(tgt - ref, torch.ones_like(ref)) and cached == [False] * 4
    summary = pair.summary()
    assert summary["reference_computed"] == 4 and summary["target_images"] == 4
    assert summary["reference_images_per_s"] and summary["target_images_per_s"]


def test_side_timing_keeps_the_first_call_apart():
    timing = targets.SideTiming()
    timing.add(32, 2.0)  # start-up costs
    timing.add(32, 1.0)
    timing.add(32, 1.0)
    assert timing.images_per_s == 24.0 and timing.steady_images_per_s == 32.0
    assert targets.SideTiming().images_per_s is None and targets.SideTiming().steady_images_per_s is None


def test_pair_on_one_device_runs_one_side_after_the_other():
    reference, target = SlowSide("cpu", 0.05), SlowSide("cpu", 0.05)
    pair = targets.Pair(reference, target)
    assert not pair.concurrent
    pair.run(torch.rand(2, 3, 8, 8))
    assert reference.spans[0][1] <= target.spans[0][0]


def test_pair_computes_only_what_the_cache_lacks(tmp_path):
    cache = refcache.ReferenceCache(tmp_path, KEY)
    pixels = torch.rand(3, 3, 8, 8)
    digests = ["01" * 32, "02" * 32, None]
    first = targets.Pair(SlowSide("cpu", 0), SlowSide("cpu", 0), cache)
    ref1, _, cached = first.run(pixels, digests)
    assert cached == [False, False, False] and cache.stats.stored == 2  # the URL-like image (no digest) is not stored
    reference = SlowSide("cpu", 0)
    second = targets.Pair(reference, SlowSide("cpu", 0), cache)
    ref2, _, cached = second.run(pixels, digests)
    assert cached == [True, True, False] and second.cached == 2 and second.computed == 1
    assert torch.equal(ref1, ref2)
    assert reference.calls == 1  # one call, for the one row the cache lacked


# --------------------------------------------------------------------------------------------------------------------
# accuracy_run: the cache in both modes, per-run counts, corruption, off; the allocator recorded
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def labelled(tmp_path):
    """The photos as a flat ImageNet-style set (<wnid>_x.png)."""
    root = tmp_path / "set"
    root.mkdir()
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
    for wnid, photo in zip(wnids, PHOTOS):
        shutil.copy(photo, root / f"{wnid}_{Path(photo).stem}{Path(photo).suffix}")
    return root


def dataset_run(model_dir, root, report, cache, *extra) -> dict:
    argv = [
        str(model_dir),
        str(report),
        "--dataset",
        str(root),
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--workers",
        "0",
        "--allocator",
        "system",
        "--reference_cache",
        str(cache),
        *extra,
    ]
    rc = accuracy_run.main(argv)
    data = read_json(report)
    # these runs test the caches: a float32 eager target is the reference itself, INVALID (exit 1), never FAIL
    itself = data["compared"] == "cpu float32 eager  vs  cpu float32 eager"
    assert (rc, data["verdict"]) == ((1, "INVALID") if itself else (0, "PASS")), data["verdict_reasons"]
    return data


def test_second_run_with_another_target_computes_only_the_target(tiny_model_dir, labelled, tmp_path, capsys):
    cache = tmp_path / "refs"
    first = dataset_run(tiny_model_dir, labelled, tmp_path / "a.json", cache)
    n = len(PHOTOS)
    assert first["speed"]["reference_computed"] == n and first["speed"]["reference_cached"] == 0
    assert first["speed"]["cache"]["stored"] == n
    assert "0 cached, 5 computed" in capsys.readouterr().out

    second = dataset_run(tiny_model_dir, labelled, tmp_path / "b.json", cache, "--target_mode", "channels_last")
    speed = second["speed"]
    assert speed["reference_cached"] == n and speed["reference_computed"] == 0
    assert speed["reference_images_per_s"] is None
    assert speed["target_images_per_s"] > 0 and speed["target_first_batch_s"] > 0
    assert speed["target_images_per_s_after_first_batch"] > 0  # 3 batches of 2, 2, 1: two after the first
    assert f"{n} cached, 0 computed" in capsys.readouterr().out
    assert second["dataset"]["reference"] == first["dataset"]["reference"]  # the same reference top-1/top-5
    assert all(r["reference_cached"] for r in map(json.loads, open(tmp_path / "b.images.jsonl")))


def test_target_warms_up_once_the_workers_started_and_outside_the_timing(
    tiny_model_dir, labelled, tmp_path, monkeypatch
):
    events = []
    real_stream, real_logits = labelsets.stream, targets.Side.logits

    def stream(*args, **kwargs):
        batches = real_stream(*args, **kwargs)  # starts the workers, as the real one does, before any next()
        events.append("workers started")

        def recorded():
            for batch in batches:
                events.append(f"batch of {len(batch[0])}")
                yield batch

        return recorded()

    def logits(self, pixels, on_hook_model=False):
        if self.mode != "eager" or self.dtype != "fp32":  # the target (the reference is fp32 eager)
            events.append(f"target call on {pixels.shape[0]}" + (" zeros" if not pixels.any() else ""))
        return real_logits(self, pixels, on_hook_model)

    monkeypatch.setattr(labelsets, "stream", stream)
    monkeypatch.setattr(targets.Side, "logits", logits)
    report = dataset_run(
        tiny_model_dir,
        labelled,
        tmp_path / "w.json",
        tmp_path / "refs",
        "--target_mode",
        "channels_last",
        "--workers",
        "1",
    )
    assert events[:3] == ["workers started", "target call on 2 zeros", "batch of 2"]
    assert events.count("target call on 2 zeros") == 1
    speed = report["speed"]
    assert speed["target_warmup_s"] > 0 and speed["target_images"] == len(PHOTOS)  # the warm-up's rows not counted


RELEASE_CHECK = """
import os, sys, torch
from mobilevit_npu import malloc
if not sys.platform.startswith("linux") or malloc._preloaded_allocator():
    print("unsupported", malloc.release_free_memory()); sys.exit()
malloc.tune_malloc()  # no mmap, no trimming on free: freed pages stay mapped until released
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
blocks = [torch.ones(8 << 20) for _ in range(8)]  # 256 MB, touched
keep = torch.ones(1)  # allocated last: the freed blocks below it are not at the heap's top
del blocks
before = rss()
released = malloc.release_free_memory()
print("released", released, before - rss())
"""


def test_release_free_memory_unmaps_freed_heap_pages():
    # its own process: tune_malloc cannot be undone, and the suite's process keeps the system allocator
    out = subprocess.run(
        [sys.executable, "-c", RELEASE_CHECK],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    if words[0] == "unsupported":
        assert words[1] == "False"
        return
    assert words[1] == "True" and int(words[2]) > 128 << 20


def test_a_damaged_entry_is_recomputed_in_a_run(tiny_model_dir, labelled, tmp_path):
    cache = tmp_path / "refs"
    first = dataset_run(tiny_model_dir, labelled, tmp_path / "a.json", cache)
    entries = sorted(cache.rglob("*.ref"))
    assert len(entries) == len(PHOTOS)
    entries[0].write_bytes(entries[0].read_bytes()[:-100])  # a torn write
    second = dataset_run(tiny_model_dir, labelled, tmp_path / "b.json", cache)
    assert second["speed"]["cache"]["invalid"] == 1
    assert second["speed"]["reference_computed"] == 1 and second["speed"]["reference_cached"] == len(PHOTOS) - 1
    assert second["aggregate"]["top1_agree_count"] == first["aggregate"]["top1_agree_count"]
    assert second["aggregate"]["cosine_min"] == pytest.approx(first["aggregate"]["cosine_min"], abs=1e-9)
    first_rows = {r["image"]: r for r in map(json.loads, open(tmp_path / "a.images.jsonl"))}
    for r in map(json.loads, open(tmp_path / "b.images.jsonl")):  # the recomputed row: the same reference top-5
        assert r["reference_top5"] == first_rows[r["image"]]["reference_top5"]


def test_pixel_cache_is_read_instead_of_decoding_and_gives_the_same_input(tmp_path, monkeypatch):
    cfg = preprocessing.PreprocessConfig()
    cache = refcache.PixelCache(tmp_path / "pix", refcache.pixels_key(cfg))
    [(_, decoded, _, digests)] = list(labelsets.stream(PHOTOS, cfg, len(PHOTOS), 1, True, cache))  # a worker fills it
    assert (cache.stats.computed, cache.stats.stored, cache.stats.cached) == (len(PHOTOS), len(PHOTOS), 0)
    assert len(list((tmp_path / "pix").rglob("*.pix"))) == len(PHOTOS)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the pixel cache holds the image")

    monkeypatch.setattr(preprocessing, "preprocess", no_decoding)
    again = refcache.PixelCache(tmp_path / "pix", refcache.pixels_key(cfg))
    [(_, cached, errors, digests_again)] = list(labelsets.stream(PHOTOS, cfg, len(PHOTOS), 0, True, again))
    assert not errors and digests_again == digests
    assert (again.stats.cached, again.stats.computed) == (len(PHOTOS), 0)
    assert torch.equal(cached, decoded)  # bit for bit the decoded input


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(flip_last_byte, id="flipped-pixel"),
        pytest.param(lambda p: rewrite_header(p, pillow="12.0.0"), id="stale-pillow"),
        pytest.param(lambda p: rewrite_header(p, shape=[256, 256, 4]), id="wrong-shape"),
    ],
)
def test_a_damaged_or_stale_pixel_entry_is_decoded_again(tmp_path, damage):
    cfg = preprocessing.PreprocessConfig()
    cache = refcache.PixelCache(tmp_path, refcache.pixels_key(cfg))
    digest = refcache.file_digest(PHOTOS[0])
    first = cache.pixels(PHOTOS[0], digest, cfg)
    damage(cache.path(digest))
    again = refcache.PixelCache(tmp_path, refcache.pixels_key(cfg))
    assert np.array_equal(again.pixels(PHOTOS[0], digest, cfg), first)
    assert (again.stats.invalid, again.stats.computed, again.stats.stored) == (1, 1, 1)
    other = refcache.PixelCache(tmp_path, refcache.pixels_key(dataclasses.replace(cfg, shortest_edge=300)))
    assert other.get_array(digest) is None and other.stats.invalid == 0  # another key: another folder, a plain miss


def test_dataset_run_with_pixel_cache_reports_and_reuses_it(tiny_model_dir, labelled, tmp_path, capsys):
    n = len(PHOTOS)
    first = dataset_run(
        tiny_model_dir,
        labelled,
        tmp_path / "a.json",
        tmp_path / "refs",
        "--pixel_cache",
        str(tmp_path / "pix"),
        "--workers",
        "1",
    )
    assert first["speed"]["pixel_cache"]["computed"] == n and first["speed"]["pixel_cache"]["stored"] == n
    assert first["speed"]["decode_wait_s"] > 0
    second = dataset_run(
        tiny_model_dir,
        labelled,
        tmp_path / "b.json",
        tmp_path / "refs",
        "--pixel_cache",
        str(tmp_path / "pix"),
        "--workers",
        "1",
    )
    pixels = second["speed"]["pixel_cache"]
    assert (pixels["cached"], pixels["computed"], pixels["folder"].startswith(str(tmp_path / "pix"))) == (n, 0, True)
    assert f"pixels {n} cached, 0 decoded" in capsys.readouterr().out
    assert second["aggregate"]["cosine_min"] == first["aggregate"]["cosine_min"]
    third = dataset_run(tiny_model_dir, labelled, tmp_path / "c.json", tmp_path / "refs")
    assert third["speed"]["pixel_cache"] is None  # off unless given


def test_pixel_cache_on_uses_the_default_folder_and_needs_a_set(
    tiny_model_dir, labelled, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(refcache.CACHE_ENV, str(tmp_path / "default"))
    report = dataset_run(tiny_model_dir, labelled, tmp_path / "a.json", "off", "--pixel_cache", "on")
    assert report["speed"]["pixel_cache"]["folder"].startswith(str(tmp_path / "default" / "pixels"))
    assert len(list((tmp_path / "default" / "pixels").rglob("*.pix"))) == len(PHOTOS)
    argv = [
        str(tiny_model_dir),
        str(tmp_path / "b.json"),
        "--device",
        "cpu",
        "--images",
        PHOTOS[0],
        "--pixel_cache",
        "on",
    ]
    assert accuracy_run.main(argv) == 2  # a usage error: the pixel cache is for --dataset / --labels
    assert "--pixel_cache go with --dataset or --labels" in capsys.readouterr().err


def test_images_mode_uses_the_cache_and_off_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(refcache.CACHE_ENV, str(tmp_path / "default"))
    argv = [
        str(tiny_model_dir),
        str(tmp_path / "r.json"),
        "--device",
        "cpu",
        "--allocator",
        "system",
        "--images",
        *PHOTOS[:3],
        "--target_mode",
        "channels_last",
    ]
    assert accuracy_run.main(argv) == 0
    assert read_json(tmp_path / "r.json")["speed"]["reference_computed"] == 3
    assert len(list((tmp_path / "default" / "reference").rglob("*.ref"))) == 3  # the default folder
    assert accuracy_run.main(argv) == 0
    report = read_json(tmp_path / "r.json")
    assert report["speed"]["reference_cached"] == 3 and report["speed"]["reference_computed"] == 0
    shutil.rmtree(tmp_path / "default")
    assert accuracy_run.main([*argv, "--reference_cache", "off"]) == 0
    assert read_json(tmp_path / "r.json")["speed"]["cache"] is None
    assert not (tmp_path / "default").exists()


def test_allocator_is_recorded_system_in_process(tiny_model_dir, tmp_path):
    report = tmp_path / "r.json"
    argv = [
        str(tiny_model_dir),
        str(report),
        "--device",
        "cpu",
        "--allocator",
        "system",
        "--images",
        PHOTOS[0],
        "--target_mode",
        "channels_last",
        "--reference_cache",
        "off",
    ]
    assert accuracy_run.main(argv) == 0
    env = read_json(report)["environment"]
    assert env["allocator"]["tuned"] is False and env["allocator"]["name"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is glibc-only")
def test_tuned_allocator_by_default_in_its_own_process(tiny_model_dir, tmp_path):
    """The default (--allocator tuned) changes malloc for the whole process: it runs in a subprocess, never in the
    test process."""
    acc, inf = tmp_path / "acc.json", tmp_path / "inf.json"
    env = {**os.environ, refcache.CACHE_ENV: str(tmp_path / "cache")}
    script = (
        "import accuracy_run, inference, sys; "
        f"a = accuracy_run.main([{str(tiny_model_dir)!r}, {str(acc)!r}, '--device', 'cpu', '--images', "
        f"{PHOTOS[0]!r}, '--target_mode', 'channels_last']); "
        f"b = inference.main(['--model_path', {str(tiny_model_dir)!r}, '--image', {PHOTOS[0]!r}, '--device', 'cpu', "
        f"'--output', {str(inf)!r}]); sys.exit(a or b)"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for report in (acc, inf):
        allocator = read_json(report)["environment"]["allocator"]
        if allocator["name"] == "glibc malloc":
            assert allocator["tuned"] is True and allocator["mallopt"]["M_MMAP_MAX"] == 0


# --------------------------------------------------------------------------------------------------------------------
# Compile once
# --------------------------------------------------------------------------------------------------------------------


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).relu().mean((2, 3))


def test_aoti_key_changes_with_shape_layout_and_weights():
    cpu = devices.Device("cpu")
    module, x = Small().eval(), torch.rand(1, 3, 8, 8)
    base = compilers.aoti_key(module, cpu, x)
    assert compilers.aoti_key(module, cpu, x.clone()) == base
    assert compilers.aoti_key(module, cpu, torch.rand(2, 3, 8, 8)) != base
    assert compilers.aoti_key(module, cpu, x.contiguous(memory_format=torch.channels_last)) != base
    assert base["torch"] == torch.__version__ and base["code_sha256"]
    assert base["transformers"] == transformers.__version__
    wrapped = compilers.aoti_key(execution.Logits(module), cpu, x)  # the wrapper's and the inner module's code
    assert wrapped["code_sha256"] != base["code_sha256"] and wrapped["weights_sha256"] != base["weights_sha256"]
    with torch.no_grad():
        module.conv.bias.add_(1.0)
    assert compilers.aoti_key(module, cpu, x) != base


def test_compile_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(compilers.COMPILE_CACHE_ENV, "off")
    assert compilers.compile_cache_dir() is None
    monkeypatch.setenv(compilers.COMPILE_CACHE_ENV, str(tmp_path))
    assert compilers.compile_cache_dir() == tmp_path
    monkeypatch.delenv(compilers.COMPILE_CACHE_ENV)
    monkeypatch.setenv(refcache.CACHE_ENV, str(tmp_path / "p"))
    assert compilers.compile_cache_dir() == tmp_path / "p" / "compiled"


@pytest.mark.slow
@pytest.mark.skipif(not compilers.aoti_available(), reason="AOTInductor packaging needs torch >= 2.6")
def test_aoti_package_is_built_once_and_a_damaged_one_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv(compilers.COMPILE_CACHE_ENV, str(tmp_path))
    cpu, module, x = devices.Device("cpu"), Small().eval(), torch.rand(2, 3, 8, 8)
    expected = module(x)
    counters.clear()
    assert torch.is_grad_enabled()  # as when a caller forgets no_grad: freezing must still run
    runner, first_s, notes, state = compilers.build_aoti(module, cpu, x)
    assert state == "miss" and torch.allclose(runner(x), expected, atol=1e-6)
    assert counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"] == 1  # the weights were frozen and packed
    (package,) = tmp_path.glob("aoti-*.pt2")
    runner, second_s, notes, state = compilers.build_aoti(module, cpu, x)
    assert state == "hit" and torch.allclose(runner(x), expected, atol=1e-6)
    assert any("hit" in n for n in notes)
    package.write_bytes(package.read_bytes()[: package.stat().st_size // 2])  # damaged
    runner, _, _, state = compilers.build_aoti(module, cpu, x)
    assert state == "miss" and torch.allclose(runner(x), expected, atol=1e-6)
    assert compilers.build_aoti(module, cpu, x)[3] == "hit"  # the rebuilt package is whole again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".aoti-")]  # no build folder left behind


@pytest.mark.slow
@pytest.mark.skipif(not compilers.aoti_available(), reason="AOTInductor packaging needs torch >= 2.6")
def test_bf16_build_hits_the_compile_cache_on_its_second_run(monkeypatch, tmp_path):
    monkeypatch.setenv(compilers.COMPILE_CACHE_ENV, str(tmp_path))
    cpu, module = devices.Device("cpu"), Small().eval().to(torch.bfloat16)
    x = torch.rand(1, 3, 8, 8, dtype=torch.bfloat16)
    assert compilers.build_aoti(module, cpu, x, autotune=True)[3] == "miss"  # bf16 weights hashed (no numpy dtype)
    twin = Small().eval().to(torch.bfloat16)
    twin.load_state_dict(module.state_dict())  # another object, the same weights: the same key
    runner, _, _, state = compilers.build_aoti(twin, cpu, x, autotune=True)
    assert state == "hit" and torch.allclose(runner(x).float(), module(x).float(), atol=5e-2)


def _enospc(path) -> OSError:
    return OSError(28, "No space left on device", str(path))


@pytest.mark.slow
@pytest.mark.skipif(not compilers.aoti_available(), reason="AOTInductor packaging needs torch >= 2.6")
def test_compile_cache_on_a_full_disk_falls_back_with_one_line(monkeypatch, tmp_path, caplog):
    """Injected ENOSPC: every write under the cache folder fails as on a full disk. torch's package writer reports
    that as a RuntimeError (PyTorchStreamWriter "file write failed"), not an OSError, so the package is built in a
    private temp folder and only copied into the cache; the copy's OSError falls back to the built runner."""
    root = tmp_path / "compiled"
    monkeypatch.setenv(compilers.COMPILE_CACHE_ENV, str(root))
    real_package, real_temp = torch._inductor.aoti_compile_and_package, atomic._temp_beside

    def package(program, package_path=None, **kwargs):
        if package_path and str(package_path).startswith(str(root)):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                "data/0: file write failed"
            )
        return real_package(program, package_path=package_path, **kwargs)

    def temp_beside(target):  # the one atomic writer's temp file (mobilevit_npu.atomic)
        if str(target).startswith(str(root)):
            raise _enospc(target.parent)
        return real_temp(target)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", package)
    monkeypatch.setattr(atomic, "_temp_beside", temp_beside)
    cpu, module, x = devices.Device("cpu"), Small().eval(), torch.rand(1, 3, 8, 8)
    runner, _, notes, state = compilers.build_aoti(module, cpu, x)
    assert state == "off" and torch.allclose(runner(x), module(x), atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if "compile cache" in r.getMessage()]
    assert len(warnings) == 1 and "ENOSPC" in warnings[0] and str(root) in warnings[0]
    assert not root.exists() or not list(root.iterdir())  # nothing half-written in the cache
