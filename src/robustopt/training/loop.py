"""The training loop: :func:`fit` trains any model on any data, under one threat model.

For every minibatch, :func:`robustopt.training.objectives.train_step` builds perturbed examples
against the current weights and takes one optimiser step on their loss (Algorithm 1 of Shaham
et al. and its relatives). Setup and validation live in :mod:`robustopt.training.setup`, the
measurements in :mod:`robustopt.training.metrics`, the run directory's transaction in
:class:`robustopt.rundir.RunDir`; this module owns the epochs: data order, augmentation, the
learning-rate schedule, checkpoints, the best weights (Rice et al.) and the fast-training guard
(Wong et al.).
"""

from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustopt.data.augment import augment_batch
from robustopt.data.datasets import to_float
from robustopt.errors import ConfigError
from robustopt.files import write_json
from robustopt.rundir import BEST, CHECKPOINT, CONFIG, MODEL, SUMMARY, RunDir, write_metrics
from robustopt.tensors import save_model
from robustopt.threat.model import ThreatModel
from robustopt.training import distributed as dist
from robustopt.training.awp import awp_step
from robustopt.training.batches import TrainData, batches, num_batches
from robustopt.training.checkpoint import load_checkpoint, save_checkpoint
from robustopt.training.config import TrainConfig
from robustopt.training.ema import WeightAverage
from robustopt.training.extra import extra_batches, extra_count, labelled_batch_size, mixed
from robustopt.training.metrics import guard_accuracy, pgd_accuracy, source_accuracy
from robustopt.training.monitor import Board, Log, chance_accuracy, epoch_line, make_bar, not_learning, want_bar
from robustopt.training.objectives import train_step
from robustopt.training.schedules import eps_factor, lr_factor, ramped, set_scheduled_lr
from robustopt.training.setup import Run, build_step, guard_size, prepare, resolve_config


@dataclass(frozen=True)
class FitSummary:
    """What a finished :func:`fit` returns (and writes to ``out/summary.json``)."""

    run_dir: str
    epochs: int  # epochs trained (fewer than asked when the fast guard stopped the run)
    test_acc: float | None  # clean accuracy on test_data after the last epoch
    pgd_acc: float | None  # held-out PGD accuracy after the last epoch (eval_pgd > 0)
    best_pgd_acc: float | None  # the best epoch's held-out PGD accuracy: best.safetensors
    best_epoch: int | None
    train_seconds: float
    stopped_early_at: int | None  # the epoch the fast guard stopped at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Which batch the logged training accuracy is measured on: the certified losses report their clean forward.
ACC_ON = {"standard": "clean batches", "ibp": "clean batches", "crown-ibp": "clean batches", "gaussian": "noisy batches"}


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fit(
    model: nn.Module,
    train_data: TrainData,
    threat: ThreatModel | None = None,
    *,
    out: str | Path,
    method: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    steps: int | None = None,
    beta: float | None = None,
    augment: bool | None = None,
    eval_pgd: int | None = None,
    seed: int | None = None,
    test_data: TrainData | None = None,
    config: TrainConfig | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scheduler_interval: str = "epoch",
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Log | None = None,
) -> FitSummary:
    """Robustly train any ``model`` on any data under ``threat`` into the run directory ``out``.

    Args:
        model: an ``nn.Module`` taking inputs in ``threat.bounds`` (``[0, 1]`` by default) and returning
            logits (B, K); wrap a model that expects standardised inputs in :class:`robustopt.Normalized`.
        train_data, test_data: a pair of tensors ``(x, y)``, a ``Dataset`` of ``(x, y)`` or a ``DataLoader``;
            any number of classes, images (C, H, W) or flat feature vectors (D,).
        threat: the norm, ε and domain of the inner maximisation (and of ``eval_pgd``); the one source of
            the threat. ``None`` only with ``method="standard"``.
        method: ``robust`` (the default given a threat: Algorithm 1), ``standard``, ``goodfellow``, ``pgd``,
            ``fast``, ``trades``, ``mart`` or ``free``.
        epochs, batch_size, lr, steps, beta, augment, eval_pgd, seed: the common options (:class:`TrainConfig`
            documents each); every other one is a field of ``config``
            (a :class:`TrainConfig`; leave its ``norm``/``eps`` unset, the threat is ``threat``).
        optimizer, scheduler: any torch optimiser and LR scheduler (``scheduler.step()`` is called every
            epoch, or every batch with ``scheduler_interval="batch"``); default: built from the config.
        resume, overwrite: continue the unfinished run in ``out`` exactly, or replace what it holds.
        progress: a progress bar (default: only on a terminal). log: where the log lines go (default: stderr).

    Returns:
        A :class:`FitSummary` (also ``out/summary.json``).

    Example:
        >>> summary = fit(model, (x, y), ThreatModel("linf", 0.1), out="runs/A", epochs=2)
        >>> summary.test_acc, summary.to_dict()
    """
    keywords = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "steps": steps, "beta": beta, "augment": augment,
                "eval_pgd": eval_pgd, "seed": seed}  # fmt: skip
    cfg, threat = resolve_config(config, threat, method, keywords)
    cfg = replace(cfg, model="custom", model_kwargs={})  # the architecture is the caller's object, not a name
    options = {"optimizer": optimizer, "scheduler": scheduler, "scheduler_interval": scheduler_interval}
    return run_fit(model, train_data, test_data, cfg, threat, out, options, device=device, resume=resume,
                   overwrite=overwrite, progress=progress, log=log or stderr_log, meta={})  # fmt: skip


def run_fit(
    model: nn.Module,
    train_data: TrainData,
    test_data: TrainData | None,
    cfg: TrainConfig,
    threat: ThreatModel | None,
    out: str | Path,
    options: dict[str, Any],
    *,
    device: str | None,
    resume: bool,
    overwrite: bool,
    progress: bool | None,
    log: Log,
    meta: dict[str, Any],
) -> FitSummary:
    """:func:`fit` after its arguments are resolved; :func:`robustopt.training.named.train` comes in here too."""
    if options["scheduler_interval"] not in ("epoch", "batch"):
        raise ConfigError(f"scheduler_interval must be 'epoch' or 'batch', got {options['scheduler_interval']!r}")
    scheduler = options["scheduler"]
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise ConfigError(f"scheduler must be a torch LR scheduler with .step(), got {type(scheduler).__name__}")
    dist_was_up = torch.distributed.is_available() and torch.distributed.is_initialized()
    run, _ = prepare(model, train_data, test_data, cfg, threat, out, device, meta)
    run.ctx = build_step(run.cfg, run, threat, options["optimizer"])
    if run.cfg.ema_decay is not None:  # from the initial weights; a resume loads the saved average over it
        run.ema = WeightAverage(run.model, run.cfg.ema_decay, run.cfg.ema_warmup)
    run.scheduler, run.scheduler_interval = scheduler, options["scheduler_interval"]
    run.base_lrs = [float(g["lr"]) for g in run.ctx.optimizer.param_groups]
    run.log, run.bar = log, want_bar(progress, run.info.is_main)
    run.board = Board(run.out) if run.cfg.tensorboard and run.info.is_main else None
    if run.device.type == "cuda":
        run.train = run.train.to(run.device)
    created_group = run.info.enabled and not dist_was_up  # a group the caller made is the caller's to destroy
    with RunDir(run.out, is_main=run.info.is_main, log=run.log) as rd:  # one writer per run directory
        _open(run, rd, resume=resume, overwrite=overwrite)
        _train_epochs(run, rd)
        summary = _finish(run)
    if run.info.enabled:  # the user's module leaves fit without DDP's hooks on its parameters
        _drop_ddp(run)
    if created_group:  # a gloo group alive at interpreter exit can abort a rank (SIGABRT)
        dist.teardown()
    return summary


def first_line(run: Run) -> str:
    """The run's first log line: the method, the threat, augmentation and the epochs, stated once."""
    cfg, threat = run.cfg, run.meta.get("threat")
    where = "no threat" if threat is None else f"{threat['norm']} ε={threat['eps']:g}"
    return (
        f"training {run.out}: method {cfg.method}, threat {where}, augmentation {'on' if cfg.augment else 'off'}, "
        f"{cfg.epochs} epochs of {len(run.train)} examples, batch {cfg.batch_size}"
    )


def _open(run: Run, rd: RunDir, *, resume: bool, overwrite: bool) -> None:
    """After every check has passed, holding the run's lock: replace, resume or start the run directory."""
    do_resume = rd.open(run.keys, resume=resume, overwrite=overwrite)
    resumed = do_resume and (run.out / CHECKPOINT).exists()
    if run.info.is_main and not resumed:
        run.log(first_line(run))
    if resumed:  # the first line after the checkpoint loaded: a checkpoint that cannot be used is the run's only line
        iters = num_batches(len(run.train), labelled_batch_size(run.cfg), run.info)
        run.prog, run.ctx.state, _ = load_checkpoint(
            run.out / CHECKPOINT, run.model, run.ctx.optimizer, run.ctx.generator, run.device, epochs=run.cfg.epochs,
            batches_per_epoch=iters,
        )  # fmt: skip
        _replay_scheduler(run)
        if run.ema is not None:
            run.ema.load(run.ctx.state, int(run.prog.extra.get("ema_updates", 0)))
        if run.info.is_main:
            run.log(first_line(run))
        run.log(f"resuming {run.out} at epoch {run.prog.epoch + 1}, batch {run.prog.batch}")
    rd.write_json(CONFIG, run.meta)


@dist.collective_errors()  # a dead or stuck peer: one line, checkpoints kept (issue 16)
def _train_epochs(run: Run, rd: RunDir) -> None:
    """The remaining epochs. A run that an ``--overwrite`` set aside is dropped after the first finished
    epoch, and given back if this run ends (error, Ctrl-C) before one."""
    try:
        while run.prog.epoch < run.cfg.epochs and not run.prog.extra.get("stopped"):
            _train_epoch(run)
            rd.epoch_done()
    except BaseException:
        rd.abort()
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


def _replay_scheduler(run: Run) -> None:
    """A user's scheduler object is a function of how often it stepped: step it as often again."""
    if run.scheduler is not None:
        for _ in range(int(run.prog.extra.get("scheduler_steps", 0))):
            run.scheduler.step()


def _checkpoint(run: Run) -> None:
    if run.ema is not None:  # the average travels as carried state; the raw weights stay the checkpoint's model
        run.ctx.state.update(run.ema.state())
        run.prog.extra["ema_updates"] = run.ema.updates
    if run.info.is_main:
        save_checkpoint(run.out / CHECKPOINT, run.model, run.ctx.optimizer, run.ctx.generator, run.ctx.state, run.prog, run.keys)


def _train_epoch(run: Run) -> None:
    """One epoch from ``run.prog``'s position: steps, periodic checkpoints, then the epoch's report."""
    cfg, prog = run.cfg, run.prog
    epoch = prog.epoch
    run.model.train()
    size = labelled_batch_size(cfg)  # the batch less its extra examples
    iters = num_batches(len(run.train), size, run.info)
    t0, last_save = time.monotonic() - prog.seconds, time.monotonic()
    bar = make_bar(run.bar, iters, prog.batch, epoch, cfg.epochs)
    stream = batches(run.train, size, seed=cfg.seed, epoch=epoch, info=run.info, device=run.device, start=prog.batch)
    if run.extra is not None:
        more = extra_batches(run.extra, extra_count(cfg), seed=cfg.seed, epoch=epoch, info=run.info, device=run.device,
                             start=prog.batch)  # fmt: skip
        stream = mixed(stream, more)
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
    run.ctx.progress = (prog.epoch + prog.batch / iters) / cfg.epochs  # drives the ε ramps (certified methods' too)
    ctx = ramped(run.ctx, eps_factor(cfg, run.ctx.progress))
    loss, logits = awp_step(ctx, x, y, cfg.awp_gamma) if cfg.awp_gamma is not None else train_step(ctx, x, y)
    if run.ema is not None:
        run.ema.update(run.model)
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
        "train_acc_on": ACC_ON.get(cfg.method, "perturbed batches"),
        "test_acc": source_accuracy(run.record, run.test, run.device, info) if run.test is not None else None,
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
        warning = not_learning(prog.history, chance_accuracy(getattr(run.test, "y", None), run.meta["num_classes"]))
        if warning:
            run.log(warning)
        if run.board is not None:
            run.board.epoch(row)
    prog.epoch, prog.batch, prog.loss_sum, prog.correct, prog.seen, prog.seconds = prog.epoch + 1, 0, 0.0, 0.0, 0.0, 0.0
    if info.is_main:
        save_model(run.out / MODEL, run.record, {"epoch": prog.epoch})
        write_metrics(run.out, prog.history)
    _checkpoint(run)


def _robust_accuracy(run: Run, row: dict[str, Any]) -> None:
    """Per-epoch PGD accuracy on the held-out examples; keep the best weights (Rice et al. 2020)."""
    cfg, prog = run.cfg, run.prog
    held = run.held.head(cfg.eval_pgd)  # type: ignore[union-attr]
    acc = pgd_accuracy(
        run.record, held, run.ctx.threat, cfg.eval_pgd_steps, run.device, run.info, seed=cfg.seed * 7919 + prog.epoch
    )
    row.update(pgd_acc=acc, pgd_steps=cfg.eval_pgd_steps, pgd_n=len(held))
    if cfg.keep_best and acc > prog.extra.get("best_pgd_acc", -1.0):
        prog.extra.update(best_pgd_acc=acc, best_epoch=prog.epoch + 1)
        if run.info.is_main:
            save_model(run.out / BEST, run.record, {"epoch": prog.epoch + 1, "pgd_acc": acc})


def _fast_guard(run: Run, row: dict[str, Any]) -> None:
    """Wong et al.'s guard: restore the best weights and stop when held-out PGD accuracy collapses."""
    cfg, prog, ctx = run.cfg, run.prog, run.ctx
    held = run.held.head(guard_size(len(run.train) + len(run.held)))  # type: ignore[union-attr, arg-type]
    assert held.x is not None and held.y is not None, "the guard holds its examples in memory"
    x, y = to_float(held.x).to(run.device), held.y.to(run.device)
    row["guard_pgd_acc"] = guard_accuracy(ctx.attack_model, ctx.threat, x, y, ctx.generator)
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
            row["test_acc"] = source_accuracy(run.record, run.test, run.device, run.info)  # of the model of record


def _finish(run: Run) -> FitSummary:
    history = run.prog.history
    summary = FitSummary(
        run_dir=str(run.out),
        epochs=run.prog.epoch,
        test_acc=history[-1]["test_acc"] if history else None,
        pgd_acc=history[-1].get("pgd_acc") if history else None,
        best_pgd_acc=run.prog.extra.get("best_pgd_acc"),
        best_epoch=run.prog.extra.get("best_epoch"),
        train_seconds=sum(r["seconds"] for r in history),
        stopped_early_at=run.prog.extra.get("stopped"),
    )
    if run.info.is_main:
        write_json(run.out / SUMMARY, summary.to_dict())
    dist.barrier()
    return summary
