"""Calibrated confidence: temperature scaling, and how well probabilities match outcomes.

A network trained to a low loss says 0.99 far more often than it is right 99
times in 100. Temperature scaling (Guo et al., 2017) divides the logits by
one number ``T`` fitted on held-out labelled images; the argmax, and so the
accuracy, cannot change. ``T`` minimises the negative log-likelihood (a
proper score) over ``log T`` with L-BFGS; ECE is only measured, never
minimised (it is not a proper score: a model that always says its accuracy
has ECE 0). Multi-label models get one temperature per class, fitted on each
class's sigmoid binary cross-entropy (a class that is all positive or all
negative in the fitting data keeps ``T = 1``: there is nothing to fit).

The metrics, before (``T = 1``) and after:

- ECE: top-label expected calibration error, 15 equal-width confidence bins
  ``[k/15, (k+1)/15)`` (the last one closed at 1), weighted by the share of
  images in each; MCE: the largest gap of a non-empty bin. These match
  torchmetrics' ``MulticlassCalibrationError(n_bins=15, norm='l1' / 'max')``.
  Multi-label: every (image, class) pair is one binary prediction whose
  confidence is the class's probability and whose outcome is its label
  (torchmetrics' ``BinaryCalibrationError`` on the flattened pairs).
- NLL: mean cross-entropy (multi-label: mean binary cross-entropy per label).
- Brier: single label, scikit-learn's multiclass Brier score,
  ``mean_i sum_k (p_ik - y_ik)^2`` (0..2, ``brier_score_loss`` with
  ``scale_by_half=False``); multi-label, the mean of ``(p - y)^2`` over all
  pairs (``brier_score_loss`` on the flattened pairs).

The temperature travels in a checkpoint's (and an export's) metadata under
``calibration`` (checked by :func:`imgcls.metadata.check_calibration`);
:func:`scale` applies it wherever probabilities are made.

A leaf beside :mod:`imgcls.metrics`: torch, and matplotlib / rich when a
picture or a table is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from imgcls.io import atomic_path

N_BINS = 15
FIT_RANGE = (
    0.05,
    20.0,
)  # a fitted temperature is kept in this range (a perfectly separated set pulls T to 0)
Temperature = float | Sequence[float]


def scale(logits: torch.Tensor, temperature: Temperature | None) -> torch.Tensor:
    """``logits / T`` (one T, or one per class: a column each); ``None`` or 1 returns ``logits``."""
    if temperature is None:
        return logits
    if isinstance(temperature, (int, float)):
        return logits if temperature == 1 else logits / temperature
    if all(t == 1 for t in temperature):
        return logits
    return logits / torch.tensor(list(temperature), dtype=logits.dtype, device=logits.device)


def probabilities(
    logits: torch.Tensor, multilabel: bool, temperature: Temperature | None = None
) -> torch.Tensor:
    """Calibrated probabilities: softmax over classes, or a sigmoid per class (multi-label)."""
    z = scale(logits, temperature)
    return torch.sigmoid(z) if multilabel else torch.softmax(z, dim=1)


def _nll(z: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean cross-entropy (multi-label: binary cross-entropy per label) of logits ``z``,
    written out in elementary ops: torch's fused losses enter an OpenMP region
    even for a handful of rows, which on a busy machine costs ~10 ms a call
    (measured: 48 ms for one forward and backward of 6 rows, 0.3 ms this way)."""
    if multilabel:
        return (z.clamp(min=0) - targets * z + torch.log1p(torch.exp(-z.abs()))).mean()
    return (z.logsumexp(1) - z.gather(1, targets[:, None]).squeeze(1)).mean()


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> float | list[float]:
    """The temperature (multi-label: one per class) that minimises the NLL of
    ``logits / T`` on ``targets``: L-BFGS over ``log T`` in float64, from T = 1,
    then kept in :data:`FIT_RANGE`."""
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().to("cpu", torch.float64).clone()  # a normal tensor, even from inference mode
        if multilabel:
            y = targets.detach().to("cpu", torch.float64).clone()
            positives = y.sum(0)
            fit = (positives > 0) & (positives < len(y))  # a class with one outcome only keeps T = 1
            log_t = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
            if not bool(fit.any()):
                return [1.0] * z.shape[1]
            zf, yf = z[:, fit], y[:, fit]

            def loss() -> torch.Tensor:
                return _nll(zf / log_t[fit].exp(), yf, True)
        else:
            y = targets.detach().to("cpu", torch.int64).clone()
            log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)

            def loss() -> torch.Tensor:
                return _nll(z / log_t.exp(), y, False)

        optimizer = torch.optim.LBFGS(  # one to a few dozen unknowns: converged in ~10 iterations
            [log_t],
            lr=1.0,
            max_iter=50,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-7,
            tolerance_change=1e-10,
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = loss()
            value.backward()
            return value

        optimizer.step(closure)
        t = log_t.detach().exp().nan_to_num(1.0).clamp(*FIT_RANGE)
    return [float(v) for v in t] if multilabel else float(t)


def _confidences(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool):
    """(probabilities, confidence, outcome) in float64: top-label, or every (image, class) pair."""
    if multilabel:
        probs = torch.sigmoid(logits)
        return probs, probs.flatten(), targets.double().flatten()
    probs = (logits - logits.logsumexp(1, keepdim=True)).exp()  # softmax (see _nll on fused kernels)
    return probs, probs.amax(1), (probs.argmax(1) == targets).double()


def reliability_bins(conf: torch.Tensor, outcome: torch.Tensor, n_bins: int = N_BINS) -> list[dict]:
    """Per equal-width bin: its range, image count, mean confidence and accuracy (None when empty)."""
    index = (conf * n_bins).floor().long().clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf.double())
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, outcome.double())
    bins = []
    for k in range(n_bins):
        n = int(count[k])
        bins.append(
            {
                "low": k / n_bins,
                "high": (k + 1) / n_bins,
                "count": n,
                "confidence": float(conf_sum[k] / n) if n else None,
                "accuracy": float(acc_sum[k] / n) if n else None,
            }
        )
    return bins


def calibration_metrics(
    logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, temperature: Temperature | None = None
) -> dict:
    """ECE, MCE, NLL and Brier score of ``logits / T`` on ``targets`` (see the module's docstring),
    and the reliability bins."""
    z = scale(logits.detach().to("cpu", torch.float64), temperature)
    y = targets.detach().to("cpu")
    y = y.double() if multilabel else y.long()
    probs, conf, outcome = _confidences(z, y, multilabel)
    bins = reliability_bins(conf, outcome)
    total = max(len(conf), 1)
    gaps = [abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]]
    ece = sum(abs(b["accuracy"] - b["confidence"]) * b["count"] for b in bins if b["count"]) / total
    if multilabel:
        brier = float(((probs - y) ** 2).mean())
    else:
        brier = float(((probs - F.one_hot(y, probs.shape[1]).double()) ** 2).sum(1).mean())
    return {
        "ece": float(ece),
        "mce": float(max(gaps, default=0.0)),
        "nll": float(_nll(z, y, multilabel)),
        "brier": brier,
        "bins": bins,
    }


def calibration_report(
    logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, temperature: Temperature | None
) -> dict:
    """Before (``T = 1``) and after (``temperature``): what evaluate and calibrate report."""
    return {
        "temperature": temperature if temperature is not None else 1.0,
        "n_bins": N_BINS,
        "brier": "mean over pairs of (p - y)^2"
        if multilabel
        else "sklearn multiclass: mean of sum_k (p_k - y_k)^2",
        "before": calibration_metrics(logits, targets, multilabel, None),
        "after": calibration_metrics(logits, targets, multilabel, temperature),
    }


def fitted(
    logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, fitted_on: str
) -> tuple[dict, dict]:
    """Fit a temperature on (``logits``, ``targets``): the checkpoint's ``calibration``
    metadata (the temperature, where it was fitted, ECE and NLL before and after)
    and the full :func:`calibration_report`."""
    temperature = fit_temperature(logits, targets, multilabel)
    report = calibration_report(logits, targets, multilabel, temperature)
    return stored(temperature, fitted_on, report), report


def stored(temperature: Temperature, fitted_on: str | None, report: dict | None) -> dict:
    """The ``calibration`` document kept in checkpoint and export metadata."""
    meta: dict = {"temperature": temperature, "fitted_on": fitted_on}
    if report is not None:
        for when in ("before", "after"):
            for key in ("ece", "nll"):
                meta[f"{key}_{when}"] = round(report[when][key], 6)
    return meta


NOT_FITTED = "no validation split: not calibrated (T = 1); fit one with imgcls calibrate RUN --data DIR"


def uncalibrated(classes: int, multilabel: bool) -> dict:
    """What a run without a validation split stores: T = 1, and why."""
    return {"temperature": [1.0] * classes if multilabel else 1.0, "fitted_on": None, "note": NOT_FITTED}


def describe(temperature: Temperature) -> str:
    """``T = 1.73``, or for a per-class list its range."""
    if isinstance(temperature, (int, float)):
        return f"T = {temperature:.3g}"
    values = list(temperature)
    return f"T per class {min(values):.3g}..{max(values):.3g}"


def summary_line(meta: dict | None) -> str:
    """One line about a stored calibration (train's closing lines, calibrate)."""
    if not meta:
        return "calibration: none stored (T = 1)"
    if meta.get("fitted_on") is None:
        return f"calibration: {meta.get('note') or NOT_FITTED}"
    line = f"calibration: {describe(meta['temperature'])} fitted on {meta['fitted_on']}"
    if "ece_before" in meta:
        line += f"; ECE {meta['ece_before']:.4f} -> {meta['ece_after']:.4f}"
        line += f", NLL {meta['nll_before']:.4f} -> {meta['nll_after']:.4f}"
    return line


def carry_thresholds(thresholds: Sequence[float], old: Temperature, new: Temperature) -> list[float]:
    """Multi-label thresholds on probabilities at temperature ``old``, moved to
    ``new`` so that each class's decision (``sigmoid(z / T) >= t``) is unchanged:
    ``t' = sigmoid(logit(t) * T_old / T_new)``."""
    n = len(thresholds)
    olds = [float(old)] * n if isinstance(old, (int, float)) else list(old)
    news = [float(new)] * n if isinstance(new, (int, float)) else list(new)
    out = []
    for t, a, b in zip(thresholds, olds, news, strict=True):
        if t <= 0 or t >= 1:
            out.append(float(t))
            continue
        z = math.log(t / (1 - t)) * a / b
        out.append(1 / (1 + math.exp(-z)) if z > -700 else 0.0)
    return out


# --------------------------------------------------------------------------- pictures and tables


def save_reliability_png(path: Path, report: dict, title: str) -> None:
    """The reliability diagram, before and after, side by side: accuracy per
    confidence bin against the diagonal, the gap shaded, ECE in each title.
    A bare Figure on the Agg canvas, as curves.png (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.1))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    fig.subplots_adjust(left=0.08, right=0.985, bottom=0.13, top=0.83, wspace=0.08)
    width = 1 / report["n_bins"]
    for ax, when in zip(axes, ("before", "after"), strict=True):
        m = report[when]
        full = [b for b in m["bins"] if b["count"]]
        lows = [b["low"] for b in full]
        ax.bar(
            lows,
            [b["accuracy"] for b in full],
            width=width,
            align="edge",
            color="#4c72b0",
            edgecolor="white",
            label="accuracy",
        )
        ax.bar(
            lows,
            [b["confidence"] - b["accuracy"] for b in full],
            bottom=[b["accuracy"] for b in full],
            width=width,
            align="edge",
            color="#dd8452",
            alpha=0.45,
            label="gap",
        )
        ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        label = "T = 1" if when == "before" else describe(report["temperature"])
        ax.set_title(f"{when} ({label})\nECE {m['ece']:.4f}, MCE {m['mce']:.4f}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title[:110], fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def reliability_png(folder: Path, report: dict, checkpoint: Path, data: str) -> str:
    """``folder/reliability.png`` (:func:`save_reliability_png`) of ``checkpoint`` on ``data``; its path."""
    path = Path(folder) / "reliability.png"
    save_reliability_png(path, report, f"{Path(checkpoint).name} on {data}")
    return str(path)


def calibration_table(report: dict):
    """A rich table: ECE, MCE, NLL and Brier, before and after."""
    from rich.table import Table

    table = Table(title=f"calibration ({describe(report['temperature'])})", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("before (T = 1)", justify="right")
    table.add_column("after", justify="right")
    for key, name in (
        ("ece", f"ECE ({report['n_bins']} bins)"),
        ("mce", "MCE"),
        ("nll", "NLL"),
        ("brier", "Brier"),
    ):
        table.add_row(name, f"{report['before'][key]:.4f}", f"{report['after'][key]:.4f}")
    return table
