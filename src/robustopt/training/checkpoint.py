"""Training checkpoints: everything needed to continue a run bit-for-bit.

A checkpoint holds the weights, the optimiser state, every RNG state (global CPU and CUDA
generators, which drive dropout, and the seeded generator behind random starts), the
method's carried tensors (e.g. free training's δ), the epoch, the position inside the epoch
and the running metrics. The data order is not stored: it is a pure function of
``(seed, epoch)`` through the DistributedSampler, so skipping the consumed batches restores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustopt.errors import CheckpointError
from robustopt.tensors import load_state_into, load_tensors, save_tensors, unwrap

EXTRA_KEYS = ("stopped", "best_guard", "best_pgd_acc", "best_epoch", "scheduler_steps", "ema_updates")
CARRIED_WEIGHTS = ("best.", "ema.")  # carried copies of the model's state: the fast guard's best, the weight average


@dataclass
class Progress:
    """Where training is: the next batch to run and the running sums of the current epoch."""

    epoch: int = 0  # 0-based epoch in progress
    batch: int = 0  # batches of this epoch already done
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0  # training seconds spent in this epoch so far
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    """Put the saved per-parameter state back; the hyperparameters stay those of ``opt`` (built from the config).

    The saved ``param_groups`` live in the file's JSON header, outside the content hash, so they are
    not trusted: they must list the same parameters with the same settings as ``opt`` (built from the
    config that ``--resume`` already matched), and a finite ``lr``. Each state tensor must have its
    parameter's shape.
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        if v is not None and not _is_number(v):
            raise CheckpointError(f"{path}: optimizer value {key} is {v!r}, not a finite number; restart with --overwrite")
        state.setdefault(int(pid), {})[k] = v
    for pid, st in state.items():
        known = 0 <= pid < len(params)
        if not known or any(torch.is_tensor(v) and v.shape != params[pid].shape for v in st.values()):
            raise CheckpointError(f"{path}: optimizer state of parameter {pid} does not fit the model; restart with --overwrite")
    groups = opt.state_dict()["param_groups"]
    saved = meta["param_groups"]
    if len(saved) != len(groups) or any(s["params"] != g["params"] for s, g in zip(saved, groups, strict=True)):
        raise CheckpointError(f"{path}: optimizer parameter groups do not match the model; restart with --overwrite")
    for s, g in zip(saved, groups, strict=True):
        changed = sorted(k for k in g if k not in ("params", "lr") and k in s and s[k] != g[k])
        if changed or not _is_number(s.get("lr")):
            what = ", ".join(changed) or "lr"
            raise CheckpointError(f"{path}: optimizer setting {what} differs from the run's configuration; use --overwrite")
        g["lr"] = float(s["lr"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def _check_progress(raw: Any, path: Path, epochs: int | None, batches_per_epoch: int | None) -> Progress:
    """A :class:`Progress` from the checkpoint's (unhashed, possibly hand-edited) JSON, with every field checked."""
    prog = Progress(**raw)  # unknown or missing-but-required keys: TypeError, reported by the caller
    counts = (prog.epoch, prog.batch)
    sums = (prog.loss_sum, prog.correct, prog.seen, prog.seconds)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
        raise CheckpointError(f"{path}: progress epoch/batch must be whole numbers >= 0, got {counts}; restart with --overwrite")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in sums):
        raise CheckpointError(f"{path}: progress sums must be finite numbers >= 0, got {sums}; restart with --overwrite")
    too_far = (epochs is not None and prog.epoch > epochs) or (batches_per_epoch is not None and prog.batch > batches_per_epoch)
    if too_far or (prog.batch > 0) != (prog.seen > 0):
        raise CheckpointError(f"{path}: progress (epoch {prog.epoch}, batch {prog.batch}) is impossible; use --overwrite")
    rows_ok = isinstance(prog.history, list) and len(prog.history) == prog.epoch  # one row per finished epoch
    if not rows_ok or not all(_is_row(r) for r in prog.history) or not isinstance(prog.extra, dict):
        raise CheckpointError(f"{path}: progress history is malformed; restart with --overwrite")
    if not all(k in EXTRA_KEYS and _is_number(v) for k, v in prog.extra.items()):
        raise CheckpointError(f"{path}: progress extras are malformed; restart with --overwrite")
    return prog


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_row(row: Any) -> bool:
    keys = ("epoch", "loss", "train_acc", "test_acc", "seconds", "lr")
    return isinstance(row, dict) and all(_is_number(row.get(k)) for k in keys)


def _check_method_state(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Carried tensors (free training's δ, the fast guard's best weights, the EMA) must be finite and fit the model."""
    weights = unwrap(model).state_dict()
    for k, v in state.items():
        name = k.split(".", 1)[1] if k.startswith(CARRIED_WEIGHTS) else None
        fits = name in weights and v.shape == weights[name].shape if name is not None else v.is_floating_point()
        if not fits or (v.is_floating_point() and not bool(torch.isfinite(v).all())):
            raise CheckpointError(f"{path}: carried training state {k!r} does not fit the model; restart with --overwrite")


def _check_rng(tensors: dict[str, torch.Tensor], generator: torch.Generator, path: Path) -> None:
    for key, like in (("rng.cpu", torch.get_rng_state()), ("rng.attack", generator.get_state())):
        t = tensors[key]
        if t.dtype != like.dtype or t.shape != like.shape:
            raise CheckpointError(f"{path}: random-number state {key} has the wrong size or type; restart with --overwrite")


def save_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    method_state: dict[str, torch.Tensor],
    progress: Progress,
    config_keys: dict[str, Any],
) -> None:
    tensors = {f"model.{k}": v for k, v in unwrap(model).state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    tensors["rng.attack"] = generator.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tensors.update({f"method.{k}": v for k, v in method_state.items()})
    meta = {"optimizer": opt_meta, "progress": progress.__dict__, "config": config_keys}
    save_tensors(path, tensors, meta)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    *,
    epochs: int | None = None,
    batches_per_epoch: int | None = None,
) -> tuple[Progress, dict[str, torch.Tensor], dict[str, Any]]:
    """Restore everything in place; returns (progress, method state, saved config keys).

    The tensors are covered by the file's content hash, its JSON metadata is not, so both are
    checked against the model, and ``epochs`` / ``batches_per_epoch`` bound the saved position:
    a hand-edited or foreign checkpoint is a :class:`CheckpointError`, never a crash mid-training.
    """
    tensors, meta = load_tensors(path)
    try:
        progress = _check_progress(meta["progress"], path, epochs, batches_per_epoch)
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        load_state_into(unwrap(model), model_sd, path)
        _restore_optimizer(opt, tensors, meta["optimizer"], path)
        for group in opt.state.values():
            for k, v in group.items():
                if torch.is_tensor(v):
                    group[k] = v.to(device)
        _check_rng(tensors, generator, path)
        torch.set_rng_state(tensors["rng.cpu"])
        generator.set_state(tensors["rng.attack"])
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
        method_state = {k[7:]: v.to(device) for k, v in tensors.items() if k.startswith("method.")}
        _check_method_state(method_state, model, path)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path} is incomplete or from an incompatible version ({e}); restart with --overwrite") from None
    config = meta.get("config", {})
    return progress, method_state, config if isinstance(config, dict) else {}
