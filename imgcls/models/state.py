"""State dicts: clean the wrapper prefixes, check that tensors fit a model, load them.

The bottom of :mod:`imgcls.models`: it imports nothing of imgcls but the
errors, so checkpoints, the builders and fine-tuning can all use it.
"""

from __future__ import annotations

from imgcls.errors import CheckpointError


def clean_state_dict(state: dict) -> dict:
    """Strip wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def check_fit(model, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The tensors ``shapes`` describes are exactly ``model``'s, shape for shape;
    an error names the missing / unexpected keys, or the tensor and both shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(unexpected)}")
        raise CheckpointError(f"{where}: weights do not fit the architecture ({'; '.join(parts)})")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(
                f"{where}: weights do not fit the architecture: {key} has shape {list(shapes[key])} "
                f"in the file, the architecture expects {list(shape)}"
            )


def _names(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


def load_weights(model, state: dict, assign: bool = False, where: str = "the checkpoint") -> None:
    """``load_state_dict`` with the module versions a plain safetensors dict lacks
    (torchvision's MNASNet, for one, reads its version from them).

    A state that does not fit raises :class:`CheckpointError` naming ``where``,
    the tensor and both shapes, or the missing and unexpected keys.
    """
    from collections import OrderedDict

    check_fit(model, {k: tuple(v.shape) for k, v in state.items()}, where)
    state = OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]  # torch reads this private field of a state dict
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where}: weights do not fit the architecture ({str(exc).strip().splitlines()[0]})"
        ) from None
