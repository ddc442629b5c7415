"""Test-only perturbations of the target model: each is a targets.Patch (installs a forward hook)."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from mobilevit_npu import targets
from mobilevit_npu.layerwise import float_tensors


def perturb_targets(monkeypatch, *patches: targets.Patch) -> None:
    """Every target model that accuracy_run builds gets `patches` (through prepare_target's own parameter)."""
    monkeypatch.setattr(targets, "prepare_target", functools.partial(targets.prepare_target, patches=patches))


def _first_tensor(output: Any) -> torch.Tensor | None:
    for tensor in float_tensors(output):
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


def add_noise(module_name: str, scale: float = 0.5, seed: int = 0) -> targets.Patch:
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


def inject_nan(module_name: str) -> targets.Patch:
    """A patch making the first element of one module's output NaN."""

    def install(model: torch.nn.Module):
        def hook(module, args, output):
            first = _first_tensor(output).clone()
            first.view(-1)[0] = math.nan
            return _replace_first_tensor(output, first)

        return model.get_submodule(module_name).register_forward_hook(hook)

    return install
