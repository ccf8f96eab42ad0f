"""Training: fit a recipe's network and write its run folder.

:mod:`~imgcls.training.loop` is the run on one page (prepare, then epochs of
steps); the steps it calls live beside it: :mod:`~imgcls.training.setup`
(device, data, model, optimizer, run folder), :mod:`~imgcls.training.validation`
(validation, the loss), :mod:`~imgcls.training.schedule` (optimizer, learning
rate, EMA), :mod:`~imgcls.training.state` (resume state, best/last),
:mod:`~imgcls.training.outputs` (metrics.csv, curves, run.json),
:mod:`~imgcls.training.progress` (the bar) and :mod:`~imgcls.training.ddp`
(DistributedDataParallel, torch.compile).
"""

from __future__ import annotations

from imgcls.training.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
