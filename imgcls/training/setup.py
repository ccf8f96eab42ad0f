"""Prepare a run: device, data, model, optimizer, and (last, once all of
that worked) the run folder. Each step is a function; :func:`prepare` calls
them in order and returns the :class:`~imgcls.training.state.Run`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from imgcls import __version__, distributed, interrupts
from imgcls import checkpoint as ck
from imgcls.errors import CheckpointError, RecipeError, UsageError
from imgcls.io import write_text_atomic
from imgcls.models import finetune
from imgcls.models.build import build_model
from imgcls.recipe import Recipe, dump_yaml, recipe_from_dict, recipe_to_dict
from imgcls.tracking import check_trackers
from imgcls.training.ddp import compiled, distribute
from imgcls.training.distill import bind_teacher, open_teacher, teacher_path
from imgcls.training.outputs import write_run_info, write_summary
from imgcls.training.schedule import EMA, make_optimizer, regularized_weights
from imgcls.training.state import Log, Run, State, load_resume_state, resumable_meta
from imgcls.training.validation import make_loss


def choose_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("device 'mps' asked for, but this machine has no MPS (use --device cpu or auto)")
    return torch.device(name)


def choose_channels_last(value: str | bool, device: torch.device) -> bool:
    """``auto``: on for CPU and CUDA, off for MPS.

    CPU, measured with bench/train_throughput.py --precision (fp32, hand
    loop): channels_last/contiguous 1.32x quickstart, 1.43x resnet-style,
    1.46x mobilenet-style (oneDNN convs are NHWC inside). CUDA: tensor-core
    convolutions want NHWC. MPS: not measured, so left off.
    """
    if value == "auto":
        return device.type in ("cpu", "cuda")
    return bool(value)


def prepare(
    recipe: Recipe,
    *,
    base_dir: Path,
    out: Path | None,
    resume: Path | None,
    log: Log,
    group: distributed.Group = distributed.SINGLE,
) -> Run:
    """Devices, data, model, optimizer, and (last, once all of that worked) the run folder."""
    spec = recipe.train
    device, channels_last = _runtime(recipe, group)
    teacher = open_teacher(spec.distill, base_dir, log)  # a missing teacher fails before the data is read
    if out is not None and resume is None and group.main:
        ck.check_out_dir(out)  # a usage error before minutes of decoding, not after
    if resume is not None and group.main:  # before any rank reads the pair
        ck.hold_run(resume, "resume it once that has finished")  # until train ends: no second writer
        ck.repair_pair(resume, log)
    data, saved_meta = _data(recipe, base_dir, resume, group, log)
    classes, input_shape = data.classes, recipe.input_shape()
    model = _model(recipe, base_dir, resume, device, channels_last, len(classes), group, log)
    choice = _precision(
        spec,
        device,
        model,
        input_shape,
        len(classes),
        len(data.train.y),
        channels_last,
        resume,
        log,
        distributed_run=group.active,
    )
    optimizer = make_optimizer(model, spec.optimizer)
    ema = EMA(model, spec.ema.decay) if spec.ema else None
    scaler = torch.amp.GradScaler(device.type, enabled=choice.dtype == torch.float16)
    meta, resolved = _meta(recipe, base_dir, resume, data)
    state = State()
    if resume is not None:
        state = load_resume_state(resume, model, optimizer, ema, scaler)
    task = _task(recipe, data, log)
    if task == "multilabel":
        meta["task"] = "multilabel"  # absent means single-label: older checkpoints stay as they were
    weights = _class_weights(recipe, data, log)
    batch_size = _batch_size(spec, len(data.train.y), group)
    augment, mix = _augmentation(recipe, len(classes))
    run = Run(
        recipe=recipe,
        device=device,
        dtype=choice.dtype,
        channels_last=channels_last,
        data=data,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        penalties=regularized_weights(model, recipe.model.l1, recipe.model.l2),
        ema=ema,
        meta=meta,
        state=state,
        run_dir=resume if resume is not None else Path(),
        augment=augment,
        mix=mix,
        batch_size=batch_size,
        steps_per_epoch=max(len(data.train.y) // batch_size, 1),  # drop the ragged last batch (BatchNorm)
        log=log,
        saved=resume is not None,
        task=task,
        loss=make_loss(task, spec, data.train.y, device, weights),
        group=group,
        accumulation=spec.gradient_accumulation,
    )
    run.teacher = bind_teacher(run, teacher)  # classes checked, logits cached: before the run folder
    finetune.set_frozen(model, finetune.frozen_at(model, recipe, state.epoch))  # a resume past unfreeze_at
    distribute(run)
    run.batches, run.forward = _batch_source(run), compiled(run)
    interrupts.check()  # a Ctrl-C swallowed while the data was prepared stops us here
    # only now, with data and model ready, does the run get a folder (rank 0 makes it)
    _run_folder(run, out, resume, resolved, input_shape)
    try:  # from here a failure (a broken group, an unwritable run.json, Ctrl-C) removes what the start wrote
        if group.main and out is None and resume is None:  # a given folder needs no record
            distributed.record_run_dir(recipe, run.run_dir)
        run.run_dir = group.broadcast(run.run_dir)
        _describe(run, choice)
    except BaseException:
        if group.main and not run.saved:
            ck.remove_unstarted_run(run.run_dir, run.created, run.written)
            distributed.forget_run_dir(recipe)
        raise
    return run


def _runtime(recipe: Recipe, group: distributed.Group) -> tuple[torch.device, bool]:
    """The process-wide torch settings the recipe asks for; the device and its memory format."""
    spec = recipe.train
    distributed.per_rank_batch(spec.batch_size, group.world)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
    device = choose_device(spec.device)
    if group.active and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)  # one GPU per process
    check_trackers(list(spec.log_to))  # a missing extra fails before any work
    return device, choose_channels_last(spec.channels_last, device)


def _data(recipe: Recipe, base_dir: Path, resume: Path | None, group: distributed.Group, log: Log):
    """The decoded data (rank 0 decodes and fills the persistent cache; the
    others then read it), checked against the recipe and the resumed run."""
    saved_meta = resumable_meta(recipe, resume)
    data = _prepare_data(recipe, base_dir, saved_meta, log) if group.main else None
    group.barrier()
    if data is None:
        data = _prepare_data(recipe, base_dir, saved_meta, log)
    classes = data.classes
    if saved_meta is not None and saved_meta["classes"] != classes:
        raise CheckpointError(
            f"{resume}: the data's classes {classes} differ from the run's {saved_meta['classes']}; resume refuses"
        )
    if recipe.model.num_classes is not None and recipe.model.num_classes != len(classes):
        raise RecipeError(
            f"model.num_classes is {recipe.model.num_classes} but the data has {len(classes)} classes"
        )
    input_shape = recipe.input_shape()
    if tuple(data.train.x.shape[1:]) != tuple(input_shape):
        raise RecipeError(
            f"model.input_shape {input_shape} differs from the data's "
            f"{tuple(data.train.x.shape[1:])} (data.channels, data.image_size)"
        )
    return data, saved_meta


def _model(
    recipe: Recipe,
    base_dir: Path,
    resume: Path | None,
    device: torch.device,
    channels_last: bool,
    num_classes: int,
    group: distributed.Group,
    log: Log,
) -> nn.Module:
    """The network, seeded, frozen as the recipe says, in its memory format."""
    spec = recipe.train
    torch.manual_seed(spec.seed)
    model_spec = _model_spec(recipe, base_dir, resume)
    model = build_model(model_spec, recipe.input_shape(), num_classes, log=log).to(device)
    finetune.set_frozen(model, finetune.frozen_at(model, recipe, 0))  # before the summary: shown frozen
    if line := finetune.freeze_line(model, recipe):
        log(line)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if group.active and spec.sync_batchnorm:
        if device.type != "cuda":
            raise RecipeError(
                "train.sync_batchnorm needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernel)"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _meta(recipe: Recipe, base_dir: Path, resume: Path | None, data) -> tuple[dict, Recipe]:
    """What every checkpoint carries, and the resolved recipe (data.path made
    absolute so evaluate finds the data from anywhere)."""
    resolved = recipe_to_dict(recipe)
    if recipe.data.path:
        from imgcls.data.sources import resolve

        resolved["data"]["path"] = str(resolve(recipe.data.path, base_dir).resolve())
    if recipe.train.distill is not None:  # absolute: a resume reads this recipe from the run folder
        teacher = teacher_path(recipe.train.distill.teacher, base_dir)
        resolved["train"]["distill"]["teacher"] = str(teacher.resolve())
    if recipe.model.weights and resume is None:
        resolved["model"]["weights"] = _model_spec(recipe, base_dir, None).weights
    meta = {
        "recipe": resolved,
        "classes": data.classes,
        "input_shape": list(recipe.input_shape()),
        "preprocessing": {
            "image_size": list(recipe.data.size),
            "channels": recipe.data.channels,
            "mean": [float(m) for m in data.mean],
            "std": [float(s) for s in data.std],
            "resize": recipe.data.resize,
        },
        "imgcls_version": __version__,
    }
    return meta, recipe_from_dict(resolved)


def _class_weights(recipe: Recipe, data, log: Log) -> torch.Tensor | None:
    """The class counts said once; per-class loss weights as train.class_weights asks."""
    from imgcls.imbalance import class_counts, class_weights, count_lines

    counts = class_counts(data.train.y, len(data.classes))
    untreated = recipe.train.class_weights == "none" and recipe.data.sampler == "shuffle"
    for line in count_lines("train", data.classes, counts, hint=untreated):
        log(line)
    return class_weights(recipe.train.class_weights, data.classes, counts)


def _batch_size(spec, n: int, group: distributed.Group) -> int:
    """Images per optimizer step, over all ranks and micro-batches."""
    if not (group.active or spec.gradient_accumulation > 1):
        return min(spec.batch_size, n)
    batch_size = spec.batch_size * spec.gradient_accumulation  # one optimizer step, all ranks
    if batch_size > n:
        raise RecipeError(
            f"train.batch_size x gradient_accumulation is {batch_size}, more than the {n} training images"
        )
    return batch_size


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # auxiliary heads (inception, googlenet) get no gradient from the main loss
    aux = any("aux" in name.lower() for name, _ in model.named_children())
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=aux
    )


def _run_folder(run: Run, out: Path | None, resume: Path | None, resolved: Recipe, input_shape) -> None:
    """Rank 0 makes (or, resuming, updates) the run folder."""
    recipe, group, log = run.recipe, run.group, run.log
    if resume is not None and group.main:
        # the resumed recipe may extend epochs etc.: the folder describes what runs now
        write_text_atomic(resume / "recipe.yaml", dump_yaml(resolved))
        log(f"resuming {resume} at epoch {run.state.epoch + 1}, step {run.state.step}")
    elif group.main:
        if out is not None:
            run.created, run.run_dir = ck.claim_out_dir(out), out
        else:
            run.created, run.run_dir = True, ck.new_run_dir(Path(recipe.train.out), recipe.name)
        ck.hold_run(run.run_dir, "choose another --out")  # until train ends (an --out another run took)
        try:
            run.written += ["recipe.yaml", "summary.txt", "summary.json"]
            write_text_atomic(run.run_dir / "recipe.yaml", dump_yaml(resolved))
            write_summary(run.run_dir, run.model, input_shape)
            log(f"run folder: {run.run_dir}")
        except BaseException:
            ck.remove_unstarted_run(run.run_dir, run.created, run.written)
            raise


def _describe(run: Run, choice) -> None:
    """Say how the run runs (device, precision, ranks) and record it in run.json."""
    spec, group, device, log = run.spec, run.group, run.device, run.log
    if not len(run.data.val.y):
        log("no validation split: the best checkpoint is chosen on training loss")
    precision_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[run.dtype]
    log(f"device: {device.type}, {precision_name}{', channels_last' if run.channels_last else ''}")
    run.info = {"device": device.type, "precision": precision_name, "channels_last": run.channels_last}
    run.info.update(precision_choice=choice.info(), compile=spec.compile, batches=run.batches.mode)
    if group.active:
        log(f"{group.world} processes, {spec.batch_size // group.world} images each per batch")
        run.info.update(world_size=group.world, sync_batchnorm=spec.sync_batchnorm)
    if spec.gradient_accumulation > 1:
        run.info["gradient_accumulation"] = spec.gradient_accumulation
    if not group.main:
        return
    if "run.json" not in run.written and not run.saved:
        run.written.append("run.json")
    write_run_info(run.run_dir, run.info)


def _model_spec(recipe: Recipe, base_dir: Path, resume: Path | None):
    """model.weights resolved against the recipe's folder; dropped on resume (last.safetensors follows)."""
    spec = recipe.model
    if spec.weights and resume is not None:
        return spec.model_copy(update={"weights": None})
    if spec.weights:
        from imgcls.data.sources import resolve

        return spec.model_copy(update={"weights": str(resolve(spec.weights, base_dir).resolve())})
    return spec


def _prepare_data(recipe: Recipe, base_dir: Path, saved_meta: dict | None, log: Log):
    from imgcls.data import prepare_data

    data_spec = recipe.data
    if saved_meta is not None:  # a resumed run keeps the statistics it started with
        pre = saved_meta["preprocessing"]
        data_spec = data_spec.model_copy(update={"mean": pre["mean"], "std": pre["std"]})
    elif recipe.model.arch and recipe.model.pretrained and data_spec.mean is None and data_spec.std is None:
        from imgcls.models.zoo import pretrained_stats

        stats = pretrained_stats(recipe.model.arch, data_spec.channels)
        if stats is not None:
            data_spec = data_spec.model_copy(update={"mean": stats[0], "std": stats[1]})
            log(f"normalising with {recipe.model.arch}'s pretraining statistics")
    return prepare_data(data_spec, base_dir, None, log)


def _precision(
    spec, device, model, input_shape, num_classes, n, channels_last, resume, log, distributed_run=False
):
    """``train.precision`` resolved (``auto``: timed per model, see imgcls.precision)."""
    from imgcls import precision

    choice = precision.choose(
        spec.precision,
        device,
        model=model,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        batch_size=min(spec.batch_size, n),
        channels_last=channels_last,
        deterministic=spec.deterministic or distributed_run,
        run_steps=max(n // min(spec.batch_size, n), 1) * spec.epochs,
        resumed_from=resume,
    )
    log(choice.line())
    return choice


def _batch_source(run: Run):
    from imgcls.data.batches import batch_mode, describe, open_batches
    from imgcls.errors import UsageError

    train, mode = run.data.train, batch_mode()
    file = getattr(train, "file", None)
    if mode == "stream" and file is None:
        raise UsageError(
            "IMGCLS_BATCHES=stream: this training split is held in RAM, not mapped from a cache file "
            "(data.cache: ram or none, or the cache folder is over its cap or cannot be written); "
            "set data.cache: disk to stream it"
        )
    source = open_batches(train.x, train.y, run.device, max_batch=run.batch_size, file=file, mode=mode)
    run.log(describe(source))
    return source


def _task(recipe: Recipe, data, log: Log) -> str:
    task = getattr(data.source, "task", "single")
    if task == "multilabel":
        if recipe.data.task == "auto":
            log(
                "data: some rows carry several labels: training a multi-label model "
                "(sigmoid outputs, binary cross-entropy); data.task: single refuses such rows"
            )
        if recipe.train.class_weights != "none" or recipe.data.sampler != "shuffle":
            raise RecipeError(
                "train.class_weights and data.sampler: balanced are for single-label data; "
                "a multi-label run weighs rare labels with train.pos_weight: auto"
            )
        monitor = recipe.train.early_stopping.monitor if recipe.train.early_stopping else None
        if monitor == "val_acc":
            log("note: for multi-label, val_acc is the exact-match ratio; val_f1 (macro F1) is the default")
    elif recipe.train.early_stopping and recipe.train.early_stopping.monitor == "val_f1":
        raise RecipeError(
            "train.early_stopping.monitor: val_f1 is a multi-label metric; use val_acc or val_loss"
        )
    return task


def _augmentation(recipe: Recipe, num_classes: int):
    from imgcls.data.augment import build_augment, mix_batch

    spec = recipe.data.augment
    augment = build_augment(spec, recipe.data.size)
    mix = None
    if spec.mixup > 0 or spec.cutmix > 0:

        def mix(x, y, gen):
            return mix_batch(x, y, num_classes, spec.mixup, spec.cutmix, gen)

    return augment, mix
