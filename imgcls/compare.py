"""``imgcls compare``: networks side by side, the lecture's timeline as a table.

One row per network: year and paper (for the named families, from the small
table below), parameters, MACs and activation memory per image, depth (weight
layers on the longest path from the input to the output, the number in
"VGG-16" or "ResNet-50"), and the ImageNet top-1 accuracy that torchvision's
weights metadata reports, where there is one. Everything but year, paper and
top-1 is measured by the summarize engine (imgcls/summary.py) on the meta
device: no weights are allocated or downloaded.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from imgcls.errors import UsageError

# name prefix (lower case; "timm/" and "legacy_" dropped) -> year of first
# publication (arXiv or conference, whichever came first), paper
FAMILIES: dict[str, tuple[int, str]] = {
    "lenet": (1998, "LeCun et al., Gradient-Based Learning Applied to Document Recognition"),
    "alexnet": (2012, "Krizhevsky et al., ImageNet Classification with Deep Convolutional Neural Networks"),
    "zfnet": (2013, "Zeiler & Fergus, Visualizing and Understanding Convolutional Networks"),
    "vgg": (2014, "Simonyan & Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition"),
    "googlenet": (2014, "Szegedy et al., Going Deeper with Convolutions"),
    "inception_v3": (2015, "Szegedy et al., Rethinking the Inception Architecture for Computer Vision"),
    "resnet": (2015, "He et al., Deep Residual Learning for Image Recognition"),
    "wide_resnet": (2016, "Zagoruyko & Komodakis, Wide Residual Networks"),
    "resnext": (2016, "Xie et al., Aggregated Residual Transformations for Deep Neural Networks"),
    "densenet": (2016, "Huang et al., Densely Connected Convolutional Networks"),
    "squeezenet": (2016, "Iandola et al., SqueezeNet: AlexNet-level accuracy with 50x fewer parameters"),
    "inception_v4": (2016, "Szegedy et al., Inception-v4, Inception-ResNet and the Impact of Residual Connections"),
    "inception_resnet": (
        2016,
        "Szegedy et al., Inception-v4, Inception-ResNet and the Impact of Residual Connections",
    ),
    "xception": (2016, "Chollet, Xception: Deep Learning with Depthwise Separable Convolutions"),
    "mobilenet": (2017, "Howard et al., MobileNets: Efficient CNNs for Mobile Vision Applications"),
    "shufflenet": (2017, "Zhang et al., ShuffleNet: An Extremely Efficient CNN for Mobile Devices"),
    "seresnet": (2017, "Hu et al., Squeeze-and-Excitation Networks"),
    "seresnext": (2017, "Hu et al., Squeeze-and-Excitation Networks"),
    "senet": (2017, "Hu et al., Squeeze-and-Excitation Networks"),
    "mobilenet_v2": (2018, "Sandler et al., MobileNetV2: Inverted Residuals and Linear Bottlenecks"),
    "shufflenet_v2": (2018, "Ma et al., ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design"),
    "mnasnet": (2018, "Tan et al., MnasNet: Platform-Aware Neural Architecture Search for Mobile"),
    "mobilenet_v3": (2019, "Howard et al., Searching for MobileNetV3"),
    "efficientnet": (2019, "Tan & Le, EfficientNet: Rethinking Model Scaling for CNNs"),
    "efficientnet_v2": (2021, "Tan & Le, EfficientNetV2: Smaller Models and Faster Training"),
    "regnet": (2020, "Radosavovic et al., Designing Network Design Spaces"),
    "vit": (2020, "Dosovitskiy et al., An Image is Worth 16x16 Words"),
    "swin": (2021, "Liu et al., Swin Transformer"),
    "convnext": (2022, "Liu et al., A ConvNet for the 2020s"),
    "maxvit": (2022, "Tu et al., MaxViT: Multi-Axis Vision Transformer"),
}


@dataclass(frozen=True)
class Entry:
    name: str
    year: int | None
    paper: str | None
    input_shape: tuple[int, ...]
    params: int
    macs: int
    activation_bytes: int  # per image, leaf outputs (what training keeps)
    depth: int  # weight layers on the longest path
    top1: float | None  # ImageNet-1K, from torchvision's weights metadata
    top1_weights: str | None  # which weights reported it


def family(name: str) -> tuple[int, str] | None:
    """Year and paper of the family ``name`` belongs to (longest prefix), if known."""
    key = name.lower().removeprefix("timm/").removeprefix("legacy_")
    matches = [prefix for prefix in FAMILIES if key.startswith(prefix)]
    return FAMILIES[max(matches, key=len)] if matches else None


def reference_top1(arch: str) -> tuple[float, str] | None:
    """ImageNet top-1 of torchvision's first weights for ``arch`` that report one
    (IMAGENET1K_V1: the original training recipe, not the later improved ones)."""
    from imgcls.models import zoo

    if arch not in zoo.torchvision_archs():
        return None
    import torchvision

    for weights in torchvision.models.get_model_weights(arch):
        top1 = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
        if top1 is not None and math.isfinite(top1):
            return float(top1), weights.name
    return None


def compare(targets: Sequence[str], input_shape: Sequence[int] | None = None) -> list[Entry]:
    """One :class:`Entry` per name or recipe file, in the order given."""
    from imgcls.summary import summarize_target

    if not targets:
        raise UsageError("give at least one architecture name or recipe file")
    entries = []
    for target in targets:
        summary = summarize_target(target, input_shape)
        arch = _arch_of(target)
        known = family(summary.name if arch is None else arch)
        top1 = reference_top1(arch) if arch is not None else None
        entries.append(
            Entry(
                name=summary.name,
                year=known[0] if known else None,
                paper=known[1] if known else None,
                input_shape=summary.input_shape,
                params=summary.total_params,
                macs=summary.total_macs,
                activation_bytes=summary.activation_bytes,
                depth=summary.weight_depth or 0,
                top1=top1[0] if top1 else None,
                top1_weights=top1[1] if top1 else None,
            )
        )
    return entries


def _arch_of(target: str) -> str | None:
    """The named architecture behind ``target``: the name itself, or a recipe's
    ``model.arch``. A layer recipe has none: its top-1 would be a claim about
    a network it only resembles by name."""
    path = Path(target)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        from imgcls.recipe import load_recipe

        return load_recipe(path).model.arch if path.is_file() else None
    return target


# --------------------------------------------------------------------------- output


def to_json(entries: Sequence[Entry]) -> str:
    return json.dumps([{**asdict(e), "input_shape": list(e.input_shape)} for e in entries], indent=2)


def to_csv(entries: Sequence[Entry]) -> str:
    buf = io.StringIO()
    fields = list(Entry.__dataclass_fields__)
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    for e in entries:
        row = {**asdict(e), "input_shape": "x".join(map(str, e.input_shape))}
        writer.writerow(["" if row[f] is None else _csv_safe(row[f]) for f in fields])
    return buf.getvalue()


def _csv_safe(value):
    """A name starting with = + - @ would be a formula in a spreadsheet: quote it."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value


def table(entries: Sequence[Entry]):
    from rich.table import Table
    from rich.text import Text

    from imgcls.summary import _mb, human

    out = Table(title="Architectures compared (one image; MACs and memory measured on the meta device)")
    headers = ("network", "year", "input", "params", "MACs", "act. memory", "depth", "top-1", "paper")
    rows = [
        (
            e.name,
            str(e.year) if e.year else "—",
            "x".join(map(str, e.input_shape)),
            human(e.params),
            human(e.macs),
            _mb(e.activation_bytes),
            str(e.depth),
            f"{e.top1:.1f}%" if e.top1 is not None else "—",
            e.paper or "—",
        )
        for e in entries
    ]
    for i, header in enumerate(headers):
        # numbers and names whole; a narrow terminal wraps the paper's title
        last = i == len(headers) - 1
        out.add_column(
            header,
            justify="left" if i in (0, 1, 2, 8) else "right",
            no_wrap=not last,
            min_width=10 if last else max(len(header), *(len(row[i]) for row in rows)),
        )
    for row in rows:
        out.add_row(*(Text(cell) for cell in row))  # data, never markup
    return out


def plot(entries: Sequence[Entry], path: Path) -> list[str]:
    """Top-1 against MACs (log scale), bubble area proportional to parameters.
    Returns the names left out for lack of a top-1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from imgcls.io import atomic_path
    from imgcls.summary import human

    shown = [(e, e.top1) for e in entries if e.top1 is not None]
    left_out = [e.name for e in entries if e.top1 is None]
    if not shown:
        raise UsageError("nothing to plot: none of these networks has a published ImageNet top-1 in torchvision")
    fig = Figure(figsize=(9, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    largest = max(e.params for e, _ in shown)
    for i, (e, top1) in enumerate(sorted(shown, key=lambda pair: pair[0].macs)):
        size = 2000 * e.params / largest + 20  # points^2
        ax.scatter(e.macs / 1e9, top1, s=size, alpha=0.45, edgecolors="black", linewidths=0.6)
        label = _plain(e.name) + (f" ({e.year})" if e.year else "")
        # neighbours on the MACs axis alternate above and below their bubbles
        gap = (math.sqrt(size) / 2 + 2) * (1 if i % 2 == 0 else -1)
        ax.annotate(
            label,
            (e.macs / 1e9, top1),
            fontsize=8,
            ha="center",
            va="bottom" if gap > 0 else "top",
            xytext=(0, gap),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("GMACs per image (log scale)")
    ax.set_ylabel("ImageNet top-1 (%), torchvision weights")
    ax.set_title(f"Accuracy against compute; bubble area = parameters (largest: {human(largest)})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return left_out


def _plain(text: str) -> str:
    """A user's name as literal text for matplotlib ($ would start mathtext)."""
    return text.replace("$", r"\$")
