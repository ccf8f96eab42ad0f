"""Model surgery: a small-image stem, a first conv for other channel counts, a new classifier.

Each function changes a built model in place; none reads weights from a file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from imgcls.errors import UsageError

Log = Callable[[str], None]


SMALL_STEM = {
    "resnet": "conv1 becomes a 3x3 stride-1 conv, the max pool is removed (resnet*, resnext*, wide_resnet*)",
    "regnet": "the stem conv keeps its 3x3 kernel with stride 1",
    "mobilenet": "features[0] (3x3 conv) gets stride 1 (mobilenet_v2, mobilenet_v3_*)",
    "efficientnet": "features[0] (3x3 conv) gets stride 1",
    "mnasnet": "layers[0] (3x3 conv) gets stride 1",
}


def _family(name: str) -> str | None:
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "resnet"
    for family in ("regnet", "mobilenet", "efficientnet", "mnasnet"):
        if name.startswith(family):
            return family
    return None


def small_stem(model: nn.Module, name: str, log: Log | None = None) -> None:
    """CIFAR-style stem for 32x32-scale images: keep the input's resolution in the
    first layer instead of dividing it by 4 (ResNet) or 2 (the others)."""
    family = _family(name)
    if family is None:
        raise UsageError(
            f"model.stem: small is defined for resnet*, resnext*, wide_resnet*, regnet*, mobilenet_v2/v3, "
            f"efficientnet*, mnasnet*; not for '{name}'"
        )
    if family == "resnet":
        old: Any = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        if log is not None and old.weight.device.type != "meta":
            log("model.stem: small: conv1 is a new 3x3 conv (its pretrained 7x7 weights are not used)")
        return
    net: Any = model  # the family says which attributes it has
    first = {"regnet": lambda: net.stem[0], "mnasnet": lambda: net.layers[0]}.get(
        family, lambda: net.features[0][0]
    )()
    if isinstance(first, nn.Sequential):  # Conv2dNormActivation
        first = first[0]
    first.stride = (1, 1)


def replace_first_conv(model: nn.Module, channels: int) -> None:
    """Swap the stem conv for one taking ``channels`` inputs.

    Pretrained RGB filters are averaged over the colour axis (and repeated),
    so a grayscale model starts from what the RGB one learned.
    """
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3 and child.groups == 1:
                conv: Any = child  # kernel_size & co. are tuples of the right length
                new = nn.Conv2d(
                    channels,
                    child.out_channels,
                    conv.kernel_size,
                    conv.stride,
                    conv.padding,
                    conv.dilation,
                    1,
                    child.bias is not None,
                    child.padding_mode,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                if child.weight.device.type != "meta":
                    with torch.no_grad():
                        mean = child.weight.mean(dim=1, keepdim=True)
                        new.weight.copy_(mean.repeat(1, channels, 1, 1) * 3 / channels)
                        if child.bias is not None and new.bias is not None:
                            new.bias.copy_(child.bias)
                setattr(parent, child_name, new)
                return
    raise UsageError("cannot find the first 3-channel convolution to adapt to the input channels")


def _last_classifier(model: nn.Module) -> tuple[nn.Module, str, nn.Module] | None:
    """(parent, name, layer) of the last Linear or Conv2d: the layer producing the class scores.

    Last in definition order (``named_modules``, depth first): a head after nested
    blocks (resnet's ``fc`` after ``layer4.1.conv2``) is found, not the blocks' last conv."""
    last = None
    for name, module in model.named_modules():
        if name and isinstance(module, (nn.Linear, nn.Conv2d)):
            last = name
    if last is None:
        return None
    parent_name, _, child_name = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child_name, getattr(parent, child_name)


def classifier_layer(model: nn.Module) -> nn.Module:
    """The layer producing the class scores (its input is the image's embedding)."""
    last = _last_classifier(model)
    if last is None:
        raise UsageError("cannot find the classifier layer (no Linear or Conv2d) of the model")
    return last[2]


def replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Replace the last layer producing the class scores (Linear, or 1x1 Conv)."""
    last = _last_classifier(model)
    if last is None:
        raise UsageError("cannot find the classifier layer to resize")
    parent, child_name, child = last
    new: nn.Module
    if isinstance(child, nn.Linear):
        new = nn.Linear(child.in_features, num_classes, child.bias is not None)
    else:
        conv: Any = child
        new = nn.Conv2d(conv.in_channels, num_classes, conv.kernel_size, conv.stride)
    setattr(parent, child_name, new)
