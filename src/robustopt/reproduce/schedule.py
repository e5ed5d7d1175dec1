"""What ``robustopt reproduce`` trains and how hard it evaluates: :class:`Schedule` and the built-in plans.

Nets are named ``baseline`` (standard training) or ``<kind>-<norm>`` with kind ``goodfellow``
(α = 0.5 clean term), ``robust`` (Algorithm 1 of Shaham et al., first order) or ``pgd`` (multi-step
inner max). With several models (CIFAR-10) the names get the model as a prefix: ``resnet18/robust-l2``.
Radii are given in the paper's standardised units unless ``eps_units = "pixel"``; every net trains
and is evaluated in pixel units (:meth:`Schedule.pixel_radius`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustopt.data.datasets import STATS
from robustopt.errors import ConfigError
from robustopt.threat.model import NORMS
from robustopt.training.config import TrainConfig, make_config, read_toml

KINDS = {"baseline": "standard", "goodfellow": "goodfellow", "robust": "robust", "pgd": "pgd"}


@dataclass
class Schedule:
    """What ``reproduce`` trains and how it evaluates. Radii are in ``eps_units`` (the paper's: standardised)."""

    dataset: str = "mnist"
    models: tuple[str, ...] = ("paper-mnist",)
    nets: tuple[str, ...] = ("baseline", "goodfellow-linf", "robust-linf", "robust-l2", "robust-l1", "pgd-linf")
    radii: dict[str, float] = field(default_factory=lambda: {"linf": 0.2, "l2": 2.0, "l1": 2.0})
    eps_units: str = "standardized"
    subset: int | None = None  # training images (None: all)
    test_n: int | None = None  # per-epoch and final test accuracy on the first N test images (None: all)
    epochs: int = 4
    pgd_epochs: int = 2  # PGD-AT costs ~(steps+1) standard epochs per epoch
    pgd_steps: int = 5
    batch_size: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    lr_schedule: str = "constant"
    lr_step: int = 25
    seed: int = 1  # the authors' seed
    seeds: int = 1  # train and evaluate every net with seeds seed, seed+1, ..., seed+seeds-1; report mean ± std
    eval_n: int = 1000  # first N test images for every adversarial evaluation
    transfer_scales: tuple[float, ...] = (1.0, 2.0, 3.0)  # transfer sets at radius × scale
    attack_steps: int = 20  # white-box PGD
    attack_restarts: int = 1
    curve_norms: tuple[str, ...] = ("linf", "l2")
    curve_scales: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0)
    curve_n: int = 500
    curve_steps: int = 10
    minimal_norms: tuple[str, ...] = ("l2",)
    minimal_n: int = 500
    deepfool_steps: int = 50
    sanity_n: int = 200  # images for the evaluator's sanity checks (on each net's own norm); 0: off
    sanity_nets: tuple[str, ...] | None = None  # nets that get them (None: every net)
    examples: int = 8  # images per row of the example grid
    eval_batch: int = 500

    def __post_init__(self) -> None:
        for name in LISTS:
            if getattr(self, name) is not None:
                setattr(self, name, _as_tuple(name, getattr(self, name)))
        validate(self)

    def pixel_radius(self, norm: str) -> float:
        """The training radius of ``norm`` in pixel units (σ-scaled when given in standardised units)."""
        if self.eps_units == "pixel":
            return float(self.radii[norm])
        std = STATS[self.dataset][1]
        return float(self.radii[norm]) * sum(std) / len(std)

    def replicas(self) -> list[Schedule]:
        """One single-seed schedule per seed (``seed``, ``seed + 1``, ...): each is trained and evaluated on its own."""
        return [dataclasses.replace(self, seed=self.seed + i, seeds=1) for i in range(self.seeds)]

    def net_names(self) -> list[str]:
        if len(self.models) == 1:
            return list(self.nets)
        return [f"{m}/{n}" for m in self.models for n in self.nets]

    def train_config(self, name: str) -> TrainConfig:
        """The TrainConfig of net ``name`` (``[model/]kind[-norm]``)."""
        model, _, net = name.rpartition("/")
        kind, _, norm = net.partition("-")
        values: dict[str, Any] = dict(
            dataset=self.dataset,
            model=model or self.models[0],
            method=KINDS[kind],
            epochs=self.pgd_epochs if kind == "pgd" else self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=self.lr_schedule,
            lr_step=self.lr_step,
            subset=self.subset,
            test_subset=self.test_n,
            seed=self.seed,
        )
        if kind != "baseline":
            values.update(norm=norm, eps=self.radii[norm], eps_units=self.eps_units)
        if kind == "pgd":
            values["steps"] = self.pgd_steps
        return make_config(values)

    def eval_keys(self) -> dict[str, Any]:
        """The settings an evaluation depends on (its cache key)."""
        skip = {"epochs", "pgd_epochs", "pgd_steps", "batch_size", "lr", "momentum", "weight_decay", "lr_schedule", "seeds"}
        return {
            k: v for k, v in dataclasses.asdict(self).items() if k not in skip | {"lr_step", "subset", "test_n", "eval_batch"}
        }


LISTS = ("models", "nets", "transfer_scales", "curve_norms", "curve_scales", "minimal_norms", "sanity_nets")
WHOLE = {"epochs": 1, "pgd_epochs": 1, "pgd_steps": 1, "eval_n": 1, "curve_n": 1, "minimal_n": 1, "attack_steps": 1,
         "attack_restarts": 1, "curve_steps": 1, "deepfool_steps": 1, "eval_batch": 1, "sanity_n": 0, "examples": 0,
         "seed": 0, "seeds": 1}  # fmt: skip


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"reproduce config: {name} must be a list (e.g. {name} = [...]), got {value!r}")
    return tuple(value)


def _positive_numbers(name: str, values: tuple[Any, ...]) -> None:
    ok = [isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values]
    if not values or not all(ok):
        raise ConfigError(f"reproduce config: {name} must list finite numbers > 0 (e.g. [1.0, 2.0]), got {list(values)!r}")


def _norms(name: str, values: tuple[Any, ...], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if not values or any(v not in allowed for v in values):
        raise ConfigError(f"reproduce config: {name} must list norms among {', '.join(allowed)}, got {list(values)!r}")


def _whole_numbers(s: Schedule) -> None:
    for name, minimum in WHOLE.items():
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"reproduce config: {name} must be a whole number >= {minimum}, got {v!r}")
    for name in ("subset", "test_n"):
        v = getattr(s, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"reproduce config: {name} must be a whole number >= 1 (or left out: all images), got {v!r}")


def _check_nets(s: Schedule) -> None:
    if not s.models or not all(isinstance(m, str) and m for m in s.models):
        raise ConfigError(f"reproduce config: models must list model names, got {list(s.models)!r}")
    if "baseline" not in s.nets:
        raise ConfigError("reproduce config: nets must include 'baseline' (the transfer sets are built on it)")
    if len(set(s.nets)) != len(s.nets):
        raise ConfigError(f"reproduce config: nets lists a net twice: {list(s.nets)!r}")
    for net in s.nets:
        kind, _, norm = net.partition("-") if isinstance(net, str) else ("", "", "")
        if kind not in KINDS or (kind == "baseline") != (norm == "") or (norm and norm not in s.radii):
            raise ConfigError(f"reproduce config: bad net {net!r}; use baseline or <goodfellow|robust|pgd>-<norm in radii>")
    unknown = [n for n in s.sanity_nets or () if n not in s.nets]
    if unknown:
        raise ConfigError(f"reproduce config: sanity_nets {unknown!r} are not among nets ({', '.join(s.nets)})")


def validate(s: Schedule) -> None:
    """Check the whole schedule before anything trains: a bad field must not cost an hour of training first."""
    _whole_numbers(s)
    if s.dataset not in STATS:
        raise ConfigError(f"reproduce config: dataset must be one of {', '.join(STATS)}, got {s.dataset!r}")
    if s.eps_units not in ("pixel", "standardized"):
        raise ConfigError(f"reproduce config: eps_units must be pixel or standardized, got {s.eps_units!r}")
    if not isinstance(s.radii, dict) or not s.radii:
        raise ConfigError(f"reproduce config: radii must be a table such as {{linf = 0.2, l2 = 2.0}}, got {s.radii!r}")
    _norms("radii", tuple(s.radii), NORMS)
    _positive_numbers("radii", tuple(s.radii.values()))
    _positive_numbers("transfer_scales", s.transfer_scales)
    _positive_numbers("curve_scales", s.curve_scales)
    _norms("curve_norms", s.curve_norms, s.radii)  # a curve runs at multiples of a training radius
    _norms("minimal_norms", s.minimal_norms, NORMS)
    _check_nets(s)
    for net in s.net_names():
        s.train_config(net)  # validates the models and the optimiser


# The built-in plans, as overrides of the Schedule defaults (the full MNIST plan is the defaults).
PLAN_NAMES = ("quick", "full", "authors")
# fmt: off
PLANS: dict[tuple[str, str], dict[str, Any]] = {
    ("mnist", "full"): {},
    ("mnist", "quick"): dict(subset=12000, epochs=2, pgd_epochs=1, pgd_steps=3, eval_n=500, attack_steps=10, curve_n=200,
                             curve_steps=5, curve_scales=(1.0, 3.0, 8.0), minimal_n=100, sanity_n=50, deepfool_steps=30),
    # The authors' plan (their public Torch code, PAPER.md): 120 epochs of every net on all 60k images, for a GPU.
    # PGD-AT is ours (the paper has no multi-step net); it gets the same 120 epochs. Evaluated on all 10k test images.
    ("mnist", "authors"): dict(epochs=120, pgd_epochs=120, pgd_steps=5, eval_n=10000, attack_restarts=2, curve_n=1000,
                               minimal_n=1000, sanity_n=500),
    # CIFAR-10: the paper's l2 radius 0.2 (standardised, 0.05 in pixels); the l-inf radius 0.03 (≈ 1.9/255 in pixels)
    # is ours. Transfer sets also at ×4 and ×16, because ×1 of so small a radius barely moves any net.
    ("cifar10", "full"): dict(nets=("baseline", "goodfellow-linf", "robust-l2", "robust-linf", "pgd-linf"), epochs=100,
                              pgd_epochs=50, pgd_steps=7),
    # Quick (CPU): resnet18 only. The authors' VGG-BN net, with dropout after every conv, stays near chance for
    # a CPU-sized budget (14% and 21% test accuracy after 3 epochs on 5000 images, lr 0.05 and 0.02 one-cycle);
    # resnet18 reaches ~48% there. 5000 images, 3 one-cycle epochs; coarse evaluation on 200 test images.
    ("cifar10", "quick"): dict(models=("resnet18",), nets=("baseline", "robust-l2"), subset=5000, epochs=3,
                               lr_schedule="onecycle", test_n=1000, pgd_epochs=1, pgd_steps=3, eval_n=200, attack_steps=5,
                               curve_n=100, curve_steps=3, curve_scales=(1.0, 4.0, 16.0), minimal_n=50, sanity_n=50,
                               deepfool_steps=20, eval_batch=100),
    # The authors' CIFAR-10 plan: their VGG-BN net, SGD lr 1 halved every 25 epochs, wd 5e-4, batch 128, 300 epochs.
    ("cifar10", "authors"): dict(models=("paper-cifar",), nets=("baseline", "robust-l2"), epochs=300, pgd_epochs=300,
                                 lr=1.0, lr_schedule="step", lr_step=25, eval_n=10000, curve_n=1000, minimal_n=1000),
}
CIFAR = dict(dataset="cifar10", models=("paper-cifar", "resnet18"), radii={"l2": 0.2, "linf": 0.03}, curve_norms=("l2", "linf"),
             lr=0.05, weight_decay=5e-4, batch_size=128, lr_schedule="step", lr_step=25, transfer_scales=(1.0, 4.0, 16.0))
# fmt: on


def default_schedule(dataset: str, plan: str = "full") -> Schedule:
    """The built-in plans per dataset: ``quick`` (CPU minutes), ``full`` and ``authors`` (the authors' epochs; a GPU)."""
    if dataset not in ("mnist", "cifar10"):
        raise ConfigError(f"reproduce knows mnist and cifar10, not {dataset!r}")
    if (dataset, plan) not in PLANS:
        raise ConfigError(f"unknown --schedule {plan!r}: choose one of {', '.join(PLAN_NAMES)}")
    return Schedule(**{**(CIFAR if dataset == "cifar10" else {}), **PLANS[dataset, plan]})


def load_schedule(dataset: str, plan: str = "full", config: Path | None = None, **overrides: Any) -> Schedule:
    """The built-in ``plan`` for ``dataset``, with a TOML file's keys (the Schedule's fields), then ``overrides``, on top.

    Everything is validated here, before anything trains."""
    schedule = default_schedule(dataset, plan)
    allowed = {f.name for f in dataclasses.fields(Schedule)} - {"dataset"}
    values = read_toml(config, allowed) if config is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if not values:
        return schedule
    try:
        return dataclasses.replace(schedule, **values)
    except (TypeError, ValueError) as e:
        where = f"config file {config}" if config is not None else "reproduce options"
        raise ConfigError(f"{where}: {e}") from None
