"""The paper's evaluation protocol for one net of a reproduce run (:func:`evaluate_net`)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from robustopt.reproduce.claims import NORM_LABEL
from robustopt.reproduce.schedule import Schedule
from robustopt.threat.model import ThreatModel, get_norm

CERT_NORMS = ("linf", "l2")  # norms whose IBP bound is not vacuous (ℓ2: exact first layer); ℓ1 is only boxed


def _acc(model: nn.Module, x: Tensor, y: Tensor, attack: str, threat: ThreatModel, s: Schedule, **kw: Any) -> dict[str, Any]:
    """:func:`robustopt.evaluation.evaluate.evaluate` with the schedule's batch size and seed; no sanity checks unless asked."""
    from robustopt.evaluation.evaluate import evaluate

    kw = {"sanity": False, **kw}
    return evaluate(model, x, y, threat, attack, batch_size=s.eval_batch, seed=s.seed, progress=False, **kw).to_dict()


def example_pool(model: nn.Module, x: Tensor, y: Tensor, s: Schedule, norm: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The net's own white-box PGD (its training norm and radius) on a pool of 8 × ``examples`` test images, from
    which the example grid picks the images where the nets disagree. Returns tensors and what attack made them."""
    from robustopt.evaluation.attacks import run_attack

    t = ThreatModel(norm, s.pixel_radius(norm))
    pool = min(len(y), 8 * s.examples)
    xe, ye = x[:pool], y[:pool]
    if pool == 0:  # examples = 0: no grid
        return {"x_adv": xe.clone(), "pred": ye.clone(), "eps": torch.tensor([t.eps])}, {}
    x_adv = run_attack(model, xe, ye, t, "pgd", steps=s.attack_steps, generator=torch.Generator(x.device).manual_seed(s.seed))
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    meta = {"attack": f"PGD-{s.attack_steps}", "norm": norm, "eps": t.eps}
    return {"x_adv": x_adv, "pred": pred, "eps": torch.tensor([t.eps])}, meta


def evaluate_net(
    model: nn.Module,
    source: nn.Module,
    x: Tensor,
    y: Tensor,
    s: Schedule,
    sanity_norm: str | None,
    progress: bool = True,
    own_norm: str | None = None,
) -> tuple[dict[str, Any], tuple[dict[str, Tensor], dict[str, Any]]]:
    """The whole protocol for one net (accuracies count an image only if correct on x and on x_adv):

    * ``transfer``: the paper's test sets, one fast-method step (``fgsm`` = ``perturb`` steps=1) against
      ``source`` (the baseline) per norm and radius × scale;
    * ``whitebox``: single-step and PGD against the net itself at the training radii, with the evaluator's
      sanity checks (:mod:`robustopt.evaluation.sanity`) on ``sanity_norm``;
    * ``verified``: IBP verified accuracy (a guaranteed lower bound, ≤ PGD) at the same radii, per norm where IBP can
      bound the norm and the net (``accuracy`` None and a ``reason`` otherwise); ``curves_verified``: the same along
      the curves' ε;
    * ``curves``: PGD accuracy against ε; ``minimal``: DeepFool minimal perturbations of the correctly
      classified images (:mod:`robustopt.evaluation.stability`).

    Returns the JSON-able results and the example pool (:func:`example_pool`, on ``own_norm``: the net's training norm)."""
    from tqdm import tqdm

    t0 = time.monotonic()
    norms = list(s.radii)
    total = len(norms) * (len(s.transfer_scales) + 1) + len(s.curve_norms) + len(s.minimal_norms)
    bar = tqdm(total=total, desc="evaluate", leave=False, disable=not progress, unit="step")
    res: dict[str, Any] = {"n": len(y), "transfer": {}, "whitebox": {}, "verified": {}, "curves": {}, "curves_verified": {},
                           "minimal": {}, "sanity": {}}  # fmt: skip
    for norm in norms:
        _transfer_and_whitebox(res, model, source, x, y, s, norm, sanity_norm, bar)
    for norm in s.curve_norms:
        res["curves"][norm] = _curve(model, x[: s.curve_n], y[: s.curve_n], s, norm)
        res["curves_verified"][norm] = _verified_curve(model, x[: s.curve_n], y[: s.curve_n], res["curves"][norm], s, norm)
        bar.update(1)
    _minimal(res, model, x[: s.minimal_n], y[: s.minimal_n], s, bar)
    bar.close()
    examples = example_pool(model, x, y, s, own_norm or norms[0])
    res["eval_seconds"] = round(time.monotonic() - t0, 2)
    return res, examples


def _transfer_and_whitebox(res: dict[str, Any], model, source, x, y, s: Schedule, norm: str, sanity_norm, bar) -> None:
    """The paper's transfer test sets against ``source``, then single-step and PGD against the net itself."""
    for scale in s.transfer_scales:
        t = ThreatModel(norm, s.pixel_radius(norm) * scale)
        res["transfer"][f"{norm}@{scale:g}"] = _acc(model, x, y, "fgsm", t, s, source_model=source)["adversarial_accuracy"]
        bar.update(1)
    t = ThreatModel(norm, s.pixel_radius(norm))
    pgd, res.setdefault("verified", {})[norm] = _pgd_and_verified(model, x, y, t, s, norm == sanity_norm)
    fgsm = _acc(model, x, y, "fgsm", t, s)["adversarial_accuracy"]
    res["clean"] = pgd["clean_accuracy"]
    res["whitebox"][norm] = {"eps": t.eps, "fgsm": fgsm, "pgd": pgd["adversarial_accuracy"]}
    if "sanity" in pgd:
        res["sanity"] = {"norm": norm, "eps": t.eps, "checks": pgd["sanity"]}
    bar.update(1)


def cannot_certify(model: nn.Module, x: Tensor, norm: str) -> str | None:
    """Why IBP does not certify this net in this norm (shown as "n/a" in the report), or None when it does."""
    from robustopt.certify import check_supported
    from robustopt.errors import ConfigError

    if norm not in CERT_NORMS:
        return f"IBP bounds an {NORM_LABEL[norm]} ball only by its enclosing box: vacuous at these radii"
    try:
        check_supported(model, x, "ibp")
    except ConfigError as e:
        return str(e)
    return None


def _pgd_and_verified(model, x: Tensor, y: Tensor, t: ThreatModel, s: Schedule, checked: bool) -> tuple[dict, dict]:
    """White-box PGD at ``t`` and, where IBP can bound the net in this norm, its verified accuracy on the same images,
    checked per example (an image verified robust that PGD breaks is a soundness bug: flagged, counted in
    ``inconsistent``, and failed in the sanity checks). The certified part never crashes the run: "n/a" with a reason."""
    from robustopt.evaluation.evaluate import evaluate
    from robustopt.evaluation.report import bounds

    kw = dict(steps=s.attack_steps, restarts=s.attack_restarts, sanity=checked, sanity_n=min(s.sanity_n, len(y)),
              batch_size=s.eval_batch, seed=s.seed, progress=False)  # fmt: skip
    why = cannot_certify(model, x, t.norm)
    if why is not None:
        return evaluate(model, x, y, t, "pgd", **kw).to_dict(), {"eps": t.eps, "method": "ibp", "accuracy": None, "reason": why}
    b = bounds(model, x, y, t, "pgd", certify="ibp", certify_batch_size=s.eval_batch, strict=False, **kw)
    info = {"eps": t.eps, "method": "ibp", "accuracy": b.verified_accuracy, "seconds": round(b.certified.seconds, 3),
            "inconsistent": len(b.inconsistent)}  # fmt: skip
    return b.evaluation.to_dict(), info


def _verified_curve(model: nn.Module, x: Tensor, y: Tensor, points: list[list[float]], s: Schedule, norm: str) -> list:
    """IBP verified accuracy at the ε of a PGD curve's points: ``[[ε, verified], ...]`` (empty where IBP cannot)."""
    from robustopt.certify import certify

    if cannot_certify(model, x, norm) is not None:
        return []
    return [[e, certify(model, x, y, ThreatModel(norm, e), "ibp", batch_size=s.eval_batch).verified_accuracy] for e, _ in points]


def _curve(model: nn.Module, x: Tensor, y: Tensor, s: Schedule, norm: str) -> list[list[float]]:
    """PGD accuracy against ε: ``[[0, clean], [ε, accuracy], ...]``."""
    curve = [_acc(model, x, y, "pgd", ThreatModel(norm, s.pixel_radius(norm) * k), s, steps=s.curve_steps)
             for k in s.curve_scales]  # fmt: skip
    return [[0.0, curve[0]["clean_accuracy"]]] + [[c["eps"], c["adversarial_accuracy"]] for c in curve]


def _minimal(res: dict[str, Any], model: nn.Module, xm: Tensor, ym: Tensor, s: Schedule, bar) -> None:
    """DeepFool minimal perturbations of the correctly classified images, per norm."""
    from robustopt.evaluation.stability import minimal_perturbations, summary

    with torch.no_grad():
        correct = model(xm).argmax(1) == ym
    for norm in s.minimal_norms:
        d = minimal_perturbations(model, xm[correct], ym[correct], ThreatModel(norm, 1.0), method="deepfool",
                                  steps=s.deepfool_steps, batch_size=s.eval_batch)  # fmt: skip
        stats = summary(d, get_norm(norm).norm(xm[correct]).cpu())
        res["minimal"][norm] = {**stats, "dists": [float(v) if math.isfinite(v) else None for v in d.tolist()]}
        bar.update(1)
