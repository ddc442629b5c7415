"""Model families: what differs between the image classifiers the toolkit runs, declared once per family.

A family is resolved once, from the folder's config.json (`model_type`, `architectures`), and travels with the loaded
model (models.LoadedModel.family); code downstream asks the family, never compares model types itself:

- loading: every family loads through transformers' AutoModelForImageClassification (the class that config.json's
  `model_type` maps to, MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES in transformers/models/auto/modeling_auto.py);
  an unknown `model_type` that mapping holds runs as the generic family; one it does not hold is refused in one line;
- preprocessing: the folder's preprocessor_config.json, read by mobilevit_npu.preprocessing (not here);
- synthetic healthy weights: synthetic.build_synthetic_model, for any family (the head is `head`);
- the fast path: fastpath.FastMobileViT restates MobileViT only (`fast_path`); every other family's fastest exact
  mode is `compiled` (`fastest_exact_mode`);
- ONNX for ATC (opsets 11-15): `export_patch` restates what an exporter cannot write at those opsets (MobileViTV2's
  unfold/fold, which the TorchScript exporter writes as aten::col2im, opset 18), `onnx_refusal` refuses instead;
- the card: `card_keys` (the config fields its model section lists) and `published` (figures only for checkpoints
  whose figures are known and cited).

To add a family: one `Family(...)` in FAMILIES (docs/architecture.md, "Add a model family").
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from mobilevit_npu.errors import UserError


@dataclass(frozen=True)
class Published:
    """Figures a paper published for one checkpoint, with where they are from (the card prints them only for it)."""

    checkpoint: str  # hub id
    top1: str
    top5: str
    params: str
    paper: str  # title
    paper_url: str
    source: str  # where the figures are stated
    # the config fields that identify the checkpoint's architecture (the card compares them with the folder's)
    config: Mapping[str, Any] = field(default_factory=dict)
    labels: int = 1000  # ImageNet-1k


@dataclass(frozen=True)
class Family:
    name: str  # the family's key: its model_type, or "generic"
    title: str  # as people write it
    model_types: tuple[str, ...] = ()
    fast_path: bool = False  # fastpath.FastMobileViT restates it exactly
    # the config fields the card's model section lists (those the config has)
    card_keys: tuple[str, ...] = ("hidden_sizes", "hidden_size", "num_hidden_layers", "num_attention_heads")
    onnx_refusal: Optional[str] = None  # why an ATC-range ONNX export is refused, one line (None: it exports)
    # a context manager factory (model) -> restates, for the export only, what the exporter cannot write at 11-15
    export_patch: Optional[Callable[[torch.nn.Module], contextlib.AbstractContextManager]] = None
    published: tuple[Published, ...] = ()
    license: Mapping[str, str] = field(default_factory=dict)  # the hub front matter's licence keys, where known
    known: bool = True  # declared here (False: an AutoModelForImageClassification model_type run generically)
    # synthetic weights only (synthetic.build_synthetic_model): module-name suffix -> factor on that module's
    # He-initialised weight. Damps the residual branches where full-strength ones make the random net chaotic (a bf16
    # rounding in one stage grows into another class a few stages on), as a trained net's branches add little.
    synthetic_damping: Mapping[str, float] = field(default_factory=dict)

    @property
    def fastest_exact_mode(self) -> str:
        """The execution mode (execution.MODES) that is the family's fastest exact one."""
        return "fast" if self.fast_path else "compiled"

    def fast_unavailable(self) -> str:
        """Why `fast` (and bf16 over it) does not apply, naming the mode to use instead."""
        return (
            f"fast is fastpath.FastMobileViT, MobileViT's restatement; {self.title}'s fastest exact mode is "
            f"{self.fastest_exact_mode}"
        )

    def published_for(self, config: Mapping[str, Any]) -> Optional[Published]:
        """The published figures whose checkpoint's architecture config.json matches, else None (never guessed)."""
        for pub in self.published:
            same = all(config.get(k) == v for k, v in pub.config.items())
            if same and len(config.get("id2label") or {}) == pub.labels:
                return pub
        return None


# ------------------------------------------------------------------------------------- MobileViTV2 for the exporter


def _unfold_patches(self, feature_map: torch.Tensor):
    """MobileViTV2Layer.unfolding (transformers modeling_mobilevitv2.py, `nn.functional.unfold` with kernel = stride =
    patch, then reshape to (batch, channels, patch pixels, patches)) as reshapes and a permute: the patches do not
    overlap, so unfold is a pure rearrangement (rows/columns past the last whole patch dropped, as unfold drops
    them). Channel index of unfold's output: c * ph * pw + i * pw + j; patch index: r * nw + s."""
    b, c, h, w = feature_map.shape
    ph, pw = int(self.patch_height), int(self.patch_width)
    nh, nw = h // ph, w // pw
    x = feature_map[:, :, : nh * ph, : nw * pw].reshape(b, c, nh, ph, nw, pw)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c, ph * pw, nh * nw), (h, w)


def _fold_patches(self, patches: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """MobileViTV2Layer.folding (`nn.functional.fold`, kernel = stride = patch) as the inverse rearrangement; where
    the map was not a whole number of patches, fold leaves the rest zero: padded with zeros here."""
    b, c, _, _ = patches.shape
    ph, pw = int(self.patch_height), int(self.patch_width)
    h, w = int(output_size[0]), int(output_size[1])
    nh, nw = h // ph, w // pw
    x = patches.reshape(b, c, ph, pw, nh, nw).permute(0, 1, 4, 2, 5, 3).reshape(b, c, nh * ph, nw * pw)
    if (nh * ph, nw * pw) != (h, w):
        x = torch.nn.functional.pad(x, (0, w - nw * pw, 0, h - nh * ph))
    return x


@contextlib.contextmanager
def _mobilevitv2_export(model: torch.nn.Module) -> Iterator[None]:
    """For the export only: every MobileViTV2 block's unfolding/folding as reshapes and permutes (opset 11-15
    operators) instead of nn.functional.unfold/fold (aten::im2col/col2im; the TorchScript exporter has col2im only at
    opset 18, torch/onnx/symbolic_opset18.py). Set on the instances, removed on exit."""
    patched = [m for m in model.modules() if hasattr(m, "unfolding") and hasattr(m, "folding")]
    for m in patched:
        m.unfolding = types.MethodType(_unfold_patches, m)
        m.folding = types.MethodType(_fold_patches, m)
    try:
        yield
    finally:
        for m in patched:
            for name in ("unfolding", "folding"):
                m.__dict__.pop(name, None)


# ------------------------------------------------------------------------------------------------------ the families

MOBILEVIT_XS = Published(
    checkpoint="apple/mobilevit-x-small",
    top1="74.8%",
    top5="92.3%",
    params="2.3M",
    paper="MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer",
    paper_url="https://arxiv.org/abs/2110.02178",
    source="arXiv:2110.02178, Table 3 (ImageNet-1k validation)",
    config={
        "model_type": "mobilevit",
        "hidden_sizes": [96, 120, 144],
        "neck_hidden_sizes": [16, 32, 48, 64, 80, 96, 384],
    },
    labels=1000,
)

# apple/mobilevit-* and apple/mobilevitv2-* on the hub: Apple's sample code licence (their model cards' front matter)
APPLE_LICENSE = {
    "license": "other",
    "license_name": "apple-sample-code-license",
    "license_link": "https://github.com/apple/ml-cvnets/blob/main/LICENSE",
}

MOBILEVIT_KEYS = ("hidden_sizes", "neck_hidden_sizes", "num_attention_heads", "patch_size", "hidden_act")

FAMILIES: tuple[Family, ...] = (
    Family(
        "mobilevit",
        "MobileViT",
        ("mobilevit",),
        fast_path=True,
        card_keys=MOBILEVIT_KEYS,
        published=(MOBILEVIT_XS,),
        license=APPLE_LICENSE,
    ),
    Family(
        "mobilevitv2",
        "MobileViTV2",
        ("mobilevitv2",),
        card_keys=("width_multiplier", "patch_size", "n_attn_blocks", "base_attn_unit_dims", "hidden_act"),
        export_patch=_mobilevitv2_export,
        license=APPLE_LICENSE,
        # Measured on synthetic MobileViTV2-0.5/1.0 (5 photos, bf16 weights against float32): undamped, the cosine
        # falls 0.993 -> 0.958 across encoder.layer.3's transformer and 0.923 -> 0.786 across layer.4's (logits
        # 0.53-0.85); damped so, every stage keeps >= 0.997 and the logits >= 0.99. The qkv projection's factor also
        # softens the query's softmax over patches (MobileViTV2LinearSelfAttention, modeling_mobilevitv2.py).
        synthetic_damping={
            "attention.qkv_proj.convolution": 0.2,
            "attention.out_proj.convolution": 0.5,
            "ffn.conv2.convolution": 0.1,
        },
    ),
    Family("vit", "ViT", ("vit",), card_keys=("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")),
    Family(
        "deit", "DeiT", ("deit",), card_keys=("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")
    ),
    Family("swin", "Swin", ("swin",), card_keys=("embed_dim", "depths", "num_heads", "window_size", "patch_size")),
    Family("convnext", "ConvNeXt", ("convnext",), card_keys=("hidden_sizes", "depths", "hidden_act")),
    Family("resnet", "ResNet", ("resnet",), card_keys=("embedding_size", "hidden_sizes", "depths", "layer_type")),
    Family(
        "efficientnet",
        "EfficientNet",
        ("efficientnet",),
        card_keys=("width_coefficient", "depth_coefficient", "hidden_dim", "hidden_act"),
    ),
    Family("mobilenet_v2", "MobileNetV2", ("mobilenet_v2",), card_keys=("depth_multiplier", "hidden_act")),
)


def _auto_image_classifiers() -> Mapping[str, str]:
    """model_type -> class name, from transformers' own AutoModelForImageClassification mapping (4.47.1 and 5.x:
    transformers/models/auto/modeling_auto.py, MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES


def resolve(config: Mapping[str, Any] | Any, where: str = "config.json") -> Family:
    """The family of a config (config.json as a dict, or a transformers PretrainedConfig). A model_type that
    AutoModelForImageClassification does not map is a UserError, one line."""
    if not isinstance(config, Mapping):
        config = {
            "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
        }
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"{where} has no `model_type`: not a transformers model folder")
    if model_type not in _auto_image_classifiers():
        raise UserError(
            f"{where}: model_type {model_type!r} is not an image classifier transformers knows "
            "(AutoModelForImageClassification has no class for it)"
        )
    return Family(model_type, model_type, (model_type,), known=False)


def for_model(model: torch.nn.Module) -> Family:
    """The family of a loaded transformers model (its config), or of fastpath's restatement (MobileViT)."""
    config = getattr(model, "config", None)
    if config is None:
        inner = getattr(model, "model", None)  # execution.Logits and the like
        config = getattr(inner, "config", None)
    if config is None:
        from mobilevit_npu import fastpath

        if isinstance(model, fastpath.FastMobileViT):
            return FAMILIES[0]
        raise TypeError(f"{type(model).__name__} has no transformers config to tell its family")
    return resolve(config)


def head(model: torch.nn.Module) -> torch.nn.Linear:
    """The classification head: the last nn.Linear under `classifier` (ResNet's is classifier.1) with num_labels
    outputs, else the last Linear with num_labels outputs."""
    labels = int(model.config.num_labels)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == labels]
    named = [m for n, m in found if n.split(".")[0] == "classifier"]
    if named or found:
        return (named or [m for _, m in found])[-1]
    raise TypeError(f"{type(model).__name__} has no linear head with {labels} outputs")
