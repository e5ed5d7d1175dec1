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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from robustopt.data.datasets import DATASETS, STATS
from robustopt.errors import ConfigError
from robustopt.models.factory import is_factory_spec
from robustopt.models.zoo import resolve_model
from robustopt.threat.model import NORMS
from robustopt.training.objectives import METHODS

SCHEDULES = ("constant", "step", "multistep", "cosine", "onecycle")
OPTIMIZERS = ("sgd", "adam", "adamw")
AMP_MODES = ("off", "bf16", "fp16")
DEFAULT_NORM, DEFAULT_EPS = "linf", 0.1  # the CLI's threat when --norm / --eps are not given


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


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A config field with the help text the CLI shows (``train --help`` is derived from these)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything that determines a training run. Saved to ``config.json`` in the run dir.

    ``robustopt train``'s options are generated from these fields (name, type, default, help),
    so the flags, the TOML keys and this class cannot drift apart.
    """

    dataset: str = _opt("mnist", f"Built-in dataset: {' | '.join(DATASETS)}")
    data: str | None = _opt(
        None, "Your own data: an .npz (x_train, y_train, x_test, y_test) or an image folder; replaces --dataset"
    )
    model: str = _opt(
        "paper-mnist",
        "Built-in net (paper-mnist, paper-cifar, small-cnn, ibp-cnn, resnet18, mlp, wrn-D-W) or package.module:factory",
    )
    model_kwargs: dict[str, Any] = _opt({}, "Keyword arguments for a package.module:factory model, as JSON", json=True)
    method: str = _opt("robust", f"Training objective: {' | '.join(METHODS)}")
    norm: str | None = _opt(None, "Threat model norm: linf | l2 | l1 [default: linf]")
    eps: float | None = _opt(None, "Radius ε, e.g. 0.3 or 8/255 [default: 0.1]")
    eps_units: str = _opt("pixel", "pixel | standardized (the paper's units: ε·σ in pixels)")
    alpha: float | None = _opt(None, "Weight of the clean loss [default: 0.5 for goodfellow, else 0]")
    beta: float | None = _opt(None, "TRADES/MART weight of the robustness term [default: 6]")
    steps: int | None = _opt(None, "Inner-max steps [default: 10 for pgd/trades/mart, else 1]")
    step_size: float | None = _opt(None, "Inner-max step in pixels [default: ε for one step, 1.25ε fast, 2.5ε/steps]")
    replays: int = _opt(4, "free training: replays per minibatch (Shafahi et al.)")
    sigma: float | None = _opt(None, "gaussian: noise std σ in pixels for randomized smoothing [default: ε]")
    epochs: int = _opt(10, "Training epochs")
    batch_size: int = _opt(100, "Minibatch size (per process under torchrun)")
    optimizer: str = _opt("sgd", f"Optimiser: {' | '.join(OPTIMIZERS)}")
    lr: float = _opt(0.01, "Learning rate (the peak for onecycle)")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(False, "SGD with Nesterov momentum")
    weight_decay: float = _opt(1e-3, "L2 penalty (decoupled for adamw)")
    schedule: str = _opt("constant", f"Learning-rate schedule: {' | '.join(SCHEDULES)}")
    lr_step: int = _opt(25, "step schedule: multiply the lr by lr-gamma (default 0.5) every N epochs")
    milestones: list[int] = _opt([], "multistep schedule: epochs at which the lr is multiplied by lr-gamma, e.g. 100,150")
    lr_gamma: float | None = _opt(None, "Factor of the step/multistep schedules [default: 0.5 step, 0.1 multistep]")
    grad_clip: float | None = _opt(None, "Clip the gradient's global norm to this value")
    augment: bool | None = _opt(None, "Random crop (pad 4) + horizontal flip [default: on for CIFAR and image folders]")
    subset: int | None = _opt(None, "Train on the first N training examples")
    test_subset: int | None = _opt(None, "Per-epoch test accuracy on the first N test examples [default: all]")
    eval_pgd: int = _opt(0, "Per-epoch PGD accuracy on N held-out training examples (0: off)")
    eval_pgd_steps: int = _opt(10, "Steps of the per-epoch PGD evaluation")
    early_stop: bool | None = _opt(None, "Keep best.safetensors by per-epoch PGD accuracy [default: on with --eval-pgd]")
    seed: int = _opt(0, "Seeds data order, init, dropout, augmentation and random starts")
    amp: str = _opt("off", "Mixed precision: off | bf16 | fp16")
    compile: bool = _opt(False, "torch.compile the model")
    channels_last: bool = _opt(False, "channels_last memory format (faster convolutions on GPU)")
    sync_bn: bool = _opt(False, "SyncBatchNorm under torchrun")
    deterministic: bool = _opt(False, "Deterministic kernels (slower on GPU)")
    checkpoint_minutes: float = _opt(10.0, "Also checkpoint every N minutes inside an epoch")
    guard_drop: float = _opt(0.2, "fast: stop when held-out PGD accuracy falls this far below its best")
    tensorboard: bool = _opt(False, "Write TensorBoard events to the run directory (needs tensorboard installed)")
    ema_decay: float | None = _opt(
        None, "Weight averaging: EMA decay per step, e.g. 0.995; the EMA is the model saved and evaluated [default: off]"
    )
    ema_warmup: bool = _opt(True, "Warm the EMA up: decay min(ema-decay, (1+t)/(10+t)) at step t (Gowal et al. 2020)")
    eps_ramp_epochs: float = _opt(0.0, "Ramp ε and the inner step size linearly from 0 over the first N epochs (0: off)")
    awp_gamma: float | None = _opt(
        None, "Adversarial weight perturbation (Wu et al. 2020): relative size γ per layer, e.g. 0.005 [default: off]"
    )
    label_smoothing: float = _opt(0.0, "Label smoothing of the outer cross-entropy (0: off)")
    extra_data: str | None = _opt(None, "Extra training data: an .npz of x and y (labels or pseudo-labels) [default: none]")
    extra_ratio: float = _opt(0.5, "With --extra-data: fraction of each batch drawn from the extra data")

    def __post_init__(self) -> None:
        self.validate()

    # -- derived values -------------------------------------------------------------
    @property
    def threat_norm(self) -> str:
        return self.norm or DEFAULT_NORM

    @property
    def pixel_eps(self) -> float:
        """ε in pixel units (standardised radii need a built-in dataset's σ; see :meth:`pixel_eps_for`)."""
        if self.eps_units == "pixel":
            return self.radius
        if self.data is not None or self.dataset not in STATS:
            raise ConfigError("--eps-units standardized needs a built-in --dataset (its σ is known); give ε in pixels")
        return self.pixel_eps_for(STATS[self.dataset][1])

    def pixel_eps_for(self, std: tuple[float, ...] | list[float]) -> float:
        """ε in pixels for data of per-channel std ``std`` (the mean σ over channels)."""
        if self.eps_units == "pixel":
            return self.radius
        return self.radius * sum(std) / len(std)

    @property
    def radius(self) -> float:
        """ε as given (default 0.1), in ``eps_units``."""
        return DEFAULT_EPS if self.eps is None else float(self.eps)

    @property
    def clean_weight(self) -> float:
        if self.alpha is not None:
            return float(self.alpha)
        return 0.5 if self.method == "goodfellow" else 0.0

    @property
    def inner_steps(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        return 10 if self.method in ("pgd", "trades", "mart") else 1

    @property
    def keep_best(self) -> bool:
        return self.eval_pgd > 0 if self.early_stop is None else bool(self.early_stop and self.eval_pgd > 0)

    def training_keys(self) -> dict[str, Any]:
        """The keys that must match for ``--resume`` to continue a run."""
        ignore = {"checkpoint_minutes", "test_subset", "tensorboard"}  # none changes the weights
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignore}

    # -- validation -----------------------------------------------------------------
    def validate(self) -> None:
        if self.data is None:
            _choice("dataset", self.dataset, DATASETS)
        elif not isinstance(self.data, str) or not self.data:
            raise ConfigError(f"--data must be a path to an .npz file or an image folder, got {self.data!r}")
        _check_model(self.model)
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model-kwargs must be a table / JSON object, got {self.model_kwargs!r}")
        _choice("method", self.method, METHODS)
        if self.norm is not None:
            _choice("norm", self.norm, tuple(NORMS))
        _choice("eps-units", self.eps_units, ("pixel", "standardized"))
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("amp", self.amp, AMP_MODES)
        self._validate_numbers()
        self._validate_integers()
        if self.method not in ("standard",) and self.eps == 0:
            raise ConfigError(f"--eps must be > 0 for method {self.method!r}")
        if self.extra_data is not None and self.batch_size < 2:
            raise ConfigError("--extra-data needs --batch-size >= 2: each minibatch holds training and extra examples")
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("--schedule multistep needs --milestones, e.g. --milestones 100,150")
        for flag in ("nesterov", "compile", "channels_last", "sync_bn", "deterministic", "tensorboard", "ema_warmup"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag.replace('_', '-')} must be true or false, got {getattr(self, flag)!r}")
        for flag in ("augment", "early_stop"):
            if getattr(self, flag) is not None and not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag.replace('_', '-')} must be true or false, got {getattr(self, flag)!r}")

    def _validate_numbers(self) -> None:
        if self.eps is not None:
            self.eps = _number("eps", self.eps, minimum=0.0)
        for name, lo, hi, strict in (
            ("alpha", 0.0, 1.0, False),
            ("beta", 0.0, None, False),
            ("step_size", 0.0, None, True),
            ("lr_gamma", 0.0, None, True),
            ("grad_clip", 0.0, None, True),
        ):
            if getattr(self, name) is not None:
                setattr(self, name, _number(name.replace("_", "-"), getattr(self, name), minimum=lo, maximum=hi, strict=strict))
        self.lr = _number("lr", self.lr, minimum=0.0, strict=True)
        self.momentum = _number("momentum", self.momentum, minimum=0.0, maximum=1.0)
        self.weight_decay = _number("weight-decay", self.weight_decay, minimum=0.0)
        self.checkpoint_minutes = _number("checkpoint-minutes", self.checkpoint_minutes, minimum=0.0, strict=True)
        self.guard_drop = _number("guard-drop", self.guard_drop, minimum=0.0, maximum=1.0)
        self._validate_techniques()

    def _validate_techniques(self) -> None:
        """EMA, ε ramp, AWP, label smoothing and extra data; each one-line error names the flag."""
        if self.ema_decay is not None:
            self.ema_decay = _number("ema-decay", self.ema_decay, minimum=0.0, maximum=1.0)
            if self.ema_decay >= 1.0:
                raise ConfigError(f"--ema-decay must be < 1 (1 would never move the average), got {self.ema_decay!r}")
        self.eps_ramp_epochs = _number("eps-ramp-epochs", self.eps_ramp_epochs, minimum=0.0)
        if isinstance(self.epochs, int) and self.eps_ramp_epochs > self.epochs:
            raise ConfigError(f"--eps-ramp-epochs ({self.eps_ramp_epochs:g}) must not exceed --epochs ({self.epochs})")
        if self.awp_gamma is not None:
            self.awp_gamma = _number("awp-gamma", self.awp_gamma, minimum=0.0, maximum=1.0, strict=True)
        self.label_smoothing = _number("label-smoothing", self.label_smoothing, minimum=0.0, maximum=0.999)
        self.extra_ratio = _number("extra-ratio", self.extra_ratio, minimum=0.0, maximum=0.99, strict=True)
        if self.extra_data is not None and (not isinstance(self.extra_data, str) or not self.extra_data):
            raise ConfigError(f"--extra-data must be a path to an .npz of x and y, got {self.extra_data!r}")
        certified = self.method in ("ibp", "crown-ibp", "gaussian")
        for flag, on in (("eps-ramp-epochs", self.eps_ramp_epochs > 0), ("label-smoothing", self.label_smoothing > 0),
                         ("awp-gamma", self.awp_gamma is not None)):  # fmt: skip
            if on and (certified or (flag == "awp-gamma" and self.method == "free")):
                why = "ramps ε by its own schedule" if flag == "eps-ramp-epochs" else "has its own loss"
                raise ConfigError(f"--{flag} does not apply to method {self.method!r}, which {why}; leave it unset")

    def _validate_integers(self) -> None:
        for name in ("steps", "replays", "epochs", "batch_size", "lr_step", "subset", "test_subset", "eval_pgd_steps"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _integer(name.replace("_", "-"), value, minimum=1))
        self.eval_pgd = _integer("eval-pgd", self.eval_pgd, minimum=0)
        self.seed = _integer("seed", self.seed, minimum=0, maximum=2**31 - 1)
        if isinstance(self.milestones, (str, bytes)) or not isinstance(self.milestones, (list, tuple)):
            raise ConfigError(f"milestones must be a list of epochs such as [100, 150], got {self.milestones!r}")
        self.milestones = sorted(_integer("milestones", m, minimum=1) for m in self.milestones)


def _check_model(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"--model must be a model name or package.module:factory, got {name!r}")
    if is_factory_spec(name) or name == "custom":  # custom: a module handed to robustopt.fit
        return
    resolve_model(name)  # a clear error for an unknown name


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


def _integer(what: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ConfigError(f"--{what} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"--{what} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"--{what} must be <= {maximum}, got {value!r}")
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
