"""The recipe's schema: pydantic models, unknown keys forbidden, strict types.

Every layer kind of the YAML vocabulary (``conv``, ``pool``, ``dense``,
``residual``...) is one small model here; :class:`Recipe` holds the data,
model and train sections.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from imgcls.recipe.cv import CVSpec
from imgcls.recipe.distill import DistillSpec
from imgcls.recipe.types import NAME_PATTERN, Activation, Bool, Float, Int, Padding, Pair, PosInt, Strict


class Regularized(Strict):
    l1: Annotated[float, Field(strict=True, ge=0)] | None = None
    l2: Annotated[float, Field(strict=True, ge=0)] | None = None


class Windowed(Regularized):
    """What every convolution shares: the sliding window, and what follows it."""

    kernel: Pair = 3
    stride: Pair = 1
    padding: Padding = "valid"
    dilation: Pair = 1
    activation: Activation = "none"
    bias: Bool | None = None  # default: True, False when batch_norm
    batch_norm: Bool | BatchNorm = False  # a mapping sets its eps / momentum


class Conv(Windowed):
    """2-D convolution: ``filters`` kernels of ``kernel`` size."""

    primary: ClassVar[str] = "filters"
    filters: PosInt
    groups: PosInt = 1


class Depthwise(Windowed):
    """Depthwise conv alone: each input channel convolved with its own filters."""

    padding: Padding = "same"
    depth_multiplier: PosInt = 1


class Separable(Depthwise):
    """Depthwise conv (one filter per channel) then a 1x1 pointwise conv."""

    primary: ClassVar[str] = "filters"
    filters: PosInt


class Pool(Strict):
    primary: ClassVar[str] = "size"
    size: Pair = 2
    stride: Pair | None = None  # default: size
    padding: Padding = "valid"


class Empty(Strict):
    pass


class Dense(Regularized):
    primary: ClassVar[str] = "units"
    units: PosInt
    activation: Activation = "none"
    bias: Bool = True


class Dropout(Strict):
    primary: ClassVar[str] = "rate"
    rate: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.5


class BatchNorm(Strict):
    momentum: Annotated[float, Field(strict=True, gt=0, lt=1)] = 0.1
    eps: Annotated[float, Field(strict=True, gt=0)] = 1e-5


class ActivationLayer(Strict):
    primary: ClassVar[str] = "name"
    name: Activation
    negative_slope: Float = 0.01  # leaky_relu
    alpha: Float = 1.0  # elu


class Residual(Strict):
    """``layers`` plus a shortcut; a 1x1 projection when the shapes differ."""

    layers: list[Layer]
    activation: Activation = "none"  # applied after the sum, as in ResNet
    projection: Literal["auto", "always"] = "auto"


class Parallel(Strict):
    """Branches on the same input, concatenated on channels (Inception)."""

    branches: Annotated[list[list[Layer]], Field(min_length=1)]


class Repeat(Strict):
    times: PosInt
    layers: list[Layer]


# Layers the reference architectures need (recipes/architectures/): each is
# generic; the textbook's parameter names.


class SqueezeExcite(Strict):
    """Squeeze-and-excitation (Hu et al., 2018): global average pool, a 1x1 conv
    to channels / reduction (``activation``), a 1x1 conv back (``gate``); the
    input is scaled channel-wise by the result."""

    primary: ClassVar[str] = "reduction"
    reduction: PosInt = 16
    divisor: PosInt = 1  # squeeze channels rounded to a multiple of this (MobileNetV3: 8)
    activation: Activation = "relu"
    gate: Activation = "sigmoid"


class ChannelShuffle(Strict):
    """ShuffleNet: channels viewed as ``groups`` x C/groups, transposed."""

    primary: ClassVar[str] = "groups"
    groups: PosInt


class Split(Strict):
    """The input's channels cut into equal parts, one per branch (in order);
    the outputs concatenated. ``[]`` passes its part through (ShuffleNetV2)."""

    branches: Annotated[list[list[Layer]], Field(min_length=2)]


class Add(Strict):
    """Branches on the same input, summed; ``[]`` is the identity. A residual
    whose shortcut is written out, registered in the order given (Xception)."""

    branches: Annotated[list[list[Layer]], Field(min_length=2)]
    activation: Activation = "none"  # applied after the sum


class DenseBlock(Strict):
    """DenseNet (Huang et al., 2017): ``layers`` times ``x = concat(x, f(x))``,
    f = BN-ReLU-conv1x1 (bottleneck x growth filters)-BN-ReLU-conv3x3 (growth
    filters); ``bottleneck: 0`` drops the 1x1 (DenseNet without B)."""

    layers: PosInt
    growth: PosInt
    bottleneck: Annotated[int, Field(strict=True, ge=0)] = 4
    dropout: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.0


class Scale(Strict):
    """Multiply by a constant (Inception-ResNet's residual scaling)."""

    primary: ClassVar[str] = "factor"
    factor: Float


class AdaptivePool(Strict):
    """Average pooling to a fixed ``size`` whatever the input size (AlexNet, VGG)."""

    primary: ClassVar[str] = "size"
    size: Pair = 1


LAYER_KINDS: dict[str, type[Strict]] = {
    "conv": Conv,
    "separable": Separable,
    "depthwise": Depthwise,
    "maxpool": Pool,
    "avgpool": Pool,
    "global_avg_pool": Empty,
    "global_max_pool": Empty,
    "flatten": Empty,
    "dense": Dense,
    "dropout": Dropout,
    "batchnorm": BatchNorm,
    "activation": ActivationLayer,
    "residual": Residual,
    "parallel": Parallel,
    "repeat": Repeat,
    "se": SqueezeExcite,
    "channel_shuffle": ChannelShuffle,
    "split": Split,
    "add": Add,
    "dense_block": DenseBlock,
    "scale": Scale,
    "adaptive_avg_pool": AdaptivePool,
}


class Layer(Strict):
    """One entry of a layer list: exactly one of the keys below.

    YAML forms: ``- conv: {filters: 16, kernel: 3}``, ``- dense: 10`` (the
    primary parameter alone), ``- flatten`` (a kind with no parameters).
    """

    conv: Conv | None = None
    separable: Separable | None = None
    depthwise: Depthwise | None = None
    maxpool: Pool | None = None
    avgpool: Pool | None = None
    global_avg_pool: Empty | None = None
    global_max_pool: Empty | None = None
    flatten: Empty | None = None
    dense: Dense | None = None
    dropout: Dropout | None = None
    batchnorm: BatchNorm | None = None
    activation: ActivationLayer | None = None
    residual: Residual | None = None
    parallel: Parallel | None = None
    repeat: Repeat | None = None
    se: SqueezeExcite | None = None
    channel_shuffle: ChannelShuffle | None = None
    split: Split | None = None
    add: Add | None = None
    dense_block: DenseBlock | None = None
    scale: Scale | None = None
    adaptive_avg_pool: AdaptivePool | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value in LAYER_KINDS:
                return {value: {}}
            if value in Activation.__args__:  # type: ignore[attr-defined]  # a Literal alias keeps its values in __args__
                return {"activation": {"name": value}}
            raise ValueError(did_you_mean("layer kind", value, LAYER_KINDS))
        if isinstance(value, dict):
            if len(value) != 1:
                keys = ", ".join(map(str, value)) or "nothing"
                raise ValueError(f"a layer is one key (conv, dense, ...); got {keys}")
            ((kind, params),) = value.items()
            spec = LAYER_KINDS.get(kind)
            if spec is None:
                return value  # let extra="forbid" report it, with a hint
            if params is None:
                params = {}
            elif not isinstance(params, (dict, BaseModel)):
                primary = getattr(spec, "primary", None)
                if primary is None:
                    raise ValueError(f"{kind} takes a mapping of parameters")
                params = {primary: params}
            return {kind: params}
        return value

    @model_serializer(mode="wrap")
    def _one_key(self, handler: Any) -> dict:
        return {self.kind: handler(self)[self.kind]}

    @property
    def kind(self) -> str:
        return next(k for k in LAYER_KINDS if getattr(self, k) is not None)

    @property
    def spec(self) -> Any:
        """The one layer given (a Conv, Dense, ...: its model depends on ``kind``)."""
        return getattr(self, self.kind)


class ModelSpec(Strict):
    """Either ``layers`` (the vocabulary) or ``arch`` (a named architecture)."""

    arch: str | None = None
    pretrained: Bool = False
    layers: list[Layer] | None = None
    input_shape: tuple[PosInt, PosInt, PosInt] | None = None  # C, H, W
    num_classes: PosInt | None = None
    l1: Annotated[float, Field(strict=True, ge=0)] = 0.0
    l2: Annotated[float, Field(strict=True, ge=0)] = 0.0
    head: Literal["auto", "none"] = "auto"
    # fine-tuning (imgcls/models/finetune.py): start from a local safetensors file,
    # freeze part of the network, CIFAR-style stem for small images
    weights: str | None = None
    freeze: Literal["backbone"] | Annotated[int, Field(strict=True, ge=0)] | list[str] | None = None
    stem: Literal["default", "small"] = "default"

    @field_validator("input_shape", mode="before")
    @classmethod
    def _shape_string(cls, value: Any) -> Any:
        return parse_shape(value) if isinstance(value, str) else value

    @field_validator("freeze", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) and value != "backbone" else value

    @model_validator(mode="after")
    def _one_of(self) -> ModelSpec:
        if (self.arch is None) == (self.layers is None):
            raise ValueError("give either 'arch' (a named architecture) or 'layers'")
        if self.pretrained and self.arch is None:
            raise ValueError("'pretrained' needs 'arch'")
        if self.pretrained and self.weights:
            raise ValueError("give either 'pretrained: true' or 'weights: FILE', not both")
        if self.stem != "default" and self.arch is None:
            raise ValueError("'stem' applies to a named architecture ('arch')")
        return self


class ShapesSpec(Strict):
    """The built-in synthetic set: shapes drawn on noisy backgrounds."""

    classes: list[str] | None = None  # default: circle ring square triangle star cross
    per_class: PosInt = 300
    image_size: PosInt = 32
    seed: Int = 0


class RandomCrop(Strict):
    primary: ClassVar[str] = "padding"
    padding: Annotated[int, Field(strict=True, ge=0)] = 4


class RandomResizedCrop(Strict):
    scale: tuple[Float, Float] = (0.08, 1.0)
    ratio: tuple[Float, Float] = (3 / 4, 4 / 3)


class ColorJitter(Strict):
    brightness: Annotated[float, Field(strict=True, ge=0)] = 0.0
    contrast: Annotated[float, Field(strict=True, ge=0)] = 0.0
    saturation: Annotated[float, Field(strict=True, ge=0)] = 0.0
    hue: Annotated[float, Field(strict=True, ge=0, le=0.5)] = 0.0


class RandAugment(Strict):
    num_ops: PosInt = 2
    magnitude: Annotated[int, Field(strict=True, ge=0, le=30)] = 9


class AugmentSpec(Strict):
    random_crop: RandomCrop | None = None
    random_resized_crop: RandomResizedCrop | None = None
    hflip: Bool = False
    vflip: Bool = False
    rotation: Annotated[float, Field(strict=True, ge=0, le=180)] = 0.0
    color_jitter: ColorJitter | None = None
    trivial_augment: Bool = False
    randaugment: RandAugment | None = None
    random_erasing: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.0
    mixup: Annotated[float, Field(strict=True, ge=0)] = 0.0  # beta(alpha, alpha); 0 = off
    cutmix: Annotated[float, Field(strict=True, ge=0)] = 0.0

    @field_validator("random_crop", "random_resized_crop", "color_jitter", "randaugment", mode="before")
    @classmethod
    def _true_means_defaults(cls, value: Any, info: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            return None
        if isinstance(value, (int, float)):
            # a number sets the main parameter where there is one (random_crop: 4)
            primary = getattr(inner_model(cls.model_fields[info.field_name].annotation), "primary", None)
            if primary is None:
                raise ValueError("give a mapping of parameters, or true for the defaults")
            return {primary: value}
        return value


class DataSpec(Strict):
    """Where images come from and how they are prepared.

    ``source`` is ``shapes`` (built in), ``folder`` (one sub-folder per class,
    optionally under train/ val/ test/) or ``csv`` (``file,label`` rows).
    """

    source: Literal["shapes", "folder", "csv"] = "shapes"
    # multilabel: several labels per image (csv only); auto: multilabel when any row has several
    task: Literal["auto", "single", "multilabel"] = "auto"
    path: str | None = None  # folder or csv file; for shapes, where to write them
    image_size: Pair = 32
    channels: Literal[1, 3] = 3
    resize: Literal["stretch", "center_crop", "pad"] = "stretch"
    val_split: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.2
    split_seed: Int = 0
    cv: CVSpec | None = None  # a fold of a K-fold split instead of val_split (imgcls cv)
    cache: Literal["auto", "ram", "disk", "none"] = "auto"
    max_bad_fraction: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.01
    sampler: Literal["shuffle", "balanced"] = "shuffle"  # balanced: classes drawn equally often
    mean: list[Float] | None = None  # default: measured on the training set
    std: list[Float] | None = None
    shapes: ShapesSpec = ShapesSpec()
    augment: AugmentSpec = AugmentSpec()

    @field_validator("channels", mode="before")
    @classmethod
    def _no_bool_channels(cls, value: Any) -> Any:
        if isinstance(value, bool):  # a Literal[1, 3] would take true as 1
            raise ValueError(f"Input should be 1 or 3, not {shown(value)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if self.source in ("folder", "csv") and not self.path:
            raise ValueError(f"source '{self.source}' needs 'path'")
        if self.task == "multilabel" and self.source != "csv":
            raise ValueError("task 'multilabel' needs source 'csv' (a labels column like 'dog;cat')")
        if (
            self.cv is not None
            and (self.cv.group_by is not None) != (self.source == "csv")
            and (self.cv.group_by is not None or self.cv.group_by_folder is not None)
        ):
            raise ValueError("cv: group_by is for csv data (a column), group_by_folder for folder data")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != self.channels:
                raise ValueError(f"'{key}' needs {self.channels} values, one per channel")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("'std' values must be > 0")
        return self

    @property
    def size(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else (s[0], s[1])


class OptimizerSpec(Strict):
    primary: ClassVar[str] = "name"
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    lr: Annotated[float, Field(strict=True, gt=0)] = 1e-3
    momentum: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.9
    nesterov: Bool = False
    betas: tuple[Float, Float] = (0.9, 0.999)
    weight_decay: Annotated[float, Field(strict=True, ge=0)] = 0.0
    # per-stage learning rates (imgcls/models/finetune.py): stage i of n gets
    # lr * layer_decay ** (n - i), the classifier lr * head_lr
    layer_decay: Annotated[float, Field(strict=True, gt=0, le=1)] | None = None
    head_lr: Annotated[float, Field(strict=True, gt=0)] | None = None


class ScheduleSpec(Strict):
    primary: ClassVar[str] = "name"
    name: Literal["constant", "step", "cosine", "onecycle"] = "constant"
    warmup_epochs: Annotated[float, Field(strict=True, ge=0)] = 0.0
    step_size: PosInt = 10  # step: epochs between decays
    gamma: Annotated[float, Field(strict=True, gt=0, le=1)] = 0.1
    min_lr: Annotated[float, Field(strict=True, ge=0)] = 0.0  # cosine floor
    max_lr: Annotated[float, Field(strict=True, gt=0)] | None = None  # onecycle peak; default optimizer.lr


class EarlyStopping(Strict):
    monitor: Literal["val_loss", "val_acc", "val_f1"] = "val_loss"  # val_f1: multi-label macro F1
    patience: PosInt = 5
    min_delta: Annotated[float, Field(strict=True, ge=0)] = 0.0


class EMASpec(Strict):
    primary: ClassVar[str] = "decay"
    decay: Annotated[float, Field(strict=True, gt=0, lt=1)] = 0.999


class TrainSpec(Strict):
    epochs: PosInt = 10
    batch_size: PosInt = 64
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    label_smoothing: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.0
    pos_weight: Literal["none", "auto"] = "none"  # multi-label BCE: auto = negatives/positives per class
    # auto: inverse class frequency, normalised so the mean weight per image is 1
    class_weights: Literal["auto", "none"] | dict[str, Annotated[float, Field(strict=True, ge=0)]] = "none"
    unfreeze_at: Annotated[int, Field(strict=True, ge=0)] | None = None  # epochs of head-only training
    grad_clip: Annotated[float, Field(strict=True, gt=0)] | None = None
    seed: Int = 0
    deterministic: Bool = False
    early_stopping: EarlyStopping | None = None
    ema: EMASpec | None = None
    distill: DistillSpec | None = None  # knowledge distillation: imgcls/recipe/distill.py
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto"] | Bool = "auto"
    # torch.compile the model (compile time reported apart from img/s); off by default, see README
    compile: Bool = False
    threads: PosInt | None = None
    out: str = "runs"
    # several processes (imgcls train --nproc N / torchrun): BatchNorm statistics
    # over the whole global batch instead of each process's share (CUDA only)
    sync_batchnorm: Bool = False
    # optimizer step every K batches: the step sees batch_size * K images
    gradient_accumulation: PosInt = 1
    # trackers beside metrics.csv (always written: resume, `imgcls runs` read it); see imgcls/tracking.py
    log_to: list[Literal["csv", "tensorboard", "mlflow"]] = ["csv"]

    @field_validator("log_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("optimizer", "schedule", "ema", mode="before")
    @classmethod
    def _scalar(cls, value: Any, info: Any) -> Any:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            key = {"optimizer": "name", "schedule": "name", "ema": "decay"}[info.field_name]
            return {key: value}
        if info.field_name == "ema" and isinstance(value, bool):
            return {} if value else None
        return value

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _patience(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"patience": value}
        return {} if value is True else (None if value is False else value)


class Recipe(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = "recipe"
    description: str = ""
    data: DataSpec = DataSpec()
    model: ModelSpec
    train: TrainSpec = TrainSpec()

    def input_shape(self) -> tuple[int, int, int]:
        if self.model.input_shape is not None:
            return self.model.input_shape
        h, w = self.data.size
        return (self.data.channels, h, w)


for _m in (Windowed, Conv, Depthwise, Separable, Residual, Parallel, Repeat, Split, Add, Layer):
    _m.model_rebuild()

# --------------------------------------------------------------------------- helpers


def parse_shape(text: str) -> tuple[int, int, int]:
    """``3x224x224`` (C x H x W) -> (3, 224, 224)."""
    parts = re.split(r"[x×, ]+", text.strip().lower())
    try:
        values = tuple(int(p) for p in parts if p)
    except ValueError:
        values = ()
    if len(values) == 2:
        values = (3, *values)
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"'{text}' is not a shape like 3x224x224 (channels x height x width)")
    return values[0], values[1], values[2]


def did_you_mean(what: str, value: str, known: Any) -> str:
    close = difflib.get_close_matches(str(value), list(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} '{value}'{hint}"


def shown(value: Any) -> str:
    """A value as the user wrote it in YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}' (a string)"
    if isinstance(value, float) and value != value:
        return ".nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return ".inf" if value > 0 else "-.inf"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = inner_model(arg)
        if found is not None:
            return found
    return None
