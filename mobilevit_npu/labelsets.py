"""Labelled image sets at scale: ImageNet-style folders, streaming decode and a resumable journal.

- `scan_folder` / `read_labels_csv`: (path, class id) pairs from class subfolders (wnid or index), flat
  `<wnid>_anything.JPEG` files, or a CSV `image,class_id`.
- `stream`: a DataLoader whose workers decode and preprocess; bad images come back as errors, not exceptions.
- `run`: each rank's share (distributed.Distributed.shard), results gathered on rank 0.
- `Journal`: results appended as JSON lines beside the report (REPORT.json.parts/rank*.jsonl), so `--resume`
  continues a killed run without redoing finished images.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobilevit_npu import DATA_DIR, atomic, distributed, malloc, preprocessing, refcache, reports, timing
from mobilevit_npu.bounds import (  # noqa: F401  (the run's memory and worker bounds; re-exported)
    BYTES_PER_INPUT_BYTE,
    batch_bytes,
    bounded_batch,
    default_workers,
    max_workers,
)
from mobilevit_npu.errors import UserError, first_line

logger = logging.getLogger("mobilevit_npu.labelsets")


WNIDS_FILE = DATA_DIR / "imagenet1k_wnids.txt"


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

    Returns the samples (sorted by path; one file under two names, a link, is one sample) and the entries that could
    not be labelled, with the reason: images in no class, and every entry that is not an image file and not a plain
    other file (a dangling symlink, a FIFO, a link to a device: preprocessing.folder_entry, which opens nothing), so
    each is named and counted against --max_skipped. Folders and regular files without an image suffix are ignored.
    """
    if not str(root).strip():
        raise UserError("--dataset is an empty path")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--dataset {root} is not a folder")
    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
    samples: list[Sample] = []
    unlabelled: list[dict] = []
    seen: dict[Any, Sample] = {}  # preprocessing.image_key: one file under two names (a link) is one image

    def entry(path: Path, label: int | None, why_unlabelled: str) -> None:
        """One folder entry: an image is a sample (once), or unlabelled with `why_unlabelled` when label is None; an
        entry that is not an image file and not a plain other file (a dangling symlink, a FIFO, a link to a device:
        preprocessing.folder_entry, which opens nothing) is named and counted as skipped."""
        kind = preprocessing.folder_entry(path)
        if kind == "other":
            return
        if kind != "image":
            unlabelled.append({"image": str(path), "error": f"{kind}, not an image file: skipped"})
            return
        if label is None:
            unlabelled.append({"image": str(path), "error": why_unlabelled})
            return
        key = preprocessing.image_key(str(path))
        if key in seen:
            if seen[key].label != label:
                raise UserError(
                    f"--dataset {root}: {path} and {seen[key].image} are one file in two classes "
                    f"({seen[key].label} and {label}); one image, one class"
                )
            logger.info("--dataset %s: %s is the same file as %s: counted once", root, path, seen[key].image)
            return
        seen[key] = Sample(str(path), label)
        samples.append(seen[key])

    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:
        for folder in subdirs:
            label = _class_of(folder.name, wnid_index, num_classes)
            if label is None:
                raise UserError(
                    f"class folder {folder} is neither an ImageNet wnid nor a class index below {num_classes}"
                )
            for path in sorted(folder.rglob("*")):
                entry(path, label, "")
        stray = sorted(p for p in root.iterdir() if not p.is_dir())  # beside the class folders: in no class
        before = len(unlabelled)
        for path in stray:
            entry(path, None, "at the dataset root beside the class folders: in no class (move it into one)")
        others = len(stray) - (len(unlabelled) - before)
        if stray:
            logger.warning(
                "--dataset %s: %d entries at the root beside the class folders (skipped, counted) and %d "
                "other file(s) ignored",
                root,
                len(unlabelled) - before,
                others,
            )
    else:
        for path in sorted(root.iterdir()):
            label = wnid_index.get(path.name.split("_", 1)[0])
            entry(path, label, "file name does not start with an ImageNet wnid")
    if not samples:
        raise UserError(f"no labelled images in {root} (class subfolders, or files named <wnid>_*.JPEG)")
    return samples, unlabelled


def _guess_encodings(data: bytes) -> list[str]:
    """The encodings charset_normalizer (requests' own dependency) ranks best, ties included (a short GBK file decodes
    as cleanly in cp949 as in gb18030: both are named, neither is picked), at most three; [] when it has none."""
    try:
        from charset_normalizer import from_bytes

        matches = list(from_bytes(data))
    except Exception:  # noqa: BLE001 - a guess only names the encoding in the message
        return []
    if not matches:
        return []
    best = (matches[0].chaos, -matches[0].coherence)
    return [m.encoding for m in matches if (m.chaos, -m.coherence) == best][:3]


def _decode_csv(path: Path, data: bytes) -> str:
    """The CSV's text: UTF-8 (a UTF-8 BOM stripped) or UTF-16 with its BOM; anything else is refused naming the
    encodings it decodes as, since image names decoded under a guessed encoding could name other files."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        guesses = _guess_encodings(data)
        looks = f"it decodes cleanly as {' or '.join(guesses)}" if guesses else "its encoding is unknown"
        raise UserError(
            f"--labels {path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}; {looks}); save it as "
            f"UTF-8, e.g. iconv -f ENCODING -t UTF-8 {path} > labels.utf8.csv"
        ) from None


MAX_CSV_FIELD = 4096  # characters in one field of the labels CSV: PATH_MAX on Linux, the longest path open() takes
_CLASS_ID = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() takes "²", which int() refuses


def read_labels_csv(path: str | Path, root: str | Path | None = None, num_classes: int = 1000) -> list[Sample]:
    """CSV rows `image,class_id`; relative paths are taken from `root` or the CSV's folder.

    - Encoding: UTF-8 (a BOM is stripped) or UTF-16 with a BOM; any other is refused, naming the encoding it looks
      like (charset_normalizer) and the iconv command.
    - Header: the first row is a header only when its class_id field is not a whole number and its image field is
      not an image file name (`image,class_id`, `path,label`); a first row naming an image is always data, so a
      headerless CSV loses nothing.
    - Rows starting with `#` and empty rows are skipped; class ids are ASCII whole numbers in 0..num_classes-1.
    - Duplicates: the same image (under any spelling: `x.JPEG`, `./x.JPEG`, a link to it; preprocessing.image_key)
      with the same class twice is kept once, with a warning giving the count; the same image with two different
      classes is an error naming both lines (no label is picked silently).
    - Not a CSV: the file is read through reports.read_bounded (a regular file, at most reports.MAX_CSV_BYTES); a NUL
      byte, a field over MAX_CSV_FIELD characters or a row the csv module refuses is one line naming the line.
    """
    if not str(path).strip():
        raise UserError("--labels is an empty path")
    path = Path(path)
    base = Path(root) if root else path.parent
    data = reports.read_bounded(path, "--labels", reports.MAX_CSV_BYTES)  # a regular file, within its size bound
    text = _decode_csv(path, data)
    if "\x00" in text:  # a binary file, or UTF-16 without its BOM; no file name holds a NUL
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise UserError(
            f"--labels {path}:{line}: a NUL byte: not a text CSV (a binary file, or UTF-16 saved without its BOM?)"
        )
    samples: list[Sample] = []
    seen: dict[Any, tuple[int, int, str]] = {}  # the image (image_key: one file under any spelling) -> (class, line)
    duplicates = 0
    rows = csv.reader(io.StringIO(text, newline=""))
    line_no = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:  # a field over csv.field_size_limit() (131,072 characters), ...
            raise UserError(
                f"--labels {path}:{rows.line_num}: {first_line(exc)}: not an image,class_id row (is it a CSV?)"
            ) from None
        line_no = rows.line_num
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        longest = max(len(field) for field in row)
        if longest > MAX_CSV_FIELD:
            raise UserError(
                f"--labels {path}:{line_no}: a field of {longest:,} characters, over the {MAX_CSV_FIELD:,} an image "
                "path or a class id may take: not an image,class_id row (is it a CSV?)"
            )
        if len(row) < 2:
            raise UserError(f"{path}:{line_no}: expected image,class_id")
        image, label = row[0].strip(), row[1].strip()
        if not _CLASS_ID.fullmatch(label.lstrip("-+")):
            if not samples and not seen and not preprocessing.is_image_name(image):
                continue  # the header
            raise UserError(f"{path}:{line_no}: class_id {label!r} is not a whole number")
        value = int(label)
        if not 0 <= value < num_classes:
            raise UserError(f"{path}:{line_no}: class_id {label} is outside 0..{num_classes - 1}")
        full = image if preprocessing.is_url(image) or os.path.isabs(image) else str(base / image)
        key = preprocessing.image_key(full)  # x.JPEG, ./x.JPEG and a link to it are one image
        if key in seen:
            first_label, first_line_no, first_name = seen[key]
            if first_label != value:
                same = "" if first_name == image else f" (as {first_name})"
                raise UserError(
                    f"{path}:{line_no}: {image} is labelled {value} here and {first_label} on line "
                    f"{first_line_no}{same}; one image, one class"
                )
            duplicates += 1
            continue
        seen[key] = (value, line_no, image)
        samples.append(Sample(full, value))
    if duplicates:
        logger.warning("--labels %s: %d duplicate row(s) (same image, same class) counted once", path, duplicates)
    if not samples:
        raise UserError(f"--labels {path} lists no images")
    return samples


class _Images(torch.utils.data.Dataset):
    def __init__(
        self,
        sources: Sequence[str],
        cfg: preprocessing.PreprocessConfig,
        digests: bool = False,
        pixel_cache: refcache.PixelCache | None = None,
    ):
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
        _Images(sources, cfg, digests, pixel_cache),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
    if workers:
        malloc.release_free_memory()  # forked workers share the parent's pages copy-on-write: keep them few
    batches = iter(loader)  # workers start here, not at the first next()

    def as_input(batch: tuple) -> tuple:
        indices, pixels, errors, hashes, counts = batch
        if pixel_cache is not None:
            pixel_cache.merge(counts)
        pixels = preprocessing.to_input(pixels, cfg) if pixels is not None else None
        return (indices, pixels, errors, hashes) if digests else (indices, pixels, errors)

    return (as_input(batch) for batch in batches)


def lock_file(report: str | Path) -> Path:
    """The lock a labelled run holds beside its report: REPORT.json.lock (an output of the run, like the journal)."""
    return Path(f"{report}.lock")


def journal_folder(report: str | Path) -> Path:
    """The --resume journal's folder beside the report: REPORT.json.parts/."""
    return Path(f"{report}.parts")


JOURNAL_FORMAT = 3  # each line: {"v": 3, "sha256": the image file's digest or null, "record": {...}}
# 3: the folder carries JOURNAL_MARKER, and the run key covers config.json, preprocessing, the runtime file, the device

# The file a journal folder is made with: only a folder holding it (and nothing but the journal's own files) is
# ever emptied or removed, so a REPORT.json.parts that is a user's folder (the model, a data set) is refused, never
# deleted.
JOURNAL_MARKER = ".mobilevit-npu-journal"
_MARKER_TEXT = "mobilevit-npu --resume journal: this folder and the files below are the tool's, deleted when it ends\n"
_JOURNAL_FILE = re.compile(r"rank[0-9]+\.jsonl|meta\.json|\.meta\.json\..+\.tmp")  # the tool's own files in it


def _settings_differing(before: Any, now: dict[str, Any]) -> str:
    """Which run_key settings differ between a journal's meta.json and this run, named with both values when short."""
    if not isinstance(before, dict):
        return "the journal's meta.json does not say"
    names = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old == new:
            continue
        if all(isinstance(v, (str, int, float, bool, type(None))) and len(str(v)) <= 40 for v in (old, new)):
            names.append(f"{key} ({old} in the journal, {new} now)")
        else:
            names.append(key)
    return ", ".join(names) or "the run key's format"


def _is_marked(folder: Path) -> bool:
    """Whether `folder` is a journal folder this tool made: a real folder (not a link) holding JOURNAL_MARKER, a
    regular file with the marker's text."""
    marker = folder / JOURNAL_MARKER
    try:
        return (
            folder.is_dir()
            and not folder.is_symlink()
            and marker.is_file()
            and not marker.is_symlink()
            and marker.stat().st_size == len(_MARKER_TEXT)
            and marker.read_text(encoding="utf-8") == _MARKER_TEXT
        )
    except (OSError, UnicodeDecodeError):
        return False


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of a journal folder that are not the tool's own files (the marker, meta.json, rank*.jsonl)."""
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if not (
            entry.is_file(follow_symlinks=False)
            and (entry.name == JOURNAL_MARKER or _JOURNAL_FILE.fullmatch(entry.name))
        )
    )


def _remove_journal(folder: Path) -> None:
    """Remove the tool's own files from a marked journal folder (the marker last), then the folder; anything else
    found there is left, with the folder (OSError from rmdir)."""
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and _JOURNAL_FILE.fullmatch(entry.name):
            os.unlink(entry.path)
    os.unlink(folder / JOURNAL_MARKER)
    os.rmdir(folder)


_EPS = 1e-6  # float64 rounding: a cosine of 1.0000000000000002, a probability difference a hair over 1
# ImageMetrics' float fields and their ranges (metrics._image_metrics computes them); a NaN is written as null.
_METRIC_RANGES: dict[str, tuple[float, float]] = {
    "cosine": (-1 - _EPS, 1 + _EPS),
    "top1_reference_margin": (-1 - _EPS, 1 + _EPS),
    "top5_overlap": (0.0, 1.0),
    "max_abs_prob_diff": (0.0, 1 + _EPS),
    "max_abs_logit_diff": (0.0, math.inf),
    "rmse": (0.0, math.inf),
    "mean_relative_error": (0.0, math.inf),
    "mean_relative_error_above_error_floor": (0.0, math.inf),
    "share_rel_err_below_0_001": (0.0, 1.0),
    "share_rel_err_below_0_005": (0.0, 1.0),
    "reference_logit_std": (0.0, math.inf),
    "reference_top1_prob": (0.0, 1 + _EPS),
    "target_top1_prob": (0.0, 1 + _EPS),
}
# May be null (NaN) for finite logits on both sides: no logit above the error floor, a reference logit of exactly 0.
_MAY_BE_NAN = {"mean_relative_error", "mean_relative_error_above_error_floor"}


def _record_problem(record: dict, num_classes: int | None) -> str | None:
    """Why a journaled accuracy record (verify's labelled run: image, label, both top-5s, reference_finite,
    reference_cached, metrics as metrics.ImageMetrics) cannot be trusted, or None. Types, class ids within the model's
    classes, every metric finite and within its range; a null metric (a NaN the JSON line could not hold) only where
    a side's logits were not finite, and made NaN again here, as a fresh run holds it."""
    from mobilevit_npu import metrics

    top = num_classes if num_classes else math.inf

    def class_id(value: Any, low: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value < top

    if "error" in record:  # a skipped image is redone on resume (run drops it): only its shape matters
        return None if isinstance(record["error"], str) else "an error record without its message"
    label = record.get("label")
    if not (isinstance(label, int) and not isinstance(label, bool) and label >= 0):  # the set's, not the model's
        return f"label {label!r} is not a class id"
    for side in ("reference_top5", "target_top5"):
        top5 = record.get(side)
        if not (isinstance(top5, list) and 1 <= len(top5) <= 5 and all(class_id(c) for c in top5)):
            return f"{side} {top5!r} is not a list of class ids"
    for flag in ("reference_finite", "reference_cached"):
        if not isinstance(record.get(flag), bool):
            return f"{flag} {record.get(flag)!r} is not true or false"
    values = record.get("metrics")
    fields = {f.name for f in dataclasses.fields(metrics.ImageMetrics)}
    if not isinstance(values, dict) or set(values) != fields:
        return "metrics without the fields of one image's metrics"
    if values["image"] != record["image"]:
        return f"metrics of {values['image']!r} in the record of {record['image']!r}"
    for flag in ("top1_agree", "top1_near_tie", "target_finite"):
        if not isinstance(values[flag], bool):
            return f"metrics.{flag} {values[flag]!r} is not true or false"
    finite = values["target_finite"] and record["reference_finite"]
    for name, low in (("top1_reference", 0), ("top1_target", -1)):  # -1: a non-finite target has no top-1
        if not class_id(values[name], low):
            return f"metrics.{name} {values[name]!r} is not a class id"
    if values["top1_agree"] != (values["target_finite"] and values["top1_reference"] == values["top1_target"]):
        return "metrics.top1_agree contradicts top1_reference and top1_target"
    count = values["logits_above_error_floor"]
    if not (isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= top):
        return f"metrics.logits_above_error_floor {count!r} is not a count of logits"
    for name, (low, high) in _METRIC_RANGES.items():
        value = math.nan if values[name] is None else values[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"metrics.{name} {value!r} is not a number"
        if not math.isfinite(value):
            if finite and name not in _MAY_BE_NAN:
                return f"metrics.{name} is {value} with finite logits on both sides"
            values[name] = float(value)
        elif not low <= value <= high:
            return f"metrics.{name} {value!r} is outside {low:g}..{high:g}"
    return None


def record_checker(num_classes: int | None) -> Callable[[dict], str | None]:
    """Journal(check=...) for verify's labelled run: _record_problem with the model's class count."""
    return lambda record: _record_problem(record, num_classes)


class Journal:
    """JSON lines per rank in `REPORT.parts/`; `meta.json` there says what run they belong to.

    Each line is versioned (JOURNAL_FORMAT) and holds the image file's sha256 beside its record, so a resume redoes
    an image whose bytes changed under the same name. A line that does not parse, is from another format, or whose
    record `check` (a callable: why the record cannot be trusted, or None) refuses stops the resume (UserError naming
    the file and line, and how to start afresh); only a torn last line (a crash mid-write: no newline) is dropped, and
    cut off before new lines are appended. The main rank holds an exclusive lock (fcntl.flock on `REPORT.json.lock`,
    kept as a file) for the run's life, so a second live run on the same REPORT is refused instead of deleting this
    one's journal. `--resume` where the report exists and no journal does (a finished run) is refused: nothing to
    continue, and the finished report stays as it is.

    The folder is made with JOURNAL_MARKER in it; a REPORT.parts that exists without the marker (a user's folder, a
    link, a journal of an older version) is refused and left as it is, and only the tool's own files are ever deleted
    from a marked one (a marked folder holding anything else is refused too)."""

    def __init__(
        self,
        report: str | Path,
        dist: distributed.Distributed,
        run_key: dict[str, Any],
        resume: bool,
        check: Callable[[dict], str | None] | None = None,
    ):
        self.report = Path(report)
        self.folder = journal_folder(report)
        self.dist = dist
        self.check = check
        self.rank_of: dict[str, int] = {}  # image -> the rank whose file recorded it (per_rank_images after --resume)
        self.digest_of: dict[str, str | None] = {}  # image -> the sha256 its journal line recorded
        self.resumed = 0  # images taken from the journal instead of being redone (set by run)
        self.changed = 0  # journaled images whose file changed since: redone (set by run)
        self.key = hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()[:16]
        self._lock = None
        self._fh = None
        error = None
        if dist.is_main:
            try:
                self._lock = self._take_lock()
                self._prepare(run_key, resume)
            except UserError as exc:
                error = str(exc)
        error = dist.broadcast(error)  # also the barrier: the folder is ready before any rank writes to it
        if error:
            self._release()
            raise UserError(error)
        path = self.folder / f"rank{dist.rank}.jsonl"
        try:
            _cut_torn_tail(path)
            self._fh = open(path, "a", encoding="utf-8")
        except OSError as exc:
            self._release()
            raise UserError(f"cannot write the --resume journal {path}: {exc.strerror or exc}") from exc

    def _take_lock(self):
        import fcntl

        lock_path = lock_file(self.report)
        try:
            fh = open(lock_path, "a")  # noqa: SIM115 - held open for the run's life
        except OSError as exc:
            raise UserError(f"cannot create the lock {lock_path} beside the report: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise UserError(
                f"{self.report} is being written by another live run (it holds {lock_path}); wait for it "
                "to end or give another REPORT path"
            ) from None
        return fh

    def _prepare(self, run_key: dict[str, Any], resume: bool) -> None:
        meta = self.folder / "meta.json"
        exists = os.path.lexists(self.folder)
        if exists and (self.folder.is_symlink() or not self.folder.is_dir()):
            kind = "a symbolic link" if self.folder.is_symlink() else "not a folder"
            raise UserError(
                f"{self.folder} (the journal beside the report) exists and is {kind}; it is left as it is: remove "
                "it or give another REPORT path"
            )
        afresh = f"run the same command without --resume (it deletes {self.folder} and starts afresh)"
        if resume and not meta.is_file() and self.report.is_file():
            raise UserError(
                f"--resume: {self.report} is a finished run (no journal in {self.folder}); nothing to "
                "resume and the report is left as it is. To redo it, run the same command without "
                "--resume"
            )
        if exists and not _is_marked(self.folder):
            raise UserError(
                f"{self.folder} (where the journal beside the report goes) is a folder this tool did not make (no "
                f"{JOURNAL_MARKER} in it; an older version's journal has none either): it is neither used nor "
                "deleted; move it away or give another REPORT path"
            )
        try:
            foreign = _foreign_entries(self.folder) if exists else []
        except OSError as exc:
            raise UserError(f"cannot read the --resume journal {self.folder}: {exc.strerror or exc}") from exc
        if foreign:
            raise UserError(
                f"{self.folder} (the journal beside the report) holds files this tool did not write "
                f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): it is neither used nor deleted; "
                "move them away or give another REPORT path"
            )
        if resume and meta.is_file():
            previous = reports.read_json(meta, "the --resume journal's meta.json")
            if previous.get("format") != JOURNAL_FORMAT:
                raise UserError(
                    f"--resume: {self.folder} was written by another version of this tool (journal "
                    f"format {previous.get('format', 1)}, this one reads {JOURNAL_FORMAT}); {afresh}"
                )
            if previous.get("key") != self.key:
                raise UserError(
                    f"--resume: {self.folder} belongs to a different run: "
                    f"{_settings_differing(previous.get('run'), run_key)} differ; {afresh}"
                )
            return
        try:
            if exists:
                _remove_journal(self.folder)  # marked, and nothing but the tool's own files in it
            self.folder.mkdir(parents=True)
            atomic.write(self.folder / JOURNAL_MARKER, _MARKER_TEXT)
        except OSError as exc:
            raise UserError(f"cannot create the --resume journal {self.folder}: {exc.strerror or exc}") from exc
        reports.write_json_atomic(meta, {"format": JOURNAL_FORMAT, "key": self.key, "run": run_key})

    def done(self) -> dict[str, dict]:
        """Every record of every rank's file so far, by image. A line that does not parse, has another format or a
        record `check` refuses is a UserError naming the file and line (the journal is not trusted); a torn last line
        from a crash is ignored."""
        records: dict[str, dict] = {}
        for path in sorted(self.folder.glob("rank*.jsonl")):
            rank = int(path.stem[4:]) if path.stem[4:].isdigit() else 0
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines = fh.readlines()
            for line_no, line in enumerate(lines, 1):
                if not line.endswith("\n") and line_no == len(lines):
                    break  # a torn last line: the crash happened mid-write
                entry = _parse_line(line)
                if isinstance(entry, dict) and self.check is not None:
                    problem = self.check(entry["record"])
                    entry = entry if problem is None else problem
                if isinstance(entry, str):
                    raise UserError(
                        f"--resume: {path}:{line_no}: {entry}; the journal cannot be trusted. Run the "
                        f"same command without --resume (it deletes {self.folder} and starts afresh)"
                    )
                record = entry["record"]
                records[record["image"]] = record
                self.digest_of[record["image"]] = entry["sha256"]
                self.rank_of[record["image"]] = rank
        return records

    def append(self, records: Sequence[dict], digests: Sequence[str | None] | None = None) -> None:
        """Journal records (with each image's file sha256 where known) and fsync; a full or read-only disk is a
        UserError naming the file and the errno (exit 2), not a traceback."""
        digests = list(digests) if digests is not None else [None] * len(records)
        try:
            for record, digest in zip(records, digests):
                self._fh.write(reports.json_line({"v": JOURNAL_FORMAT, "sha256": digest, "record": record}))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise UserError(
                f"cannot write the --resume journal {self._fh.name}: [Errno {exc.errno}] {exc.strerror or exc}"
            ) from exc

    def close(self, remove: bool) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):  # a full disk already said so; closing must not say it again
                self._fh.close()
        self.dist.barrier()
        if remove and self.dist.is_main and _is_marked(self.folder):
            try:
                _remove_journal(self.folder)
            except OSError as exc:  # something else was put there meanwhile: it stays, with the folder
                logger.warning("the --resume journal %s was not removed: %s", self.folder, exc.strerror or exc)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None


def _parse_line(line: str) -> dict | str:
    """A journal line as {"v", "sha256", "record"}, or why it is not one."""
    try:
        entry = json.loads(line)
    except ValueError as exc:
        return f"not JSON ({exc})"
    if not isinstance(entry, dict) or entry.get("v") != JOURNAL_FORMAT:
        found = entry.get("v", "none") if isinstance(entry, dict) else type(entry).__name__
        return f"not a format-{JOURNAL_FORMAT} journal line (format {found})"
    record, digest = entry.get("record"), entry.get("sha256")
    if (
        set(entry) != {"v", "sha256", "record"}
        or not isinstance(record, dict)
        or not isinstance(record.get("image"), str)
        or not (digest is None or isinstance(digest, str))
    ):
        return "a journal line without its image, digest and record"
    return entry


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a crash mid-write), so the next line appended starts a line."""
    try:
        with open(path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def run_shards(
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
    previous = {image: record for image, record in previous.items() if image in wanted and "error" not in record}
    if journal and previous:  # an image whose bytes changed since it was journaled is redone, not trusted
        changed = [image for image in previous if refcache.file_digest(image) != journal.digest_of.get(image)]
        for image in changed:
            del previous[image]
        journal.changed = len(changed)
        if changed and dist.is_main:
            logger.warning(
                "--resume: %d image(s) changed since the journal recorded them (e.g. %s): redone",
                len(changed),
                changed[0],
            )
    if journal:
        journal.resumed = len(previous)
    todo = [s for s in samples if s.image not in previous]
    if previous and dist.is_main:
        logger.info("resuming: %d of %d images already done, %d to go", len(previous), len(samples), len(todo))
    mine = dist.shard(todo)
    records: list[dict] = []
    label = f"{desc} (rank 0 of {dist.world_size})" if dist.enabled else desc
    bar = timing.progress_bar(len(mine), dist.is_main, label)
    hashed = digests or journal is not None  # the journal records each image's digest
    batch_size = max(1, min(batch_size, len(mine)))  # bounded by the work: never more rows than this rank's images
    batches = stream([s.image for s in mine], cfg, batch_size, workers, hashed, pixel_cache)
    if on_start is not None and mine:
        on_start()
    with bar:
        for indices, pixels, errors, *hashes in timing.timed_iter(batches, waits):
            batch = [mine[i] for i in indices]
            new = process(batch, pixels, *(hashes if digests else ())) if batch else []
            new += [{"image": mine[i].image, "label": mine[i].label, "error": err} for i, err in errors]
            if journal:
                journal.append(new, [*(hashes[0] if hashes else [None] * len(batch)), *[None] * len(errors)])
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
