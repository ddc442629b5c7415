"""Logit comparison: per-image metrics, named thresholds, the verdict, and the benchmark's agreement figure.

Every metric is computed in float64 on the CPU. The verdict (`decide`, one rule for every path):
- INVALID when the reference cannot judge: its logits are non-finite, or some image's logits have almost no spread
  across the classes (transformers' default init gives ~0), so agreement would prove nothing; or the target is the
  reference itself (`not_a_port_check`: CPU float32 eager against CPU float32 eager). Each reference check is a
  property of one image's reference logits, so the rule is the same for 1 image or 50,000, with or without --dataset.
- FAIL when the reference could judge and the target misses a threshold; also when the target's logits are NaN/Inf
  while the reference's are finite (wrong whatever the reference's spread).
- PASS otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from mobilevit_npu.thresholds import (  # noqa: F401  (the named thresholds, torch-free; re-exported)
    DEFAULT_THRESHOLDS,
    MIN_ERROR_FLOOR,
    THRESHOLD_FLAGS,
    THRESHOLD_REASONS,
    Thresholds,
    defaults_text,
)

logger = logging.getLogger("mobilevit_npu.metrics")


@dataclass
class ImageMetrics:
    """One image, reference vs target logits, all in float64."""

    image: str
    cosine: float
    top1_reference: int
    top1_target: int
    top1_agree: bool
    top1_near_tie: bool  # disagree, but p_ref(ref top-1) - p_ref(target top-1) < top1_tie_margin
    top1_reference_margin: float  # p_ref(ref top-1) - p_ref(target top-1); 0 when they agree
    top5_overlap: float  # |top5(ref) & top5(target)| / 5
    max_abs_prob_diff: float
    max_abs_logit_diff: float
    rmse: float
    mean_relative_error: float  # mean of |t - r| / |r| over all logits (the model card's definition)
    mean_relative_error_above_error_floor: float  # the same over logits with |r| > the dtype's minimum-error floor
    logits_above_error_floor: int
    share_rel_err_below_0_001: float
    share_rel_err_below_0_005: float
    reference_logit_std: float
    reference_top1_prob: float
    target_top1_prob: float
    target_finite: bool


@dataclass
class Aggregate:
    images: int
    cosine_min: float
    cosine_mean: float
    cosine_all_logits: float | None  # cosine of all images' logits concatenated (None for a streamed data set)
    top1_agreement: float
    top1_agree_count: int
    top1_near_tie_flips: int
    top1_agreement_outside_ties: float  # (agreements + near-tie flips) / images: what the verdict checks
    top5_overlap_mean: float
    max_abs_prob_diff: float
    max_abs_logit_diff: float
    rmse: float
    mean_relative_error: float
    mean_relative_error_above_error_floor: float
    min_error_floor: float
    share_rel_err_below_0_001: float
    share_rel_err_below_0_005: float
    reference_logit_std_min: float
    # mean over classes of the std across images, for information only (no check: it depends on how many images
    # there are and how alike they are); None for one image, identical images or a streamed data set
    reference_logit_std_across_images: float | None
    target_nonfinite_images: int


@dataclass
class Check:
    name: str
    value: float | None
    rule: str
    passed: bool


@dataclass
class Comparison:
    verdict: str  # PASS | FAIL | INVALID
    reasons: list[str]
    dtype: str
    thresholds: Thresholds
    per_image: list[ImageMetrics]
    aggregate: Aggregate
    checks: list[Check]
    reference_checks: list[Check]


def cosine_from(dot: float, norm2_a: float, norm2_b: float) -> float:
    """Cosine from a dot product and squared norms: 1.0 for two zero vectors, 0.0 when only one is zero, NaN when
    either is non-finite (the squared norms double as the NaN/Inf test)."""
    if not (math.isfinite(norm2_a) and math.isfinite(norm2_b)):
        return math.nan
    if norm2_a == 0.0 or norm2_b == 0.0:
        return 1.0 if norm2_a == norm2_b else 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(norm2_a * norm2_b)))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """float64 cosine similarity of two tensors, flattened."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return cosine_from(float(a @ b), float(a @ a), float(b @ b))


def _relative_error(ref: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """|t - r| / |r| elementwise from diff = |t - r|; 0 where both are equal (0/0), inf where r is 0 and t is not."""
    rel = diff / ref.abs()
    return torch.where(diff == 0, torch.zeros_like(rel), rel)


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _image_metrics(name: str, ref: torch.Tensor, tgt: torch.Tensor, cutoff: float, tie: float) -> ImageMetrics:
    finite = bool(torch.isfinite(tgt).all())
    p_ref, p_tgt = torch.softmax(ref, dim=-1), torch.softmax(tgt, dim=-1)
    k = min(5, ref.numel())
    top5_ref = set(torch.topk(ref, k).indices.tolist())
    top5_tgt = set(torch.topk(torch.nan_to_num(tgt, nan=-math.inf), k).indices.tolist())
    diff = (tgt - ref).abs()
    rel = _relative_error(ref, diff)
    above = ref.abs() > cutoff
    top1_ref = int(ref.argmax())
    top1_tgt = int(tgt.argmax()) if finite else -1
    margin = float(p_ref[top1_ref] - p_ref[top1_tgt]) if finite else math.nan
    return ImageMetrics(
        image=name,
        cosine=cosine(ref, tgt),
        top1_reference=top1_ref,
        top1_target=top1_tgt,
        top1_agree=finite and top1_ref == top1_tgt,
        top1_near_tie=finite and top1_ref != top1_tgt and margin < tie,
        top1_reference_margin=margin,
        top5_overlap=len(top5_ref & top5_tgt) / k if finite else 0.0,
        max_abs_prob_diff=float((p_tgt - p_ref).abs().max()),
        max_abs_logit_diff=float(diff.max()),
        rmse=float((diff**2).mean().sqrt()),
        mean_relative_error=_mean(rel),
        mean_relative_error_above_error_floor=_mean(rel[above]),
        logits_above_error_floor=int(above.sum()),
        share_rel_err_below_0_001=_mean((rel < 1e-3).double()),
        share_rel_err_below_0_005=_mean((rel < 5e-3).double()),
        reference_logit_std=float(ref.std()) if ref.numel() > 1 else 0.0,
        reference_top1_prob=float(p_ref.max()),
        target_top1_prob=float(p_tgt[top1_tgt]) if finite else math.nan,
        target_finite=finite,
    )


def _nanmin(values: list[float]) -> float:
    """min that lets NaN win: a NaN cosine is the worst cosine there is."""
    return math.nan if any(math.isnan(v) for v in values) else min(values)


def _nanmax(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def compare_logits(
    ref_logits: torch.Tensor,
    target_logits: torch.Tensor,
    dtype: str,
    thresholds: Thresholds | None = None,
    names: list[str] | None = None,
    distinct_inputs: bool = True,
) -> Comparison:
    """Compare [N, C] (or [C]) logits of reference and target, in float64 on the CPU, and give the verdict.

    `dtype` (fp32 | fp16 | bf16) is the target's: it picks the minimum-error floor and the default thresholds.
    `distinct_inputs`: the N images differ, so the aggregate's reference_logit_std_across_images is worth giving
    (information only: the verdict's reference checks are per image, see `judge`).
    """
    thresholds = thresholds or DEFAULT_THRESHOLDS[dtype]
    ref = ref_logits.detach().to("cpu", torch.float64).reshape(-1, ref_logits.shape[-1])
    tgt = target_logits.detach().to("cpu", torch.float64).reshape(-1, target_logits.shape[-1])
    if ref.shape != tgt.shape:
        raise ValueError(f"reference logits {tuple(ref.shape)} and target logits {tuple(tgt.shape)} differ in shape")
    if ref.shape[0] == 0:
        raise ValueError("no logits to compare")
    per_image = image_metrics(ref, tgt, dtype, thresholds, names)
    n = len(per_image)
    across = float(ref.std(dim=0).mean()) if n > 1 and distinct_inputs else None
    return judge(
        per_image,
        dtype,
        thresholds,
        reference_finite=bool(torch.isfinite(ref).all()),
        cosine_all_logits=cosine(ref, tgt),
        across_images=across,
    )


def image_metrics(
    ref: torch.Tensor, tgt: torch.Tensor, dtype: str, thresholds: Thresholds, names: list[str] | None = None
) -> list[ImageMetrics]:
    """Per-image metrics of [N, C] float64 CPU logits."""
    names = names or [f"image {i}" for i in range(ref.shape[0])]
    cutoff = MIN_ERROR_FLOOR[dtype]
    return [_image_metrics(n, r, t, cutoff, thresholds.top1_tie_margin) for n, r, t in zip(names, ref, tgt)]


def judge(
    per_image: list[ImageMetrics],
    dtype: str,
    thresholds: Thresholds,
    reference_finite: bool,
    cosine_all_logits: float | None = None,
    across_images: float | None = None,
) -> Comparison:
    """The aggregate and the verdict from per-image metrics alone, so a streamed data set needs no logits kept.

    Every logit-level mean is exact (each image has the same number of logits); `cosine_all_logits` and the spread
    across images (information only, no check) need the logits themselves and are passed in when known.
    """
    n = len(per_image)
    cutoff = MIN_ERROR_FLOOR[dtype]
    agree = sum(m.top1_agree for m in per_image)
    ties = sum(m.top1_near_tie for m in per_image)
    above = sum(m.logits_above_error_floor for m in per_image)
    mre_above = (
        sum(
            m.mean_relative_error_above_error_floor * m.logits_above_error_floor
            for m in per_image
            if m.logits_above_error_floor
        )
        / above
        if above
        else math.nan
    )
    aggregate = Aggregate(
        images=n,
        cosine_min=_nanmin([m.cosine for m in per_image]),
        cosine_mean=float(sum(m.cosine for m in per_image) / n),
        cosine_all_logits=cosine_all_logits,
        top1_agreement=agree / n,
        top1_agree_count=agree,
        top1_near_tie_flips=ties,
        top1_agreement_outside_ties=(agree + ties) / n,
        top5_overlap_mean=sum(m.top5_overlap for m in per_image) / n,
        max_abs_prob_diff=_nanmax([m.max_abs_prob_diff for m in per_image]),
        max_abs_logit_diff=_nanmax([m.max_abs_logit_diff for m in per_image]),
        rmse=math.sqrt(sum(m.rmse**2 for m in per_image) / n),
        mean_relative_error=sum(m.mean_relative_error for m in per_image) / n,
        mean_relative_error_above_error_floor=mre_above,
        min_error_floor=cutoff,
        share_rel_err_below_0_001=sum(m.share_rel_err_below_0_001 for m in per_image) / n,
        share_rel_err_below_0_005=sum(m.share_rel_err_below_0_005 for m in per_image) / n,
        reference_logit_std_min=min(m.reference_logit_std for m in per_image),
        reference_logit_std_across_images=across_images,
        target_nonfinite_images=sum(not m.target_finite for m in per_image),
    )

    min_std = thresholds.min_reference_logit_std
    reference_checks = [  # each a property of every image's own reference logits: no dependence on the image count
        Check("reference_logits_finite", None, "reference logits are all finite", reference_finite),
        Check(
            "reference_logit_std_min",
            aggregate.reference_logit_std_min,
            f">= {min_std} (spread across classes, worst image)",
            reference_finite and aggregate.reference_logit_std_min >= min_std,
        ),
    ]
    checks = [
        Check(
            "target_logits_finite",
            float(aggregate.target_nonfinite_images),
            "0 images with NaN/Inf logits",
            aggregate.target_nonfinite_images == 0,
        ),
        Check(
            "cosine_min",
            aggregate.cosine_min,
            f">= {thresholds.min_cosine}",
            aggregate.cosine_min >= thresholds.min_cosine,
        ),
        Check(
            "top1_agreement_outside_ties",
            aggregate.top1_agreement_outside_ties,
            f">= {thresholds.min_top1_agreement} (flips in a {thresholds.top1_tie_margin} near tie forgiven)",
            aggregate.top1_agreement_outside_ties >= thresholds.min_top1_agreement,
        ),
        Check(
            "max_abs_prob_diff",
            aggregate.max_abs_prob_diff,
            f"< {thresholds.max_prob_diff}",
            aggregate.max_abs_prob_diff < thresholds.max_prob_diff,
        ),
    ]
    verdict, reasons = decide(reference_checks, checks)
    return Comparison(verdict, reasons, dtype, thresholds, per_image, aggregate, checks, reference_checks)


SAME_AS_REFERENCE = "target_differs_from_reference"  # the reference check not_a_port_check adds


def decide(reference_checks: list[Check], checks: list[Check]) -> tuple[str, list[str]]:
    """The verdict and its reasons from the checks: the one rule every path (images, labelled sets, the skip budget,
    a self-comparison) goes through.

    INVALID when a reference check failed: the reference cannot judge, and the target's figures prove nothing either
    way. One exception: NaN/Inf in the target while the reference's logits are finite is FAIL, since no reference is
    needed to see that (a self-comparison stays INVALID: there the target is the reference). FAIL when a check
    failed; else PASS."""
    failed_ref = [c for c in reference_checks if not c.passed]
    failed = [c for c in checks if not c.passed]
    # the NaN/Inf is the target's own: the reference's logits are finite and the target is not the reference itself
    targets_own = all(c.passed for c in reference_checks if c.name in ("reference_logits_finite", SAME_AS_REFERENCE))
    nonfinite_target = any(c.name == "target_logits_finite" for c in failed)
    if failed_ref and not (nonfinite_target and targets_own):
        return "INVALID", [_reference_reason(c) for c in failed_ref]
    if failed:
        return "FAIL", [_describe(c) for c in failed] + [_reference_reason(c) for c in failed_ref]
    return "PASS", []


def _reference_reason(check: Check) -> str:
    if check.name == SAME_AS_REFERENCE:
        return f"not a port check: {check.rule}"
    return f"reference cannot discriminate: {_describe(check)}"


def not_a_port_check(comparison: Comparison, what: str) -> Comparison:
    """The verdict of a run whose target is the reference itself (`what` says so and names the flags that would make
    it a port): INVALID, with a failed reference check naming why, whatever the figures say (they compare a
    configuration with itself)."""
    reference_checks = [*comparison.reference_checks, Check(SAME_AS_REFERENCE, None, what, False)]
    verdict, reasons = decide(reference_checks, comparison.checks)
    return dataclasses.replace(comparison, verdict=verdict, reasons=reasons, reference_checks=reference_checks)


def _describe(check: Check) -> str:
    value = "n/a" if check.value is None else ("NaN" if math.isnan(check.value) else f"{check.value:.6g}")
    return f"{check.name} = {value}, needs {check.rule}"


EXACT_COSINE = 0.99999  # float32 re-association (folded BatchNorm, fused kernels) stays far above this


@dataclass
class Agreement:
    cosine: float
    max_abs_diff: float
    top1_agreement: float  # fraction of inputs whose arg-max class equals the reference's


def is_exact(agreement: Agreement | None) -> bool | None:
    if agreement is None:
        return None
    return agreement.cosine >= EXACT_COSINE and agreement.top1_agreement == 1.0


def agreement(reference: torch.Tensor, test: torch.Tensor) -> Agreement:
    """Logits against reference logits, in float64 on the CPU."""
    ref = reference.detach().to("cpu", torch.float64)
    out = test.detach().to("cpu", torch.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(out.shape)}")
    return Agreement(
        cosine=cosine(ref, out),
        max_abs_diff=float((ref - out).abs().max()),
        top1_agreement=float((ref.argmax(-1) == out.argmax(-1)).double().mean()),
    )


def skip_budget(comparison: Comparison, skipped: int, total: int, max_skipped: int | float) -> dict:
    """Hold the skipped images against --max_skipped: over it, a failed check and FAIL (INVALID stays INVALID).
    Returns the report's "skipped" entry."""
    allowed = int(max_skipped * total) if isinstance(max_skipped, float) else max_skipped
    passed = skipped <= allowed
    rule = f"<= {allowed} of {total} images (--max_skipped {max_skipped:g})"
    comparison.checks.append(Check("skipped_images", float(skipped), rule, passed))
    if not passed:
        comparison.reasons.append(f"{skipped} of {total} image(s) skipped, over --max_skipped {max_skipped:g}")
        if comparison.verdict == "PASS":
            comparison.verdict = "FAIL"
    from mobilevit_npu import schema  # the section's fields, defined once there

    return dataclasses.asdict(schema.SkipBudget(count=skipped, of=total, max_skipped=max_skipped, allowed=allowed))
