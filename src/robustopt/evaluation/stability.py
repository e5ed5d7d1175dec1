"""Local-stability measures: minimal adversarial perturbations and accuracy-versus-ε curves.

The paper's second claim is that robust training makes adversarial examples *harder to
generate*: the smallest perturbation that changes the label gets larger. Per example we
estimate ``r*(x) = min {‖r‖ : f(x + r) ≠ y, x + r ∈ box}``:

* ``method="deepfool"``: DeepFool's perturbation (Moosavi-Dezfooli et al. 2016), fast, an
  upper bound on r*;
* ``method="pgd"``: a per-example binary search over ε with PGD (random start, restarts),
  the stronger attack: the smallest ε at which PGD succeeds, reported as the norm of the
  adversarial example it found there (also an upper bound on r*, usually tighter).

0 marks an example already misclassified, ``inf`` one where no adversarial example was found.
``summary`` counts the misclassified ones apart (they have no minimal perturbation to speak
of: a weak model would otherwise report a median of 0) and gives median, mean and DeepFool's
ρ_adv = E[‖r‖/‖x‖] over the correctly classified ones.

Example:
    >>> d = minimal_perturbations(model, x, y, ThreatModel("l2", 1.0))   # (N,); ε is not used
    >>> d_pgd = minimal_perturbations(model, x, y, ThreatModel("linf", 0.1), method="pgd", steps=20)
    >>> summary(d, x.flatten(1).norm(dim=1))["median"]
    >>> plot_histogram({"robust": d, "standard": d_std}, "hist.png")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from robustopt.errors import ConfigError
from robustopt.evaluation.attacks import deepfool, pgd
from robustopt.evaluation.attacks._common import predict
from robustopt.evaluation.sanity import diameter
from robustopt.files import save_figure
from robustopt.threat.model import ThreatModel
from robustopt.threat.perturb import check_inputs, check_module, check_threat

Tensor = torch.Tensor
METHODS = ("deepfool", "pgd")


def _distances(threat: ThreatModel, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
    """‖x_adv − x‖ where x_adv is misclassified, inf elsewhere, 0 where x already is."""
    d = threat.norm_of(x_adv - x)
    d = torch.where(predict(model, x_adv) != y, d, torch.full_like(d, math.inf))
    return torch.where(predict(model, x) != y, torch.zeros_like(d), d)


def _binary_search(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, search_steps: int, steps: int, restarts: int, generator, loss
) -> Tensor:
    """Per-example bisection of ε in [0, diameter] with PGD; the smallest adversarial norm found."""
    hi = torch.full((len(y),), diameter(threat, x), device=x.device)
    lo = torch.zeros_like(hi)
    best = torch.full_like(hi, math.inf)
    for _ in range(search_steps + 1):
        mid = torch.where(torch.isinf(best), hi, (lo + hi) / 2)  # first round: the largest ε
        x_adv = pgd(model, x, y, threat, steps=steps, restarts=restarts, generator=generator, radius=mid, loss=loss)
        d = _distances(threat, model, x, y, x_adv)
        found = torch.isfinite(d)
        best = torch.minimum(best, d)
        hi = torch.where(found, torch.minimum(mid, d), hi)
        lo = torch.where(found | torch.isinf(best), lo, mid)
    return torch.where(predict(model, x) != y, torch.zeros_like(best), best)


def _batch_distances(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, method: str, opts: dict[str, Any]) -> Tensor:
    """Minimal distances (B,) of one batch with ``method``."""
    if method == "deepfool":
        x_adv = deepfool(model, x, y, threat.with_eps(diameter(threat, x)), steps=opts["steps"] or 50)
        return _distances(threat, model, x, y, x_adv)
    s = opts
    return _binary_search(model, x, y, threat, s["search_steps"], s["steps"] or 20, s["restarts"], s["generator"], s["loss"])


def minimal_perturbations(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    method: str = "deepfool",
    steps: int | None = None,
    restarts: int = 1,
    search_steps: int = 10,
    loss: str = "margin",
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """Minimal adversarial distances (N,) in the threat's norm; 0 if misclassified, inf if not found.

    ``threat`` gives the norm and the box; its ε is **not** used: every search runs up to the
    box's diameter, (hi − lo)·D^(1/p), the largest distance there is. ``steps`` defaults to 50
    (deepfool) or 20 (pgd, per search step). Randomness (pgd only): ``generator`` if given,
    else a generator seeded with ``seed + first index`` per batch, so a result does not depend
    on the batch size's history.

    The pgd method ascends the margin loss by default: its ascent direction is the normal of
    the nearest class boundary, where cross-entropy mixes all classes and can miss it.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown stability method {method!r}: choose one of {', '.join(METHODS)}")
    check_threat(threat, "minimal_perturbations")
    check_module(model, "minimal_perturbations")
    check_inputs(x, y, threat, "minimal_perturbations")
    dev = next(iter(model.parameters()), x).device
    out = []
    for start in tqdm(range(0, len(y), batch_size), desc=f"minimal {threat.norm} ({method})", disable=not progress):
        xb, yb = x[start : start + batch_size].to(dev), y[start : start + batch_size].to(dev)
        gen = generator or torch.Generator(device=dev).manual_seed(seed + start)
        opts = {"steps": steps, "restarts": restarts, "search_steps": search_steps, "loss": loss, "generator": gen}
        out.append(_batch_distances(model, xb, yb, threat, method, opts).cpu())
    return torch.cat(out)


def summary(dists: Tensor, x_norms: Tensor) -> dict[str, float]:
    """Statistics of minimal distances (N,) over the correctly classified examples (distance > 0).

    ``misclassified`` counts the examples with distance 0 (wrong already on x), which are left
    out of everything else. The median counts not-found examples as +inf (so it is honest when
    fewer than half are found); the mean and ρ_adv average over the found ones only;
    ``found_fraction`` is over the correctly classified ones.
    """
    d = dists.double().cpu()
    correct = d != 0
    misclassified = int((~correct).sum())
    d, x_norms = d[correct], x_norms.double().cpu().reshape(-1)[correct]
    found = torch.isfinite(d)
    n = len(d)
    fin = d[found]
    return {
        "n": n,
        "misclassified": misclassified,
        "found_fraction": float(found.double().mean()) if n else math.nan,
        "median": float(d.sort().values[(n - 1) // 2]) if n else math.nan,
        "mean": float(fin.mean()) if len(fin) else math.nan,
        "rho_adv": float((fin / x_norms[found].clamp_min(1e-12)).mean()) if len(fin) else math.nan,
    }


def accuracy_curve(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, eps_list: list[float], attack: str = "pgd", **kw: Any
) -> list[dict[str, float]]:
    """Robust accuracy at each ε of ``eps_list`` in the threat's norm and box: ``[{"eps", "accuracy", "clean_accuracy"}]``.

    The threat's own ε is not used. ``kw`` goes to :func:`robustopt.evaluation.evaluate.evaluate`; sanity checks are off.
    """
    from robustopt.evaluation.evaluate import evaluate

    kw = {"progress": False, **kw, "sanity": False}
    rows = []
    for eps in eps_list:
        res = evaluate(model, x, y, threat.with_eps(eps), attack, **kw)
        rows.append({"eps": float(eps), "accuracy": res.adversarial_accuracy, "clean_accuracy": res.clean_accuracy})
    return rows


def plot_histogram(
    dists_by_model: dict[str, Tensor], path: str | Path, xlabel: str = "minimal adversarial perturbation ‖r‖"
) -> Path:
    """Overlaid histograms of the finite distances of correctly classified examples per model, medians dashed; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, d in dists_by_model.items():
        fin = d[torch.isfinite(d) & (d != 0)].double().cpu().numpy()
        stats = summary(d, torch.ones_like(d))
        med = stats["median"]
        (line,) = ax.plot([], [])
        extra = f", {stats['misclassified']} misclassified not shown" if stats["misclassified"] else ""
        ax.hist(fin, bins=40, alpha=0.5, color=line.get_color(), label=f"{label} (median {med:.3g}{extra})")
        if math.isfinite(med):
            ax.axvline(med, color=line.get_color(), linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
