"""Optimisers and learning-rate schedules named in a :class:`~robustopt.training.config.TrainConfig`.

A built-in schedule is a pure function of the position in training, ``t = epoch + it/iters``,
applied as a factor on each parameter group's initial lr at every batch. Being stateless, it
resumes exactly without saving anything:

* ``constant``: 1;
* ``step``: ``γ^⌊epoch / lr_step⌋`` (γ = 0.5 unless ``lr_gamma``);
* ``multistep``: ``γ^(number of milestones ≤ epoch)`` (γ = 0.1 unless ``lr_gamma``; Rice et al., TRADES);
* ``cosine``: ``(1 + cos(π·t/epochs)) / 2``;
* ``onecycle``: linear from 0 to 1 over the first 40% of training, then linearly to 0 (Wong et al. 2020).

The ε ramp (``eps_ramp_epochs = E``) is the certified methods' schedule,
:class:`robustopt.certify.training.Ramp`, started at 0 and ended at ``E / epochs`` of training, on the
same progress value ``t / epochs``: the step at progress p trains at ``ε·r(p)`` with inner step size
``α·r(p)``, ``r(p) = min(1, p·epochs / E)``, so the first step is clean and ε is reached after E epochs
(Gowal et al. 2018's warm-up, used by Gowal et al. 2020 and Rebuffi et al. 2021).
"""

from __future__ import annotations

import bisect
import dataclasses
import math

import torch
from torch import nn

from robustopt.certify.training import Ramp
from robustopt.errors import ConfigError
from robustopt.training.config import TrainConfig
from robustopt.training.objectives import StepContext


def lr_factor(cfg: TrainConfig, epoch: int, it: int, iters: int) -> float:
    """The schedule's multiplier at iteration ``it`` of ``epoch`` (0-based), ``iters`` batches per epoch."""
    t = (epoch + it / max(iters, 1)) / cfg.epochs  # fraction of training done, in [0, 1)
    if cfg.schedule == "step":
        return (0.5 if cfg.lr_gamma is None else cfg.lr_gamma) ** (epoch // cfg.lr_step)
    if cfg.schedule == "multistep":
        return (0.1 if cfg.lr_gamma is None else cfg.lr_gamma) ** bisect.bisect_right(cfg.milestones, epoch)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "onecycle":
        return t / 0.4 if t < 0.4 else max(0.0, (1.0 - t) / 0.6)
    return 1.0


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam (L2 weight decay) or AdamW (decoupled) over the trainable weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (all have requires_grad=False)")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay
    )


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """An optimiser handed to fit must update this model's weights."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    owned = {id(p) for p in model.parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params:
        raise ConfigError("the optimizer has no parameters; build it as torch.optim.SGD(model.parameters(), ...)")
    if not any(id(p) in owned for p in params):
        raise ConfigError(
            "the optimizer's parameters are not the model's; build it from model.parameters() after moving the model"
        )


def set_scheduled_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Each group's lr = its base lr (as handed to the loop, before any resume) × factor.

    The base lrs are kept by the loop, not read back from the optimiser: a resumed optimiser holds the
    scheduled lr of the moment it was saved, which must not become the new base."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor


def eps_factor(cfg: TrainConfig, progress: float) -> float:
    """The ε ramp's factor r(progress) ∈ [0, 1]; 1 without a ramp."""
    if cfg.eps_ramp_epochs <= 0:
        return 1.0
    return Ramp(start=0.0, end=cfg.eps_ramp_epochs / cfg.epochs)(progress)


def ramped(ctx: StepContext, factor: float) -> StepContext:
    """The step context at ``factor``·ε and ``factor``·(inner step size); ``ctx`` itself at 1.

    At factor 0 the threat set is the clean point itself (ε = 0) and the step size, moot there, is left as it
    is (an attack refuses a zero step). The copy shares the weights, optimiser, generator and carried state:
    only the threat radius and the step size differ; the full threat stays the one of evaluation and checkpoints."""
    if factor >= 1.0:
        return ctx
    threat = dataclasses.replace(ctx.threat, eps=ctx.threat.eps * factor)
    step_size = ctx.objective.step_size * factor if factor > 0 else ctx.objective.step_size  # at ε = 0 any step is moot
    objective = dataclasses.replace(ctx.objective, step_size=step_size)
    return dataclasses.replace(ctx, threat=threat, objective=objective)
