"""The training loop: :func:`fit` trains any model on any data; :func:`train` is its named-config layer.

For every minibatch, :func:`robustopt.training.objectives.train_step` builds perturbed examples
against the current weights and takes one optimiser step on their loss (Algorithm 1 of Shaham
et al. and its relatives). This module owns everything around it: validation before anything
is written, data order, augmentation, the learning-rate schedule, per-epoch clean and PGD
accuracy, the best weights (Rice et al.), the fast-training guard (Wong et al.), checkpoints,
exact resume and DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustopt import __version__
from robustopt.data.augment import augment_batch, default_augment
from robustopt.data.datasets import Dataset, load_dataset, to_float
from robustopt.devices import pick_device
from robustopt.errors import ConfigError
from robustopt.models.factory import build_from_spec, is_factory_spec
from robustopt.models.zoo import build_model
from robustopt.runs import (
    BEST,
    CHECKPOINT,
    CONFIG,
    MODEL,
    SUMMARY,
    RunLock,
    check_out,
    check_run_dir,
    clean_stray_tmp,
    drop_set_aside,
    replace_run,
    restore_set_aside,
    save_model,
    write_json,
    write_metrics,
)
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import perturb
from robustopt.training import distributed as dist
from robustopt.training.batches import (
    Source,
    TrainData,
    as_source,
    batches,
    check_source,
    eval_batches,
    num_batches,
    probe_num_classes,
)
from robustopt.training.checkpoint import Progress, load_checkpoint, save_checkpoint
from robustopt.training.config import TrainConfig, make_config
from robustopt.training.monitor import Board, Log, epoch_line, make_bar, want_bar
from robustopt.training.objectives import StepContext, make_objective, train_step
from robustopt.training.schedules import build_optimizer, check_optimizer, lr_factor, set_scheduled_lr

GUARD_N = 500  # held-out training examples of the fast-training guard (Wong et al.)


@torch.no_grad()
def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, info: dist.DistInfo | None = None
) -> float:
    """Clean accuracy of ``model`` on (x, y), sharded over ranks when distributed."""
    return source_accuracy(model, Source(x, y), device, info or dist.DistInfo())


@torch.no_grad()
def source_accuracy(model: nn.Module, source: Source, device: torch.device, info: dist.DistInfo) -> float:
    was_training = model.training
    model.eval()
    correct = seen = 0.0
    for xb, yb in eval_batches(source, device, info):
        correct += float((model(xb).argmax(1) == yb).sum())
        seen += len(yb)
    model.train(was_training)
    correct, seen = dist.all_sum([correct, seen], device)
    return correct / max(seen, 1.0)


def pgd_accuracy(
    model: nn.Module, source: Source, threat: ThreatModel, steps: int, device: torch.device, info: dist.DistInfo, seed: int
) -> float:
    """PGD-``steps`` accuracy (random start, step 2.5ε/steps) in eval mode, sharded over ranks.

    Its generator is seeded per call (``seed``), never the training stream's, so watching
    robust accuracy does not change the weights a run ends with."""
    was = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    correct = seen = 0.0
    for xb, yb in eval_batches(source, device, info):
        x_adv = perturb(model, xb, yb, threat, steps=steps, random_start=True, generator=gen)
        with torch.no_grad():
            correct += float((model(x_adv).argmax(1) == yb).sum())
        seen += len(yb)
    model.train(was)
    correct, seen = dist.all_sum([correct, seen], device)
    return correct / max(seen, 1.0)


def _guard_check(ctx: StepContext, held: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> float:
    """PGD-10 accuracy on held-out training examples: Wong et al.'s catastrophic-overfitting check."""
    x, y = to_float(held[0]).to(device), held[1].to(device)
    model = ctx.attack_model
    was = model.training
    model.eval()
    x_adv = perturb(model, x, y, ctx.threat, steps=10, random_start=True, generator=ctx.generator)
    with torch.no_grad():
        acc = float((model(x_adv).argmax(1) == y).float().mean())
    model.train(was)
    total, ranks = dist.all_sum([acc, 1.0], device)  # random starts differ per rank; all must take the same decision
    return total / ranks


# ---------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything one training run holds, built and validated by :func:`_prepare` before any file is written."""

    cfg: TrainConfig
    out: Path
    info: dist.DistInfo
    device: torch.device
    model: nn.Module  # the plain module (weights, attacks, evaluation)
    ctx: StepContext  # the step: DDP/compiled model, optimiser, objective, generator
    train: Source
    test: Source | None
    held: Source | None  # held-out training examples: per-epoch PGD accuracy and the fast guard
    meta: dict[str, Any]
    augment: bool
    scheduler: Any = None
    scheduler_interval: str = "epoch"
    base_lrs: list[float] = field(default_factory=list)  # each group's lr before any schedule or resume
    prog: Progress = field(default_factory=Progress)
    log: Log = print
    bar: bool = False
    board: Board | None = None


def fit(
    model: nn.Module,
    train_data: TrainData,
    *,
    out: str | Path,
    method: str | None = None,
    threat: ThreatModel | None = None,
    epochs: int | None = None,
    test_data: TrainData | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scheduler_interval: str = "epoch",
    config: TrainConfig | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress_bar: bool | None = None,
    log: Log = print,
    meta: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Robustly train any ``model`` on any data into the run directory ``out``; returns the summary.

    Args:
        model: an ``nn.Module`` taking inputs in ``threat.bounds`` (``[0, 1]`` by default) and returning
            logits (B, K); wrap a model that expects standardised inputs in :class:`robustopt.Normalized`.
        train_data, test_data: a pair of tensors ``(x, y)``, a ``Dataset`` of ``(x, y)`` or a ``DataLoader``;
            any number of classes, images (C, H, W) or flat feature vectors.
        method: ``standard, goodfellow, robust, pgd, fast, trades, mart`` or ``free``.
        threat: the norm, ε and domain of the inner maximisation (and of ``eval_pgd``).
        optimizer, scheduler: any torch optimiser and LR scheduler (``scheduler.step()`` is called every
            epoch, or every batch with ``scheduler_interval="batch"``); default: built from the config.
        config: a :class:`TrainConfig` to start from; ``**options`` override its fields (``batch_size``,
            ``lr``, ``beta``, ``steps``, ``augment``, ``eval_pgd``, ``amp``, ``seed``, ...).
        resume, overwrite: continue the unfinished run in ``out`` exactly, or replace what it holds.

    Returns:
        The summary (also ``out/summary.json``): epochs, final test accuracy, best PGD accuracy, seconds.
    """
    cfg, threat = _resolve(config, method, threat, epochs, options)
    dist_was_up = (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    )  # a group the caller made is the caller's to destroy
    run = _prepare(model, train_data, test_data, cfg, threat, out, optimizer, scheduler, scheduler_interval, device, meta or {})
    run.log, run.bar = log, want_bar(progress_bar, run.info.is_main)
    created_group = run.info.enabled and not dist_was_up
    with RunLock(run.out) if run.info.is_main else contextlib.nullcontext():  # one writer per run directory
        _open_run_dir(run, resume=resume, overwrite=overwrite)
        _train_epochs(run)
        summary = _finish(run)
    if run.info.enabled:  # the user's module leaves fit without DDP's hooks on its parameters
        _drop_ddp(run)
    if created_group:  # a gloo group alive at interpreter exit can abort a rank (SIGABRT)
        dist.teardown()
    return summary


def _train_epochs(run: Run) -> None:
    """The remaining epochs. A run that an ``--overwrite`` set aside is dropped after the first finished
    epoch, and given back if this run ends (error, Ctrl-C) before one."""
    try:
        while run.prog.epoch < run.cfg.epochs and not run.prog.extra.get("stopped"):
            _train_epoch(run)
            if run.info.is_main:
                drop_set_aside(run.out)  # the new run has a finished epoch to put in the old one's place
    except BaseException:
        if run.info.is_main and restore_set_aside(run.out):
            run.log(f"the new run ended before finishing an epoch; the previous run in {run.out} is restored")
        raise
    finally:
        if run.board is not None:
            run.board.close()


def _drop_ddp(run: Run) -> None:
    """Free the DDP wrapper (and so its Reducer's gradient hooks on the model's parameters), before the
    group it uses is destroyed.

    The Reducer holds the process group, so while it lives ``destroy_process_group`` cannot free the
    group; it would be freed later, when ``fit``'s locals go, right after the last collective
    (see :func:`robustopt.training.distributed.all_sum` for why that can deadlock). DDP objects sit in
    reference cycles, hence the collection.
    """
    run.ctx.model = run.model
    gc.collect()


def _resolve(
    config: TrainConfig | None, method: str | None, threat: ThreatModel | None, epochs: int | None, options: dict[str, Any]
) -> tuple[TrainConfig, ThreatModel]:
    """The run's full configuration: ``config`` (or the defaults), then the keyword arguments."""
    values = dataclasses.asdict(config) if config is not None else {}
    if config is None and threat is None and method not in (None, "standard"):
        raise ConfigError(f"fit(method={method!r}) needs threat=ThreatModel(norm, eps)")
    if threat is not None and not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat must be a robustopt.ThreatModel, got {type(threat).__name__}")
    if threat is not None and config is None:
        values.update(norm=threat.norm, eps=threat.eps, eps_units="pixel")
    values.setdefault("model", "custom")
    for key, value in (("method", method), ("epochs", epochs)):
        if value is not None:
            values[key] = value
    if config is None:
        values.setdefault("method", "standard")
    values.update(options)
    cfg = make_config(values)
    if threat is None:
        threat = ThreatModel(cfg.norm, cfg.pixel_eps)
    return cfg, threat


def _prepare(
    model: nn.Module,
    train_data: TrainData,
    test_data: TrainData | None,
    cfg: TrainConfig,
    threat: ThreatModel,
    out: str | Path,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scheduler_interval: str,
    device: str | None,
    meta: dict[str, Any],
) -> Run:
    """Validate model, data, optimiser and options, and build the step. Writes nothing."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = check_out(out)
    info, dev = _devices(cfg, device)
    train_src, test_src = (
        as_source(train_data, "train_data"),
        as_source(test_data, "test_data") if test_data is not None else None,
    )
    model = model.to(dev)
    k = probe_num_classes(model, train_src, dev, meta.get("num_classes"))
    check_source(train_src, threat, k, "train_data")
    if test_src is not None:
        check_source(test_src, threat, k, "test_data")
    input_shape = tuple(train_src.take(torch.arange(1))[0].shape[1:])
    threat.check_fits(input_shape)
    augment = _augment_choice(cfg, meta, input_shape)
    train_src, held = _hold_out(cfg, train_src)
    if scheduler_interval not in ("epoch", "batch"):
        raise ConfigError(f"scheduler_interval must be 'epoch' or 'batch', got {scheduler_interval!r}")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise ConfigError(f"scheduler must be a torch LR scheduler with .step(), got {type(scheduler).__name__}")
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ctx = _step_context(cfg, model, threat, optimizer, info, dev)
    meta = _metadata(cfg, meta, threat, k, input_shape, dev, info)
    board = Board(out) if cfg.tensorboard and info.is_main else None
    if dev.type == "cuda":
        train_src = train_src.to(dev)
    base_lrs = [float(g["lr"]) for g in ctx.optimizer.param_groups]
    return Run(
        cfg, out, info, dev, model, ctx, train_src, test_src, held, meta, augment, scheduler, scheduler_interval, base_lrs,
        board=board,
    )  # fmt: skip


def _devices(cfg: TrainConfig, device: str | None) -> tuple[dist.DistInfo, torch.device]:
    info = dist.from_env()
    dev = pick_device(device)
    if info.enabled and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with a fixed workspace
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    return info, dev


def _augment_choice(cfg: TrainConfig, meta: dict[str, Any], input_shape: tuple[int, ...]) -> bool:
    augment = bool(meta.get("augment_default", False)) if cfg.augment is None else cfg.augment
    if augment and len(input_shape) != 3:
        raise ConfigError(f"--augment needs image inputs (C, H, W); the data has shape {input_shape}; use --no-augment")
    return augment


def _hold_out(cfg: TrainConfig, source: Source) -> tuple[Source, Source | None]:
    """Hold out the last training examples: ``eval_pgd`` for per-epoch PGD accuracy, and for ``fast`` its guard's
    500 (a quarter of the data when there are 1000 or fewer)."""
    if cfg.eval_pgd and len(source) <= 2 * cfg.eval_pgd:
        raise ConfigError(
            f"holding out {cfg.eval_pgd} examples for the per-epoch PGD check needs more than {2 * cfg.eval_pgd} training "
            f"examples, the data has {len(source)}; lower --eval-pgd or use more data"
        )
    n = max(cfg.eval_pgd, guard_size(len(source)) if cfg.method == "fast" else 0)
    return (source, None) if n == 0 else source.split(n)


def guard_size(n: int) -> int:
    """Examples the fast-training guard holds out of n training examples."""
    return GUARD_N if n > 2 * GUARD_N else max(1, n // 4)


def _step_context(
    cfg: TrainConfig,
    model: nn.Module,
    threat: ThreatModel,
    optimizer: torch.optim.Optimizer | None,
    info: dist.DistInfo,
    dev: torch.device,
) -> StepContext:
    if optimizer is None:
        optimizer = build_optimizer(cfg, model)
    check_optimizer(optimizer, model)
    generator = torch.Generator(device=dev).manual_seed(cfg.seed * 1000 + info.rank)
    torch.manual_seed(cfg.seed * 1000 + info.rank + 1)  # dropout: different per rank, fixed per seed
    outer: nn.Module = model
    if info.enabled:
        dist.setup(info, dev)
        outer = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        outer = torch.compile(outer)
    return context_for(cfg, outer, model, optimizer, threat, generator)


def context_for(
    cfg: TrainConfig,
    outer: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    threat: ThreatModel,
    generator: torch.Generator,
) -> StepContext:
    """The step context of ``cfg``: its objective, AMP mode and options, wired to the given modules."""
    step_size = cfg.step_size if cfg.step_size is not None else (threat.eps if cfg.method == "free" else None)
    objective = make_objective(cfg.method, threat, alpha=cfg.alpha, beta=cfg.beta, steps=cfg.steps, step_size=step_size)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type) if cfg.amp == "fp16" else None
    return StepContext(outer, model, optimizer, threat, objective, generator, cfg.replays, amp_dtype, scaler, cfg.grad_clip)


def _metadata(
    cfg: TrainConfig,
    meta: dict[str, Any],
    threat: ThreatModel,
    k: int,
    input_shape: tuple[int, ...],
    dev: torch.device,
    info: dist.DistInfo,
) -> dict[str, Any]:
    """config.json: what load_model needs to rebuild the net, the threat, every training argument, versions."""
    import numpy
    import safetensors

    return {
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "dataset": meta.get("dataset", cfg.data or "custom"),
        "kind": meta.get("kind", "tensors"),
        "class_names": meta.get("class_names"),
        "num_classes": k,
        "input_shape": list(input_shape),
        "normalization": meta.get("normalization"),
        "threat": {"norm": threat.norm, "eps": threat.eps, "bounds": list(threat.bounds)},
        "pixel_eps": threat.eps,
        "train": dataclasses.asdict(cfg),
        "device": str(dev),
        "world_size": info.world_size,
        "versions": {
            "robustopt": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "safetensors": safetensors.__version__,
        },
    }


# ---------------------------------------------------------------------------- run directory


def _open_run_dir(run: Run, *, resume: bool, overwrite: bool) -> None:
    """After every check has passed, holding the run's lock: replace, resume or start the run directory."""
    if run.info.is_main:
        if restore_set_aside(run.out):  # a killed --overwrite: its new run never finished an epoch
            run.log(f"restored the previous run that an interrupted --overwrite had set aside in {run.out}")
        do_resume = check_run_dir(run.out, run.cfg.training_keys(), resume=resume, overwrite=overwrite)
        replace_run(run.out) if overwrite else clean_stray_tmp(run.out)
    else:
        do_resume = resume
    if do_resume and (run.out / CHECKPOINT).exists():
        iters = num_batches(len(run.train), run.cfg.batch_size, run.info)
        run.prog, run.ctx.state, _ = load_checkpoint(
            run.out / CHECKPOINT, run.model, run.ctx.optimizer, run.ctx.generator, run.device, epochs=run.cfg.epochs,
            batches_per_epoch=iters,
        )  # fmt: skip
        _replay_scheduler(run)
        run.log(f"resuming {run.out} at epoch {run.prog.epoch + 1}, batch {run.prog.batch}")
    if run.info.is_main:
        write_json(run.out / CONFIG, run.meta)


def _replay_scheduler(run: Run) -> None:
    """A user's scheduler object is a function of how often it stepped: step it as often again."""
    if run.scheduler is not None:
        for _ in range(int(run.prog.extra.get("scheduler_steps", 0))):
            run.scheduler.step()


def _checkpoint(run: Run) -> None:
    if run.info.is_main:
        save_checkpoint(
            run.out / CHECKPOINT,
            run.model,
            run.ctx.optimizer,
            run.ctx.generator,
            run.ctx.state,
            run.prog,
            run.cfg.training_keys(),
        )


# ---------------------------------------------------------------------------- epochs


def _train_epoch(run: Run) -> None:
    """One epoch from ``run.prog``'s position: steps, periodic checkpoints, then the epoch's report."""
    cfg, prog = run.cfg, run.prog
    epoch = prog.epoch
    run.model.train()
    iters = num_batches(len(run.train), cfg.batch_size, run.info)
    t0, last_save = time.monotonic() - prog.seconds, time.monotonic()
    bar = make_bar(run.bar, iters, prog.batch, epoch, cfg.epochs)
    stream = batches(run.train, cfg.batch_size, seed=cfg.seed, epoch=epoch, info=run.info, device=run.device, start=prog.batch)
    for x, y in stream:
        _one_batch(run, x, y, iters)
        bar.update(1)
        bar.set_postfix(loss=f"{prog.loss_sum / prog.seen:.4f}", acc=f"{prog.correct / prog.seen:.3f}")
        if time.monotonic() - last_save > 60 * cfg.checkpoint_minutes and prog.batch < iters:
            prog.seconds = time.monotonic() - t0
            _checkpoint(run)
            last_save = time.monotonic()
    bar.close()
    lr = run.ctx.optimizer.param_groups[0]["lr"]  # the lr this epoch trained with
    if run.scheduler is not None and run.scheduler_interval == "epoch":
        run.scheduler.step()
        prog.extra["scheduler_steps"] = prog.extra.get("scheduler_steps", 0) + 1
    _end_epoch(run, time.monotonic() - t0, lr)


def _one_batch(run: Run, x: torch.Tensor, y: torch.Tensor, iters: int) -> None:
    cfg, prog = run.cfg, run.prog
    if run.augment:
        x = augment_batch(x, run.ctx.generator)
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if run.scheduler is None:
        set_scheduled_lr(run.ctx.optimizer, run.base_lrs, lr_factor(cfg, prog.epoch, prog.batch, iters))
    loss, logits = train_step(run.ctx, x, y)
    if not math.isfinite(loss):
        raise ConfigError(f"training diverged (loss {loss}) at epoch {prog.epoch + 1}; lower --lr")
    if run.scheduler is not None and run.scheduler_interval == "batch":
        run.scheduler.step()
        prog.extra["scheduler_steps"] = prog.extra.get("scheduler_steps", 0) + 1
    prog.loss_sum += loss * len(y)
    prog.correct += float((logits.argmax(1) == y).sum())
    prog.seen += len(y)
    prog.batch += 1


def _end_epoch(run: Run, seconds: float, lr: float) -> None:
    """Metrics of the finished epoch, the guard and best weights, then files and the log line."""
    cfg, prog, info = run.cfg, run.prog, run.info
    loss_sum, correct, seen = dist.all_sum([prog.loss_sum, prog.correct, prog.seen], run.device)
    row: dict[str, Any] = {
        "epoch": prog.epoch + 1,
        "loss": loss_sum / max(seen, 1.0),
        "train_acc": correct / max(seen, 1.0),
        "train_acc_on": "clean batches" if cfg.method == "standard" else "perturbed batches",
        "test_acc": source_accuracy(run.model, run.test, run.device, info) if run.test is not None else None,
        "seconds": round(seconds, 3),
        "lr": lr,
    }
    if run.held is not None and cfg.eval_pgd > 0:
        _robust_accuracy(run, row)
    if cfg.method == "fast":
        _fast_guard(run, row)
    prog.history.append(row)
    if info.is_main:
        run.log(epoch_line(row, cfg.epochs))
        if run.board is not None:
            run.board.epoch(row)
    prog.epoch, prog.batch, prog.loss_sum, prog.correct, prog.seen, prog.seconds = prog.epoch + 1, 0, 0.0, 0.0, 0.0, 0.0
    if info.is_main:
        save_model(run.out / MODEL, run.model, {"epoch": prog.epoch})
        write_metrics(run.out, prog.history)
    _checkpoint(run)


def _robust_accuracy(run: Run, row: dict[str, Any]) -> None:
    """Per-epoch PGD accuracy on the held-out examples; keep the best weights (Rice et al. 2020)."""
    cfg, prog = run.cfg, run.prog
    held = run.held.head(cfg.eval_pgd)  # type: ignore[union-attr]
    acc = pgd_accuracy(
        run.model, held, run.ctx.threat, cfg.eval_pgd_steps, run.device, run.info, seed=cfg.seed * 7919 + prog.epoch
    )
    row.update(pgd_acc=acc, pgd_steps=cfg.eval_pgd_steps, pgd_n=len(held))
    if cfg.keep_best and acc > prog.extra.get("best_pgd_acc", -1.0):
        prog.extra.update(best_pgd_acc=acc, best_epoch=prog.epoch + 1)
        if run.info.is_main:
            save_model(run.out / BEST, run.model, {"epoch": prog.epoch + 1, "pgd_acc": acc})


def _fast_guard(run: Run, row: dict[str, Any]) -> None:
    """Wong et al.'s guard: restore the best weights and stop when held-out PGD accuracy collapses."""
    cfg, prog, ctx = run.cfg, run.prog, run.ctx
    held = run.held.head(guard_size(len(run.train) + len(run.held)))  # type: ignore[union-attr, arg-type]
    assert held.x is not None and held.y is not None, "the guard holds its examples in memory"
    row["guard_pgd_acc"] = _guard_check(ctx, (held.x, held.y), run.device)
    best = prog.extra.get("best_guard", -1.0)
    if row["guard_pgd_acc"] >= best:
        prog.extra["best_guard"] = row["guard_pgd_acc"]
        ctx.state.update({f"best.{k}": v.detach().clone() for k, v in run.model.state_dict().items()})
    elif row["guard_pgd_acc"] < best - cfg.guard_drop:
        run.log(
            f"catastrophic overfitting: held-out PGD accuracy fell from {best:.3f} to {row['guard_pgd_acc']:.3f}; "
            "restoring the best weights and stopping"
        )
        run.model.load_state_dict({k[5:]: v for k, v in ctx.state.items() if k.startswith("best.")})
        prog.extra["stopped"] = prog.epoch + 1
        if run.test is not None:
            row["test_acc"] = source_accuracy(run.model, run.test, run.device, run.info)  # of the restored weights


def _finish(run: Run) -> dict[str, Any]:
    history = run.prog.history
    summary = {
        "epochs": run.prog.epoch,
        "test_acc": history[-1]["test_acc"] if history else None,
        "pgd_acc": history[-1].get("pgd_acc") if history else None,
        "best_pgd_acc": run.prog.extra.get("best_pgd_acc"),
        "best_epoch": run.prog.extra.get("best_epoch"),
        "train_seconds": sum(r["seconds"] for r in history),
        "stopped_early_at": run.prog.extra.get("stopped"),
    }
    if run.info.is_main:
        write_json(run.out / SUMMARY, summary)
    dist.barrier()
    return summary


# ---------------------------------------------------------------------------- named configurations


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    data_dir: str | Path | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress_bar: bool | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Train the model and data a :class:`TrainConfig` names (built-in, factory or file) with :func:`fit`.

    Returns the summary dict (also written to ``out/summary.json``).
    """
    data = load_dataset(cfg.data or cfg.dataset, data_dir).subset(cfg.subset)
    threat = ThreatModel(cfg.norm, cfg.pixel_eps_for(data.std))
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_net(cfg.model, cfg.model_kwargs, data)
    meta = {
        "dataset": data.name,  # a built-in name, or the absolute path of the user's data
        "num_classes": data.num_classes,
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "augment_default": default_augment(data.kind),  # on for CIFAR and image folders, off for MNIST-like data
        "kind": data.kind,
        "class_names": list(data.class_names) if data.class_names else None,
    }
    test = (data.x_test[: cfg.test_subset], data.y_test[: cfg.test_subset])  # [:None] is all of them
    return fit(
        model,
        (data.x_train, data.y_train),
        out=out,
        threat=threat,
        test_data=test,
        config=cfg,
        device=device,
        resume=resume,
        overwrite=overwrite,
        progress_bar=progress_bar,
        log=log,
        meta=meta,
    )


def build_net(name: str, kwargs: dict[str, Any], data: Dataset) -> nn.Module:
    """A built-in architecture for ``data``, or the user's ``package.module:factory``."""
    if is_factory_spec(name):
        return build_from_spec(name, kwargs)
    if kwargs:
        raise ConfigError(f"--model-kwargs is only for package.module:factory models, not the built-in {name!r}")
    return build_model(name, mean=data.mean, std=data.std, num_classes=data.num_classes, input_shape=data.input_shape)
