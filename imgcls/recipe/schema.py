"""The recipe's schema: pydantic models, unknown keys forbidden, strict types.

Every layer kind of the YAML vocabulary (``conv``, ``pool``, ``dense``,
``residual``...) is one small model here; :class:`Recipe` holds the data,
model and train sections.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)


class Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `.nan` is a recipe error, not a run
    # that trains to the end on NaN
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=False, allow_inf_nan=False)


# Strict scalars: `epochs: true`, `epochs: 2.5` or `seed: "3"` are errors, not
# silently 1, 2 or 3. Ints are still welcome where a float is asked for.
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
# a recipe's name (and a tune study's): it names a folder under train.out
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


Activation = Literal["relu", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh", "softmax", "none"]
Padding = Union[Literal["valid", "same", "full"], Annotated[int, Field(strict=True, ge=0)]]
PosInt = Annotated[int, Field(strict=True, gt=0)]
Pair = Union[PosInt, tuple[PosInt, PosInt]]


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
    batch_norm: Bool = False


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


for _m in (Residual, Parallel, Repeat, Layer):
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
