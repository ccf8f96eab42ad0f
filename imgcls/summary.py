"""``imgcls summarize``: a layer table (shapes, parameters, MACs) built on the meta device.

The model is built with its weights on PyTorch's ``meta`` device (shapes and
dtypes, no storage), then one forward pass of a batch-1 meta tensor runs
through it. Forward hooks record each module's output shape; a dispatch mode
sees every matrix product and convolution the pass performs and charges it to
the innermost module running at the time. So ``imgcls summarize vgg16`` neither
allocates nor initialises 138 M weights, and the numbers come from the real
forward code, not from a re-implementation of it.

Conventions (the same as torchinfo's where torchinfo counts at all):

* **params** are counted once per tensor, even when a module or a weight is
  shared; a row's count covers its whole subtree, owned by the first name
  under which ``named_modules()`` meets it.
* **MACs** (multiply-accumulates, one image): a convolution is
  ``output elements x in_channels/groups x kernel area``, a matrix product
  ``M x K x N`` (so a Linear on a ``(tokens, features)`` input counts every
  token), plus one add per output element for a bias. Attention products
  (``q @ k^T``, ``attn @ v``, fused scaled-dot-product kernels) are counted
  too, wherever they happen, because they are real work that grows with the
  square of the token count. A parameterised leaf that does no product
  (BatchNorm, LayerNorm, GroupNorm...) counts its parameter count, as torchinfo
  does; so does a norm with children (timm's BatchNormAct2d). Element-wise
  work (activations, pooling, residual adds, softmax) is not counted.
* Why not ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2)? Measured
  (``python bench/summary_cost.py --flop-counter``), it reproduces
  torchvision's published GFLOPS (torchvision computed them with it) but not
  the numbers above: it leaves out bias adds (``addmm`` and biased
  convolutions) and counts nothing for norm layers, so every model differs
  (alexnet 714,188,480 against our and torchinfo's 714,682,664; vgg16 -13.6 M;
  vit_b_16 -0.09 %, convnext_tiny/swin_t -0.3 %; the seed-conv448 recipe loses
  its 14,400 bias adds); it counts 0 for a CPU ``scaled_dot_product_attention``
  (``_scaled_dot_product_flash_attention_for_cpu`` has no formula there); and
  it is slower: our whole measurement takes 0.85x the time of its bare forward
  pass with breakdown (median of 6 architectures). Restoring the bias adds
  would need formulas of our own again, so the four short ones below stay.
* **parameter memory**: ``numel x element size`` of each unique parameter;
  buffers (BatchNorm running statistics) are reported apart.
* **activation memory**: the bytes of every tensor output by a leaf module
  (one without children), summed over the forward pass of one image, at the
  model's dtype (4 bytes per value in fp32). It is what a forward pass that
  keeps every intermediate (training) stores; inference needs far less.
"""

from __future__ import annotations

import copy
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from imgcls.errors import ImgclsError, UsageError
from imgcls.macs import NORMS, MacCounter, tensors

Shape = tuple[int, ...]

# Arch names default to ImageNet's input and classes, except where the
# architecture was designed for something else.
DEFAULT_INPUT: Shape = (3, 224, 224)
DEFAULT_CLASSES = 1000
ARCH_DEFAULTS: dict[str, tuple[Shape, int]] = {"lenet5": ((1, 32, 32), 10)}


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class Row:
    """One module. ``params``, ``trainable_params`` and ``macs`` cover its subtree."""

    name: str  # qualified module name; "" is the model itself
    type: str
    depth: int  # 0 for the model, 1 for its children...
    output_shape: Shape | None  # first tensor output, batch included; None if never called
    params: int
    trainable_params: int
    macs: int
    calls: int
    children: bool  # has child rows shown below it
    folded: bool = False  # children hidden by fold(); its numbers include them

    @property
    def trainable(self) -> str:
        if self.params == 0:
            return "--"
        if self.trainable_params == self.params:
            return "yes"
        return "no" if self.trainable_params == 0 else "partial"


@dataclass(frozen=True)
class Summary:
    name: str
    model_type: str
    input_shape: Shape  # C, H, W of one image
    num_classes: int | None
    rows: tuple[Row, ...]
    total_params: int
    trainable_params: int
    total_macs: int
    param_bytes: int
    buffer_bytes: int
    activation_bytes: int
    depth: int | None = field(default=None)
    # weight layers (convolutions, matrix products with a weight) on the
    # longest path from the input to the output: VGG-16's 16, ResNet-50's 50
    weight_depth: int | None = None

    @property
    def non_trainable_params(self) -> int:
        return self.total_params - self.trainable_params

    def fold(self, depth: int | None) -> Summary:
        """Rows deeper than ``depth`` folded into their ancestor (totals unchanged)."""
        if depth is None:
            return self
        if depth < 0:
            raise UsageError(f"--depth must be 0 or more, got {depth}")
        rows = tuple(
            replace(
                row,
                children=row.children and row.depth < depth,
                folded=row.folded or row.children and row.depth >= depth,
            )
            for row in self.rows
            if row.depth <= depth
        )
        return replace(self, rows=rows, depth=depth)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` and ``summary.json`` (stable keys, ints)."""
        return {
            "name": self.name,
            "model_type": self.model_type,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "total_macs": self.total_macs,
            "param_bytes": self.param_bytes,
            "buffer_bytes": self.buffer_bytes,
            "activation_bytes": self.activation_bytes,
            "depth": self.depth,
            "rows": [
                {
                    "name": row.name,
                    "type": row.type,
                    "depth": row.depth,
                    "output_shape": None if row.output_shape is None else list(row.output_shape),
                    "params": row.params,
                    "trainable_params": row.trainable_params,
                    "macs": row.macs,
                    "calls": row.calls,
                    "folded": row.folded,
                }
                for row in self.rows
            ],
        }


# --------------------------------------------------------------------------- entry points


def summarize_target(
    target: str,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    overrides: Sequence[str] = (),
    depth: int | None = None,
) -> Summary:
    """Summarize a recipe file (``.yaml``/``.yml``), a checkpoint or run folder, or an arch name."""
    from imgcls import recipe as r
    from imgcls.models.build import build_model, resolve_num_classes

    path = Path(target)
    trained = path.is_dir() or path.suffix.lower() == ".safetensors"
    classes: int | None
    if trained:
        # a trained model: its own recipe, input shape and classes
        from imgcls.checkpoint import read_meta, resolve_checkpoint

        meta = read_meta(resolve_checkpoint(path))
        recipe = r.recipe_from_dict(meta["recipe"], where=str(path), overrides=tuple(overrides))
        shape = tuple(input_shape or meta["input_shape"])
        classes = num_classes or len(meta["classes"])
        name = recipe.name
    elif path.exists() or path.suffix.lower() in (".yaml", ".yml"):
        recipe = r.load_recipe(path, tuple(overrides))
        shape = tuple(input_shape) if input_shape is not None else recipe.input_shape()
        if recipe.model.layers is not None and recipe.model.head == "none":
            classes = num_classes or recipe.model.num_classes  # no head: classes play no part
        else:
            classes = resolve_num_classes(recipe, num_classes)
        name = recipe.name
    else:
        # an arch name; --set model.* still applies (e.g. model.input_shape)
        recipe = r.recipe_from_dict({"model": {"arch": target}}, where=target, overrides=tuple(overrides))
        default_shape, default_classes = ARCH_DEFAULTS.get(target, (DEFAULT_INPUT, DEFAULT_CLASSES))
        shape = tuple(input_shape or recipe.model.input_shape or default_shape)
        classes = num_classes or recipe.model.num_classes or default_classes
        name = target
    shape = _check_shape(shape)
    # the architecture only: published or local starting weights are not read
    spec = recipe.model.model_copy(update={"pretrained": False, "weights": None})
    try:
        with meta_init():
            # None only for a head-less layer stack, which has no class count
            model = build_model(spec, shape, cast(int, classes))
    except ImgclsError:
        raise
    except Exception as exc:  # a torchvision/timm constructor refusing the size
        raise UsageError(f"{name}: cannot build for input {_fmt(shape)}: {_one_line(exc)}") from exc
    model.to("meta")  # the few tensors made on the CPU (index tables) follow the weights
    from imgcls.models.finetune import frozen_at, set_frozen

    # frozen parameters show as non-trainable: at the start for a recipe, at the end for a trained model
    set_frozen(model, frozen_at(model, recipe, recipe.train.epochs if trained else 0))
    summary = _measure(model, shape, name, classes)
    return summary.fold(depth)


def summarize_model(
    model: nn.Module,
    input_shape: Sequence[int],
    depth: int | None = None,
    num_classes: int | None = None,
    name: str = "",
) -> Summary:
    """Summarize a built model, real or meta; the model itself is left untouched.

    A real model is copied structurally with each weight replaced by a meta
    tensor of the same shape and dtype (``deepcopy`` with a prepared memo),
    so no weight is copied and the caller's modules get no hooks and keep
    their train/eval mode.
    """
    shape = _check_shape(tuple(input_shape))
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    meta_model = copy.deepcopy(model, memo)
    return _measure(meta_model, shape, name or type(model).__name__, num_classes).fold(depth)


# --------------------------------------------------------------------------- building on meta

# Constructors that make weights go to the meta device; the ones left out
# (arange, linspace, tensor...) compute small tables at build time that some
# models read back with .tolist() (RegNet's stage widths), which meta cannot.
_BULK_CONSTRUCTORS = {
    torch.empty,
    torch.empty_strided,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.eye,
}


class _MetaInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _BULK_CONSTRUCTORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def meta_init() -> TorchFunctionMode:
    """``with meta_init(): build_model(...)`` puts weights and buffers on the meta device."""
    return _MetaInit()


# --------------------------------------------------------------------------- measuring


def _measure(model: nn.Module, input_shape: Shape, name: str, num_classes: int | None) -> Summary:
    model.eval()
    named = list(model.named_modules())  # each module once, under its first name
    leaves = {id(m) for _, m in named if next(m.children(), None) is None}

    own_params, total, trainable, param_bytes = _own_params(named)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())

    counter = MacCounter()
    shapes: dict[int, Shape] = {}
    calls: dict[int, int] = defaultdict(int)
    activation_bytes = 0

    def before(module, args):
        counter.stack.append(id(module))

    def after(module, args, output):
        nonlocal activation_bytes
        key = counter.stack.pop()
        calls[key] += 1
        outputs = list(tensors(output))
        if outputs and key not in shapes:
            shapes[key] = tuple(outputs[0].shape)
        if key in leaves:
            activation_bytes += sum(o.numel() * o.element_size() for o in outputs)
        if key in leaves or isinstance(module, NORMS):
            if counter.macs.get(key, 0) == 0 and own_params[key][0]:
                counter.macs[key] += own_params[key][0]  # norms: torchinfo's params x batch

    handles = []
    for _, module in named:
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after, always_call=True))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.empty((1, *input_shape), device="meta", dtype=dtype)
    counter.paths[id(x)] = (x, 0)
    try:
        with torch.no_grad(), counter:
            output = model(x)
    except ImgclsError:
        raise
    except Exception as exc:
        raise UsageError(
            f"{name} cannot run on a {_fmt(input_shape)} input: {_one_line(exc)}; "
            f"give a larger input shape (most ImageNet models expect {_fmt(DEFAULT_INPUT)})"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()

    sub_params, sub_macs = _subtree_totals(named, own_params, counter.macs)
    rows = tuple(
        Row(
            name=module_name,
            type=type(module).__name__,
            depth=0 if not module_name else module_name.count(".") + 1,
            output_shape=shapes.get(id(module)),
            params=sub_params[i][0],
            trainable_params=sub_params[i][1],
            macs=sub_macs[i],
            calls=calls.get(id(module), 0),
            children=id(module) not in leaves,
        )
        for i, (module_name, module) in enumerate(named)
    )
    return Summary(
        name=name,
        model_type=type(model).__name__,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        rows=rows,
        total_params=total,
        trainable_params=trainable,
        total_macs=sub_macs[0],
        param_bytes=param_bytes,
        buffer_bytes=buffer_bytes,
        activation_bytes=activation_bytes,
        weight_depth=max((counter.paths.get(id(t), (t, 0))[1] for t in tensors(output)), default=0),
    )


def _own_params(named: list[tuple[str, nn.Module]]) -> tuple[dict[int, tuple[int, int]], int, int, int]:
    """Per module, its own (params, trainable) counting each shared parameter
    once; and the totals: params, trainable params, parameter bytes."""
    own_params: dict[int, tuple[int, int]] = {}
    seen: set[int] = set()
    total = trainable = param_bytes = 0
    for _, module in named:
        n = t = 0
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n += p.numel()
            t += p.numel() if p.requires_grad else 0
            param_bytes += p.numel() * p.element_size()
        own_params[id(module)] = (n, t)
        total += n
        trainable += t
    return own_params, total, trainable, param_bytes


def _subtree_totals(named, own_params: dict, macs: dict) -> tuple[list[list[int]], list[int]]:
    """Params and MACs of each module's subtree: children are added into their
    parents, walking children before parents."""
    index = {module_name: i for i, (module_name, _) in enumerate(named)}
    sub_params = [list(own_params[id(m)]) for _, m in named]
    sub_macs = [macs.get(id(m), 0) for _, m in named]
    for i in range(len(named) - 1, 0, -1):
        parent = index[named[i][0].rpartition(".")[0]]
        sub_params[parent][0] += sub_params[i][0]
        sub_params[parent][1] += sub_params[i][1]
        sub_macs[parent] += sub_macs[i]
    return sub_params, sub_macs


# --------------------------------------------------------------------------- rendering


def summary_table(summary: Summary):
    """A rich table like Keras' ``model.summary()``: one row per module, indented.
    The model's name (a recipe's, a file's) is data: never read as markup."""
    from rich.table import Table
    from rich.text import Text

    from imgcls.text import shown

    # an expanded container shows only what its children do not (its own
    # weights, its own products), so the column adds up to the total, as in torchinfo
    own = {row.name: [row.params, row.macs] for row in summary.rows}
    for row in summary.rows:
        if row.name:
            parent = own[row.name.rpartition(".")[0]]
            parent[0] -= row.params
            parent[1] -= row.macs
    cells = []
    for row in summary.rows:
        label = row.name.rpartition(".")[2] if row.name else shown(summary.name)
        params, macs = own[row.name] if row.children else (row.params, row.macs)
        cells.append(
            (
                "  " * row.depth + f"{label} ({row.type})",
                _shape_text(row.output_shape),
                f"{params:,}" if params else "--",
                human(macs) if macs else "--",
                row.trainable,
            )
        )
    title = Text(f"{shown(summary.name)} ({summary.model_type})", style="table.title")
    table = Table(title=title, title_justify="left")
    # numbers are never cut; a narrow terminal shortens the layer names instead
    headers = ("Layer (type)", "Output shape", "Params", "MACs", "Trainable")
    for i, header in enumerate(headers):
        width = max(len(header), *(len(c[i]) for c in cells))
        table.add_column(
            header,
            no_wrap=True,
            overflow="ellipsis" if i == 0 else "fold",
            min_width=None if i == 0 else width,
            justify="right" if header in ("Params", "MACs") else "center" if i == 4 else "left",
        )
    for row, cell in zip(summary.rows, cells, strict=True):
        table.add_row(Text(cell[0]), *cell[1:], style="dim" if row.children and cell[2] == "--" else None)
    return table


def totals_lines(summary: Summary) -> list[str]:
    s = summary
    classes = f", {s.num_classes} classes" if s.num_classes is not None else ""
    return [
        f"Input: {_fmt(s.input_shape)} (one image){classes}",
        f"Total params: {s.total_params:,}",
        f"Trainable params: {s.trainable_params:,}",
        f"Non-trainable params: {s.non_trainable_params:,}",
        f"Total MACs: {s.total_macs:,} ({human(s.total_macs)}) per image",
        f"Parameter memory: {_mb(s.param_bytes)}"
        + (f" (+ {_mb(s.buffer_bytes)} buffers)" if s.buffer_bytes else ""),
        f"Activation memory: {_mb(s.activation_bytes)} per image (leaf outputs, kept for training)",
    ]


def summary_text(summary: Summary, width: int = 120) -> str:
    """Table and totals as plain text (for ``summary.txt`` in a run folder)."""
    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(summary_table(summary))
    for line in totals_lines(summary):
        console.print(line, markup=False, highlight=False)
    return cast(io.StringIO, console.file).getvalue()


def human(n: int) -> str:
    """1234567 -> '1.23M' (SI units, as MAC counts are usually quoted)."""
    for unit, size in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# --------------------------------------------------------------------------- helpers


def _check_shape(shape: Sequence[int]) -> Shape:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise UsageError(f"input shape must be channels x height x width, e.g. 3x224x224; got {_fmt(shape)}")
    return shape


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _shape_text(shape: Shape | None) -> str:
    return "not called" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _mb(n: int) -> str:
    """Bytes in SI units (MB = 10^6 bytes, as torchinfo prints them)."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
