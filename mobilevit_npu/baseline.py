"""--baseline OLD_perf_report.json: the change since an earlier benchmark, per mode and batch size.

A change in p50 is called a regression (or an improvement) only when it exceeds both runs' own spread: each run's
interquartile range of its samples (p75 - p25), so run-to-run noise on a shared machine is never reported as a
finding. Two runs are compared only when they measured the same weights, on the same device, with the same stack
(torch, transformers, torch_npu, CANN); otherwise the comparison is refused in one line before anything runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from mobilevit_npu.errors import UserError

STACK = ("torch", "transformers", "torch_npu", "cann")
SPREAD = "interquartile range of the run's samples (p75 - p25)"


@dataclass
class BaselineRow:
    """One (mode, batch size, dtype) in both runs, or in one of them."""

    mode: str
    batch_size: int
    dtype: str
    verdict: str  # regression | improvement | within spread | only in baseline | only in this run
    old_p50_ms: Optional[float]
    new_p50_ms: Optional[float]
    p50_change: Optional[float]  # new / old - 1
    old_images_per_s: Optional[float]
    new_images_per_s: Optional[float]
    images_per_s_change: Optional[float]  # new / old - 1
    old_spread_ms: Optional[float]  # the baseline's interquartile range
    new_spread_ms: Optional[float]  # this run's interquartile range


@dataclass
class BaselineSection:
    """--baseline: this run against an earlier report of the same weights, device and stack."""

    report: str  # the baseline report's path, as given
    sha256: str  # of the baseline report file
    commit: str  # the project's commit that wrote the baseline
    rule: str  # when a change counts
    rows: list[BaselineRow] = field(default_factory=list)


def _identity(header: Any) -> dict[str, Any]:
    """What must match: the weights, the device, the stack. `header` is a typed report or the dict a run builds."""

    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    source = get(header, "model_source")
    env = get(header, "environment")
    weights = (
        get(source, "weights_digest")
        or get(source, "sha256")
        or (f"synthetic seed {get(source, 'seed')}" if get(source, "synthetic") else None)
    )
    return {
        "weights": weights,
        "device": f"{get(header, 'device')} ({get(env, 'device_name')})",
        **{name: get(env, name) for name in STACK},
    }


def check_comparable(old: Any, new: Any, old_path: str) -> None:
    """UserError (one line) when the two runs measured different weights, devices or stacks."""
    a, b = _identity(old), _identity(new)
    what = {"weights": "weights", "device": "device"}
    for key in ("weights", "device", *STACK):
        if a[key] != b[key]:
            label = what.get(key, f"stack ({key})")
            raise UserError(
                f"--baseline {old_path}: it measured other {label}: {a[key]} there, {b[key]} here; "
                "compare only runs of the same weights, device and stack"
            )


def _iqr(samples: list[float]) -> Optional[float]:
    if not samples:
        return None
    q75, q25 = np.percentile(np.asarray(samples, dtype=np.float64), [75, 25])
    return float(q75 - q25)


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _p50(result: Any) -> Optional[float]:
    lat = _get(result, "latency_ms")
    return None if lat is None else float(_get(lat, "p50"))


def compare(old_results: list[Any], new_results: list[Any]) -> list[BaselineRow]:
    """One row per (mode, batch size, dtype) with status ok in either run."""

    def key(r: Any) -> tuple:
        return (_get(r, "mode"), _get(r, "batch_size"), str(_get(r, "dtype")), bool(_get(r, "end_to_end")))

    old = {key(r): r for r in old_results if _get(r, "status") == "ok"}
    new = {key(r): r for r in new_results if _get(r, "status") == "ok"}
    rows = []
    for k in list(dict.fromkeys([*new, *old])):
        o, n = old.get(k), new.get(k)
        op50, np50 = (_p50(o) if o else None), (_p50(n) if n else None)
        otp = _get(o, "throughput_images_per_s") if o else None
        ntp = _get(n, "throughput_images_per_s") if n else None
        ospread = _iqr(list(_get(o, "samples_ms") or [])) if o else None
        nspread = _iqr(list(_get(n, "samples_ms") or [])) if n else None
        if o is None:
            verdict = "only in this run"
        elif n is None:
            verdict = "only in baseline"
        else:
            delta = np50 - op50
            bound = max(ospread or 0.0, nspread or 0.0)
            verdict = "regression" if delta > bound else ("improvement" if -delta > bound else "within spread")
        rows.append(
            BaselineRow(
                mode=k[0],
                batch_size=k[1],
                dtype=k[2],
                verdict=verdict,
                old_p50_ms=op50,
                new_p50_ms=np50,
                p50_change=(np50 / op50 - 1.0) if op50 and np50 else None,
                old_images_per_s=otp,
                new_images_per_s=ntp,
                images_per_s_change=(ntp / otp - 1.0) if otp and ntp else None,
                old_spread_ms=ospread,
                new_spread_ms=nspread,
            )
        )
    return rows


def load_baseline(path: str) -> tuple[Any, str]:
    """The baseline benchmark report (schema.load: one line on a bad file) and its sha256."""
    from mobilevit_npu import schema

    report = schema.load(path)
    if not isinstance(report, schema.BenchmarkReport):
        raise UserError(f"--baseline {path}: a `{report.KIND}` report, not a benchmark report")
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    return report, digest


def section(path: str, report: Any, digest: str, new_results: list[Any]) -> BaselineSection:
    return BaselineSection(
        report=path,
        sha256=digest,
        commit=report.provenance.commit,
        rule=f"a p50 change is a regression or an improvement only beyond both runs' spread, each the {SPREAD}",
        rows=compare(report.results, new_results),
    )


def format_change(sec: BaselineSection) -> str:
    """The change table for the console."""
    header = (
        f"{'mode':<14}{'batch':>6}{'old p50':>10}{'new p50':>10}{'change':>9}{'old img/s':>11}{'new img/s':>11}"
        f"{'change':>9}{'spread old/new ms':>19}  verdict"
    )
    lines = [f"against the baseline {sec.report}:", header, "-" * len(header)]

    def f(x: Optional[float], spec: str) -> str:
        return "-" if x is None else format(x, spec)

    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{x * 100:+.1f}%"

    for r in sec.rows:
        spread = f"{f(r.old_spread_ms, '.2f')}/{f(r.new_spread_ms, '.2f')}"
        lines.append(
            f"{r.mode:<14}{r.batch_size:>6}{f(r.old_p50_ms, '.2f'):>10}{f(r.new_p50_ms, '.2f'):>10}"
            f"{pct(r.p50_change):>9}{f(r.old_images_per_s, '.1f'):>11}{f(r.new_images_per_s, '.1f'):>11}"
            f"{pct(r.images_per_s_change):>9}{spread:>19}  {r.verdict}"
        )
    lines.append(f"spread: the {SPREAD}; a change counts only beyond both runs' spread")
    return "\n".join(lines)
