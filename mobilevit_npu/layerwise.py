"""Layer-by-layer comparison: forward hooks on both models, the first module whose output parts from the
reference's, the first to produce NaN/Inf, and the worst ones.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from mobilevit_npu import metrics

logger = logging.getLogger("mobilevit_npu.layerwise")


def float_tensors(output: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a module output: a tensor, a (nested) tuple/list, a dict or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from float_tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from float_tensors(item)


def _flatten(output: Any) -> torch.Tensor | None:
    """All floating tensors of an output as one new 1-D CPU tensor (a copy: later in-place ops cannot change it)."""
    parts = [t.detach().reshape(-1).to("cpu", torch.float32) for t in float_tensors(output)]
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
class LayerRow:
    """One module named by `layers` (first_divergent, first_nonfinite, worst): its LayerStat, in short."""

    name: str  # as in named_modules; "name#2" for a module's second call in one forward
    order: int  # position in execution order
    cosine_min: float  # its worst image's cosine against the reference's output (NaN: non-finite or shapes differ)
    max_abs_error: float
    worst_image: Optional[str]  # the image with that cosine
    target_nonfinite_images: int  # images whose output held NaN/Inf on the target

    @classmethod
    def of(cls, stat: LayerStat) -> LayerRow:
        return cls(**{f.name: getattr(stat, f.name) for f in fields(cls)})


@dataclass
class LayerReport:
    """--layers: the module-by-module comparison (layerwise.LayerComparator)."""

    threshold: float  # a module below this cosine diverges
    modules_compared: int
    first_divergent: Optional[LayerRow]  # in execution order
    first_nonfinite: Optional[LayerRow]  # the first to produce NaN/Inf where the reference did not
    worst: list[LayerRow]  # the five lowest cosines
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
        cos = metrics.cosine_from(dot, nr, nt)
        err = float(torch.sub(tgt64, ref64, out=tgt64).abs_().max()) if ref64.numel() else 0.0
        if stat.worst_image is None or _worse(cos, stat.cosine_min):
            stat.cosine_min = cos
            stat.worst_image = self._image
        if math.isnan(err) or err > stat.max_abs_error:
            stat.max_abs_error = err

    def report(self) -> LayerReport:
        modules = sorted(self.stats.values(), key=lambda s: s.order)
        row = LayerRow.of

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
