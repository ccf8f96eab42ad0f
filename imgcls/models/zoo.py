"""Named architectures: torchvision's registry, our built-in classics, and timm.

Names come from ``torchvision.models.list_models(module=torchvision.models)``
(classification only), never from a list kept by hand. LeNet-5 and ZFNet,
which torchvision lacks, are recipes shipped in ``imgcls/models/archs/``.
``timm/NAME`` builds a timm model when the ``imgcls[timm]`` extra is installed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import os
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from imgcls.errors import CheckpointError, UsageError
from imgcls.metadata import unsafe_file_reason
from imgcls.models import surgery

ARCH_DIR = Path(__file__).with_name("archs")


def builtin_archs() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.yaml"))


@cache
def torchvision_archs() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def list_archs(pattern: str = "*") -> list[str]:
    """Every name ``model: {arch: NAME}`` accepts, filtered by a wildcard."""
    names = [*builtin_archs(), *torchvision_archs()]
    try:
        import timm

        names += [f"timm/{n}" for n in timm.list_models()]
    except ImportError:
        pass
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def unknown_arch(name: str) -> UsageError:
    import difflib

    known = [*builtin_archs(), *torchvision_archs()]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UsageError(f"unknown architecture '{name}'{hint} (`imgcls models` lists them)")


def build_torchvision(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    pretrained: bool,
    small_stem: bool = False,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    import torchvision

    channels, height, width = input_shape
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict = {}
    if "aux_logits" in _model_kwargs(name):
        # googlenet / inception_v3: auxiliary heads only matter for their
        # original training recipe; one output keeps train/eval/export uniform
        kwargs["aux_logits"] = False
    if "init_weights" in _model_kwargs(name) and not pretrained:
        kwargs["init_weights"] = True
    if name.startswith("vit_") and (height, width) != (224, 224) and not pretrained:
        if height != width:
            raise UsageError(f"{name} needs a square input, got {height}x{width}")
        kwargs["image_size"] = height
    if name.startswith("maxvit") and not pretrained:
        kwargs["input_size"] = (height, width)
    if pretrained:
        model, weights = load_published(name, log)
        published = len(weights.meta["categories"])
        if num_classes != published:
            surgery.replace_classifier(model, num_classes)
            if log is not None:
                log(
                    f"{name}: ImageNet weights; the {published}-class classifier replaced by a new {num_classes}-class one"
                )
    else:
        model = builder(weights=None, num_classes=num_classes, **kwargs)
    if small_stem:
        surgery.small_stem(model, name, log if pretrained else None)  # says what pretrained part is new
    if channels != 3:
        surgery.replace_first_conv(model, channels)
    return model


# What torchvision's builders set when they load published weights; we build
# bare (so the file is read with weights_only=True, which torchvision's own
# loading does not force) and set the same.
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _published_kwargs(name: str, weights) -> dict:
    if name in ("googlenet", "inception_v3"):
        return {"transform_input": True, "aux_logits": True, "init_weights": False}
    if name.startswith("vit_"):
        return {"image_size": weights.meta["min_size"][0]}
    if name.startswith("maxvit"):
        return {"input_size": weights.meta["min_size"]}
    return {}


def _drop_aux_heads(model: nn.Module) -> None:
    """As torchvision does after loading googlenet / inception_v3 weights:
    the auxiliary heads only served their original training recipe."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False  # type: ignore[assignment]  # a plain flag on the model, not a submodule
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)


def load_published(name: str, log: Callable[[str], None] | None = None):
    """torchvision ``name`` with its DEFAULT published weights: (model, weights enum).

    The one loader of published weights: read from the torch hub cache
    (downloaded once, hash-checked, when the network is there) with
    ``weights_only=True``. Offline without the file, a one-line error says
    where it was looked for.
    """
    import torchvision
    from torch.hub import get_dir

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise UsageError(
            f"'{name}' is not a torchvision architecture with published weights (see `imgcls models`)"
        ) from None
    categories = weights.meta["categories"]
    model = torchvision.models.get_model(
        name, weights=None, num_classes=len(categories), **_published_kwargs(name, weights)
    )
    cached = Path(get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.exists() and log is not None:
        log(f"downloading {weights.url} to {cached} (once)")
    try:
        # torch.hub announces downloads on stdout; keep stdout for results.
        # check_hash applies to a download only; the cached file is read as is.
        with contextlib.redirect_stdout(sys.stderr):
            state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True, weights_only=True)
    except Exception as exc:  # URLError, hash mismatch, unreadable or refused file
        reason = unsafe_file_reason(exc) or f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        raise CheckpointError(
            f"cannot get the {name} weights ({reason}); without network, put the file at {cached}"
        ) from None
    if name.startswith("densenet"):
        state = {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{cached}: weights do not fit {name}: {str(exc).splitlines()[0]}") from None
    _drop_aux_heads(model)
    return model, weights


@cache
def _model_kwargs(name: str) -> frozenset[str]:
    """Constructor arguments of the model class behind a builder."""
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    module: Any = inspect.getmodule(builder)  # a torchvision.models module
    names: set[str] = set()
    for obj in vars(module).values():
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__:
            names |= set(inspect.signature(obj.__init__).parameters)
    return frozenset(names)


def build_timm(name: str, input_shape: tuple[int, int, int], num_classes: int, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UsageError(f"'timm/{name}' needs timm: pip install 'imgcls[timm]'") from None
    if not timm.list_models(name, pretrained=False):
        raise UsageError(f"timm has no model '{name}' (`imgcls models 'timm/*'` lists them)")
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=input_shape[0])
    # timm's own weights from the local Hugging Face / torch hub cache only (a
    # missing file is an error, not a download or a hang): the file is found
    # here and handed to timm, with no process-wide offline switch to flip
    try:
        cached = _timm_cached_weights(timm, name)
        if cached is None:
            raise FileNotFoundError(name)
        return timm.create_model(
            name,
            pretrained=True,
            num_classes=num_classes,
            in_chans=input_shape[0],
            pretrained_cfg_overlay={"file": cached, "source": ""},
        )
    except Exception as exc:
        from torch.hub import get_dir

        hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
        raise CheckpointError(
            f"cannot get timm's weights for '{name}' ({type(exc).__name__}); looked in the Hugging Face cache "
            f"({hf_home}/hub) and {Path(get_dir()) / 'checkpoints'}: run once with network to fill it"
        ) from None


def _timm_cached_weights(timm, name: str) -> str | None:
    """The weights file timm would download for ``name``, when already in the
    Hugging Face cache or torch hub's checkpoints folder; else None."""
    from urllib.parse import urlparse

    from torch.hub import get_dir

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.file and Path(cfg.file).is_file():
        return str(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in files:
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):
                return hit
    if cfg.url:
        path = Path(get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return str(path)
    return None


def pretrained_stats(name: str, channels: int) -> tuple[list[float], list[float]] | None:
    """The mean/std a torchvision architecture's published weights were trained
    with (averaged over RGB for grayscale), so fine-tuning sees inputs on the
    scale the weights expect; None when unknown (timm, built-ins)."""
    if name not in torchvision_archs():
        return None
    import torchvision

    transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    mean, std = list(transforms.mean), list(transforms.std)
    if channels == 1:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return mean, std
