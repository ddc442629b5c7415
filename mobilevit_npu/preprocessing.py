"""Images: decode (files, folders, globs, URLs), and preprocess exactly as MobileViTImageProcessor does
(shortest edge 288, centre crop 256, x 1/255, RGB->BGR), from the model's own preprocessor_config.json.
"""

from __future__ import annotations

import contextlib
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

from mobilevit_npu import DATA_DIR, reports
from mobilevit_npu.errors import UserError, first_line

logger = logging.getLogger("mobilevit_npu.preprocessing")


BUNDLED_IMAGES_DIR = DATA_DIR / "images"  # the sample photos (package data; their sources: SOURCES.md there)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


URL_TIMEOUT_S = 20.0


URL_MAX_BYTES = 50 * 1024 * 1024


# Bounds on what one image may cost before PIL allocates it (--max_image_pixels, --max_aspect_ratio). A 1x40000 PNG of
# 239 bytes resized to shortest edge 288 would be 288 x 11,520,000 pixels: refused from its header instead.
MAX_IMAGE_PIXELS = 2**27  # 134M: a 108 MP phone photo fits; decoded and resized sizes alike (PIL's own guard,
# which refuses over 2 x Image.MAX_IMAGE_PIXELS = 179M decoded pixels, stays on above it)
MAX_ASPECT_RATIO = 32.0  # 32:1 (wider than any phone panorama); resized that is 288 x 9216 pixels


@dataclass(frozen=True)
class PreprocessConfig:
    shortest_edge: int = 288
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

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        size = cfg.get("size", cls.shortest_edge)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise UserError(f"preprocessor size {size} is not supported: MobileViT resizes by shortest_edge")
            size = size["shortest_edge"]
        crop = cfg.get("crop_size", cls.crop_height)
        if isinstance(crop, dict):
            crop_h, crop_w = crop["height"], crop["width"]
        else:
            crop_h = crop_w = crop
        return cls(
            shortest_edge=int(size),
            crop_height=int(crop_h),
            crop_width=int(crop_w),
            resample=int(cfg.get("resample", Image.Resampling.BILINEAR)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_center_crop=bool(cfg.get("do_center_crop", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_flip_channel_order=bool(cfg.get("do_flip_channel_order", True)),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> PreprocessConfig:
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            logger.warning("%s missing: using MobileViT's defaults (288 / 256 / bilinear / BGR)", path)
            return cls()
        try:
            return cls.from_dict(reports.read_json(path, "preprocessor_config.json"))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} is not a MobileViT preprocessor config ({exc})") from exc


def resize_shape(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after a shortest-edge resize, rounded as transformers does (int(), not round())."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


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
    resized = resize_shape(width, height, cfg.shortest_edge) if cfg.do_resize else (width, height)
    into = f"resized to shortest edge {cfg.shortest_edge} it would be {resized[0]}x{resized[1]}"
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
    """An RGB PIL image resized and centre-cropped as MobileViTImageProcessor does it: HWC uint8, the channels already
    in the model's order (BGR when the config flips them). `to_input` makes the model's input of a batch of these;
    decoding workers send these (a quarter of the float32 input's bytes)."""
    if cfg.do_resize:
        size = resize_shape(image.width, image.height, cfg.shortest_edge)
        if size != image.size:
            image = image.resize(size, resample=Image.Resampling(cfg.resample))
    array = np.asarray(image)
    if cfg.do_center_crop:
        array = center_crop(array, cfg.crop_height, cfg.crop_width)
    if cfg.do_flip_channel_order:
        array = array[..., ::-1]
    return np.ascontiguousarray(array)


def to_input(pixels: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """[N, H, W, C] uint8 from `crop_pixels` -> the model's [N, C, H, W] float32 input: uint8 -> float32, then one
    float32 multiply by the rescale factor (bit for bit transformers' rescale, checked over all 256 values)."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    if cfg.do_rescale:
        x.mul_(torch.tensor(cfg.rescale_factor, dtype=torch.float32))
    return x


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An RGB PIL image to a CHW float32 array exactly as MobileViTImageProcessor makes it."""
    return to_input(torch.from_numpy(crop_pixels(image, cfg))[None], cfg)[0].numpy()


def center_crop(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HWC centre crop with transformers' offsets; pads with zeros where the crop is larger than the image."""
    h, w = array.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return array[top : top + crop_h, left : left + crop_w]
    out_h, out_w = max(h, crop_h), max(w, crop_w)
    padded = np.zeros((out_h, out_w) + array.shape[2:], dtype=array.dtype)
    pad_top, pad_left = (out_h - h) // 2, (out_w - w) // 2
    padded[pad_top : pad_top + h, pad_left : pad_left + w] = array
    top, left = (out_h - crop_h) // 2, (out_w - crop_w) // 2
    return padded[top : top + crop_h, left : left + crop_w]


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


def expand_images(specs: Sequence[str]) -> list[str]:
    """Paths, directories (their images, sorted), globs and URLs, in the order given. A spec that names nothing (a
    missing file, an empty folder, a glob matching no file) stays in the list as given, so that reading it reports it
    as an error for that input instead of dropping it."""
    out: list[str] = []
    for spec in specs:
        found: list[str] = [spec]
        if is_url(spec):
            pass
        elif os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).iterdir() if p.is_file() and is_image_name(p.name)) or [spec]
        elif glob.has_magic(spec) and not os.path.exists(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)) or [spec]
        out.extend(found)
    return out


def bundled_images() -> list[str]:
    """The sample photos shipped with the package, as paths relative to the working directory when they lie below it."""
    folder = BUNDLED_IMAGES_DIR
    with contextlib.suppress(ValueError):
        folder = BUNDLED_IMAGES_DIR.relative_to(Path.cwd())
    return expand_images([str(folder)])
