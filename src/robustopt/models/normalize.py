"""Per-channel standardisation inside a model, so that the model takes pixel-unit inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel; x (B, C, ...) in pixel units: images (B, C, H, W) or features (B, D).

    The buffers keep their (1, C, 1, 1) shape (state dicts of earlier runs load unchanged); they are
    viewed to match the input's rank, so for features C is D (one value per feature) or 1.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return (x - self.mean) / self.std
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)
