"""Test-only perturbations of the target model: each is a targets.Patch (installs a forward hook, or wraps one
module's forward)."""

from __future__ import annotations

import functools
import math
import types
from typing import Any

import numpy as np
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


def add_noise_in_forward(module_name: str, scale: float = 1.0, seed: int = 0) -> targets.Patch:
    """Gaussian noise (scale x the output's std) added inside one module's forward, invisibly to tools that wrap
    torch's APIs.

    msprobe's module hook is moved to the front of the module's forward hooks (`move_to_end(handle.id, last=False)`,
    msprobe/pytorch/dump/module_dump/module_processor.py:300, mindstudio-probe 26.2.0), so it records a module's output
    before add_noise's hook changes it: the noise must be in the forward itself. And msprobe's L1 wraps the methods of
    torch.Tensor, torch and torch.nn.functional (pytorch/dump/api_dump/api_register.py:48-55): noise made with them
    would add API calls to the target alone and shift the call numbers msprobe matches rows by. So the noise comes
    from numpy and is added with torch._C.TensorBase's methods, which msprobe leaves alone. The forward hooks of
    --layers see the noisy output as well."""
    base = torch._C.TensorBase

    def install(model: torch.nn.Module):
        module = model.get_submodule(module_name)
        rng = np.random.default_rng(seed)

        def noisy_forward(self, *args, **kwargs):
            output = type(self).forward(self, *args, **kwargs)
            first = _first_tensor(output)
            values = base.numpy(base.float(base.cpu(base.detach(first))))
            noise = rng.standard_normal(values.shape).astype(np.float32) * (scale * (float(values.std()) or 1.0))
            noisy = base.add(first, base.to(base.new_tensor(first, noise), first.device, first.dtype))
            return _replace_first_tensor(output, noisy)  # a new tensor: an output aliasing the input stays intact

        # a bound method, so that a deep copy of the model (probe.dump_and_compare dumps copies) calls its own forward
        module.forward = types.MethodType(noisy_forward, module)
        return module

    return install
