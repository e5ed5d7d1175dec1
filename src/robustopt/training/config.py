"""Typed training configuration. The CLI and TOML files only map keys onto :class:`TrainConfig`.

``--eps-units standardized`` converts a radius given in the paper's standardised input units
into pixel units: the paper's input is ``(x - μ)/σ``, so a perturbation of size ε in
standardised units is ``σ·ε`` in pixels. For multi-channel data the mean σ over channels is
used. For MNIST σ = 0.3081, so the paper's ℓ∞ 0.2 is 0.0616 and its ℓ2/ℓ1 2.0 is 0.616.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from robustopt.data.datasets import DATASETS, STATS
from robustopt.errors import ConfigError
from robustopt.models.zoo import MODELS
from robustopt.threat.model import NORMS

METHODS = ("standard", "goodfellow", "robust", "pgd", "fast", "free")
SCHEDULES = ("constant", "step", "onecycle")
AMP_MODES = ("off", "bf16", "fp16")


def parse_number(text: str | float | int, what: str = "value") -> float:
    """Parse ``0.3``, ``8/255`` or ``1e-3`` without ``eval``."""
    if isinstance(text, bool):
        raise ConfigError(f"{what} must be a number, got {text!r}")
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([-+]?[0-9.eE+-]+)\s*(?:/\s*([0-9.eE+-]+)\s*)?", str(text))
    try:
        if m is None:
            raise ValueError
        value = float(m.group(1)) / (float(m.group(2)) if m.group(2) else 1.0)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{what} must be a finite number such as 0.3 or 8/255, got {text!r}") from None
    return value


@dataclass
class TrainConfig:
    """Everything that determines a training run. Saved to ``config.json`` in the run dir."""

    dataset: str = "mnist"
    model: str = "paper-mnist"
    method: str = "robust"
    norm: str = "linf"
    eps: float = 0.1
    eps_units: str = "pixel"
    alpha: float | None = None  # weight of the clean loss; default 0.5 for goodfellow, else 0
    steps: int | None = None  # inner-max steps; default 1, or 10 for pgd
    step_size: float | None = None  # default ε for one step, 2.5ε/steps for PGD, 1.25ε for fast
    replays: int = 4  # free training: replays per minibatch (Shafahi et al.)
    epochs: int = 10
    batch_size: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    schedule: str = "constant"
    lr_step: int = 25  # "step" schedule: halve the lr every lr_step epochs
    subset: int | None = None
    test_subset: int | None = None  # per-epoch test accuracy on the first N test images (None: all of them)
    seed: int = 0
    amp: str = "off"
    compile: bool = False
    channels_last: bool = False
    sync_bn: bool = False
    deterministic: bool = False
    checkpoint_minutes: float = 10.0
    guard_drop: float = 0.2  # fast training: stop when held-out PGD accuracy falls this far below its best

    def __post_init__(self) -> None:
        self.validate()

    # -- derived values -------------------------------------------------------------
    @property
    def pixel_eps(self) -> float:
        """ε in pixel units."""
        if self.eps_units == "pixel":
            return float(self.eps)
        std = STATS[self.dataset][1]
        return float(self.eps) * sum(std) / len(std)

    @property
    def clean_weight(self) -> float:
        if self.alpha is not None:
            return float(self.alpha)
        return 0.5 if self.method == "goodfellow" else 0.0

    @property
    def inner_steps(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        return 10 if self.method == "pgd" else 1

    @property
    def inner_step_size(self) -> float | None:
        if self.step_size is not None:
            return float(self.step_size)
        if self.method == "fast":
            return 1.25 * self.pixel_eps
        if self.method == "free":
            return self.pixel_eps
        return None

    def training_keys(self) -> dict[str, Any]:
        """The keys that must match for ``--resume`` to continue a run."""
        ignore = {"checkpoint_minutes", "test_subset"}  # neither changes the weights
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignore}

    # -- validation -----------------------------------------------------------------
    def validate(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, tuple(MODELS))
        _choice("method", self.method, METHODS)
        _choice("norm", self.norm, tuple(NORMS))
        _choice("eps-units", self.eps_units, ("pixel", "standardized"))
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("amp", self.amp, AMP_MODES)
        self.eps = _number("eps", self.eps, minimum=0.0)
        if self.method not in ("standard",) and self.eps == 0:
            raise ConfigError(f"--eps must be > 0 for method {self.method!r}")
        if self.alpha is not None:
            self.alpha = _number("alpha", self.alpha, minimum=0.0, maximum=1.0)
        if self.step_size is not None:
            self.step_size = _number("step-size", self.step_size, minimum=0.0, strict=True)
        for name in ("steps", "replays", "epochs", "batch_size", "lr_step"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _integer(name.replace("_", "-"), value, minimum=1))
        for name in ("subset", "test_subset"):
            if getattr(self, name) is not None:
                setattr(self, name, _integer(name.replace("_", "-"), getattr(self, name), minimum=1))
        self.seed = _integer("seed", self.seed, minimum=0)
        self.lr = _number("lr", self.lr, minimum=0.0, strict=True)
        self.momentum = _number("momentum", self.momentum, minimum=0.0, maximum=1.0)
        self.weight_decay = _number("weight-decay", self.weight_decay, minimum=0.0)
        self.checkpoint_minutes = _number("checkpoint-minutes", self.checkpoint_minutes, minimum=0.0, strict=True)
        self.guard_drop = _number("guard-drop", self.guard_drop, minimum=0.0, maximum=1.0)
        for flag in ("compile", "channels_last", "sync_bn", "deterministic"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag.replace('_', '-')} must be true or false, got {getattr(self, flag)!r}")


def _choice(what: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"unknown {what} {value!r}: choose one of {', '.join(options)}")


def _number(what: str, value: Any, *, minimum: float | None = None, maximum: float | None = None, strict: bool = False) -> float:
    v = parse_number(value, f"--{what}")
    if not math.isfinite(v):
        raise ConfigError(f"--{what} must be finite, got {value!r}")
    if minimum is not None and (v < minimum or (strict and v == minimum)):
        raise ConfigError(f"--{what} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    if maximum is not None and v > maximum:
        raise ConfigError(f"--{what} must be <= {maximum:g}, got {value!r}")
    return v


def _integer(what: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ConfigError(f"--{what} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"--{what} must be >= {minimum}, got {value!r}")
    return int(value)


CONFIG_KEYS = {f.name for f in fields(TrainConfig)}


def read_toml(path: str | Path, allowed: set[str]) -> dict[str, Any]:
    """Read a TOML file of options; keys may use dashes or underscores, but not both for one key.

    Reads at most 1 MiB: a pipe such as ``--config <(...)`` works, ``/dev/zero`` is an error.
    """
    p = Path(path)
    limit = 1 << 20
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ConfigError(f"config file {p} is larger than {limit} bytes; is it the right file?")
        raw = tomllib.loads(data.decode())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in out:
            raise ConfigError(f"config file {p}: {spelled[name]!r} and {key!r} are the same option; keep one")
        out[name], spelled[name] = value, key
    unknown = sorted(set(out) - allowed)
    if unknown:
        raise ConfigError(f"config file {p}: unknown keys {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return out


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build a validated config, turning type errors into :class:`ConfigError`."""
    unknown = sorted(set(values) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"unknown training keys: {', '.join(unknown)}")
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"invalid configuration: {e}") from None
