"""The model behind the server: loaded, described, and answered as predict answers.

:class:`ServedModel` wraps the :class:`imgcls.predictor.Predictor` that
``imgcls predict`` loads (a run folder, a checkpoint, an ONNX or TorchScript
export) and uses predict's own steps: the bytes of an upload go through the one
safe decode (:func:`imgcls.data.inputs.load_input_bytes`), the batch through
:func:`imgcls.predict.calibrated_logits`, and each answer is predict's record
(:class:`imgcls.predict.Prediction`), built where predict builds it
(:func:`imgcls.predict.prediction_records`, called by :meth:`ServedModel.answers`).

Everything that touches the model (:meth:`logits`, :meth:`explain_png`)
is called from one thread only: the batching worker (:mod:`imgcls.serve.batching`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from imgcls.data.inputs import load_input_bytes
from imgcls.errors import UsageError
from imgcls.openset import Rejection, file_digest
from imgcls.openset_features import HeadInputs
from imgcls.predict import calibrated_logits, prediction_records, rejection_of
from imgcls.predictor import Predictor, load_predictor


@dataclass
class ModelInfo:
    name: str
    version: str  # the first 12 hex digits of the model file's SHA-256
    format: str  # checkpoint, onnx or torchscript
    file: str  # the file's name (not its path: a client learns nothing of the server's folders)
    meta: dict

    def public(self, predictor: Predictor, explain: str | None, tta: bool) -> dict:
        """What ``GET /v1/model`` answers."""
        pre = predictor.preprocessing
        return {
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "file": self.file,
            "task": predictor.task,
            "classes": list(predictor.classes),
            "thresholds": predictor.thresholds,
            "input_size": list(pre["image_size"]),
            "channels": pre["channels"],
            "preprocessing": pre,
            "calibration": self.meta.get("calibration"),
            "tta": tta,
            "explain": explain is None,
            "explain_unavailable": explain,
        }


def _describe(predictor: Predictor) -> ModelInfo:
    path = Path(predictor.source)
    exported = getattr(predictor.forward, "kind", None)
    if exported is not None:
        meta = dict(predictor.forward.meta)  # type: ignore[attr-defined]
        fmt = exported
    else:
        from imgcls.checkpoint import read_meta

        meta, fmt = read_meta(path), "checkpoint"
    recipe = meta.get("recipe")
    name = str((recipe.get("name") if isinstance(recipe, dict) else None) or path.stem)
    return ModelInfo(name, file_digest(path)[:12], fmt, path.name, meta)


class ServedModel:
    """A loaded predictor with predict's decode, forward and records."""

    def __init__(self, predictor: Predictor, *, tta: bool = False, rejection: Rejection | None = None):
        self.predictor = predictor
        self.tta = tta
        self.rejection = rejection
        self.info = _describe(predictor)
        self.explain_layer, self.explain_unavailable = self._explain_layer()
        self.public = self.info.public(predictor, self.explain_unavailable, tta)
        self.public["unknown"] = None if rejection is None else rejection.describe()

    @classmethod
    def load(
        cls,
        model: str,
        *,
        tta: bool = False,
        log=lambda message: None,
        min_confidence: str | None = None,
        score: str | None = None,
    ) -> ServedModel:
        """``min_confidence`` / ``score``: predict's --min-confidence and --score (checked
        before the model is loaded: a bad value costs no load)."""
        from imgcls.openset import parse_min_confidence

        parse_min_confidence(min_confidence, score)
        predictor = load_predictor(model, log=log)
        return cls(predictor, tta=tta, rejection=rejection_of(predictor, min_confidence, score, log))

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    def _explain_layer(self) -> tuple[str | None, str | None]:
        """The Grad-CAM layer, or why there is none (exports have no module to hook)."""
        if not isinstance(self.predictor.forward, torch.nn.Module):
            return None, f"Grad-CAM needs a checkpoint; this model is a {self.info.format} export"
        from imgcls.explain import default_layer

        shape = self.info.meta.get("input_shape")
        if not shape:
            pre = self.predictor.preprocessing
            shape = [pre["channels"], *pre["image_size"]]
        try:
            return default_layer(self.predictor.forward, shape), None
        except UsageError as exc:
            return None, str(exc)

    # ------------------------------------------------------------------ client side (any thread)

    def decode(self, data: bytes, name: str = "upload") -> torch.Tensor:
        """An upload as the model's uint8 (C, H, W) input; raises DecodeError naming ``name``."""
        return load_input_bytes(data, self.predictor.preprocessing, name)

    def answers(self, rows: torch.Tensor, top_k: int, names: list[str | None]) -> list[dict]:
        """The JSON answer per row of ``rows`` (:meth:`logits`): predict's record
        (``imgcls predict --json``, built by :func:`imgcls.predict.prediction_records`),
        without the file name when there is none."""
        n = len(self.classes)
        logits_, features = rows[:, :n], (rows[:, n:] if rows.shape[1] > n else None)
        records = prediction_records(
            self.predictor,
            logits_,
            [name or "" for name in names],
            top_k,
            rejection=self.rejection,
            features=features,
        )
        out = []
        for record, name in zip(records, names, strict=True):
            answer = record.to_dict()
            if name is None:
                del answer["file"]
            out.append(answer)
        return out

    # ------------------------------------------------------------------ the worker thread only

    def logits(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """Decoded images -> calibrated logits (N x classes), as ``imgcls predict``
        computes them; for a feature score (:mod:`imgcls.openset_features`), each
        row goes on with the classifier layer's input (:meth:`answers` splits them)."""
        x = torch.stack(batch)
        with torch.inference_mode():
            if self.rejection is None or self.rejection.scorer is None:
                return calibrated_logits(self.predictor, x, tta=self.tta).float()
            assert isinstance(self.predictor.forward, torch.nn.Module)  # a feature score: checkpoints only
            with HeadInputs(self.predictor.forward) as heads:
                logits_ = calibrated_logits(self.predictor, x, tta=self.tta).float()
                return torch.cat([logits_, heads.take().to(logits_.dtype)], dim=1)

    def explain_png(self, pixels: torch.Tensor, target: str | None) -> tuple[bytes, str]:
        """A Grad-CAM overlay (the image, and beside it the heatmap) as PNG bytes, and the
        class it explains (``target``, or the predicted class)."""
        from PIL import Image

        from imgcls.explain import class_maps, side_by_side
        from imgcls.forward import model_input

        if self.explain_layer is None:
            raise UsageError(self.explain_unavailable or "Grad-CAM is not available for this model")
        classes = self.classes
        if target is not None and target not in classes:
            raise UsageError("class: not one of this model's classes (GET /v1/model lists them)")
        pre = self.predictor.preprocessing
        x = model_input(pixels[None], pre["mean"], pre["std"])
        if target is None:
            with torch.inference_mode():
                index = int(self.predictor.batch_logits(pixels[None]).argmax(1)[0])
        else:
            index = classes.index(target)
        model = self.predictor.forward
        assert isinstance(model, torch.nn.Module)  # explain_layer is set for checkpoints only
        cam, _ = class_maps(model, x, self.explain_layer, torch.tensor([index]))
        buf = io.BytesIO()
        Image.fromarray(side_by_side(pixels, cam[0])).save(buf, format="PNG")
        return buf.getvalue(), classes[index]
