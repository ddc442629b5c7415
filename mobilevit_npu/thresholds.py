"""The named tolerances an accuracy run is judged by: per dtype, each with the flag that overrides it and the reason
for its default (docs/accuracy.md). Pure data, importable without torch: accuracy_run.py's --help lists them; metrics
judges with them (and re-exports every name here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# msprobe's minimum-error floor per dtype (`_minmum_err` in its api accuracy checker's standard_config.py; its
# small-value thresholds are another figure, `_small_value`: 2^-20 / 2^-10 / 2^-10). Relative errors are also given
# over the logits above this floor only: near zero a relative error says nothing (a difference of one unit in the last
# place of a number near zero is a huge relative error).
MIN_ERROR_FLOOR = {"fp32": 2.0**-14, "fp16": 2.0**-11, "bf16": 2.0**-8}
# Why the relative errors are reported beside the verdict and never judge it (the console prints it beside them).
RELATIVE_ERROR_NOT_JUDGED = (
    "reported, not judged: a logit near 0 makes its relative error huge whatever the port (|t - r| / |r| with |r| ~ "
    "1e-3), so the verdict rests on cosine, top-1 and |dp|; the figure over |r| above the floor is the telling one"
)


@dataclass(frozen=True)
class Thresholds:
    """Named tolerances. The target must reach all of them; the reference must pass min_reference_logit_std."""

    min_cosine: float  # worst image's cosine similarity of logits
    min_top1_agreement: float  # share of images, 0..1, whose top-1 class is the reference's
    max_prob_diff: float  # largest |p_target - p_reference| over all images and classes (strictly below)
    top1_tie_margin: float  # a top-1 flip between classes whose reference probabilities differ by less is a near tie
    layer_min_cosine: float  # --layers: a module under this is "divergent"
    min_reference_logit_std: float = 0.1  # reference logits must spread at least this much (else INVALID)

    @classmethod
    def for_dtype(cls, dtype: str, **overrides: float | None) -> Thresholds:
        base = DEFAULT_THRESHOLDS[dtype]
        changes = {k: float(v) for k, v in overrides.items() if v is not None}
        return dataclasses.replace(base, **changes)


DEFAULT_THRESHOLDS = {
    "fp32": Thresholds(
        min_cosine=0.999, min_top1_agreement=1.0, max_prob_diff=0.01, top1_tie_margin=0.0, layer_min_cosine=0.999
    ),
    "fp16": Thresholds(
        min_cosine=0.999, min_top1_agreement=1.0, max_prob_diff=0.02, top1_tie_margin=0.02, layer_min_cosine=0.995
    ),
    "bf16": Thresholds(
        min_cosine=0.98, min_top1_agreement=1.0, max_prob_diff=0.10, top1_tie_margin=0.05, layer_min_cosine=0.99
    ),
}


THRESHOLD_FLAGS = {  # accuracy_run.py's flag per threshold: what it bounds (its defaults and why: THRESHOLD_REASONS)
    "min_cosine": "lowest cosine similarity of logits allowed for any image",
    "min_top1_agreement": "lowest share (0..1) of images whose top-1 class must match the reference's",
    "max_prob_diff": "largest |probability difference| allowed (strictly below), over all images and classes",
    "top1_tie_margin": "a top-1 flip is forgiven as a near tie when the reference's probabilities of the two classes "
    "differ by less than this",
    "layer_min_cosine": "--layers: a module whose output cosine falls under this is divergent",
    "min_reference_logit_std": "every image's reference logits must spread at least this much across the classes, "
    "else the verdict is INVALID",
}
THRESHOLD_REASONS = {
    "min_cosine": "fp32: 0.999, the model card's criterion; a correct fp32 port differs only by summation order "
    "(measured on the synthetic X-Small: channels_last 1 - 1e-9). fp16: 0.999 too; its 11-bit significand "
    "(eps 4.9e-4) keeps the logits close (measured: worst image 0.99981, 5x margin in 1 - cosine). bf16: 0.98; its "
    "8-bit significand (eps 3.9e-3) rounds every activation by up to 0.4%, compounding over ~30 blocks (measured: "
    "worst image 0.9898-0.9907, mean 0.996). 0.98 still catches gross errors (a wrong operator, a missing channel "
    "flip); subtle ones need an fp32 run on the device.",
    "min_top1_agreement": "1.0 for every dtype: the prediction is what users see. Flips inside a near tie (see "
    "top1_tie_margin) are forgiven; lower this (e.g. 0.99) for thousands of images.",
    "max_prob_diff": "fp32: < 1%, the model card's criterion. fp16: < 2% (measured 0.8%). bf16: < 10%: a logit error "
    "of ~0.5, which bf16 rounding gives on logits of size ~10, moves a probability p by ~p/2 (measured 6.8-7.7%).",
    "top1_tie_margin": "fp32: 0, every flip counts (the model card). fp16 0.02 and bf16 0.05: when the reference's "
    "top two classes are closer than the probability change the dtype is allowed anyway, either order is right.",
    "layer_min_cosine": "--layers only, no effect on the verdict: fp32 0.999 as above; fp16 0.995 and bf16 0.99, "
    "because intermediate outputs (attention probabilities above all) lose more cosine to rounding than the logits.",
    "min_reference_logit_std": "0.1 for every dtype, per image: trained classifiers spread their logits by ~2-4 "
    "across the classes; transformers' default init gives 0 for this model, where any target 'agrees' with the "
    "reference. Below 0.1 the softmax is near uniform and the check cannot discriminate, so the verdict is INVALID. "
    "A property of each image's own logits, so it does not depend on how many images a run has.",
}


def defaults_text(name: str) -> str:
    """A threshold's defaults per dtype, for --help: "default by --dtype: fp32 0.999, fp16 0.999, bf16 0.98"."""
    values = ", ".join(f"{d} {getattr(DEFAULT_THRESHOLDS[d], name):g}" for d in ("fp32", "fp16", "bf16"))
    return f"default by --dtype: {values}"
