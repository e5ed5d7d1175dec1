"""Weight averaging: an exponential moving average (EMA) of the weights, the model of record of a run.

After optimiser step ``t`` (t = 0, 1, ...; one update per minibatch) every floating-point parameter and
buffer of the average moves towards the raw model's::

    θ̄ ← d_t·θ̄ + (1 − d_t)·θ,   d_t = min(d, (1 + t)/(10 + t))  (warm-up on),   d_t = d  (warm-up off)

This is the averaging of Gowal et al. 2020 ("Uncovering the limits of adversarial training", arXiv 2010.03593)
and Rebuffi et al. 2021 (arXiv 2103.01946), with the warm-up of their code (DeepMind's ``ema_update``, also
TensorFlow's ``ExponentialMovingAverage(num_updates=t)``): early on the average forgets its random start quickly.

BatchNorm: the running mean and variance are *averaged* with the same d_t, like the weights (as
``torch.optim.swa_utils.AveragedModel(use_buffers=True)`` does), and integer buffers (``num_batches_tracked``)
are copied. Why averaged, not copied: the raw model's statistics describe the raw weights of the last ~1/(1 − m)
batches, while the averaged weights lag behind by ~1/(1 − d) steps; averaged statistics lag alike.
The average is initialised as a copy of the raw model and is never put in train mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from robustopt.tensors import unwrap

PREFIX = "ema."  # its tensors in the checkpoint's carried state


class WeightAverage:
    """The EMA of ``model``'s parameters and floating buffers. ``module`` is a frozen copy in eval mode.

    Example:
        >>> ema = WeightAverage(model, decay=0.995)
        >>> ...; optimizer.step(); ema.update(model)   # after every step
        >>> ema.module(x)  # evaluate the average
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, t: int) -> float:
        """d_t of update ``t`` (0-based)."""
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model`` (the raw weights just updated)."""
        d = self.decay_at(self.updates)
        raw = unwrap(model).state_dict()
        for name, avg in self.module.state_dict().items():
            if avg.is_floating_point():
                avg.lerp_(raw[name].to(avg.dtype), 1.0 - d)  # avg + (1 − d)(raw − avg) = d·avg + (1 − d)·raw
            else:
                avg.copy_(raw[name])
        self.updates += 1

    def state(self) -> dict[str, torch.Tensor]:
        """The averaged tensors for the checkpoint (live references, no copy)."""
        return {PREFIX + k: v for k, v in self.module.state_dict().items()}

    def load(self, carried: dict[str, torch.Tensor], updates: int) -> None:
        """Restore from a checkpoint's carried state (keys ``ema.*``) and the saved update count."""
        self.module.load_state_dict({k[len(PREFIX) :]: v for k, v in carried.items() if k.startswith(PREFIX)})
        self.updates = int(updates)
