"""The layer vocabulary: one small builder per recipe key, with shape inference.

Each builder takes the layer's spec and the input shape — ``(C, H, W)`` for
feature maps, ``(F,)`` for flat vectors — and returns the module and its
output shape, so a stack is checked when it is built, before any data runs
(as Keras' ``compute_output_shape`` does). Errors name the layer by its
recipe path (``model.layers[3]``), give the shapes and suggest the fix.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imgcls import recipe as r
from imgcls.errors import ShapeError

Shape = tuple[int, ...]

# --------------------------------------------------------------------------- small modules


def activation_module(
    name: str, negative_slope: float = 0.01, alpha: float = 1.0, *, inplace: bool = False
) -> nn.Module:
    """``inplace=True`` only where the input is a tensor the same block just
    created (a conv, norm or linear output, a residual sum): the torchvision
    BasicBlock rule. A standalone activation layer may get a tensor someone
    else still reads (the residual shortcut, a sibling branch, a flatten view
    of one, the caller's batch), so it never works in place."""
    return {
        "relu": lambda: nn.ReLU(inplace=inplace),
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope, inplace=inplace),
        "elu": lambda: nn.ELU(alpha, inplace=inplace),
        "gelu": nn.GELU,
        "silu": lambda: nn.SiLU(inplace=inplace),
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "softmax": lambda: nn.Softmax(dim=1),
        "none": nn.Identity,
        "relu6": lambda: nn.ReLU6(inplace=inplace),
        "hardswish": lambda: nn.Hardswish(inplace=inplace),
        "hardsigmoid": lambda: nn.Hardsigmoid(inplace=inplace),
    }[name]()


class Pad2d(nn.Module):
    """Explicit (possibly asymmetric) padding: (left, right, top, bottom)."""

    def __init__(self, pads: tuple[int, int, int, int], value: float = 0.0):
        super().__init__()
        self.pads = pads
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads, value=self.value)

    def extra_repr(self) -> str:
        return f"{self.pads}, value={self.value}"


class AvgPoolSame(nn.Module):
    """Average pooling with Keras 'same' padding: padded cells are not counted."""

    def __init__(self, size: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int]):
        super().__init__()
        self.size, self.stride, self.pads = size, stride, pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = F.avg_pool2d(F.pad(x, self.pads), self.size, self.stride)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        count = F.avg_pool2d(F.pad(ones, self.pads), self.size, self.stride)
        return total / count

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}, pads={self.pads}"


class Concat(nn.Module):
    """Parallel branches on one input, concatenated on channels (Inception)."""

    def __init__(self, branches: Sequence[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class ResidualBlock(nn.Module):
    """``activation(body(x) + shortcut(x))``."""

    def __init__(self, body: nn.Module, shortcut: nn.Module, activation: nn.Module):
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.body(x) + self.shortcut(x))


# --------------------------------------------------------------------------- shape arithmetic


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv_padding(padding: str | int, size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding on one axis for valid / same / full / int."""
    span = dilation * (kernel - 1) + 1
    if padding == "valid":
        return 0, 0
    if padding == "full":
        return span - 1, span - 1
    if padding == "same":
        # Keras: output = ceil(size / stride) for any stride; extra pixel at the end
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + span - size, 0)
        return total // 2, total - total // 2
    return int(padding), int(padding)


def conv_out(size: int, before: int, after: int, kernel: int, stride: int, dilation: int) -> int:
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


class Context:
    """Where we are in the recipe, for error messages, plus the global l1/l2."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        self.l1, self.l2 = l1, l2


def _fail(path: str, kind: str, message: str) -> ShapeError:
    return ShapeError(f"{path} ({kind}): {message}")


def _need_map(path: str, kind: str, shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise _fail(
            path,
            kind,
            f"needs a feature map (channels x height x width) but gets a flat "
            f"vector of {shape[0]}; put it before 'flatten' / 'dense'",
        )
    return shape[0], shape[1], shape[2]


def _fmt(shape: Shape) -> str:
    return "x".join(map(str, shape))


def _windowed(
    path: str, kind: str, shape: Shape, kernel, stride, padding, dilation
) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    c, h, w = _need_map(path, kind, shape)
    k, s, d = pair(kernel), pair(stride), pair(dilation)
    ph = conv_padding(padding, h, k[0], s[0], d[0])
    pw = conv_padding(padding, w, k[1], s[1], d[1])
    oh = conv_out(h, *ph, k[0], s[0], d[0])
    ow = conv_out(w, *pw, k[1], s[1], d[1])
    if oh <= 0 or ow <= 0:
        pad_text = padding if isinstance(padding, str) else f"padding {padding}"
        raise _fail(
            path,
            kind,
            f"a {k[0]}x{k[1]} {pad_text} window does not fit on a {h}x{w} map "
            f"(input {_fmt(shape)}); use padding: same, a smaller kernel, or fewer "
            "pooling layers before it",
        )
    return (pw[0], pw[1], ph[0], ph[1]), k, s, d, (oh, ow)


def _tag(module: nn.Module, spec: r.Regularized, ctx: Context) -> nn.Module:
    """Mark a weight-bearing module with its l1/l2: the layer's own values (0
    included, to opt out) else the global ones. Untagged weights get none."""
    l1 = spec.l1 if spec.l1 is not None else ctx.l1
    l2 = spec.l2 if spec.l2 is not None else ctx.l2
    if l1 or l2 or spec.l1 is not None or spec.l2 is not None:
        module.imgcls_regularization = (l1, l2)  # type: ignore[assignment]  # a plain attribute, not a submodule
    return module


def _conv_stack(
    parts: list[tuple[str, nn.Module]], out_c: int, spec, kind_bn: bool | r.BatchNorm
) -> nn.Module:
    if kind_bn:
        norm = kind_bn if isinstance(kind_bn, r.BatchNorm) else r.BatchNorm()
        parts.append(("bn", nn.BatchNorm2d(out_c, eps=norm.eps, momentum=norm.momentum)))
    if spec.activation != "none":
        # in place is safe: the conv / norm output just above is this block's own
        parts.append(("act", activation_module(spec.activation, inplace=True)))
    if len(parts) == 1:
        return parts[0][1]
    return nn.Sequential(OrderedDict(parts))


def _pad_part(pads: tuple[int, int, int, int]) -> tuple[list[tuple[str, nn.Module]], int | tuple[int, int]]:
    """Symmetric padding goes into the conv; asymmetric gets its own module."""
    left, right, top, bottom = pads
    if left == right and top == bottom:
        return [], (top, left)
    return [("pad", Pad2d(pads))], 0


# --------------------------------------------------------------------------- builders


def build_conv(spec: r.Conv, shape: Shape, path: str, ctx: Context):
    c, _, _ = _need_map(path, "conv", shape)
    if c % spec.groups or spec.filters % spec.groups:
        raise _fail(
            path,
            "conv",
            f"groups={spec.groups} must divide the input channels ({c}) and filters ({spec.filters})",
        )
    pads, k, s, d, (oh, ow) = _windowed(
        path, "conv", shape, spec.kernel, spec.stride, spec.padding, spec.dilation
    )
    parts, padding = _pad_part(pads)
    bias = spec.bias if spec.bias is not None else not spec.batch_norm
    conv = nn.Conv2d(c, spec.filters, k, s, padding, d, spec.groups, bias=bias)
    parts.append(("conv", _tag(conv, spec, ctx)))
    return _conv_stack(parts, spec.filters, spec, spec.batch_norm), (spec.filters, oh, ow)


def build_depthwise(spec: r.Depthwise, shape: Shape, path: str, ctx: Context):
    c, _, _ = _need_map(path, "depthwise", shape)
    pads, k, s, d, (oh, ow) = _windowed(
        path, "depthwise", shape, spec.kernel, spec.stride, spec.padding, spec.dilation
    )
    parts, padding = _pad_part(pads)
    out_c = c * spec.depth_multiplier
    bias = spec.bias if spec.bias is not None else not spec.batch_norm
    conv = nn.Conv2d(c, out_c, k, s, padding, d, groups=c, bias=bias)
    parts.append(("depthwise", _tag(conv, spec, ctx)))
    return _conv_stack(parts, out_c, spec, spec.batch_norm), (out_c, oh, ow)


def build_separable(spec: r.Separable, shape: Shape, path: str, ctx: Context):
    c, _, _ = _need_map(path, "separable", shape)
    pads, k, s, d, (oh, ow) = _windowed(
        path, "separable", shape, spec.kernel, spec.stride, spec.padding, spec.dilation
    )
    parts, padding = _pad_part(pads)
    mid = c * spec.depth_multiplier
    bias = spec.bias if spec.bias is not None else not spec.batch_norm
    parts.append(("depthwise", _tag(nn.Conv2d(c, mid, k, s, padding, d, groups=c, bias=False), spec, ctx)))
    parts.append(("pointwise", _tag(nn.Conv2d(mid, spec.filters, 1, bias=bias), spec, ctx)))
    return _conv_stack(parts, spec.filters, spec, spec.batch_norm), (spec.filters, oh, ow)


def _build_pool(kind: str):
    def build(spec: r.Pool, shape: Shape, path: str, ctx: Context):
        c = _need_map(path, kind, shape)[0]
        stride = spec.stride if spec.stride is not None else spec.size
        pads, k, s, _, (oh, ow) = _windowed(path, kind, shape, spec.size, stride, spec.padding, 1)
        left, right, top, bottom = pads
        if kind == "maxpool":
            if left == right and top == bottom and top <= k[0] // 2 and left <= k[1] // 2:
                return nn.MaxPool2d(k, s, (top, left)), (c, oh, ow)
            return nn.Sequential(Pad2d(pads, float("-inf")), nn.MaxPool2d(k, s)), (c, oh, ow)
        if not any(pads):
            return nn.AvgPool2d(k, s), (c, oh, ow)
        return AvgPoolSame(k, s, pads), (c, oh, ow)

    return build


def build_global_pool(kind: str):
    def build(spec: r.Empty, shape: Shape, path: str, ctx: Context):
        c = _need_map(path, kind, shape)[0]
        pool = nn.AdaptiveAvgPool2d(1) if kind == "global_avg_pool" else nn.AdaptiveMaxPool2d(1)
        return nn.Sequential(pool, nn.Flatten()), (c,)

    return build


def build_flatten(spec: r.Empty, shape: Shape, path: str, ctx: Context):
    return nn.Flatten(), (math.prod(shape),)


def build_dense(spec: r.Dense, shape: Shape, path: str, ctx: Context):
    if len(shape) != 1:
        raise _fail(
            path,
            "dense",
            f"needs a flat input but gets a {_fmt(shape)} feature map; put 'flatten' "
            "or 'global_avg_pool' before it",
        )
    linear = _tag(nn.Linear(shape[0], spec.units, bias=spec.bias), spec, ctx)
    if spec.activation == "none":
        return linear, (spec.units,)
    act = activation_module(spec.activation, inplace=True)  # on the linear output: ours
    return nn.Sequential(OrderedDict(linear=linear, act=act)), (spec.units,)


def build_dropout(spec: r.Dropout, shape: Shape, path: str, ctx: Context):
    return nn.Dropout(spec.rate), shape


def build_batchnorm(spec: r.BatchNorm, shape: Shape, path: str, ctx: Context):
    cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
    return cls(shape[0], eps=spec.eps, momentum=spec.momentum), shape


def build_activation(spec: r.ActivationLayer, shape: Shape, path: str, ctx: Context):
    return activation_module(spec.name, spec.negative_slope, spec.alpha), shape


def build_residual(spec: r.Residual, shape: Shape, path: str, ctx: Context):
    body, out = build_stack(spec.layers, shape, f"{path}.residual.layers", ctx)
    shortcut: nn.Module = nn.Identity()
    if out != shape or spec.projection == "always":
        if len(out) != len(shape):
            raise _fail(
                path,
                "residual",
                f"the body turns {_fmt(shape)} into {_fmt(out)}; a shortcut cannot bridge a feature map and a flat vector",
            )
        if len(shape) == 1:
            shortcut = nn.Linear(shape[0], out[0], bias=False)
        else:
            (c, h, w), (oc, oh, ow) = shape, out
            sh, sw = -(-h // oh), -(-w // ow)
            if conv_out(h, 0, 0, 1, sh, 1) != oh or conv_out(w, 0, 0, 1, sw, 1) != ow:
                raise _fail(
                    path,
                    "residual",
                    f"the body turns {_fmt(shape)} into {_fmt(out)}; a strided 1x1 projection cannot match that, keep the spatial size or divide it by the stride",
                )
            shortcut = nn.Sequential(
                OrderedDict(conv=nn.Conv2d(c, oc, 1, (sh, sw), bias=False), bn=nn.BatchNorm2d(oc))
            )
    # in place on body + shortcut, a sum the block itself made
    return ResidualBlock(body, shortcut, activation_module(spec.activation, inplace=True)), out


def build_parallel(spec: r.Parallel, shape: Shape, path: str, ctx: Context):
    branches, outs = [], []
    for i, layers in enumerate(spec.branches):
        module, out = build_stack(layers, shape, f"{path}.parallel.branches[{i}]", ctx)
        branches.append(module)
        outs.append(out)
    if any(len(o) != len(outs[0]) or o[1:] != outs[0][1:] for o in outs):
        shown = ", ".join(_fmt(o) for o in outs)
        raise _fail(
            path,
            "parallel",
            f"branches must agree on everything but channels to be concatenated; they give {shown}. Use padding: same and equal strides",
        )
    channels = sum(o[0] for o in outs)
    return Concat(branches), (channels, *outs[0][1:])


def build_repeat(spec: r.Repeat, shape: Shape, path: str, ctx: Context):
    copies = []
    for n in range(spec.times):
        module, shape = build_stack(spec.layers, shape, f"{path}.repeat[{n}].layers", ctx)
        copies.append(module)
    return nn.Sequential(*copies), shape


# --------------------------------------------------------------------------- reference-architecture layers


def make_divisible(value: float, divisor: int) -> int:
    """``value`` rounded to the nearest multiple of ``divisor``, never below 90 %
    of it (torchvision's and timm's ``_make_divisible``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcitation(nn.Module):
    """``x * gate(fc2(act(fc1(avgpool(x)))))``, fc1 and fc2 1x1 convs."""

    def __init__(self, channels: int, squeeze: int, activation: nn.Module, gate: nn.Module):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = activation
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous()
        return x.view(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class SplitConcat(nn.Module):
    """Equal channel parts, one per branch, outputs concatenated."""

    def __init__(self, branches: Sequence[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.chunk(len(self.branches), dim=1)
        return torch.cat([branch(part) for branch, part in zip(self.branches, parts, strict=True)], dim=1)


class Sum(nn.Module):
    """``activation(branch1(x) + branch2(x) + ...)``."""

    def __init__(self, branches: Sequence[nn.Module], activation: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return self.activation(out)


class DenseConcat(nn.Module):
    """``x = cat(x, layer(x))`` for each layer in turn."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class ScaleBy(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def build_se(spec: r.SqueezeExcite, shape: Shape, path: str, ctx: Context):
    c = _need_map(path, "se", shape)[0]
    squeeze = make_divisible(c / spec.reduction, spec.divisor)
    # in place is safe on fc1's output; the gate's output is the block's own too
    act = activation_module(spec.activation, inplace=True)
    gate = activation_module(spec.gate, inplace=True)
    return SqueezeExcitation(c, squeeze, act, gate), shape


def build_channel_shuffle(spec: r.ChannelShuffle, shape: Shape, path: str, ctx: Context):
    c = _need_map(path, "channel_shuffle", shape)[0]
    if c % spec.groups:
        raise _fail(path, "channel_shuffle", f"groups={spec.groups} must divide the input channels ({c})")
    return ChannelShuffle(spec.groups), shape


def _branches(kind: str, all_branches, shapes, path: str, ctx: Context):
    modules, outs = [], []
    for i, (layers, shape) in enumerate(zip(all_branches, shapes, strict=True)):
        module, out = build_stack(layers, shape, f"{path}.{kind}.branches[{i}]", ctx)
        modules.append(module)
        outs.append(out)
    return modules, outs


def build_split(spec: r.Split, shape: Shape, path: str, ctx: Context):
    c, h, w = _need_map(path, "split", shape)
    n = len(spec.branches)
    if c % n:
        raise _fail(path, "split", f"{n} branches need input channels ({c}) divisible by {n}")
    branches, outs = _branches("split", spec.branches, [(c // n, h, w)] * n, path, ctx)
    if any(len(o) != 3 or o[1:] != outs[0][1:] for o in outs):
        shown = ", ".join(_fmt(o) for o in outs)
        raise _fail(path, "split", f"branches must agree on height and width to be concatenated; they give {shown}")
    return SplitConcat(branches), (sum(o[0] for o in outs), *outs[0][1:])


def build_add(spec: r.Add, shape: Shape, path: str, ctx: Context):
    branches, outs = _branches("add", spec.branches, [shape] * len(spec.branches), path, ctx)
    if any(o != outs[0] for o in outs):
        shown = ", ".join(_fmt(o) for o in outs)
        raise _fail(path, "add", f"branches must give the same shape to be added; they give {shown}")
    # in place on the sum, a tensor the block itself made
    return Sum(branches, activation_module(spec.activation, inplace=True)), outs[0]


def build_dense_block(spec: r.DenseBlock, shape: Shape, path: str, ctx: Context):
    c, h, w = _need_map(path, "dense_block", shape)
    layers = []
    for _ in range(spec.layers):
        parts: list[tuple[str, nn.Module]] = []
        width = c
        if spec.bottleneck:
            mid = spec.bottleneck * spec.growth
            conv = nn.Conv2d(width, mid, 1, bias=False)
            parts += [("norm1", nn.BatchNorm2d(width)), ("relu1", nn.ReLU(inplace=True))]
            parts += [("conv1", _tag(conv, r.Regularized(), ctx))]
            width = mid
        conv = nn.Conv2d(width, spec.growth, 3, padding=1, bias=False)
        parts += [("norm2", nn.BatchNorm2d(width)), ("relu2", nn.ReLU(inplace=True))]
        parts += [("conv2", _tag(conv, r.Regularized(), ctx))]
        if spec.dropout:
            parts.append(("dropout", nn.Dropout(spec.dropout)))
        layers.append(nn.Sequential(OrderedDict(parts)))
        c += spec.growth
    return DenseConcat(layers), (c, h, w)


def build_scale(spec: r.Scale, shape: Shape, path: str, ctx: Context):
    return ScaleBy(spec.factor), shape


def build_adaptive_avg_pool(spec: r.AdaptivePool, shape: Shape, path: str, ctx: Context):
    c = _need_map(path, "adaptive_avg_pool", shape)[0]
    size = pair(spec.size)
    return nn.AdaptiveAvgPool2d(size), (c, *size)


BUILDERS: dict[str, Callable] = {
    "conv": build_conv,
    "separable": build_separable,
    "depthwise": build_depthwise,
    "maxpool": _build_pool("maxpool"),
    "avgpool": _build_pool("avgpool"),
    "global_avg_pool": build_global_pool("global_avg_pool"),
    "global_max_pool": build_global_pool("global_max_pool"),
    "flatten": build_flatten,
    "dense": build_dense,
    "dropout": build_dropout,
    "batchnorm": build_batchnorm,
    "activation": build_activation,
    "residual": build_residual,
    "parallel": build_parallel,
    "repeat": build_repeat,
    "se": build_se,
    "channel_shuffle": build_channel_shuffle,
    "split": build_split,
    "add": build_add,
    "dense_block": build_dense_block,
    "scale": build_scale,
    "adaptive_avg_pool": build_adaptive_avg_pool,
}
assert set(BUILDERS) == set(r.LAYER_KINDS)


def build_stack(
    layers: Sequence[r.Layer], shape: Shape, path: str, ctx: Context
) -> tuple[nn.Sequential, Shape]:
    """Build a list of layers into an ``nn.Sequential`` named ``conv1``, ``dense2``…"""
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    counts: dict[str, int] = {}
    for i, layer in enumerate(layers):
        kind = layer.kind
        module, shape = BUILDERS[kind](layer.spec, shape, f"{path}[{i}]", ctx)
        counts[kind] = counts.get(kind, 0) + 1
        modules[f"{kind}{counts[kind]}"] = module
    return nn.Sequential(modules), shape
