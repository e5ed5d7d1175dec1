"""Expectation over Transformation (Athalye, Carlini & Wagner 2018) for randomised models.

A model whose output changes from call to call (random input transformations, dropout left
on, stochastic activations) hands every gradient attack a single noisy sample of its
gradient. EOT attacks the *expected* output instead: ``f̄(x) = (1/S) Σ_s f_s(x)``, whose
input gradient is the average of the sampled gradients. The evaluator switches to it when the
``randomness`` check fails (AutoAttack's version "rand" likewise averages 20 samples).

Example:
    >>> attacker = ExpectedLogits(randomised_model, samples=20)
    >>> x_adv = run_attack(attacker, x, y, threat, "pgd")
"""

from __future__ import annotations

import torch
from torch import nn

from robustopt.errors import ConfigError

Tensor = torch.Tensor


class ExpectedLogits(nn.Module):
    """``x (B, ...) -> mean over `samples` forward passes of model(x)``, (B, K)."""

    def __init__(self, model: nn.Module, samples: int = 20) -> None:
        super().__init__()
        if samples < 1:
            raise ConfigError(f"EOT samples must be >= 1, got {samples}")
        self.model, self.samples = model, samples

    def forward(self, x: Tensor) -> Tensor:
        total = self.model(x)
        for _ in range(self.samples - 1):
            total = total + self.model(x)
        return total / self.samples
