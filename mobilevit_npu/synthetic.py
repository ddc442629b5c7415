"""Synthetic weights with healthy activations, for machines without the real checkpoint, for any image-classifier
family (mobilevit_npu.families): `--synthetic` is the full-size MobileViT-X-Small; build_synthetic_model and
save_synthetic take any AutoModelForImageClassification config.

transformers' random init draws BatchNorm scales near 0 for MobileViT, EfficientNet and MobileNetV2, so activations
die (logits ~0, CPU-vs-device checks pass trivially, float denormals slow CPU inference ~5x). These weights have
BatchNorm scale 1 and running statistics calibrated on real photos, and a head scaled so the logits spread as a
trained model's do.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import ImageOps

from mobilevit_npu import DATA_DIR, atomic, devices, families, models, preprocessing

logger = logging.getLogger("mobilevit_npu.synthetic")

# apple/mobilevit-x-small's config.json and preprocessor_config.json, shipped with the package (the same files as the
# repository's model/ folder: tests/test_package.py keeps them equal), so --synthetic works from an installed copy.
X_SMALL_DIR = DATA_DIR / "x_small"


def x_small_config():
    """The apple/mobilevit-x-small configuration (the package's copy of model/config.json)."""
    from transformers import MobileViTConfig

    return MobileViTConfig.from_pretrained(str(X_SMALL_DIR))


def _calibration_batch(images: Iterable[str], cfg: preprocessing.PreprocessConfig) -> torch.Tensor:
    """The photos plus their mirror images and two shifted crops each: varied real statistics for BatchNorm."""
    tensors = []
    edge = getattr(cfg, "shortest_edge", None)
    for path in images:
        image = preprocessing.load_image(path)
        tensors.append(torch.from_numpy(preprocessing.preprocess_image(image, cfg)))
        tensors.append(torch.from_numpy(preprocessing.preprocess_image(ImageOps.mirror(image), cfg)))
        if isinstance(edge, int) and cfg.do_center_crop and getattr(cfg, "crop_pct", None) is None:  # wider resize
            wide, shown = dataclasses.replace(cfg, shortest_edge=edge + 64), image
        else:  # a fixed-size resize: the centre 80 % of the photo instead
            w, h = image.size
            wide, shown = cfg, image.crop((w // 10, h // 10, w - w // 10, h - h // 10))
        tensors.append(torch.from_numpy(preprocessing.preprocess_image(shown, wide)))
        tensors.append(torch.from_numpy(preprocessing.preprocess_image(ImageOps.flip(shown), wide)))
    return torch.stack(tensors)


def _is_norm(module: torch.nn.Module) -> bool:
    """torch's norms and the families' own LayerNorm classes (ConvNeXt's ConvNextLayerNorm is no nn.LayerNorm)."""
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    return isinstance(module, norms) or type(module).__name__.endswith("LayerNorm")


@torch.no_grad()
def build_synthetic_model(
    config=None,
    seed: int = 0,
    images: Sequence[str] | None = None,
    logit_std: float = 3.0,
    preprocess: preprocessing.PreprocessConfig | None = None,
) -> torch.nn.Module:
    """An AutoModelForImageClassification (of `config`; the X-Small by default) whose activations are healthy, for
    machines without the real weights.

    transformers' random init draws BatchNorm scales near 0, so activations die (logits ~0, float denormals make CPU
    inference ~5x slower). Here: He-initialised convs and linears, norm scale 1 (BatchNorm, LayerNorm, GroupNorm and
    the families' own LayerNorms), the residual branches the family damps (families.Family.synthetic_damping:
    MobileViTV2's) scaled down, layer scales (ConvNeXt's 1e-6) 0.5, BatchNorm running statistics calibrated on
    real photos preprocessed by `preprocess` (the processor of the folder the weights are for; MobileViT's defaults
    when None, which only fit MobileViT), and the head (families.head) scaled so the logits spread (std `logit_std`
    across classes) as a trained model's do. Deterministic for a given seed, config, preprocessing and photos.
    """
    from transformers import AutoModelForImageClassification

    config = config or x_small_config()
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForImageClassification.from_config(config).eval()
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = module.weight[0].numel()
            gain = 1.0 if getattr(module, "groups", 1) > 1 else math.sqrt(2.0)
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * gain / math.sqrt(fan_in))
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.02)
        elif _is_norm(module) and getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    damping = families.resolve(model.config).synthetic_damping
    for name, module in model.named_modules():
        factor = next((f for suffix, f in damping.items() if name.endswith(suffix)), None)
        if factor is not None:
            module.weight.mul_(factor)
    for name, param in model.named_parameters():
        if name.endswith("layer_scale_parameter"):  # ConvNeXt: 1e-6 at init would leave every block an identity
            param.fill_(0.5)
    batch = _calibration_batch(images or preprocessing.bundled_images(), preprocess or preprocessing.PreprocessConfig())
    calibrate_batchnorm(model, batch)
    logits = model(pixel_values=batch).logits
    classifier = families.head(model)
    scale = logit_std / float(logits.std(dim=1).mean())
    classifier.weight.mul_(scale)
    classifier.bias.copy_(torch.randn(classifier.bias.shape, generator=generator) * 0.1 * logit_std)
    return model.eval()


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """Set every BatchNorm's running mean/var to the statistics of `batch`, layer by layer, in one forward pass."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass gives the exact batch statistics
        m.train()
    try:
        model(pixel_values=batch)
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)


def synthetic_model(device: devices.Device | None = None, dtype: str = "fp32", seed: int = 0) -> models.LoadedModel:
    """The full-size synthetic X-Small, ready to run; reports name it "synthetic"."""
    model = build_synthetic_model(seed=seed)
    source = {"synthetic": True, "name": f"synthetic mobilevit-x-small (seed {seed})", "seed": seed}
    preprocess = preprocessing.PreprocessConfig.from_folder(X_SMALL_DIR)
    return models.finish(model, preprocess, source, device, dtype)


def save_synthetic(folder: str | Path, config, processor, seed: int = 0, images: Sequence[str] | None = None) -> Path:
    """Any family's synthetic weights saved the real way: `processor` (a transformers image processor).save_pretrained,
    the weights calibrated on photos preprocessed as that saved folder says, then the model's save_pretrained."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(str(folder))
    preprocess = preprocessing.PreprocessConfig.from_folder(folder)
    build_synthetic_model(config=config, seed=seed, images=images, preprocess=preprocess).save_pretrained(str(folder))
    return folder


def save_synthetic_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the synthetic X-Small as a Hugging Face folder (config, safetensors, preprocessor config)."""
    folder = Path(folder)
    build_synthetic_model(seed=seed).save_pretrained(str(folder))
    src = X_SMALL_DIR / "preprocessor_config.json"
    atomic.write(folder / "preprocessor_config.json", src.read_bytes())
    return folder
