"""Training checkpoints: everything needed to continue a run bit-for-bit.

A checkpoint holds the weights, the optimiser state, every RNG state (global CPU and CUDA
generators, which drive dropout, and the seeded generator behind random starts), the
method's carried tensors (e.g. free training's δ), the epoch, the position inside the epoch
and the running metrics. The data order is not stored: it is a pure function of
``(seed, epoch)`` through the DistributedSampler, so skipping the consumed batches restores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustopt.errors import CheckpointError
from robustopt.runs import load_state_into, load_tensors, save_tensors, unwrap


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


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


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
) -> tuple[Progress, dict[str, torch.Tensor], dict[str, Any]]:
    """Restore everything in place; returns (progress, method state, saved config keys)."""
    tensors, meta = load_tensors(path)
    try:
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        load_state_into(unwrap(model), model_sd, path)
        _restore_optimizer(opt, tensors, meta["optimizer"])
        for group in opt.state.values():
            for k, v in group.items():
                if torch.is_tensor(v):
                    group[k] = v.to(device)
        torch.set_rng_state(tensors["rng.cpu"])
        generator.set_state(tensors["rng.attack"])
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
        method_state = {k[7:]: v.to(device) for k, v in tensors.items() if k.startswith("method.")}
        progress = Progress(**meta["progress"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is incomplete or from an incompatible version ({e}); restart with --overwrite") from None
    return progress, method_state, meta.get("config", {})
