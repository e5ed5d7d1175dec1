"""The one training loop (Algorithm 1 of Shaham et al., and its relatives).

For every minibatch, :func:`robustopt.training.objectives.train_step` builds perturbed examples against the
current weights and takes one optimiser step on their loss. This module owns everything
around it: data order, learning-rate schedule, evaluation, checkpoints, resume, DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from robustopt import __version__, devices
from robustopt.data.datasets import Dataset, load_dataset, to_float
from robustopt.errors import ConfigError
from robustopt.models.zoo import build_model
from robustopt.runs import (
    CHECKPOINT,
    CONFIG,
    MODEL,
    SUMMARY,
    RunLock,
    check_out,
    check_run_dir,
    clean_stray_tmp,
    replace_run,
    save_model,
    write_json,
    write_metrics,
)
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import perturb
from robustopt.training import distributed as dist
from robustopt.training.checkpoint import Progress, load_checkpoint, save_checkpoint
from robustopt.training.config import TrainConfig
from robustopt.training.objectives import StepContext, train_step

Log = Callable[[str], None]


def pick_device(name: str | None = None) -> torch.device:
    """``auto`` (or None) picks CUDA, then MPS, then CPU."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    info: dist.DistInfo,
    device: torch.device,
    start: int = 0,
    shuffle: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's minibatches of an epoch, skipping the first ``start``. x is uint8 or float.

    The order is a pure function of (seed, epoch), which is what makes resume exact.
    """
    sampler = DistributedSampler(range(len(y)), num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), dtype=torch.long)
    for i in range(start * batch_size, len(idx), batch_size):
        b = idx[i : i + batch_size].to(x.device)
        yield to_float(x[b]).to(device, non_blocking=True), y[b].to(device, non_blocking=True)


def num_batches(n: int, batch_size: int, info: dist.DistInfo) -> int:
    return math.ceil(math.ceil(n / info.world_size) / batch_size)


@torch.no_grad()
def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    info: dist.DistInfo | None = None,
    batch_size: int = 1000,
) -> float:
    """Clean accuracy of ``model`` on (x, y), sharded over ranks when distributed."""
    info = info or dist.DistInfo()
    was_training = model.training
    model.eval()
    correct = seen = 0.0
    for i in range(info.rank * batch_size, len(y), batch_size * info.world_size):
        xb, yb = to_float(x[i : i + batch_size]).to(device), y[i : i + batch_size].to(device)
        correct += float((model(xb).argmax(1) == yb).sum())
        seen += len(yb)
    model.train(was_training)
    correct, seen = dist.all_sum([correct, seen], device)
    return correct / max(seen, 1.0)


def learning_rate(cfg: TrainConfig, epoch: int, it: int, iters: int) -> float:
    """The lr at iteration ``it`` of ``epoch``: constant, step (halve every lr_step) or one-cycle."""
    if cfg.schedule == "step":
        return cfg.lr * 0.5 ** (epoch // cfg.lr_step)
    if cfg.schedule == "onecycle":
        t = (epoch + it / max(iters, 1)) / cfg.epochs  # in [0, 1)
        return cfg.lr * (t / 0.4 if t < 0.4 else max(0.0, (1 - t) / 0.6))
    return cfg.lr


def run_metadata(cfg: TrainConfig, data: Dataset, device: torch.device, info: dist.DistInfo) -> dict[str, Any]:
    import numpy
    import safetensors

    return {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "pixel_eps": cfg.pixel_eps,
        "train": dataclasses.asdict(cfg),
        "device": str(device),
        "world_size": info.world_size,
        "versions": {
            "robustopt": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "safetensors": safetensors.__version__,
        },
    }


def _guard_check(ctx: StepContext, held: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> float:
    """PGD-10 accuracy on a held-out batch: Wong et al.'s catastrophic-overfitting check."""
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


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    data_dir: str | Path | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress_bar: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Train a model by robust optimisation and save it to the run directory ``out``.

    Returns the summary dict (also written to ``out/summary.json``).
    """
    info = dist.from_env()
    dev = devices.pick_device(device)
    if info.enabled and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with a fixed workspace
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Validation first (out, seed, data, model): nothing on disk changes until all of it has passed.
    out = check_out(out)
    if cfg.seed * 1000 + info.world_size + cfg.epochs >= 2**64:  # generator seeds must fit in 64 bits
        raise ConfigError(f"--seed must be below {(2**64 - info.world_size - cfg.epochs) // 1000}, got {cfg.seed}")
    data = load_dataset(cfg.dataset, data_dir).subset(cfg.subset)
    threat = ThreatModel(cfg.norm, cfg.pixel_eps)
    threat.check_fits(data.input_shape)
    x_train, y_train = data.x_train, data.y_train
    x_test, y_test = data.x_test[: cfg.test_subset], data.y_test[: cfg.test_subset]  # [:None] is all of them
    held = None
    if cfg.method == "fast":  # hold out 500 training images for the overfitting guard
        if len(y_train) <= 1000:
            raise ConfigError("method 'fast' needs more than 1000 training images (500 are held out for its PGD guard)")
        x_train, y_train, held = x_train[:-500], y_train[:-500], (x_train[-500:], y_train[-500:])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, mean=data.mean, std=data.std, num_classes=data.num_classes, input_shape=data.input_shape)
    # Then the lock (one writer per run directory), the pure check, and only then the replacement.
    with RunLock(out) if info.is_main else contextlib.nullcontext():
        if info.is_main:
            do_resume = check_run_dir(out, cfg.training_keys(), resume=resume, overwrite=overwrite)
            replace_run(out) if overwrite else clean_stray_tmp(out)
        else:
            do_resume = resume and (out / CHECKPOINT).exists()
        train_set, test_set = (x_train, y_train), (x_test, y_test)
        return _train_in(out, cfg, data, model, threat, train_set, test_set, held, dev, info, do_resume, progress_bar, log)


def _train_in(
    out: Path,
    cfg: TrainConfig,
    data: Dataset,
    model: nn.Module,
    threat: ThreatModel,
    train_set: tuple[torch.Tensor, torch.Tensor],
    test_set: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor] | None,
    dev: torch.device,
    info: dist.DistInfo,
    do_resume: bool,
    progress_bar: bool,
    log: Log,
) -> dict[str, Any]:
    """The training proper, in a run directory that :func:`train` has validated and locked."""
    (x_train, y_train), (x_test, y_test) = train_set, test_set
    if dev.type == "cuda":  # keep the whole uint8 dataset on the GPU: batches never wait on the host
        x_train, y_train = x_train.to(dev), y_train.to(dev)
    created_group = dist.setup(info, dev)
    model = model.to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator(device=dev).manual_seed(cfg.seed * 1000 + info.rank)
    torch.manual_seed(cfg.seed * 1000 + info.rank + 1)  # dropout: different per rank, fixed per seed
    method_state: dict[str, torch.Tensor] = {}
    prog = Progress()
    if do_resume:
        iters = num_batches(len(y_train), cfg.batch_size, info)
        prog, method_state, _ = load_checkpoint(
            out / CHECKPOINT, model, optimizer, generator, dev, epochs=cfg.epochs, batches_per_epoch=iters
        )
        log(f"resuming {out} at epoch {prog.epoch + 1}, batch {prog.batch}")
    if info.is_main:
        write_json(out / CONFIG, run_metadata(cfg, data, dev, info))

    train_model: nn.Module = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler(dev.type) if cfg.amp == "fp16" else None
    ctx = StepContext(train_model, model, optimizer, threat, cfg, generator, amp_dtype, scaler, method_state)

    iters = num_batches(len(y_train), cfg.batch_size, info)
    last_save = time.monotonic()

    def checkpoint() -> None:
        if info.is_main:
            save_checkpoint(out / CHECKPOINT, model, optimizer, generator, ctx.state, prog, cfg.training_keys())

    start_wall = time.monotonic()
    while prog.epoch < cfg.epochs and not prog.extra.get("stopped"):
        epoch = prog.epoch
        model.train()
        t0 = time.monotonic() - prog.seconds
        bar = tqdm(
            total=iters,
            initial=prog.batch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not (progress_bar and info.is_main),
            unit="batch",
        )
        for x, y in batches(
            x_train, y_train, cfg.batch_size, seed=cfg.seed, epoch=epoch, info=info, device=dev, start=prog.batch
        ):
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, epoch, prog.batch, iters)
            loss, logits = train_step(ctx, x, y)
            if not math.isfinite(loss):
                raise ConfigError(f"training diverged (loss {loss}) at epoch {epoch + 1}; lower --lr")
            prog.loss_sum += loss * len(y)
            prog.correct += float((logits.argmax(1) == y).sum())
            prog.seen += len(y)
            prog.batch += 1
            bar.update(1)
            bar.set_postfix(loss=f"{prog.loss_sum / prog.seen:.4f}", acc=f"{prog.correct / prog.seen:.3f}")
            if time.monotonic() - last_save > 60 * cfg.checkpoint_minutes and prog.batch < iters:
                prog.seconds = time.monotonic() - t0
                checkpoint()
                last_save = time.monotonic()
        bar.close()
        seconds = time.monotonic() - t0
        loss_sum, correct, seen = dist.all_sum([prog.loss_sum, prog.correct, prog.seen], dev)
        test_acc = accuracy(model, x_test, y_test, dev, info)
        row = {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_acc": test_acc,
            "seconds": round(seconds, 3),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if held is not None:
            row["guard_pgd_acc"] = _guard_check(ctx, held, dev)
            best = prog.extra.get("best_guard", -1.0)
            if row["guard_pgd_acc"] >= best:
                prog.extra["best_guard"] = row["guard_pgd_acc"]
                ctx.state.update({f"best.{k}": v.detach().clone() for k, v in model.state_dict().items()})
            elif row["guard_pgd_acc"] < best - cfg.guard_drop:
                log(
                    f"catastrophic overfitting: held-out PGD accuracy fell from {best:.3f} to {row['guard_pgd_acc']:.3f}; "
                    "restoring the best weights and stopping"
                )
                model.load_state_dict({k[5:]: v for k, v in ctx.state.items() if k.startswith("best.")})
                prog.extra["stopped"] = epoch + 1
                row["test_acc"] = accuracy(model, x_test, y_test, dev, info)  # of the restored weights
        prog.history.append(row)
        if info.is_main:
            log(
                f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  train acc {row['train_acc']:.4f}  "
                f"test acc {test_acc:.4f}  {seconds:.1f}s"
            )
        prog.epoch, prog.batch, prog.loss_sum, prog.correct, prog.seen, prog.seconds = epoch + 1, 0, 0.0, 0.0, 0.0, 0.0
        if info.is_main:
            save_model(out / MODEL, model, {"epoch": epoch + 1})
            write_metrics(out, prog.history)
        checkpoint()
        last_save = time.monotonic()

    summary = {
        "epochs": prog.epoch,
        "test_acc": prog.history[-1]["test_acc"] if prog.history else None,
        "train_seconds": sum(r["seconds"] for r in prog.history),
        "wall_seconds": time.monotonic() - start_wall,
        "stopped_early_at": prog.extra.get("stopped"),
    }
    if info.is_main:
        write_json(out / SUMMARY, summary)
    if created_group:  # a gloo group alive at interpreter exit can SIGABRT the process
        dist.teardown()
    else:
        dist.barrier()
    return summary
