"""CPU-vs-device consistency for accuracy_run.py: logit metrics, the verdict, and the layer-by-layer comparison.

The reference is always the model on the CPU in float32, eager. The target is the same weights on the chosen device,
dtype and execution mode. Both consume the very same preprocessed float32 tensor (the target casts it to its dtype).
Every metric is computed in float64 on the CPU.

Verdict: INVALID when the reference cannot discriminate (non-finite logits, or logits with almost no spread, as with
transformers' default init), so a check never passes trivially; otherwise FAIL when any threshold is missed; else PASS.

Seam for tests: `patched_target(add_noise("module.name"))` installs a perturbation on every target model built by
`prepare_target` while the context is open, so a test drives the very code path of the script.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import common

logger = logging.getLogger("mobilevit_npu.accuracy")

MODES = ("eager", "channels_last", "compiled")
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# msprobe's small-value cut-off per dtype: below it a relative error says nothing (a difference of one unit in the last
# place of a number near zero is a huge relative error).
SMALL_VALUE = {"fp32": 2.0**-14, "fp16": 2.0**-11, "bf16": 2.0**-8}


# --------------------------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------------------------


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
    "min_reference_logit_std": "0.1 for every dtype: trained classifiers spread their logits by ~2-4 across the "
    "classes; transformers' default init gives 0 for this model, where any target 'agrees' with the reference. Below "
    "0.1 the softmax is near uniform and the check cannot discriminate, so the verdict is INVALID.",
}


# --------------------------------------------------------------------------------------------------------------------
# Logit metrics and the verdict
# --------------------------------------------------------------------------------------------------------------------


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
    mean_relative_error_above_cutoff: float  # the same over logits with |r| > the dtype's small-value cut-off
    logits_above_cutoff: int
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
    mean_relative_error_above_cutoff: float
    small_value_cutoff: float
    share_rel_err_below_0_001: float
    share_rel_err_below_0_005: float
    reference_logit_std_min: float
    reference_logit_std_across_images: float | None  # mean over classes of the std across images (None: 1 image)
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
        mean_relative_error_above_cutoff=_mean(rel[above]),
        logits_above_cutoff=int(above.sum()),
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


def compare(
    ref_logits: torch.Tensor,
    target_logits: torch.Tensor,
    dtype: str,
    thresholds: Thresholds | None = None,
    names: list[str] | None = None,
    distinct_inputs: bool = True,
) -> Comparison:
    """Compare [N, C] (or [C]) logits of reference and target, in float64 on the CPU, and give the verdict.

    `dtype` (fp32 | fp16 | bf16) is the target's: it picks the small-value cut-off and the default thresholds.
    `distinct_inputs`: the N images differ, so reference logits that do not change across them mean the model ignores
    its input (INVALID).
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
    return summarize(
        per_image, dtype, thresholds, reference_finite=bool(torch.isfinite(ref).all()),
        cosine_all_logits=cosine(ref, tgt), across_images=across,
    )


def image_metrics(
    ref: torch.Tensor, tgt: torch.Tensor, dtype: str, thresholds: Thresholds, names: list[str] | None = None
) -> list[ImageMetrics]:
    """Per-image metrics of [N, C] float64 CPU logits."""
    names = names or [f"image {i}" for i in range(ref.shape[0])]
    cutoff = SMALL_VALUE[dtype]
    return [_image_metrics(n, r, t, cutoff, thresholds.top1_tie_margin) for n, r, t in zip(names, ref, tgt)]


def summarize(
    per_image: list[ImageMetrics],
    dtype: str,
    thresholds: Thresholds,
    reference_finite: bool,
    cosine_all_logits: float | None = None,
    across_images: float | None = None,
) -> Comparison:
    """The aggregate and the verdict from per-image metrics alone, so a streamed data set needs no logits kept.

    Every logit-level mean is exact (each image has the same number of logits); `cosine_all_logits` and the spread
    across images need the logits themselves and are passed in when known.
    """
    n = len(per_image)
    cutoff = SMALL_VALUE[dtype]
    agree = sum(m.top1_agree for m in per_image)
    ties = sum(m.top1_near_tie for m in per_image)
    above = sum(m.logits_above_cutoff for m in per_image)
    mre_above = (
        sum(m.mean_relative_error_above_cutoff * m.logits_above_cutoff for m in per_image if m.logits_above_cutoff)
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
        mean_relative_error_above_cutoff=mre_above,
        small_value_cutoff=cutoff,
        share_rel_err_below_0_001=sum(m.share_rel_err_below_0_001 for m in per_image) / n,
        share_rel_err_below_0_005=sum(m.share_rel_err_below_0_005 for m in per_image) / n,
        reference_logit_std_min=min(m.reference_logit_std for m in per_image),
        reference_logit_std_across_images=across_images,
        target_nonfinite_images=sum(not m.target_finite for m in per_image),
    )

    ref_finite = reference_finite
    across = across_images
    min_std = thresholds.min_reference_logit_std
    reference_checks = [
        Check("reference_logits_finite", None, "reference logits are all finite", ref_finite),
        Check(
            "reference_logit_std_min",
            aggregate.reference_logit_std_min,
            f">= {min_std} (spread across classes, worst image)",
            ref_finite and aggregate.reference_logit_std_min >= min_std,
        ),
    ]
    if across is not None:
        reference_checks.append(
            Check(
                "reference_logit_std_across_images",
                across,
                f">= {min_std} (the logits must change with the input)",
                ref_finite and across >= min_std,
            )
        )
    checks = [
        Check("target_logits_finite", float(aggregate.target_nonfinite_images), "0 images with NaN/Inf logits",
              aggregate.target_nonfinite_images == 0),
        Check("cosine_min", aggregate.cosine_min, f">= {thresholds.min_cosine}",
              aggregate.cosine_min >= thresholds.min_cosine),
        Check("top1_agreement_outside_ties", aggregate.top1_agreement_outside_ties,
              f">= {thresholds.min_top1_agreement} (flips in a {thresholds.top1_tie_margin} near tie forgiven)",
              aggregate.top1_agreement_outside_ties >= thresholds.min_top1_agreement),
        Check("max_abs_prob_diff", aggregate.max_abs_prob_diff, f"< {thresholds.max_prob_diff}",
              aggregate.max_abs_prob_diff < thresholds.max_prob_diff),
    ]  # fmt: skip
    failed_ref = [c for c in reference_checks if not c.passed]
    failed = [c for c in checks if not c.passed]
    if failed_ref:
        verdict = "INVALID"
        reasons = [f"reference cannot discriminate: {_describe(c)}" for c in failed_ref]
    elif failed:
        verdict = "FAIL"
        reasons = [_describe(c) for c in failed]
    else:
        verdict = "PASS"
        reasons = []
    return Comparison(verdict, reasons, dtype, thresholds, per_image, aggregate, checks, reference_checks)


def _describe(check: Check) -> str:
    value = "n/a" if check.value is None else ("NaN" if math.isnan(check.value) else f"{check.value:.6g}")
    return f"{check.name} = {value}, needs {check.rule}"


# --------------------------------------------------------------------------------------------------------------------
# Target preparation, with a seam for perturbations
# --------------------------------------------------------------------------------------------------------------------

TargetPatch = Callable[[torch.nn.Module], Any]
_TARGET_PATCHES: list[TargetPatch] = []


@contextlib.contextmanager
def patched_target(*patches: TargetPatch) -> Iterator[None]:
    """While open, every target model built by prepare_target gets these patches (for tests and experiments)."""
    _TARGET_PATCHES.extend(patches)
    try:
        yield
    finally:
        for patch in patches:
            _TARGET_PATCHES.remove(patch)


def _first_tensor(output: Any) -> torch.Tensor | None:
    for tensor in _tensors(output):
        return tensor
    return None


def _replace_first_tensor(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        items = list(output)
        items[0] = _replace_first_tensor(items[0], new)
        return type(output)(items) if not hasattr(output, "_fields") else type(output)(*items)
    if isinstance(output, dict):  # ModelOutput too
        key = next(k for k, v in output.items() if isinstance(v, torch.Tensor))
        output[key] = new
        return output
    raise TypeError(f"cannot perturb an output of type {type(output).__name__}")


def add_noise(module_name: str, scale: float = 0.5, seed: int = 0) -> TargetPatch:
    """A patch adding Gaussian noise (scale x the output's std) to one module's output, deterministically."""

    def install(model: torch.nn.Module):
        generator = torch.Generator().manual_seed(seed)

        def hook(module, args, output):
            first = _first_tensor(output)
            noise = torch.randn(first.shape, generator=generator, dtype=torch.float32)
            std = first.detach().float().std().item() or 1.0
            return _replace_first_tensor(output, first + (noise * scale * std).to(first.device, first.dtype))

        return model.get_submodule(module_name).register_forward_hook(hook)

    return install


def inject_nan(module_name: str) -> TargetPatch:
    """A patch making the first element of one module's output NaN."""

    def install(model: torch.nn.Module):
        def hook(module, args, output):
            first = _first_tensor(output).clone()
            first.view(-1)[0] = math.nan
            return _replace_first_tensor(output, first)

        return model.get_submodule(module_name).register_forward_hook(hook)

    return install


@dataclass
class Side:
    """One side of the comparison: what runs, where, in what precision and mode."""

    model: Any  # the callable that produces the logits (a compiled wrapper in compiled mode)
    hook_model: torch.nn.Module  # the eager module that --layers hooks
    device: common.Device
    dtype: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.device} {DTYPE_NAMES[self.dtype]} {self.mode}"

    def input(self, pixels: torch.Tensor) -> torch.Tensor:
        """The shared float32 CPU tensor as this side consumes it (same values, cast to the side's dtype)."""
        x = pixels.to(self.device.torch).to(common.DTYPES[self.dtype])
        if self.mode == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, model: Any = None) -> torch.Tensor:
        out = (model or self.model)(pixel_values=self.input(pixels))
        logits = out.logits if hasattr(out, "logits") else out[0]
        common.synchronize(self.device)
        return logits.detach().to("cpu", torch.float64)


def reference_side(model: torch.nn.Module) -> Side:
    model = model.to("cpu", torch.float32).eval()
    return Side(model=model, hook_model=model, device=common.Device("cpu"), dtype="fp32", mode="eager")


def compile_model(model: torch.nn.Module, device: common.Device):
    """torch.compile for the device: TorchAir's backend on an NPU (unverified here), inductor elsewhere."""
    if device.type == "npu":
        try:
            import torchair  # shipped inside torch_npu; import torch_npu first (resolve_device did)
        except ImportError as exc:
            raise common.UserError(
                f"--target_mode compiled on an NPU needs torchair (inside torch_npu): {exc}"
            ) from exc
        backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
        return torch.compile(model, backend=backend, dynamic=False)
    return torch.compile(model, dynamic=False)


def prepare_target(
    reference: torch.nn.Module, device: common.Device, dtype: str, mode: str, layers: bool = False
) -> Side:
    """A deep copy of the reference (never an alias) on the device, dtype and mode, with any test patches applied.
    `layers`: the run will watch every layer (--layers), so a compiled target also gets an eager twin to hook."""
    if mode not in MODES:
        raise common.UserError(f"unknown target mode {mode!r}: use {', '.join(MODES)}")
    model = copy.deepcopy(reference).eval()
    model.to(dtype=common.DTYPES[dtype])
    model.to(device.torch)
    if mode == "channels_last":
        model.to(memory_format=torch.channels_last)
    hook_model = model
    if mode == "compiled" and layers:
        # Layer hooks would break the compiled graph into pieces, so --layers watches an eager twin instead.
        hook_model = copy.deepcopy(model)
    for patch in _TARGET_PATCHES:
        patch(model)
        if hook_model is not model:
            patch(hook_model)
    runner = compile_model(model, device) if mode == "compiled" else model
    return Side(model=runner, hook_model=hook_model, device=device, dtype=dtype, mode=mode)


# --------------------------------------------------------------------------------------------------------------------
# Layer-by-layer comparison
# --------------------------------------------------------------------------------------------------------------------


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a module output: a tensor, a (nested) tuple/list, a dict or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item)


def _flatten(output: Any) -> torch.Tensor | None:
    """All floating tensors of an output as one new 1-D CPU tensor (a copy: later in-place ops cannot change it)."""
    parts = [t.detach().reshape(-1).to("cpu", torch.float32) for t in _tensors(output)]
    if not parts:
        return None
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


@dataclass
class LayerStat:
    name: str  # as in named_modules / the state dict; "name#2" for a module's second call in one forward
    order: int  # position in execution order (completion of the module's forward)
    numel: int
    cosine_min: float = 1.0
    max_abs_error: float = 0.0
    worst_image: str | None = None
    target_nonfinite_images: int = 0
    reference_nonfinite_images: int = 0
    first_nonfinite_image: str | None = None
    shape_mismatch: bool = False


@dataclass
class LayerReport:
    threshold: float
    modules_compared: int
    first_divergent: dict | None
    first_nonfinite: dict | None
    worst: list[dict]
    modules: list[LayerStat]
    missing_in_target: list[str] = field(default_factory=list)
    note: str = ""


def _worse(cosine: float, than: float) -> bool:
    """True when `cosine` is worse than `than`; NaN is the worst."""
    if math.isnan(than):
        return False
    return math.isnan(cosine) or cosine < than


class LayerComparator:
    """Forward hooks on every named module of both models; compares module by module while the target runs.

    Per image: the reference forward stores each module's output (flattened, float32, CPU): one image's activations
    at most. The target's hook then pops the matching entry, compares it in float64 and drops both, so memory stays
    bounded by one image of reference activations whatever the number of images.
    """

    def __init__(self, reference: torch.nn.Module, target: torch.nn.Module, threshold: float):
        self.threshold = threshold
        self.stats: dict[str, LayerStat] = {}
        self.missing: set[str] = set()
        self._stash: OrderedDict[str, torch.Tensor | None] = OrderedDict()
        self._calls: dict[str, int] = {}
        self._image = ""
        self._handles = []
        for side, model in (("reference", reference), ("target", target)):
            for name, module in model.named_modules():
                if name:  # the root's output is the logits, compared by compare()
                    hook = self._reference_hook(name) if side == "reference" else self._target_hook(name)
                    self._handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _key(self, name: str) -> str:
        count = self._calls.get(name, 0) + 1
        self._calls[name] = count
        return name if count == 1 else f"{name}#{count}"

    def begin(self, image: str, side: str) -> None:
        self._image = image
        self._calls = {}
        if side == "reference":
            self._stash.clear()

    def end_image(self) -> None:
        self.missing.update(self._stash)
        self._stash.clear()

    def _reference_hook(self, name: str):
        def hook(module, args, output):
            self._stash[self._key(name)] = _flatten(output)

        return hook

    def _target_hook(self, name: str):
        def hook(module, args, output):
            key = self._key(name)
            if key not in self._stash:
                self.missing.add(key)
                return
            ref = self._stash.pop(key)
            tgt = _flatten(output)
            if ref is None or tgt is None:
                return
            self._record(key, ref, tgt)

        return hook

    def _record(self, key: str, ref: torch.Tensor, tgt: torch.Tensor) -> None:
        stat = self.stats.get(key)
        if stat is None:
            stat = self.stats[key] = LayerStat(name=key, order=len(self.stats), numel=ref.numel())
        if ref.numel() != tgt.numel():
            stat.shape_mismatch = True
            stat.cosine_min = math.nan
            return
        # float64 BLAS dot products: the norms double as the NaN/Inf test (squares of float32 values cannot overflow)
        ref64, tgt64 = ref.double(), tgt.double()
        dot, nr, nt = float(ref64 @ tgt64), float(ref64 @ ref64), float(tgt64 @ tgt64)
        if not math.isfinite(nr):
            stat.reference_nonfinite_images += 1
        if not math.isfinite(nt):
            stat.target_nonfinite_images += 1
            stat.first_nonfinite_image = stat.first_nonfinite_image or self._image
        cos = cosine_from(dot, nr, nt)
        err = float(torch.sub(tgt64, ref64, out=tgt64).abs_().max()) if ref64.numel() else 0.0
        if stat.worst_image is None or _worse(cos, stat.cosine_min):
            stat.cosine_min = cos
            stat.worst_image = self._image
        if math.isnan(err) or err > stat.max_abs_error:
            stat.max_abs_error = err

    def report(self) -> LayerReport:
        modules = sorted(self.stats.values(), key=lambda s: s.order)

        def row(stat: LayerStat) -> dict:
            return {
                "name": stat.name,
                "order": stat.order,
                "cosine_min": stat.cosine_min,
                "max_abs_error": stat.max_abs_error,
                "worst_image": stat.worst_image,
                "target_nonfinite_images": stat.target_nonfinite_images,
            }

        def bad(stat: LayerStat) -> bool:
            return math.isnan(stat.cosine_min) or stat.cosine_min < self.threshold or stat.target_nonfinite_images > 0

        first_divergent = next((s for s in modules if bad(s)), None)
        first_nonfinite = next(
            (s for s in modules if s.target_nonfinite_images > 0 and s.reference_nonfinite_images == 0), None
        )
        worst = sorted(modules, key=lambda s: (-math.inf if math.isnan(s.cosine_min) else s.cosine_min, s.order))[:5]
        return LayerReport(
            threshold=self.threshold,
            modules_compared=len(modules),
            first_divergent=row(first_divergent) if first_divergent else None,
            first_nonfinite=row(first_nonfinite) if first_nonfinite else None,
            worst=[row(s) for s in worst],
            modules=modules,
            missing_in_target=sorted(self.missing),
        )
