"""An exact, layout-friendly re-statement of MobileViTForImageClassification.

`build_fast_model(model)` returns a plain `nn.Module` computing the same logits as the Hugging Face model (float32
rounding aside: cosine >= 0.99999, same top-1) with:

- BatchNorm folded into the preceding convolution (in float64, then cast back);
- query/key/value fused into one linear, attention through `scaled_dot_product_attention`;
- the MobileViT block's unfold/fold written as one permute each that reads and writes channels-last memory directly
  (transformers' version is four reshapes/transposes in NCHW order, i.e. two extra copies per block).

It reads the model through its state-dict structure only (`mobilevit.conv_stem`, `encoder.layer[i]`, `conv_kxk`,
`transformer.layer[j].attention.attention.query`, ...), which every transformers release from 4.x to 5.x must keep to
load checkpoints; no private helpers are imported. The benchmark's `fast` mode is this model in channels-last memory,
built on CPU by torch.export + AOTInductor with weight freezing (torch.compile where that is unavailable).

No fast preprocessing path lives here on purpose: torch's uint8 antialiased bilinear resize differs from PIL's by
1/255 on 0.01-0.8% of the pixels of every bundled photo (measured), so end-to-end runs use `common.preprocess`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.Module | None) -> nn.Conv2d:
    """A new Conv2d with bias equal to conv followed by bn (eval statistics); the arithmetic is done in float64 on the
    CPU, whatever the device, and the result copied to the conv's device."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )

    def cpu64(t: torch.Tensor) -> torch.Tensor:  # float64 on the CPU: the NPU's float64 support varies by operator
        return t.detach().to("cpu", torch.float64)

    weight = cpu64(conv.weight)
    bias = cpu64(conv.bias) if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    if bn is not None:
        scale = cpu64(bn.weight) / torch.sqrt(cpu64(bn.running_var) + bn.eps)
        weight = weight * scale.reshape(-1, 1, 1, 1)
        bias = (bias - cpu64(bn.running_mean)) * scale + cpu64(bn.bias)
    with torch.no_grad():  # cast on the CPU, then copied to the device
        fused.weight.copy_(weight.to(conv.weight.dtype))
        fused.bias.copy_(bias.to(conv.weight.dtype))
    return fused


class FusedConv(nn.Module):
    """MobileViTConvLayer (conv, optional BatchNorm, optional activation) with the BatchNorm folded in.

    With `linear_max_pixels` set, a 1x1 stride-1 convolution on channels-last input of at most that many pixels
    (batch x height x width) runs as a linear over the (pixels, channels) matrix that channels-last memory already is
    (two permutes that are views, no copy): the same sums, and inductor can then build it as a GEMM with the bias,
    activation and residual fused in, instead of calling oneDNN. Large maps keep oneDNN's convolution (with its SiLU
    fused), which wins there."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.conv = _fold_conv_bn(layer.convolution, getattr(layer, "normalization", None))
        activation = getattr(layer, "activation", None)
        self.act = copy.deepcopy(activation) if isinstance(activation, nn.Module) else (activation or nn.Identity())
        conv = self.conv
        self.pointwise = (
            conv.kernel_size == (1, 1)
            and conv.stride == (1, 1)
            and conv.groups == 1
            and (conv.padding in ((0, 0), "valid"))
        )
        self.linear_max_pixels: int | None = None  # None: always a convolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        limit = self.linear_max_pixels
        if (
            limit is not None
            and self.pointwise
            and x.shape[0] * x.shape[2] * x.shape[3] <= limit
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            y = F.linear(x.permute(0, 2, 3, 1), self.conv.weight.flatten(1), self.conv.bias).permute(0, 3, 1, 2)
            return self.act(y)
        return self.act(self.conv(x))


class InvertedResidual(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.expand = FusedConv(block.expand_1x1)
        self.depthwise = FusedConv(block.conv_3x3)
        self.reduce = FusedConv(block.reduce_1x1)
        self.use_residual = bool(block.use_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(self.depthwise(self.expand(x)))
        return x + y if self.use_residual else y


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer on (sequences, tokens, channels) with a fused QKV projection and SDPA."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        attn = layer.attention.attention
        self.heads = int(attn.num_attention_heads)
        self.head_dim = int(attn.attention_head_size)
        self.math_attention = False
        q, k, v = attn.query, attn.key, attn.value
        self.qkv = nn.Linear(q.in_features, 3 * q.out_features, bias=q.bias is not None)
        self.qkv.to(device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight], dim=0))
            if q.bias is not None:
                self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias], dim=0))
        self.proj = copy.deepcopy(layer.attention.output.dense)
        self.norm1 = copy.deepcopy(layer.layernorm_before)
        self.norm2 = copy.deepcopy(layer.layernorm_after)
        self.fc1 = copy.deepcopy(layer.intermediate.dense)
        act = layer.intermediate.intermediate_act_fn
        self.act = copy.deepcopy(act) if isinstance(act, nn.Module) else act
        self.fc2 = copy.deepcopy(layer.output.dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(s, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.math_attention:  # softmax(q k^T / sqrt(d)) v spelt out: for graph compilers without an SDPA converter
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            attn = torch.matmul(scores.softmax(dim=-1), v)
        else:
            attn = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as transformers divides
        x = x + self.proj(attn.transpose(1, 2).reshape(s, n, c))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class MobileViTBlock(nn.Module):
    """MobileViTLayer: local convs, unfold into patches, transformer, fold back, projection, fusion with the input."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        down = getattr(layer, "downsampling_layer", None)
        self.down = InvertedResidual(down) if down is not None else None
        self.conv_kxk = FusedConv(layer.conv_kxk)
        self.conv_1x1 = FusedConv(layer.conv_1x1)
        self.transformer = nn.ModuleList(TransformerLayer(t) for t in layer.transformer.layer)
        self.norm = copy.deepcopy(layer.layernorm)
        self.proj = FusedConv(layer.conv_projection)
        self.fusion = FusedConv(layer.fusion)
        self.ph, self.pw = int(layer.patch_height), int(layer.patch_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        residual = x
        y = self.conv_1x1(self.conv_kxk(x))
        b, c, h, w = y.shape
        ph, pw = self.ph, self.pw
        nh, nw = math.ceil(h / ph), math.ceil(w / pw)
        resized = (nh * ph, nw * pw) != (h, w)
        if resized:
            y = F.interpolate(y, size=(nh * ph, nw * pw), mode="bilinear", align_corners=False)
        # unfold: sequence = (image, row-in-patch, col-in-patch), token = (patch row, patch col), as transformers
        # orders them. From channels-last memory (b, h, w, c) this is one permute copy.
        t = y.permute(0, 2, 3, 1).reshape(b, nh, ph, nw, pw, c).permute(0, 2, 4, 1, 3, 5).reshape(b * ph * pw, -1, c)
        for layer in self.transformer:
            t = layer(t)
        t = self.norm(t)
        # fold back straight into channels-last memory
        y = t.reshape(b, ph, pw, nh, nw, c).permute(0, 3, 1, 4, 2, 5).reshape(b, nh * ph, nw * pw, c)
        y = y.permute(0, 3, 1, 2)
        if resized:
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        y = self.proj(y)
        return self.fusion(torch.cat((residual, y), dim=1))


class FastMobileViT(nn.Module):
    """Returns the logits tensor (not a ModelOutput): forward(pixel_values) -> (batch, num_labels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        body = model.mobilevit
        self.stem = FusedConv(body.conv_stem)
        layers = []
        for layer in body.encoder.layer:
            if hasattr(layer, "transformer"):
                layers.append(MobileViTBlock(layer))
            else:
                layers.append(nn.Sequential(*(InvertedResidual(block) for block in layer.layer)))
        self.layers = nn.ModuleList(layers)
        expand = getattr(body, "conv_1x1_exp", None) if getattr(body, "expand_output", True) else None
        self.expand = FusedConv(expand) if expand is not None else None
        self.classifier = copy.deepcopy(model.classifier)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixel_values)
        for layer in self.layers:
            x = layer(x)
        if self.expand is not None:
            x = self.expand(x)
        return self.classifier(x.mean(dim=(-2, -1)))


@torch.no_grad()
def build_fast_model(
    model: nn.Module, channels_last: bool = True, math_attention: bool = False, linear_max_pixels: int | None = None
) -> FastMobileViT:
    """The exact re-statement of a MobileViTForImageClassification (the original is left untouched). With
    `math_attention` the attention is written as matmul-softmax-matmul instead of scaled_dot_product_attention; with
    `linear_max_pixels` (channels-last only) the 1x1 convolutions on maps of at most that many pixels run as linears
    (see FusedConv)."""
    from mobilevit_npu import families  # the family says whether this restatement applies (MobileViT only)

    config = getattr(model, "config", None)
    if config is not None and not families.resolve(config).fast_path:
        raise TypeError(families.resolve(config).fast_unavailable())
    if not hasattr(model, "mobilevit") or not hasattr(model, "classifier"):
        raise TypeError(f"expected a MobileViTForImageClassification, got {type(model).__name__}")
    fast = FastMobileViT(model).eval()
    for module in fast.modules():
        if isinstance(module, TransformerLayer):
            module.math_attention = math_attention
        if isinstance(module, FusedConv):
            module.linear_max_pixels = linear_max_pixels if channels_last else None
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast
