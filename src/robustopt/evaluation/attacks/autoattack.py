"""AutoAttack, version "standard" (Croce & Hein, ICML 2020), on top of :class:`ThreatModel`.

The measurement RobustBench and most papers report. A cascade: each attack runs only on the
examples every earlier one failed to break *within ε*, and the robust accuracy is what
survives all of them.

===========  ==============================================================  ============
component    budget (version "standard")                                     norms
===========  ==============================================================  ============
``apgd-ce``  APGD, cross-entropy, 100 iterations, 1 restart                  linf, l2, l1
``apgd-t``   APGD, targeted DLR, 100 iterations, the 9 most likely wrong     linf, l2, l1
             classes one after the other
``fab-t``    FAB, targeted, 100 iterations, 9 target classes                 linf, l2
``square``   Square (Andriushchenko et al. 2020), 5000 queries, p_init 0.8   linf, l2
===========  ==============================================================  ============

For ℓ1 the standard version runs the two APGD attacks only, as the reference does. Every
component draws its randomness from a fresh generator seeded with the same fixed seed
(default 0), so a figure does not depend on what ran before it.

Known differences from the reference implementation: ℓ1 APGD uses robustopt's sparse top-k
step rather than the adaptive-sparsity ℓ1-APGD of Croce & Hein (2021), and ℓ2 Square uses a
window search with projection rather than the paper's mass-moving update (both weaker, never
out of the threat model).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from robustopt.evaluation.attacks._common import Attack, cascade
from robustopt.evaluation.attacks.apgd import apgd, apgd_targeted
from robustopt.evaluation.attacks.fab import fab_targeted
from robustopt.evaluation.attacks.square import square
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import attack_state

Tensor = torch.Tensor
VERSION = "standard"
STANDARD = {"steps": 100, "n_targets": 9, "queries": 5000, "p_init": 0.8, "seed": 0}
COMPONENTS = {"linf": ("apgd-ce", "apgd-t", "fab-t", "square"), "l2": ("apgd-ce", "apgd-t", "fab-t", "square"),
              "l1": ("apgd-ce", "apgd-t")}  # fmt: skip


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def standard_components(
    norm: str, steps: int, n_targets: int, queries: int, seed: int, device: torch.device | str = "cpu"
) -> list[tuple[str, Attack]]:
    """The components of version "standard" for ``norm``, each ``(model, x, y, threat) -> x_adv``, each with its own generator."""
    every: dict[str, Attack] = {
        "apgd-ce": partial(apgd, steps=steps, loss="ce", generator=_seeded(seed, device)),
        "apgd-t": partial(apgd_targeted, steps=steps, n_targets=n_targets, generator=_seeded(seed, device)),
        "fab-t": partial(fab_targeted, steps=steps, n_targets=n_targets),
        "square": partial(square, steps=queries, p_init=STANDARD["p_init"], generator=_seeded(seed, device)),
    }
    return [(name, every[name]) for name in COMPONENTS[norm]]


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 100,
    n_targets: int = 9,
    queries: int = 5000,
    seed: int = 0,
    generator: torch.Generator | None = None,
    stats: dict[str, int] | None = None,
) -> Tensor:
    """AutoAttack "standard": APGD-CE, APGD-T, FAB-T and Square in a cascade (ℓ1: the two APGD only).

    Paper: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020.

    Distance: the threat's norm (ℓ∞, ℓ2; ℓ1 with APGD only).

    Arguments:
        steps (int): APGD and FAB iterations (per target). Default 100 (standard).
        n_targets (int): target classes of APGD-T and FAB-T, ``min(n_targets, K − 1)``. Default 9.
        queries (int): Square's steps (one model query each). Default 5000.
        seed (int): every component draws from a fresh generator seeded with it. Default 0.
        generator: accepted for the protocol and ignored: the standard version's randomness is
            ``seed``, so a figure does not depend on what ran before it.
        stats (dict): if given, accumulates the robust count after the clean pass and after each
            component, e.g. ``{'clean': 98, 'apgd-ce': 71, 'apgd-t': 69, 'fab-t': 69, 'square': 69}``.

    The defaults are the standard budgets; others give a different (non-standard) measurement.

    Shape:
        x: (B, ...); y: (B,); returns (B, ...) inside the threat.

    Example:
        >>> x_adv = autoattack(model, x, y, ThreatModel("linf", 0.1), steps=3, n_targets=2, queries=10)
        >>> bool(ThreatModel("linf", 0.1).contains(x_adv, x).all())
        True
    """
    comps = standard_components(threat.norm, steps, n_targets, queries, seed, x.device)
    with attack_state(model, "autoattack"):
        return cascade(model, x, y, threat, comps, stats)


def is_standard(steps: int, n_targets: int, queries: int, seed: int) -> bool:
    """True when the budgets are those of version "standard"."""
    return (steps, n_targets, queries, seed) == tuple(STANDARD[k] for k in ("steps", "n_targets", "queries", "seed"))


ATTACKS = {"autoattack": autoattack}
