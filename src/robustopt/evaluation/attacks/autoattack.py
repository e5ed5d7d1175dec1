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

Example:
    >>> stats = {}
    >>> x_adv = autoattack(model, x, y, ThreatModel("linf", 0.3), stats=stats)
    >>> stats   # {'clean': 98, 'apgd-ce': 71, 'apgd-t': 69, 'fab-t': 69, 'square': 69}
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from robustopt.evaluation.attacks.apgd import apgd, apgd_targeted
from robustopt.evaluation.attacks.auto import cascade
from robustopt.evaluation.attacks.fab import fab_targeted
from robustopt.evaluation.attacks.square import square
from robustopt.threat.model import ThreatModel

Tensor = torch.Tensor
VERSION = "standard"
STANDARD = {"steps": 100, "n_targets": 9, "queries": 5000, "p_init": 0.8, "seed": 0}
COMPONENTS = {"linf": ("apgd-ce", "apgd-t", "fab-t", "square"), "l2": ("apgd-ce", "apgd-t", "fab-t", "square"),
              "l1": ("apgd-ce", "apgd-t")}  # fmt: skip


def _seeded(seed: int, like: Tensor) -> torch.Generator:
    return torch.Generator(device=like.device).manual_seed(seed)


def standard_components(
    norm: str, steps: int, n_targets: int, queries: int, seed: int
) -> list[tuple[str, Callable[..., Tensor]]]:
    """The components of version "standard" for ``norm``, each ``(model, x, y, threat) -> x_adv``."""
    every: dict[str, Callable[..., Tensor]] = {
        "apgd-ce": lambda m, x, y, t: apgd(m, x, y, t, steps=steps, loss="ce", generator=_seeded(seed, x)),
        "apgd-t": lambda m, x, y, t: apgd_targeted(m, x, y, t, steps=steps, n_targets=n_targets, generator=_seeded(seed, x)),
        "fab-t": lambda m, x, y, t: fab_targeted(m, x, y, t, steps=steps, n_targets=n_targets),
        "square": lambda m, x, y, t: square(m, x, y, t, queries=queries, p_init=STANDARD["p_init"], generator=_seeded(seed, x)),
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
    stats: dict[str, int] | None = None,
) -> Tensor:
    """AutoAttack "standard"; x (B, C, H, W) in the box, y (B,) -> x_adv (B, C, H, W) inside the threat model.

    ``stats`` accumulates the robust count after the clean pass and after each component. The
    defaults are the standard budgets; changing them gives a different (non-standard) measurement.
    """
    comps = standard_components(threat.norm, steps, n_targets, queries, seed)
    return cascade(model, x, y, threat, comps, stats)


def is_standard(steps: int, n_targets: int, queries: int, seed: int) -> bool:
    """True when the budgets are those of version "standard"."""
    return (steps, n_targets, queries, seed) == tuple(STANDARD[k] for k in ("steps", "n_targets", "queries", "seed"))
