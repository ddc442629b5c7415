"""Images: decode (files, folders, globs, URLs), and preprocess exactly as the model's image processor does, from its
own preprocessor_config.json: each restated class (PROCESSOR_RULES: MobileViT, ViT, DeiT, BEiT, BiT, MobileNetV2,
ConvNeXt/ResNet, EfficientNet, LeViT, PoolFormer) on the backend transformers picks here (PIL, or torchvision with
transformers 5 when torchvision is importable). MobileViT-X-Small's: shortest edge 288, centre crop 256, x 1/255, BGR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import io
import logging
import os
import stat
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from mobilevit_npu import DATA_DIR, flags, reports
from mobilevit_npu.errors import UserError, first_line

logger = logging.getLogger("mobilevit_npu.preprocessing")


BUNDLED_IMAGES_DIR = DATA_DIR / "images"  # the sample photos (package data; their sources: SOURCES.md there)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


URL_TIMEOUT_S = 20.0


URL_MAX_BYTES = 50 * 1024 * 1024


# Bounds on what one image may cost before PIL allocates it (--max_image_pixels, --max_aspect_ratio). A 1x40000 PNG of
# 239 bytes resized to shortest edge 288 would be 288 x 11,520,000 pixels: refused from its header instead.
# The image limits (their reasons beside them) are declared in flags, torch-free: --help shows them.
MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO = flags.MAX_IMAGE_PIXELS, flags.MAX_ASPECT_RATIO


# ------------------------------------------------------------------------------------------- the image processors
# Each image-processor class restated here (transformers' name, without the "Pil" / "Fast" backend suffix) and the rule
# its resize follows; the rest of every pipeline is the backends' own: resize, centre crop, rescale, normalize
# (transformers 5.25 image_processing_backends.py:656-690 PIL, :399-444 torchvision; 4.47.1 each class's preprocess).
# Read in transformers 5.25 (models/<name>/image_processing_pil_<name>.py and image_processing_<name>.py) and 4.47.1.
PROCESSOR_RULES = {
    # resize, crop, rescale, flip RGB->BGR; no normalisation in either version, whatever do_normalize says
    # (5.25 mobilevit/image_processing_pil_mobilevit.py:161-189, image_processing_mobilevit.py:167-205)
    "MobileViTImageProcessor": "mobilevit",
    "ViTImageProcessor": "plain",  # vit/image_processing_pil_vit.py: the PIL backend's pipeline as it is
    "DeiTImageProcessor": "plain",  # deit/image_processing_pil_deit.py
    "BeitImageProcessor": "plain",  # beit/image_processing_pil_beit.py:136-170 (label reduction: maps only)
    "BitImageProcessor": "plain",  # bit/image_processing_pil_bit.py (DINOv2's processor)
    "MobileNetV2ImageProcessor": "plain",  # mobilenet_v2/image_processing_pil_mobilenet_v2.py:148-179
    # crop_pct: shortest edge < 384 -> resize to int(edge / crop_pct) then centre-crop edge x edge; else a square
    # resize (convnext/image_processing_pil_convnext.py:61-99, image_processing_convnext.py:61-99)
    "ConvNextImageProcessor": "convnext",
    # rescale_offset (- 1 after the rescale) and include_top (divide by the std a second time)
    # (efficientnet/image_processing_pil_efficientnet.py:65-112, image_processing_efficientnet.py:69-166)
    "EfficientNetImageProcessor": "efficientnet",
    # shortest edge resized to int(256 / 224 * edge) (levit/image_processing_pil_levit.py:50-71)
    "LevitImageProcessor": "levit",
    # resize by int(edge / crop_pct) (poolformer/image_processing_pil_poolformer.py:64-93)
    "PoolFormerImageProcessor": "poolformer",
}
# transformers 4.x classes whose preprocess has no centre-crop step (4.47.1 vit/image_processing_vit.py,
# convnext/image_processing_convnext.py preprocess): a do_center_crop in their config is ignored there, applied in 5.x.
V4_NO_CROP = ("ViTImageProcessor", "ConvNextImageProcessor")
# transformers 4.x classes whose resize takes size {height, width} only, and raises on a shortest_edge (4.47.1
# vit/image_processing_vit.py:139, deit/image_processing_deit.py:150, beit/image_processing_beit.py:171,
# efficientnet/image_processing_efficientnet.py:159): refused there as transformers refuses it.
V4_HEIGHT_WIDTH_ONLY = ("ViTImageProcessor", "DeiTImageProcessor", "BeitImageProcessor", "EfficientNetImageProcessor")
BACKENDS = ("pil", "torchvision")
# PIL's resampling filters (transformers' PILImageResampling), and the torchvision modes transformers 5 maps them to
# (image_utils.py:62-69); the torchvision backend is restated only where the mode is the same at any torchvision
# (LANCZOS needs torchvision >= 0.27, else transformers falls back to BICUBIC: image_processing_backends.py:251-259;
# BOX and HAMMING are not tensor modes at all).
RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
TORCHVISION_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_SIZE_KEYS_NOT_RESTATED = ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def default_backend() -> str:
    """The backend `AutoImageProcessor.from_pretrained(folder)` picks with this environment's transformers: 5.x takes
    torchvision when it is importable, else PIL (5.25 models/auto/image_processing_auto.py:360-363); 4.x takes the
    class the config names, the PIL/numpy ("slow") one for every class restated here (4.47.1
    image_processing_auto.py:446-452)."""
    if _transformers_major() < 5:
        return "pil"
    from transformers.utils import is_torchvision_available

    return "torchvision" if is_torchvision_available() else "pil"


def _processor_name(cfg: dict[str, Any], model_type: str | None) -> tuple[str, bool]:
    """(the image-processor class a config names, without backend suffix; whether it named a legacy "...Fast" class),
    found as AutoImageProcessor finds it: image_processor_type, else feature_extractor_type, else the model type's
    entry in transformers' own table (5.25 image_processing_auto.py:139-207, 4.47.1 :418-495)."""
    if "AutoImageProcessor" in (cfg.get("auto_map") or {}):
        raise UserError("preprocessor_config.json names remote code (auto_map.AutoImageProcessor): not restated")
    name = cfg.get("image_processor_type")
    if name is None and isinstance(cfg.get("feature_extractor_type"), str):
        name = cfg["feature_extractor_type"].replace("FeatureExtractor", "ImageProcessor")
    if name is None and model_type:
        from transformers.models.auto import image_processing_auto

        entry = image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
        if isinstance(entry, dict):  # 5.x: {"torchvision": name, "pil": name + "Pil"}
            name = entry.get("torchvision") or entry.get("pil")
        elif isinstance(entry, (tuple, list)) and entry:  # 4.x: (slow, fast)
            name = entry[0]
        if name is None:
            raise UserError(f"preprocessor_config.json names no image processor, nor does model type {model_type!r}")
    if name is None:
        return "MobileViTImageProcessor", False  # a bare dict: MobileViT's, as this toolkit always read it
    if not isinstance(name, str):
        raise UserError(f"preprocessor_config.json: image_processor_type {name!r} is not a class name")
    fast = name.endswith("Fast")
    name = name[: -len("Fast")] if fast else name
    name = name[: -len("Pil")] if name.endswith("Pil") else name
    if name not in PROCESSOR_RULES:
        raise UserError(
            f"image processor {name} is not restated by this toolkit, so its inputs would be guessed: refused "
            f"(restated: {', '.join(sorted(PROCESSOR_RULES))})"
        )
    return name, fast


def _installed_processor(name: str, cfg: dict[str, Any]) -> Any:
    """The installed transformers' own PIL/numpy class built from the config as from_pretrained builds it
    (ImageProcessingMixin.from_dict): its attributes are the config with that version's class defaults filled in."""
    import transformers

    class_name = name + "Pil" if _transformers_major() >= 5 else name
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise UserError(f"transformers {transformers.__version__} has no {class_name}")
    try:
        return cls.from_dict(dict(cfg))
    except Exception as exc:  # transformers' own refusal of the config, whatever it raises
        raise UserError(
            f"preprocessor_config.json: transformers {transformers.__version__}'s {class_name} refuses it "
            f"({first_line(exc)})"
        ) from exc


def _field(container: Any, key: str) -> Any:
    if container is None:
        return None
    if isinstance(container, dict):
        return container.get(key)
    return getattr(container, key, None)


def _positive_int(value: Any, what: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise UserError(f"preprocessor_config.json: {what} is {value!r}, not a positive whole number: {fix}")
    if value != int(value) or int(value) < 1:
        raise UserError(f"preprocessor_config.json: {what} is {value!r}, not a positive whole number: {fix}")
    return int(value)


def _three(value: Any, what: str) -> tuple[float, ...]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"preprocessor_config.json: {what} is {value!r}: give one number or three (one per channel)")
    if not all(np.isfinite(values)):
        raise UserError(f"preprocessor_config.json: {what} is {value!r}: every value must be finite")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the model's input: one image-processor class's pipeline, its config's values with the
    class's defaults filled in (by the installed transformers), and the backend restated: the one AutoImageProcessor
    picks in this environment (`backend`; describe() says it for reports). The defaults are MobileViT-X-Small's."""

    shortest_edge: int | None = 288  # size {"shortest_edge": N}; None when size is {"height", "width"}
    # The model's input height and width: the centre crop's size, or the fixed size the resize gives without a crop.
    crop_height: int = 256
    crop_width: int = 256
    resample: int = Image.Resampling.BILINEAR
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_flip_channel_order: bool = True
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    processor: str = "MobileViTImageProcessor"  # a key of PROCESSOR_RULES
    backend: str = "pil"  # "pil" or "torchvision": the transformers backend whose output this restates
    size_height: int | None = None  # size {"height": H, "width": W}
    size_width: int | None = None
    crop_pct: float | None = None  # ConvNeXt / PoolFormer
    do_normalize: bool = False
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    rescale_offset: bool = False  # EfficientNet
    include_top: bool = False  # EfficientNet

    @property
    def rule(self) -> str:
        return PROCESSOR_RULES[self.processor]

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        return self.crop_height, self.crop_width

    def describe(self) -> str:
        """One line for reports: the class, the backend matched and what it does."""
        steps = []
        if self.do_resize:
            into = f"{self.size_width}x{self.size_height}"
            into = f"shortest edge {self.shortest_edge}" if self.shortest_edge else into
            pct = self.crop_pct is not None and self.rule in ("convnext", "poolformer")
            steps.append(f"resize {into} {RESAMPLE_NAMES.get(self.resample, self.resample)}")
            steps[-1] += f" (crop_pct {self.crop_pct:g})" if pct else ""
        if self.do_center_crop:
            steps.append(f"centre crop {self.crop_width}x{self.crop_height}")
        if self.do_rescale:
            steps.append(f"x {self.rescale_factor:.6g}" + (" - 1" if self.rescale_offset else ""))
        if self.do_normalize:
            steps.append(f"mean {list(self.image_mean)} std {list(self.image_std)}")
        if self.include_top:
            steps.append("/ std again (include_top)")
        if self.do_flip_channel_order:
            steps.append("RGB->BGR")
        return f"{self.processor} ({self.backend} backend): " + ", ".join(steps)

    @classmethod
    def from_dict(
        cls, cfg: dict[str, Any], model_type: str | None = None, backend: str | None = None
    ) -> PreprocessConfig:
        """A preprocessor_config.json's dict as `AutoImageProcessor.from_pretrained` reads it with the installed
        transformers; `model_type` (config.json's) names the class when the dict does not; `backend` defaults to the
        one transformers would pick here. A class or option not restated exactly, or a value transformers would fail
        on, is a UserError naming it and what to do."""
        if not isinstance(cfg, dict):
            raise UserError("preprocessor_config.json does not hold a JSON object")
        name, legacy_fast = _processor_name(cfg, model_type)
        major = _transformers_major()
        if legacy_fast and major < 5:
            raise UserError(f"{name}Fast (transformers 4.x's torchvision processor) is not restated: name {name}")
        backend = backend or default_backend()
        if backend not in BACKENDS:
            raise UserError(f"image-processor backend {backend!r} is not one of {', '.join(BACKENDS)}")
        proc = _installed_processor(name, cfg)
        rule = PROCESSOR_RULES[name]
        if _field(proc, "do_pad"):
            raise UserError(f"preprocessor_config.json: do_pad is not restated for {name}: refused")
        do_resize = bool(_field(proc, "do_resize"))
        do_crop = bool(_field(proc, "do_center_crop")) and not (major < 5 and name in V4_NO_CROP)
        size = _field(proc, "size")
        for key in _SIZE_KEYS_NOT_RESTATED:
            if _field(size, key) is not None:
                raise UserError(f"preprocessor_config.json: size {key} is not restated for {name}: refused")
        edge = _field(size, "shortest_edge")
        size_h, size_w = _field(size, "height"), _field(size, "width")
        fix = 'set "size" to the model\'s resize (e.g. {"shortest_edge": 256} or {"height": 224, "width": 224})'
        if do_resize:
            if edge is not None:
                edge, size_h, size_w = _positive_int(edge, "size shortest_edge", fix), None, None
            elif size_h is not None and size_w is not None:
                size_h, size_w = _positive_int(size_h, "size height", fix), _positive_int(size_w, "size width", fix)
            else:
                raise UserError(f"preprocessor_config.json: size {cfg.get('size')!r} names no resize: {fix}")
            if rule == "convnext" and edge is None:
                raise UserError(f"preprocessor_config.json: {name} resizes by size shortest_edge only: {fix}")
            if major < 5 and name in V4_HEIGHT_WIDTH_ONLY and edge is not None:
                raise UserError(
                    f"preprocessor_config.json: transformers 4.x's {name} resizes by size height and width only, "
                    'not shortest_edge: give size {"height": H, "width": W}'
                )
        else:
            edge, size_h, size_w = None, None, None
        crop_h = crop_w = 0
        if do_crop:
            crop = _field(proc, "crop_size")
            fix_crop = 'set "crop_size" to the model\'s input size (e.g. {"height": 224, "width": 224})'
            crop_h = _positive_int(_field(crop, "height"), "crop_size height", fix_crop)
            crop_w = _positive_int(_field(crop, "width"), "crop_size width", fix_crop)
        resample = _field(proc, "resample")
        resample = Image.Resampling.BILINEAR if resample is None else resample  # image_processing_backends.py:573
        if isinstance(resample, bool) or not isinstance(resample, int) or int(resample) not in RESAMPLE_NAMES:
            raise UserError(
                f"preprocessor_config.json: resample {resample!r} is not a PIL filter ("
                + ", ".join(f"{k} {v}" for k, v in RESAMPLE_NAMES.items())
                + "): set resample to the model's filter"
            )
        resample = int(resample)
        if backend == "torchvision" and do_resize and resample not in TORCHVISION_MODES:
            raise UserError(
                f"preprocessor_config.json: resample {resample} ({RESAMPLE_NAMES[resample]}) on transformers' "
                "torchvision backend depends on the torchvision version: not restated"
            )
        crop_pct = _field(proc, "crop_pct") if rule in ("convnext", "poolformer") else None
        if crop_pct is not None or (rule == "convnext" and do_resize and edge < 384):
            if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct < float("inf"):
                raise UserError(f"preprocessor_config.json: crop_pct is {crop_pct!r}: give the fraction kept (0.875)")
            crop_pct = float(crop_pct)
            if rule == "convnext" and do_resize and edge < 384 and int(edge / crop_pct) < 1:
                raise UserError(f"preprocessor_config.json: crop_pct {crop_pct:g} resizes to nothing: give 0.875")
        factor = _field(proc, "rescale_factor")
        do_rescale = bool(_field(proc, "do_rescale"))
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not np.isfinite(factor):
            raise UserError(f"preprocessor_config.json: rescale_factor is {factor!r}: give a number (e.g. 1/255)")
        efficientnet, mobilevit = rule == "efficientnet", rule == "mobilevit"
        do_normalize = bool(_field(proc, "do_normalize")) and not mobilevit
        include_top = efficientnet and bool(_field(proc, "include_top"))
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if do_normalize or include_top:
            mean, std = _three(_field(proc, "image_mean"), "image_mean"), _three(_field(proc, "image_std"), "image_std")
            if 0.0 in std:
                raise UserError(f"preprocessor_config.json: image_std {list(std)} holds a zero (division by zero)")
        if include_top and backend == "torchvision" and not (do_rescale or do_normalize):
            raise UserError(
                "preprocessor_config.json: include_top without do_rescale or do_normalize fails in transformers' "
                "torchvision backend (it normalizes integer pixels): set do_rescale true"
            )
        found = cls(
            shortest_edge=edge,
            crop_height=crop_h,
            crop_width=crop_w,
            resample=resample,
            do_resize=do_resize,
            do_center_crop=do_crop,
            do_rescale=do_rescale,
            rescale_factor=float(factor),
            do_flip_channel_order=mobilevit and bool(_field(proc, "do_flip_channel_order")),
            processor=name,
            backend=backend,
            size_height=size_h,
            size_width=size_w,
            crop_pct=crop_pct,
            do_normalize=do_normalize,
            image_mean=mean,
            image_std=std,
            rescale_offset=efficientnet and do_rescale and bool(_field(proc, "rescale_offset")),
            include_top=include_top,
        )
        fixed = found._fixed_size()
        if fixed is None:
            raise UserError(
                f"preprocessor_config.json: {name} without a centre crop resizes by the shortest edge, so images of "
                "different shapes give inputs of different shapes, which cannot be batched, compared or exported: "
                'set do_center_crop true with a crop_size, or size {"height": H, "width": W}'
            )
        return dataclasses.replace(found, crop_height=fixed[0], crop_width=fixed[1])

    def _fixed_size(self) -> tuple[int, int] | None:
        """(height, width) every image comes out at, or None when it depends on the image."""
        if self.do_center_crop:
            return self.crop_height, self.crop_width
        if not self.do_resize:
            return None
        if self.rule == "convnext":  # both branches end edge x edge
            return self.shortest_edge, self.shortest_edge
        if self.shortest_edge:
            return None
        if self.rule == "poolformer" and self.crop_pct is not None:
            if self.size_height == self.size_width:
                return None  # resized by its shortest edge (poolformer/image_processing_pil_poolformer.py:78-79)
            return int(self.size_height / self.crop_pct), int(self.size_width / self.crop_pct)
        return self.size_height, self.size_width

    @classmethod
    def from_folder(cls, folder: Path, backend: str | None = None) -> PreprocessConfig:
        path = Path(folder) / "preprocessor_config.json"
        model_type = None
        config_path = Path(folder) / "config.json"
        if config_path.is_file():
            with contextlib.suppress(Exception):  # a bad config.json is reported where the model loads
                model_type = reports.read_json(config_path, "config.json").get("model_type")
        if not os.path.lexists(path):  # a FIFO, a device link or a dangling link is refused by read_json, not skipped
            if model_type not in (None, "mobilevit"):
                raise UserError(f"{path} missing: a {model_type} model's preprocessing cannot be guessed")
            logger.warning("%s missing: using MobileViT's defaults (288 / 256 / bilinear / BGR)", path)
            return cls(backend=backend or default_backend())
        try:
            return cls.from_dict(
                reports.read_json(path, "preprocessor_config.json"), model_type=model_type, backend=backend
            )
        except UserError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise UserError(f"{path}: {str(exc).removeprefix('preprocessor_config.json: ')}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} is not an image-processor config ({first_line(exc)})") from exc


def resize_shape(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after a shortest-edge resize, rounded as transformers does (int(), not round():
    image_transforms.py:249-313 get_resize_output_image_size, default_to_square=False)."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def resized_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int] | None:
    """(width, height) the processor's resize gives an image of this size, or None when it does not resize."""
    if not cfg.do_resize:
        return None
    rule, edge = cfg.rule, cfg.shortest_edge
    if rule == "convnext":  # convnext/image_processing_pil_convnext.py:74-99
        return resize_shape(width, height, int(edge / cfg.crop_pct)) if edge < 384 else (edge, edge)
    if rule == "levit" and edge:  # levit/image_processing_pil_levit.py:58-63
        return resize_shape(width, height, int((256 / 224) * edge))
    if rule == "poolformer" and cfg.crop_pct is not None:  # poolformer/image_processing_pil_poolformer.py:74-88
        if edge:
            return resize_shape(width, height, int(edge / cfg.crop_pct))
        if cfg.size_height == cfg.size_width:
            return resize_shape(width, height, int(cfg.size_height / cfg.crop_pct))
        return int(cfg.size_width / cfg.crop_pct), int(cfg.size_height / cfg.crop_pct)
    if edge:
        return resize_shape(width, height, edge)
    return cfg.size_width, cfg.size_height


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. Transparency is composited on white (as transformers' convert_to_rgb does); 16- and
    32-bit integer and float greyscale are scaled to 8 bits instead of being clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)  # exact enough for 8 bits, half float64's memory
        if image.mode.startswith("I;16"):
            array = array / 257.0
        elif image.mode == "F" and array.size and np.nanmax(array) <= 1.0:
            array = array * 255.0
        elif image.mode == "I" and array.size and array.max() > 255:
            array = array / 257.0
        array = np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)
        return Image.fromarray(array).convert("RGB")  # 2-D uint8 is mode L
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _own_socket(response):
    """A socket of our own (a dup of its file descriptor) on a streaming response's connection, or None: shutting it
    down from another thread makes the blocked read return at once, without touching requests' objects."""
    import socket

    sock = getattr(getattr(response.raw, "_connection", None), "sock", None)
    reader = getattr(getattr(response.raw, "_fp", None), "fp", None)
    try:
        fd = sock.fileno() if sock is not None else reader.fileno()
        return socket.socket(fileno=os.dup(fd))
    except (AttributeError, OSError, ValueError):
        return None


def fetch_url(url: str, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
    """GET an http(s) image within a size cap and a total deadline: `timeout` seconds for the whole download, not per
    read (a server sending a byte every few seconds is cut off at the deadline). Failures are OSError naming the URL."""
    import socket

    import requests

    timeout = URL_TIMEOUT_S if timeout is None else timeout
    max_bytes = URL_MAX_BYTES if max_bytes is None else max_bytes
    deadline = time.monotonic() + timeout
    expired = threading.Event()
    late = OSError(f"could not fetch {url}: no complete response within {timeout:g} s")
    timer = own = None
    try:
        with requests.get(url, timeout=timeout, stream=True) as response:
            own = _own_socket(response)

            def cut() -> None:
                expired.set()
                if own is not None:
                    with contextlib.suppress(OSError):
                        own.shutdown(socket.SHUT_RDWR)

            timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
            timer.daemon = True
            timer.start()
            response.raise_for_status()
            kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if kind.startswith("text/") or kind in ("application/json", "application/xhtml+xml"):
                raise OSError(f"{url} sent {kind}, not an image (a web page instead of the image file?)")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise OSError(f"{url} is {int(declared)} bytes, over the {max_bytes}-byte cap")
            data = bytearray()
            for chunk in response.iter_content(1 << 16):
                data.extend(chunk)
                if len(data) > max_bytes:
                    raise OSError(f"{url} is over the {max_bytes}-byte cap")
                if expired.is_set():
                    raise late
            if expired.is_set():
                raise late
            return bytes(data)
    except Exception as exc:
        if expired.is_set():
            raise late from exc
        if not isinstance(exc, requests.RequestException):
            raise
        raise OSError(f"could not fetch {url}: {first_line(exc)}") from exc
    finally:
        if timer is not None:
            timer.cancel()
        if own is not None:
            own.close()


_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def require_regular_file(path: str | os.PathLike) -> None:
    """Raise OSError (one line) unless `path`, through its symlinks, is a regular file: checked before any read or
    hash of an input, because /dev/zero never ends, a FIFO blocks the open and /dev/stdin waits for a terminal.
    A path that does not exist raises FileNotFoundError as open() would."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        target = os.path.realpath(path)
        via = f" (a link to {target})" if target != os.path.abspath(path) else ""
        raise OSError(f"{path}{via} is {kind}, not a regular file: refused before reading it")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def check_size(width: int, height: int, cfg: PreprocessConfig) -> None:
    """Refuse, from the header alone, an image whose decoded or resized size is over cfg's bounds (OSError, one line)
    before PIL allocates it."""
    if width < 1 or height < 1:
        raise OSError(f"the image has no pixels ({width}x{height})")
    if width * height > cfg.max_image_pixels:
        raise OSError(
            f"refused: {width}x{height} is {width * height:,} pixels, over the {cfg.max_image_pixels:,} allowed "
            "(--max_image_pixels raises the bound)"
        )
    resized = resized_size(width, height, cfg) or (width, height)
    how = f" to shortest edge {cfg.shortest_edge}" if cfg.do_resize and cfg.shortest_edge else ""
    into = f"resized{how} it would be {resized[0]}x{resized[1]}"
    ratio = max(width, height) / min(width, height)
    if ratio > cfg.max_aspect_ratio:
        raise OSError(
            f"refused: {width}x{height} has an aspect ratio of {ratio:,.0f}:1, over the {cfg.max_aspect_ratio:g}:1 "
            f"allowed ({into} pixels; --max_aspect_ratio raises the bound)"
        )
    if resized[0] * resized[1] > cfg.max_image_pixels:
        raise OSError(
            f"refused: {width}x{height} {into} = {resized[0] * resized[1]:,} pixels, over the "
            f"{cfg.max_image_pixels:,} allowed (--max_image_pixels raises the bound)"
        )


def _missing(source: str) -> OSError | None:
    """Why a local source that expand_images kept as given cannot be read: an empty folder, a glob matching nothing."""
    if os.path.isdir(source):
        return OSError(f"no images found in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
    if glob.has_magic(source) and not os.path.exists(source):
        return OSError("no files match this pattern")
    return None


def load_image(source: str | Path, cfg: PreprocessConfig | None = None) -> Image.Image:
    """Open a file or URL, apply its EXIF orientation and convert it to RGB. Every failure is an OSError with a
    one-line message; an image over cfg's size bounds is refused from its header, before it is decoded."""
    cfg = cfg or PreprocessConfig()
    source = str(source)
    if not is_url(source):
        if missing := _missing(source):
            raise missing
        require_regular_file(source)  # a symlink to /dev/zero is refused here, not decoded (or hashed) forever
    try:
        stream = io.BytesIO(fetch_url(source)) if is_url(source) else source
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_size bounds it; PIL's error stays
            opened = Image.open(stream)
        with opened:
            check_size(opened.width, opened.height, cfg)
            opened.load()  # decode now, so a truncated file fails here
            image = ImageOps.exif_transpose(opened)
            return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise OSError(f"refused: {exc} (PIL's decompression-bomb guard)") from exc
    except Image.UnidentifiedImageError as exc:  # its message holds the stream's repr for a URL
        raise OSError("cannot identify image file: not an image format PIL can decode") from exc
    except (ValueError, SyntaxError) as exc:  # some PIL plugins raise these on corrupt data
        raise OSError(f"cannot decode image: {first_line(exc)}") from exc
    except MemoryError as exc:
        raise OSError("out of memory decoding the image") from exc


def crop_pixels(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image resized and centre-cropped as cfg's image processor does it on cfg's backend: HWC uint8, the
    channels already in the model's order (BGR when the config flips them). Every step up to here is on uint8 pixels
    in transformers too (the PIL backend resizes through PIL: image_transforms.py:316-384; the torchvision backend
    resizes uint8 tensors), so `to_input` makes the model's input of a batch of these; decoding workers and the pixel
    cache hold these (a quarter of the float32 input's bytes)."""
    size = resized_size(image.width, image.height, cfg)
    crop = center_crop if cfg.backend == "pil" else torchvision_center_crop
    if cfg.backend == "pil":
        if size is not None and size != image.size:  # PIL's resize to the same size is a copy
            image = image.resize(size, resample=Image.Resampling(cfg.resample))
        array = np.asarray(image)
    else:
        array = torchvision_resize(np.asarray(image), size, cfg.resample) if size is not None else np.asarray(image)
    if cfg.do_resize and cfg.rule == "convnext" and cfg.shortest_edge < 384:  # the crop inside ConvNeXt's resize
        array = crop(array, cfg.shortest_edge, cfg.shortest_edge)
    if cfg.do_center_crop:
        array = crop(array, cfg.crop_height, cfg.crop_width)
    if cfg.do_flip_channel_order:  # image_transforms.py:818-853 (PIL), image_processing_mobilevit.py:153-165
        array = array[..., ::-1]
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()  # torch.from_numpy warns on PIL's read-only arrays


def _native_uint8(mode: str) -> bool:
    """Whether torchvision resizes uint8 CPU tensors without a float round trip (torchvision 0.29
    transforms/v2/functional/_geometry.py:270-280 _do_native_uint8_resize_on_cpu)."""
    import platform

    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
            "aarch64",
            "arm64",
        )
    return mode in ("bicubic", "nearest-exact")  # nearest: uint8 accepted on any device (_geometry.py:318-320)


def resize_kernel(cfg: PreprocessConfig) -> str:
    """What does the resize besides this code: Pillow for the PIL backend (its version is keyed apart); torch's
    interpolate for the torchvision backend, whose uint8 kernel depends on the CPU (_native_uint8)."""
    if cfg.backend == "pil":
        return "pillow"
    import platform

    return f"torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()} {platform.machine()}"


def torchvision_resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """HWC uint8 resized to (width, height) as transformers 5's torchvision backend does it: the PIL image's array made
    a contiguous CHW tensor (image_processing_backends.py:129-151), one image per group on the CPU (image_transforms.py
    :1071-1080), then torchvision's resize_image (transforms/v2/functional/_geometry.py:285-362): antialiased
    interpolate, align_corners False, in uint8 where the CPU kernel takes it, else in float32 rounded back."""
    width, height = size
    if (height, width) == array.shape[:2]:
        return array
    mode = TORCHVISION_MODES[resample]
    antialias = mode in ("bilinear", "bicubic")
    x = torch.from_numpy(np.array(array)).permute(2, 0, 1).contiguous()[None]
    native = _native_uint8(mode)
    y = torch.nn.functional.interpolate(
        x if native else x.to(torch.float32),
        size=[height, width],
        mode=mode,
        align_corners=False if antialias else None,
        antialias=antialias,
    )
    if not native:
        if mode == "bicubic":
            y = y.clamp_(min=0, max=255)
        y = y.round_().to(torch.uint8)
    return y[0].permute(1, 2, 0).numpy()


def input_table(cfg: PreprocessConfig) -> torch.Tensor:
    """[3, 256] float32: what each byte of each channel of a crop becomes in the model's input. Rescale and normalize
    act on each value alone, so this table, made by the backend's own operations in its own order and dtypes, is the
    backend's output for every pixel."""
    return _input_table(
        cfg.backend, cfg.rule, cfg.do_rescale, cfg.rescale_factor, cfg.rescale_offset, cfg.do_normalize,
        cfg.image_mean, cfg.image_std, cfg.include_top,
    )  # fmt: skip


@functools.lru_cache(maxsize=32)
def _input_table(backend, rule, do_rescale, factor, offset, do_normalize, mean, std, include_top) -> torch.Tensor:
    if backend == "pil" and do_rescale and not (offset or do_normalize or include_top):
        # A rescale alone (MobileViT's x 1/255) stays the one float32 multiply this toolkit always made: byte-identical
        # to earlier runs and caches, and bit for bit the torchvision backend's rescale (image * scale). The PIL
        # backend's float64 multiply rounded to float32 is 1 ulp away on 126 of the 256 values (<= 6e-8 for 1/255).
        backend = "torchvision"
    if backend == "pil":
        x: np.ndarray = np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, 3))  # [256, C]: channel last
        if do_rescale:  # image_transforms.py:121-125: float64 multiply, then float32
            x = (x.astype(np.float64) * factor).astype(np.float32)
            if offset:  # efficientnet/image_processing_pil_efficientnet.py:72-74
                x -= 1
        for apply, m in ((do_normalize, mean), (include_top, (0.0, 0.0, 0.0))):  # ..._pil_efficientnet.py:106-109
            if apply:  # image_transforms.py:420-441: float32, (x - mean) / std with mean and std in x's dtype
                x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
                x = (x - np.array(m, dtype=x.dtype)) / np.array(std, dtype=x.dtype)
        return torch.from_numpy(np.ascontiguousarray(x.astype(np.float32).T))
    u = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[None, :, None, :]  # [1, C, 1, 256]: channel first
    if rule == "efficientnet":  # efficientnet/image_processing_efficientnet.py:85-123, 160-166
        fuse = do_rescale and do_normalize and not offset
    else:  # image_processing_backends.py:328-369
        fuse, offset = do_rescale and do_normalize, False
    x = u
    if fuse:
        m, s = torch.tensor(mean) * (1.0 / factor), torch.tensor(std) * (1.0 / factor)
        x = _tv_normalize(x.to(torch.float32), m, s)
    else:
        if do_rescale:
            x = x * factor
            if offset:
                x -= 1
        if do_normalize:
            x = _tv_normalize(x.to(torch.float32), list(mean), list(std))
    if include_top:
        x = _tv_normalize(x, 0, list(std))
    return x.to(torch.float32)[0, :, 0, :].contiguous()


def _tv_normalize(image: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """torchvision 0.29 transforms/v2/functional/_misc.py:37-67 normalize_image (as transformers calls it)."""
    mean = torch.as_tensor(mean, dtype=image.dtype)
    std = torch.as_tensor(std, dtype=image.dtype)
    mean = mean.view(-1, 1, 1) if mean.ndim == 1 else mean
    std = std.view(-1, 1, 1) if std.ndim == 1 else std
    return image.sub(mean).div_(std)


def to_input(pixels: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """[N, H, W, C] uint8 from `crop_pixels` -> the model's [N, C, H, W] float32 input, value for value the backend's
    rescale and normalize (input_table). Where the table is one float32 multiply (MobileViT's x 1/255: checked over
    all 256 values) that multiply is done, as always; otherwise the table is looked up."""
    x = pixels.permute(0, 3, 1, 2)
    table = input_table(cfg)
    factor = torch.tensor(cfg.rescale_factor if cfg.do_rescale else 1.0, dtype=torch.float32)
    if _is_one_multiply(table, factor):
        return x.to(torch.float32, memory_format=torch.contiguous_format).mul_(factor)
    out = torch.empty(x.shape, dtype=torch.float32)
    for c in range(x.shape[1]):
        out[:, c] = table[c][x[:, c].long()]
    return out


def _is_one_multiply(table: torch.Tensor, factor: torch.Tensor) -> bool:
    return bool(torch.equal(table, torch.arange(256, dtype=torch.float32).mul(factor).expand_as(table)))


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image to a CHW float32 array exactly as cfg's image processor makes it on cfg's backend."""
    return to_input(torch.from_numpy(crop_pixels(image, cfg))[None], cfg)[0].numpy()


def center_crop(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HWC centre crop as transformers' PIL backend does it (image_transforms.py:448-530): where the crop is larger
    than the image, zero padding with the odd pixel before the image (ceil)."""
    h, w = array.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= h and left + crop_w <= w:
        return array[top : top + crop_h, left : left + crop_w]
    out_h, out_w = max(h, crop_h), max(w, crop_w)
    padded = np.zeros((out_h, out_w) + array.shape[2:], dtype=array.dtype)
    pad_top, pad_left = -(-(out_h - h) // 2), -(-(out_w - w) // 2)
    padded[pad_top : pad_top + h, pad_left : pad_left + w] = array
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(out_h, top + crop_h), max(0, left) : min(out_w, left + crop_w)]


def torchvision_center_crop(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HWC centre crop as transformers 5's torchvision backend does it (image_processing_backends.py:371-397): where
    the crop is larger than the image, zero padding with the odd pixel after the image (floor)."""
    h, w = array.shape[:2]
    if crop_w > w or crop_h > h:
        top_pad, left_pad = max(crop_h - h, 0) // 2, max(crop_w - w, 0) // 2
        padded = np.zeros((max(h, crop_h), max(w, crop_w)) + array.shape[2:], dtype=array.dtype)
        padded[top_pad : top_pad + h, left_pad : left_pad + w] = array
        array, (h, w) = padded, padded.shape[:2]
    top, left = int((h - crop_h) / 2.0), int((w - crop_w) / 2.0)
    return array[top : top + crop_h, left : left + crop_w]


def preprocess(source: str | Path, cfg: PreprocessConfig, pixels: bool = False) -> np.ndarray:
    """Decode and preprocess one image: the model's CHW float32 input, or with `pixels` the HWC uint8 crop it is made
    of (crop_pixels). Any failure (bad file, over the size bounds, out of memory) is an OSError."""
    try:
        image = load_image(source, cfg)
        return crop_pixels(image, cfg) if pixels else preprocess_image(image, cfg)
    except MemoryError as exc:
        raise OSError("out of memory preprocessing the image") from exc


@dataclass
class Decoded:
    source: str
    pixels: torch.Tensor  # [3, H, W] float32 on the CPU
    preprocess_ms: float

    @property
    def batch(self) -> torch.Tensor:
        return self.pixels.unsqueeze(0)


def read_images(sources: Sequence[str], cfg: PreprocessConfig) -> tuple[list[Decoded], list[dict]]:
    """Preprocess each image, timing it; the ones that fail come back as {"image", "error"}. Both lists keep the
    order of `sources`."""
    ok, errors = [], []
    for source in sources:
        start = time.perf_counter()
        try:
            array = preprocess(source, cfg)
        except OSError as exc:
            errors.append({"image": source, "error": str(exc) or type(exc).__name__})
            continue
        ok.append(Decoded(source, torch.from_numpy(array), (time.perf_counter() - start) * 1000.0))
    return ok, errors


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def folder_entry(path: str | os.PathLike) -> str:
    """What an entry of a scanned folder is, from os.stat alone (nothing is opened: a FIFO's open blocks): "image" (a
    regular file, through its links, with an image name), "other" (a folder, or a regular file with another name: not
    an image, not counted), or else why it is not an image file ("a dangling symlink", "a FIFO", "a character device
    (a link to /dev/zero)", ...). Scans list the last kind too, so each is named and counted as skipped."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a dangling symlink (to {os.readlink(path)})" if os.path.islink(path) else "gone while scanned"
    except OSError as exc:  # a symlink loop, no permission, a name too long
        return f"unreadable ({exc.strerror or first_line(exc)})"
    if stat.S_ISDIR(mode):
        return "other"
    if stat.S_ISREG(mode):
        return "image" if is_image_name(os.fspath(path)) else "other"
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"{kind} (a link to {os.path.realpath(path)})" if os.path.islink(path) else kind


def image_key(source: str) -> Any:
    """One key per image whatever its spelling: a local regular file's (device, inode), so `ds/x.JPEG`, `ds/./x.JPEG`,
    a symlink to it and a hard link are one image; otherwise the normalised absolute path (or the URL as given)."""
    if is_url(source):
        return source
    try:
        st = os.stat(source)
        if stat.S_ISREG(st.st_mode):
            return st.st_dev, st.st_ino
    except (OSError, ValueError):
        pass
    return os.path.normpath(os.path.abspath(source))


def expand_images(specs: Sequence[str]) -> list[str]:
    """Paths, directories (their images, sorted), globs and URLs, in the order given, each image once (image_key: the
    same file under two spellings is one image, listed as first given). A spec that names nothing (a missing file, an
    empty folder, a glob matching no file) stays in the list as given, so that reading it reports it as an error for
    that input instead of dropping it. A folder's or a glob's entries that are not image files but not plain other
    files either (a dangling symlink, a FIFO, a link to a device: folder_entry) are listed too, so reading refuses
    each in one line (never opening it) and the run counts it as skipped; folders and other regular files are not."""
    out: list[str] = []
    seen: set[Any] = set()
    repeated = 0
    for spec in specs:
        found: list[str] = [spec]
        if is_url(spec):
            pass
        elif os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).iterdir() if folder_entry(p) != "other") or [spec]
        elif glob.has_magic(spec) and not os.path.lexists(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if not os.path.isdir(p)) or [spec]
        for source in found:
            key = image_key(source)
            if key in seen:
                repeated += 1
                continue
            seen.add(key)
            out.append(source)
    if repeated:
        logger.info("%d image(s) given again under another name (or the same): each image is read once", repeated)
    return out


def bundled_images() -> list[str]:
    """The sample photos shipped with the package, as paths relative to the working directory when they lie below it."""
    folder = BUNDLED_IMAGES_DIR
    with contextlib.suppress(ValueError):
        folder = BUNDLED_IMAGES_DIR.relative_to(Path.cwd())
    return expand_images([str(folder)])
