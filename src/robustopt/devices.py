"""Choosing the device to compute on (``--device``), with a clear error for every name that cannot work.

``torch.device`` accepts many names that robustopt cannot train or evaluate on (``meta`` holds no
data; ``xla``, ``hpu``, ``lazy`` … need backends robustopt does not set up), and ``cuda:7`` on a
one-GPU machine fails only later, deep inside a tensor copy. :func:`pick_device` refuses these up
front, so a bad ``--device`` is one line and exit 2 instead of an internal error.
"""

from __future__ import annotations

import torch

from robustopt.errors import ConfigError

SUPPORTED = ("cpu", "cuda", "mps")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def auto_device() -> torch.device:
    """CUDA, then MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The device for ``--device name``: ``auto`` (or None, or empty) picks CUDA, then MPS, then CPU.

    Accepts ``cpu``, ``cuda``, ``cuda:N`` (N below the number of visible GPUs) and ``mps``; anything
    else raises :class:`~robustopt.errors.ConfigError` naming the flag and the valid choices.
    """
    if isinstance(name, str):
        name = name.strip()
    if name in (None, "", "auto"):
        return auto_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in SUPPORTED:
        raise ConfigError(f"--device {name!r} is not supported for training or evaluation: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise ConfigError(f"--device {name!r}: there is one CPU device; use --device cpu")
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name!r}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    if device.type == "mps" and not _mps_available():
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu")
    return device
