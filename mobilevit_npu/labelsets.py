"""Labelled image sets at scale: ImageNet-style folders, streaming decode and a resumable journal.

- `scan_folder` / `read_labels_csv`: (path, class id) pairs from class subfolders (wnid or index), flat
  `<wnid>_anything.JPEG` files, or a CSV `image,class_id`.
- `stream`: a DataLoader whose workers decode and preprocess; bad images come back as errors, not exceptions.
- `run`: each rank's share (distributed.Distributed.shard), results gathered on rank 0.
- `Journal`: results appended as JSON lines beside the report (REPORT.json.parts/rank*.jsonl), so `--resume`
  continues a killed run without redoing finished images.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobilevit_npu import PROJECT_DIR, distributed, malloc, preprocessing, refcache, reports, timing
from mobilevit_npu.errors import UserError, first_line

logger = logging.getLogger("mobilevit_npu.labelsets")


WNIDS_FILE = PROJECT_DIR / "assets" / "imagenet1k_wnids.txt"


@dataclass(frozen=True)
class Sample:
    image: str
    label: int


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in the standard class-index order (n01440764 = 0 ... n15075141 = 999)."""
    return WNIDS_FILE.read_text(encoding="ascii").split()


def _class_of(name: str, wnid_index: dict[str, int], num_classes: int) -> int | None:
    if name in wnid_index:
        return wnid_index[name]
    if name.isdigit() and int(name) < num_classes:
        return int(name)
    return None


def scan_folder(root: str | Path, num_classes: int = 1000) -> tuple[list[Sample], list[dict]]:
    """Class subfolders named by wnid or class index, or flat files named `<wnid>_anything.ext`.

    Returns the samples (sorted by path) and the files that could not be labelled, with the reason.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--dataset {root} is not a folder")
    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
    samples, unlabelled = [], []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:
        for folder in subdirs:
            label = _class_of(folder.name, wnid_index, num_classes)
            if label is None:
                raise UserError(
                    f"class folder {folder} is neither an ImageNet wnid nor a class index below {num_classes}"
                )
            for path in sorted(folder.rglob("*")):
                if path.is_file() and preprocessing.is_image_name(path.name):
                    samples.append(Sample(str(path), label))
    else:
        for path in sorted(root.iterdir()):
            if not (path.is_file() and preprocessing.is_image_name(path.name)):
                continue
            label = wnid_index.get(path.name.split("_", 1)[0])
            if label is None:
                unlabelled.append({"image": str(path), "error": "file name does not start with an ImageNet wnid"})
            else:
                samples.append(Sample(str(path), label))
    if not samples:
        raise UserError(f"no labelled images in {root} (class subfolders, or files named <wnid>_*.JPEG)")
    return samples, unlabelled


def read_labels_csv(path: str | Path, root: str | Path | None = None, num_classes: int = 1000) -> list[Sample]:
    """CSV rows `image,class_id` (a header row is allowed); relative paths are taken from `root` or the CSV's folder."""
    path = Path(path)
    base = Path(root) if root else path.parent
    samples = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for line_no, row in enumerate(csv.reader(fh), 1):
                if not row or row[0].startswith("#"):
                    continue
                if len(row) < 2:
                    raise UserError(f"{path}:{line_no}: expected image,class_id")
                image, label = row[0].strip(), row[1].strip()
                if not label.lstrip("-").isdigit():
                    if line_no == 1:
                        continue  # header
                    raise UserError(f"{path}:{line_no}: class_id {label!r} is not a whole number")
                if not 0 <= int(label) < num_classes:
                    raise UserError(f"{path}:{line_no}: class_id {label} is outside 0..{num_classes - 1}")
                full = image if preprocessing.is_url(image) or os.path.isabs(image) else str(base / image)
                samples.append(Sample(full, int(label)))
    except OSError as exc:
        raise UserError(f"cannot read --labels {path}: {exc}") from exc
    if not samples:
        raise UserError(f"--labels {path} lists no images")
    return samples


class _Images(torch.utils.data.Dataset):
    def __init__(self, sources: Sequence[str], cfg: preprocessing.PreprocessConfig, digests: bool = False,
                 pixel_cache: refcache.PixelCache | None = None):  # fmt: skip
        self.sources, self.cfg, self.digests = list(sources), cfg, digests or pixel_cache is not None
        self.pixel_cache = pixel_cache.for_worker() if pixel_cache is not None else None  # counts sent back per batch

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        source = self.sources[index]
        digest = refcache.file_digest(source) if self.digests else None  # hashed where it is decoded, off the model
        try:
            if self.pixel_cache is not None:
                pixels = self.pixel_cache.pixels(source, digest, self.cfg)
            else:
                pixels = preprocessing.preprocess(source, self.cfg, pixels=True)
            return index, torch.from_numpy(pixels), None, digest, self._counts()
        except OSError as exc:
            return index, None, str(exc) or type(exc).__name__, digest, self._counts()
        except Exception as exc:  # noqa: BLE001 - a worker that raises ends the whole run: one image's record instead
            return index, None, f"{type(exc).__name__}: {first_line(exc)}", digest, self._counts()

    def _counts(self) -> refcache.CacheStats | None:
        """The pixel cache's counts since the last item (then reset): they travel with the batch to the caller."""
        if self.pixel_cache is None:
            return None
        counts, self.pixel_cache.stats = self.pixel_cache.stats, refcache.CacheStats()
        return counts


def _collate(items):
    ok = [(i, x, d) for i, x, err, d, _ in items if x is not None]
    errors = [(i, err) for i, x, err, _, _ in items if x is None]
    counts = refcache.CacheStats()
    for *_, c in items:
        if c is not None:
            counts.add(c)
    pixels = None
    if ok:  # uint8 crops; in a worker stacked straight into shared memory (as default_collate does): no copy out
        first = ok[0][1]
        shared = torch.utils.data.get_worker_info() is not None
        out = first.new_empty((len(ok), *first.shape)).share_memory_() if shared else None
        pixels = torch.stack([x for _, x, _ in ok], out=out)
    return [i for i, _, _ in ok], pixels, errors, [d for _, _, d in ok], counts


def _idle_priority() -> None:
    """Lower the calling process to the lowest CPU priority: SCHED_IDLE where the OS has it (Linux: it runs only on a
    core nothing else wants), else nice 19; left as it is where neither can be set."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.nice(19 - os.nice(0))
    except (AttributeError, OSError):
        pass


def _worker_init(_):
    torch.set_num_threads(1)  # workers only decode and resize: leave the cores to the model
    _idle_priority()  # and never take one from it: decoding fills the time the model leaves a core idle


def stream(
    sources: Sequence[str],
    cfg: preprocessing.PreprocessConfig,
    batch_size: int,
    workers: int,
    digests: bool = False,
    pixel_cache: refcache.PixelCache | None = None,
) -> Iterator[tuple]:
    """Batches of (indices of the decoded images, their model input, [(index, error)] for those that failed); with
    `digests`, a fourth item: the sha256 of each decoded image's file (refcache.file_digest), computed in the worker.
    With workers, they start decoding on this call, and the next batches are decoded while the caller computes on
    this one. Workers send uint8 crops (preprocessing.crop_pixels), made into the float32 input here: a quarter of
    the bytes through shared memory, whose fresh pages cost ~1 ms per image on a VM as float32. With `pixel_cache`,
    crops it holds are read instead of decoded, new ones stored, and its counts in the caller's copy kept current."""
    loader = torch.utils.data.DataLoader(
        _Images(sources, cfg, digests, pixel_cache), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, worker_init_fn=_worker_init if workers else None, prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )  # fmt: skip
    if workers:
        malloc.release_free_memory()  # forked workers share the parent's pages copy-on-write: keep them few
    batches = iter(loader)  # workers start here, not at the first next()

    def as_input(batch: tuple) -> tuple:
        indices, pixels, errors, hashes, counts = batch
        if pixel_cache is not None:
            pixel_cache.stats.add(counts)
        pixels = preprocessing.to_input(pixels, cfg) if pixels is not None else None
        return (indices, pixels, errors, hashes) if digests else (indices, pixels, errors)

    return (as_input(batch) for batch in batches)


# Memory one image costs in an eager forward, as a multiple of its float32 input (3 x 256 x 256 x 4 = 0.75 MiB): the
# X-Small's largest single activation is 8 MiB per image at 256x256 (forward hooks over every module) and a few are
# alive at once, so 40x (30 MiB) bounds it with room for the reference's float64 copy and the stacked crops.
BYTES_PER_INPUT_BYTE = 40


def batch_bytes(batch_size: int, cfg: preprocessing.PreprocessConfig) -> int:
    """The estimated memory of one forward over `batch_size` images (BYTES_PER_INPUT_BYTE x the float32 input)."""
    return batch_size * 3 * cfg.crop_height * cfg.crop_width * 4 * BYTES_PER_INPUT_BYTE


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def bounded_batch(requested: int, images: int, cfg: preprocessing.PreprocessConfig, device: Any = None,
                  flag: str = "--batch_size") -> int:  # fmt: skip
    """The batch a run will really use: never more than its `images` (the warm-up and the example input the target
    is built for must use this, not the flag), and refused (UserError, exit 2, naming the size) when the estimate of
    its memory (batch_bytes) exceeds what `device` (cuda/npu: its free memory) or the host has free
    (malloc.available_memory), instead of an out-of-memory kill. `images` <= 0 (a benchmark on cycled photos) leaves
    the request unbounded by the work."""
    batch = max(1, min(requested, images)) if images > 0 else requested
    need = batch_bytes(batch, cfg)
    free, where = malloc.available_memory(device)
    if free is not None and need > free:
        raise UserError(
            f"{flag} {requested}: a batch of {batch} image(s) needs about {_size(need)} (estimate: "
            f"{BYTES_PER_INPUT_BYTE}x its float32 input), more than the {_size(free)} of {where}; give a smaller {flag}"
        )
    return batch


def default_workers(world_size: int = 1) -> int:
    """As many decoding workers as the rank has cores (at most 8). They run at idle priority (`_worker_init`), so
    they overlap the model wherever it leaves a core idle (between its parallel regions, or the whole CPU while a
    device computes) and never preempt its threads; when the model waits for a batch, every core decodes it.

    Why, measured on a 2-core VM (CPU target at batch 32, 640 JPEGs, cached reference): a normal-priority worker
    preempts one of the model's two threads, which stalls the other at its next barrier, and the model ran 15-20%
    slower than alone; nice 19 still cost it ~8%; SCHED_IDLE workers cost it nothing measurable (readme, labelled
    sets)."""
    cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, world_size)))


class Journal:
    """JSON lines per rank in `REPORT.parts/`; `meta.json` there says what run they belong to."""

    def __init__(self, report: str | Path, dist: distributed.Distributed, run_key: dict[str, Any], resume: bool):
        self.folder = Path(f"{report}.parts")
        self.dist = dist
        self.rank_of: dict[str, int] = {}  # image -> the rank whose file recorded it (per_rank_images after --resume)
        self.resumed = 0  # images taken from the journal instead of being redone (set by run)
        self.key = hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()[:16]
        meta = self.folder / "meta.json"
        error = None
        if dist.is_main:
            what = "the --resume journal's meta.json"
            previous = reports.read_json(meta, what) if resume and meta.is_file() else None
            if previous is not None and previous.get("key") != self.key:
                error = (
                    f"--resume: {self.folder} belongs to a different run (model, dtype, device kind or images "
                    "changed); drop --resume to start over"
                )
            else:
                if not resume and self.folder.exists():
                    shutil.rmtree(self.folder)
                self.folder.mkdir(parents=True, exist_ok=True)
                reports.write_json_atomic(meta, {"key": self.key, "run": run_key})
        error = dist.broadcast(error)  # also the barrier: the folder is ready before any rank writes to it
        if error:
            raise UserError(error)
        self._fh = open(self.folder / f"rank{dist.rank}.jsonl", "a", encoding="utf-8")

    def done(self) -> dict[str, dict]:
        """Every record of every rank's file so far, by image (a torn last line from a crash is ignored)."""
        records: dict[str, dict] = {}
        for path in sorted(self.folder.glob("rank*.jsonl")):
            rank = int(path.stem[4:]) if path.stem[4:].isdigit() else 0
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    records[record["image"]] = record
                    self.rank_of[record["image"]] = rank
        return records

    def append(self, records: Sequence[dict]) -> None:
        for record in records:
            self._fh.write(reports.json_line(record))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self, remove: bool) -> None:
        self._fh.close()
        self.dist.barrier()
        if remove and self.dist.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)


def run(
    samples: Sequence[Sample],
    cfg: preprocessing.PreprocessConfig,
    process: Callable[[list[Sample], torch.Tensor], list[dict]],
    dist: distributed.Distributed,
    batch_size: int,
    workers: int,
    journal: Journal | None = None,
    desc: str = "images",
    digests: bool = False,
    on_start: Callable[[], None] | None = None,
    pixel_cache: refcache.PixelCache | None = None,
    waits: list[float] | None = None,
) -> tuple[list[dict], list[int]]:
    """Stream this rank's share of `samples` through `process` and gather every record on rank 0.

    `process(batch_samples, pixels)` returns one record per image (each with "image"). Bad images become records
    `{"image", "label", "error"}`. With a journal, images already in it are skipped and every new record is appended
    as soon as its batch is done. With `digests`, `process` also gets each image's file sha256 (or None), as a third
    argument. `on_start()` is called once the decoding workers have started, before the first batch is awaited (a
    warm-up call there overlaps the first batches' decoding). `pixel_cache`: decoded crops are read from and stored
    in it (stream). `waits` gets the seconds this rank waited for each batch to be decoded. Returns (all records,
    images done per rank over the whole run, resumed ones included) on rank 0; ([], []) elsewhere.
    """
    previous = journal.done() if journal else {}
    wanted = {s.image for s in samples}
    previous = {image: record for image, record in previous.items() if image in wanted}
    if journal:
        journal.resumed = len(previous)
    todo = [s for s in samples if s.image not in previous]
    if previous and dist.is_main:
        logger.info("resuming: %d of %d images already done, %d to go", len(previous), len(samples), len(todo))
    mine = dist.shard(todo)
    records: list[dict] = []
    label = f"{desc} (rank 0 of {dist.world_size})" if dist.enabled else desc
    bar = timing.progress_bar(len(mine), dist.is_main, label)
    batches = stream([s.image for s in mine], cfg, batch_size, workers, digests, pixel_cache)
    if on_start is not None and mine:
        on_start()
    with bar:
        for indices, pixels, errors, *hashes in timing.timed_iter(batches, waits):
            batch = [mine[i] for i in indices]
            new = (process(batch, pixels, *hashes) if batch else [])
            new += [{"image": mine[i].image, "label": mine[i].label, "error": err} for i, err in errors]
            if journal:
                journal.append(new)
            records.extend(new)
            bar.update(len(new))
    gathered = dist.gather(records)
    if not dist.is_main:
        return [], []
    per_rank = [len(part) for part in gathered]
    for image in previous:  # a resumed run counts what each rank did before it too
        rank = journal.rank_of.get(image, 0)
        per_rank.extend([0] * (rank + 1 - len(per_rank)))
        per_rank[rank] += 1
    merged = dict(previous)
    for part in gathered:
        merged.update((r["image"], r) for r in part)
    order = {s.image: i for i, s in enumerate(samples)}
    return sorted(merged.values(), key=lambda r: order.get(r["image"], len(order))), per_rank


def summarize_labels(records: Sequence[dict], unlabelled: Sequence[dict], per_rank: Sequence[int]) -> dict[str, Any]:
    """Top-1/top-5 of reference and target against the labels, their agreement, per-class counts, disagreements.

    Each record holds "image", "label" and either "error" or "reference_top5" / "target_top5" (class ids, best first).
    """
    done = [r for r in records if "error" not in r]
    skipped = [{"image": r["image"], "error": r["error"]} for r in records if "error" in r] + list(unlabelled)
    n = len(done)

    def share(hits: int) -> float | None:
        return hits / n if n else None

    per_class: dict[int, dict[str, int]] = {}
    disagreements = []
    hits = {"ref1": 0, "ref5": 0, "tgt1": 0, "tgt5": 0, "agree": 0}
    for r in done:
        ref, tgt, label = r["reference_top5"], r["target_top5"], r["label"]
        row = per_class.setdefault(label, {"images": 0, "reference_top1_correct": 0, "target_top1_correct": 0})
        row["images"] += 1
        row["reference_top1_correct"] += ref[0] == label
        row["target_top1_correct"] += tgt[0] == label
        hits["ref1"] += ref[0] == label
        hits["ref5"] += label in ref
        hits["tgt1"] += tgt[0] == label
        hits["tgt5"] += label in tgt
        if ref[0] == tgt[0]:
            hits["agree"] += 1
        else:
            disagreements.append({"image": r["image"], "label": label, "reference": ref[0], "target": tgt[0]})
    return {
        "images": n,
        "skipped": len(skipped),
        "reference": {"top1": share(hits["ref1"]), "top5": share(hits["ref5"])},
        "target": {"top1": share(hits["tgt1"]), "top5": share(hits["tgt5"])},
        "agreement_top1": share(hits["agree"]),
        "per_rank_images": list(per_rank),
        "per_class": {str(k): per_class[k] for k in sorted(per_class)},
        "disagreements": disagreements,
        "skipped_images": skipped,
    }
