"""What ``robustopt reproduce`` trains and how hard it evaluates: :class:`Schedule` and the built-in plans.

Nets are named ``baseline`` (standard training) or ``<kind>-<norm>`` with kind ``goodfellow``
(α = 0.5 clean term), ``robust`` (Algorithm 1 of Shaham et al., first order) or ``pgd`` (multi-step
inner max). With several models (CIFAR-10) the names get the model as a prefix: ``resnet18/robust-l2``.
Radii are given in the paper's standardised units unless ``eps_units = "pixel"``; every net trains
and is evaluated in pixel units (:meth:`Schedule.pixel_radius`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustopt.data.datasets import STATS
from robustopt.errors import ConfigError
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
        for name in ("epochs", "pgd_epochs", "pgd_steps", "eval_n", "curve_n", "minimal_n", "attack_steps", "eval_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"reproduce config: {name} must be a whole number >= 1, got {getattr(self, name)!r}")
        self.models, self.nets = tuple(self.models), tuple(self.nets)
        self.transfer_scales, self.curve_scales = tuple(self.transfer_scales), tuple(self.curve_scales)
        self.curve_norms, self.minimal_norms = tuple(self.curve_norms), tuple(self.minimal_norms)
        if not isinstance(self.sanity_n, int) or self.sanity_n < 0:
            raise ConfigError(f"reproduce config: sanity_n must be a whole number >= 0, got {self.sanity_n!r}")
        if self.sanity_nets is not None:
            self.sanity_nets = tuple(self.sanity_nets)
        if "baseline" not in self.nets:
            raise ConfigError("reproduce config: nets must include 'baseline' (the transfer sets are built on it)")
        for net in self.nets:
            kind, _, norm = net.partition("-")
            if kind not in KINDS or (kind == "baseline") != (norm == "") or (norm and norm not in self.radii):
                raise ConfigError(f"reproduce config: bad net {net!r}; use baseline or <goodfellow|robust|pgd>-<norm in radii>")
        for net in self.net_names():
            self.train_config(net)  # validates models, radii, optimiser

    def pixel_radius(self, norm: str) -> float:
        """The training radius of ``norm`` in pixel units (σ-scaled when given in standardised units)."""
        if self.eps_units == "pixel":
            return float(self.radii[norm])
        std = STATS[self.dataset][1]
        return float(self.radii[norm]) * sum(std) / len(std)

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
        skip = {"epochs", "pgd_epochs", "pgd_steps", "batch_size", "lr", "momentum", "weight_decay", "lr_schedule"}
        return {
            k: v for k, v in dataclasses.asdict(self).items() if k not in skip | {"lr_step", "subset", "test_n", "eval_batch"}
        }


# The built-in plans, as overrides of the Schedule defaults (the full MNIST plan is the defaults).
# fmt: off
PLANS: dict[tuple[str, bool], dict[str, Any]] = {
    ("mnist", False): {},
    ("mnist", True): dict(subset=12000, epochs=2, pgd_epochs=1, pgd_steps=3, eval_n=500, attack_steps=10, curve_n=200,
                          curve_steps=5, curve_scales=(1.0, 3.0, 8.0), minimal_n=100, sanity_n=50, deepfool_steps=30),
    # CIFAR-10: the paper's l2 radius 0.2 (standardised, 0.05 in pixels); the l-inf radius 0.03 (≈ 1.9/255 in pixels)
    # is ours. Transfer sets also at ×4 and ×16, because ×1 of so small a radius barely moves any net.
    ("cifar10", False): dict(nets=("baseline", "goodfellow-linf", "robust-l2", "robust-linf", "pgd-linf"), epochs=100,
                             pgd_epochs=50, pgd_steps=7),
    # Quick (CPU): resnet18 only. The authors' VGG-BN net, with dropout after every conv, stays near chance for
    # a CPU-sized budget (14% and 21% test accuracy after 3 epochs on 5000 images, lr 0.05 and 0.02 one-cycle);
    # resnet18 reaches ~48% there. 5000 images, 3 one-cycle epochs; coarse evaluation on 200 test images.
    ("cifar10", True): dict(models=("resnet18",), nets=("baseline", "robust-l2"), subset=5000, epochs=3,
                            lr_schedule="onecycle", test_n=1000, pgd_epochs=1, pgd_steps=3, eval_n=200, attack_steps=5,
                            curve_n=100, curve_steps=3, curve_scales=(1.0, 4.0, 16.0), minimal_n=50, sanity_n=50,
                            deepfool_steps=20, eval_batch=100),
}
CIFAR = dict(dataset="cifar10", models=("paper-cifar", "resnet18"), radii={"l2": 0.2, "linf": 0.03}, curve_norms=("l2", "linf"),
             lr=0.05, weight_decay=5e-4, batch_size=128, lr_schedule="step", lr_step=25, transfer_scales=(1.0, 4.0, 16.0))
# fmt: on


def default_schedule(dataset: str, quick: bool) -> Schedule:
    """The built-in plans: ``mnist`` (full or quick) and ``cifar10`` (quick: CPU-sized; full: GPU-sized)."""
    if (dataset, quick) not in PLANS:
        raise ConfigError(f"reproduce knows mnist and cifar10, not {dataset!r}")
    return Schedule(**{**(CIFAR if dataset == "cifar10" else {}), **PLANS[dataset, quick]})


def load_schedule(dataset: str, quick: bool, config: Path | None = None) -> Schedule:
    """The default plan for ``dataset``, with a TOML file's keys (the Schedule's fields) applied on top."""
    schedule = default_schedule(dataset, quick)
    if config is None:
        return schedule
    allowed = {f.name for f in dataclasses.fields(Schedule)} - {"dataset"}
    values = read_toml(config, allowed)
    try:
        return dataclasses.replace(schedule, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config file {config}: {e}") from None
