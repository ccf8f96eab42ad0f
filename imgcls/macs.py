"""MACs, counted where they happen: a dispatch mode charges each product's
multiply-accumulates to the innermost module running, and follows the
longest path of weight layers from the input (see :mod:`imgcls.summary` for
the conventions, and why not ``torch.utils.flop_counter``)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def _mm(args, out) -> int:
    a, b = args[-2], args[-1]
    return a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(args, out) -> int:
    a, b = args[-2], args[-1]
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _conv(args, out) -> int:
    x, weight, bias = args[0], args[1], args[2]
    transposed = args[6] if len(args) > 6 else False
    kernel = math.prod(weight.shape[2:])
    if transposed:  # weight: in, out/groups, k...; every input value meets out/groups x k
        macs = x.numel() * weight.shape[1] * kernel
    else:  # weight: out, in/groups, k...
        macs = out.numel() * weight.shape[1] * kernel
    return macs + (out.numel() if bias is not None else 0)


def _sdpa(args, out) -> int:
    q, k, v = args[0], args[1], args[2]
    batch = math.prod(q.shape[:-2])
    return batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _with_bias_adds(count):
    def macs(args, out) -> int:
        return count(args, out) + out.numel()

    return macs


_aten = torch.ops.aten
_MAC_RULES = {
    _aten.mm: _mm,
    _aten.addmm: _with_bias_adds(_mm),
    _aten.bmm: _bmm,
    _aten.baddbmm: _with_bias_adds(_bmm),
    _aten.convolution: _conv,
}
for _name in (
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math",
):
    if hasattr(_aten, _name):
        _MAC_RULES[getattr(_aten, _name)] = _sdpa


# a norm with children (timm's BatchNormAct2d: BatchNorm2d + its activation)
# is charged like a leaf norm, so a network costs the same however it nests them
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class MacCounter(TorchDispatchMode):
    """Charge each product's MACs to the innermost module running."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[int] = []
        self.macs: dict[int, int] = defaultdict(int)
        # tensor id -> (tensor, weight layers on the longest path from the input);
        # weights and constants have no entry (the tensor is kept: ids stay unique)
        self.paths: dict[int, tuple[torch.Tensor, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rule = _MAC_RULES.get(func.overloadpacket)
        if rule is not None and self.stack:
            self.macs[self.stack[-1]] += int(rule(args, out))
        inputs = list(tensors([args, kwargs or {}]))
        known = [self.paths[id(t)][1] for t in inputs if id(t) in self.paths]
        if known:
            # a product of the data with a weight (not of two activations, as in attention) is a layer
            length = max(known) + (rule is not None and len(known) < len(inputs))
            for tensor in tensors(out):
                self.paths[id(tensor)] = (tensor, length)
        return out


def tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)


