"""Which of the paper's claims a reproduce run supports, and the sanity checks of its evaluation.

The paper (Shaham et al., arXiv 1511.05432) claims that robust optimisation (1) makes a net resist
adversarial examples built against a baseline, (2) makes new adversarial examples harder to
generate and (3) does not cost (even improves) clean accuracy. :func:`claims` checks each claim
per net against the baseline with a two-standard-error rule: a difference smaller than
``2·sqrt(p(1-p)/n + q(1-q)/n + (s_p² + s_q²)/K)`` is called *inconclusive*, never a win (``s`` the std over
K training seeds: with several seeds the seed-to-seed spread counts as noise too). Everything here is a pure
function of the results dict that :func:`robustopt.reproduce.report.assemble` builds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from robustopt.reproduce.seeds import at, cell

NORM_LABEL = {"linf": "ℓ∞", "l2": "ℓ2", "l1": "ℓ1"}
FAST_NAME = {"linf": "FGSM", "l2": "fast ℓ2", "l1": "fast ℓ1 (one pixel)"}
TOL = 0.01  # slack of the sanity checks (random starts, small n)


def compare(a: float, b: float, n_a: int, n_b: int, sd: tuple[float, float] = (0.0, 0.0), k: int = 1) -> int:
    """+1 if accuracy a is above b by more than two standard errors, -1 if below, 0 if within noise.

    a and b are means over ``k`` seeds whose stds are ``sd`` (0 for one seed), each seed on n images."""
    se = math.sqrt(a * (1 - a) / max(n_a, 1) + b * (1 - b) / max(n_b, 1) + (sd[0] ** 2 + sd[1] ** 2) / max(k, 1))
    margin = max(2 * se, 1e-9)
    return 1 if a - b > margin else -1 if b - a > margin else 0


def pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def transfer_sets(schedule: Any) -> dict[str, dict[str, Any]]:
    """Metadata of the transfer test sets, keyed as in the evaluation (``norm@scale``)."""
    return {
        f"{norm}@{scale:g}": {"norm": norm, "scale": scale, "eps": schedule.pixel_radius(norm) * scale}
        for norm in schedule.radii
        for scale in schedule.transfer_scales
    }


def transfer_label(meta: dict[str, Any]) -> str:
    return f"{FAST_NAME[meta['norm']]} vs baseline, {NORM_LABEL[meta['norm']]} ε={meta['eps']:.4g} (×{meta['scale']:g})"


def groups(schedule: Any) -> list[tuple[str, list[str]]]:
    """(model, net names) per model: each model has its own baseline and table."""
    if len(schedule.models) == 1:
        return [(schedule.models[0], list(schedule.nets))]
    return [(m, [f"{m}/{n}" for n in schedule.nets]) for m in schedule.models]


def spread(net: dict[str, Any], *path: str) -> float:
    """The std over seeds of the figure at ``path`` (0 for a single seed)."""
    v = at(net.get("std"), *path)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else 0.0


def versus(name: str, nets: dict[str, Any], *path: str) -> int:
    """:func:`compare` of the figure at ``path`` of net ``name`` against its baseline's, seeds' spread included."""
    net, base = nets[name], nets[baseline_of(name)]
    n = at(net, "eval", "n") or 1
    return compare(at(net, *path), at(base, *path), n, at(base, "eval", "n") or 1, (spread(net, *path), spread(base, *path)),
                   len(net.get("runs") or [None]))  # fmt: skip


def baseline_of(name: str) -> str:
    model, slash, _ = name.rpartition("/")
    return f"{model}{slash}baseline"


# ----------------------------------------------------------------------------- sanity checks


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def evaluator_checks(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluator's own checks (:mod:`robustopt.evaluation.sanity`), flattened into report rows."""
    san = ev.get("sanity") or {}
    rows = []
    for key, c in (san.get("checks") or {}).items():
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in c.items() if k not in ("passed", "message"))
        rows.append(
            {
                "check": f"evaluator: {key}, {NORM_LABEL[san['norm']]} ε={san['eps']:.4g}",
                "passed": bool(c["passed"]),
                "detail": f"{c['message']}: {nums}",
            }
        )
    return rows


def sanity(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks of one net's evaluation that a correct attack must pass; a failure hints at gradient masking.

    The evaluator's checks, then consistency checks across the tables (every norm, every radius)."""
    checks = evaluator_checks(ev)

    def add(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "passed": bool(ok), "detail": detail})

    for norm, wb in ev["whitebox"].items():
        lab = f"{NORM_LABEL[norm]} ε={wb['eps']:.4g}"
        if "fgsm" in wb:
            add(
                f"PGD ≤ single-step, {lab}",
                wb["pgd"] <= wb["fgsm"] + TOL,
                f"PGD {pct(wb['pgd'])}% vs single-step {pct(wb['fgsm'])}%",
            )
            add(
                f"single-step ≤ clean, {lab}", wb["fgsm"] <= ev["clean"] + TOL, f"{pct(wb['fgsm'])}% vs clean {pct(ev['clean'])}%"
            )
        key = f"{norm}@1"
        if key in ev["transfer"]:
            t = ev["transfer"][key]
            add(f"white-box ≤ transfer, {lab}", wb["pgd"] <= t + TOL, f"white-box PGD {pct(wb['pgd'])}% vs transfer {pct(t)}%")
    for norm, v in (ev.get("verified") or {}).items():
        if v.get("accuracy") is not None and norm in ev["whitebox"]:
            pgd, lab = ev["whitebox"][norm]["pgd"], f"{NORM_LABEL[norm]} ε={v['eps']:.4g}"
            broken = v.get("inconsistent") or 0
            add(f"verified (IBP) ≤ PGD, {lab}", v["accuracy"] <= pgd + TOL and not broken,
                f"verified {pct(v['accuracy'])}% vs PGD {pct(pgd)}%; {broken:g} image(s) verified yet broken by PGD")  # fmt: skip
    for norm, points in ev["curves"].items():
        accs = [a for _, a in points]
        add(
            f"accuracy falls with ε, {NORM_LABEL[norm]}",
            all(b <= a + 2 * TOL for a, b in zip(accs, accs[1:], strict=False)),
            " → ".join(pct(a) for a in accs),
        )
        add(f"≈0 at large ε, {NORM_LABEL[norm]} ε={points[-1][0]:.3g}", accs[-1] <= 0.05, f"{pct(accs[-1])}%")
    return checks


# ----------------------------------------------------------------------------- claims


def _verdict(wins: int, losses: int, total: int) -> str:
    if total and wins == total:
        return "supported"
    return "not supported" if wins == 0 else "partly supported"


def claim_transfer(name: str, nets: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """Claim 1: the net resists the adversarial test sets built against the baseline (beats the baseline on them)."""
    cmp = {k: versus(name, nets, "eval", "transfer", k) for k in sets}
    wins, losses = sum(c > 0 for c in cmp.values()), sum(c < 0 for c in cmp.values())
    not_beaten = [
        f"{transfer_label(sets[k])}: {cell(nets[name], 'eval', 'transfer', k)}% vs baseline "
        f"{cell(nets[baseline_of(name)], 'eval', 'transfer', k)}%" + (" (lower)" if c < 0 else " (within noise)")
        for k, c in cmp.items()
        if c <= 0
    ]
    text = f"beats the baseline on {wins}/{len(cmp)} transfer test sets"
    if not_beaten:
        text += "; does NOT beat the baseline on " + "; ".join(not_beaten)
    return {
        "claim": "resists adversarial examples made against the baseline",
        "net": name,
        "verdict": _verdict(wins, losses, len(cmp)),
        "text": text,
    }


def median_ratio_interval(a: list[float | None], b: list[float | None], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``median(a) / median(b)``; each list is resampled with replacement.

    ``None`` (no adversarial example found) counts as an infinite distance. Fixed seed: the report is reproducible."""
    rng = np.random.default_rng(seed)
    va = np.array([np.inf if v is None else v for v in a], dtype=float)
    vb = np.array([np.inf if v is None else v for v in b], dtype=float)
    if len(va) == 0 or len(vb) == 0:
        return float("nan"), float("nan")
    ma = np.median(va[rng.integers(0, len(va), (draws, len(va)))], axis=1)
    mb = np.median(vb[rng.integers(0, len(vb), (draws, len(vb)))], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = np.nanquantile(ma / mb, [0.025, 0.975], method="nearest")  # no inf - inf
    return float(lo), float(hi)


def claim_harder(name: str, nets: dict[str, Any]) -> list[dict[str, Any]]:
    """Claim 2: new adversarial examples are harder to generate: larger DeepFool distances, higher white-box PGD accuracy.

    The distance claim holds when the bootstrap interval of the ratio of medians lies above 1 (when the per-image
    distances are at hand), so a few percent on a few hundred images is not called a win."""
    ev, base = nets[name]["eval"], nets[baseline_of(name)]["eval"]
    out = []
    for norm, m in ev["minimal"].items():
        b = base["minimal"][norm]
        ratio = m["median"] / b["median"] if b["median"] and math.isfinite(b["median"]) else float("nan")
        text = f"median {m['median']:.3g} vs baseline {b['median']:.3g} (×{ratio:.2f}"
        ok = ratio > 1
        if "dists" in m and "dists" in b:
            lo, hi = median_ratio_interval(m["dists"], b["dists"])
            ok = lo > 1
            text += f", 95% bootstrap interval ×{lo:.2f}–{hi:.2f}"
        text += ")" + ("" if ok else ": does NOT exceed the baseline" + (" (within noise)" if ratio > 1 else ""))
        out.append(
            {
                "claim": f"harder to generate: median DeepFool {NORM_LABEL[norm]} distance above the baseline's",
                "net": name,
                "verdict": "supported" if ok else "not supported",
                "text": text,
            }
        )
    cmp = {nrm: versus(name, nets, "eval", "whitebox", nrm, "pgd") for nrm in ev["whitebox"]}
    wins = sum(c > 0 for c in cmp.values())
    text = "; ".join(
        f"PGD {NORM_LABEL[nrm]}: {cell(nets[name], 'eval', 'whitebox', nrm, 'pgd')}% vs baseline "
        f"{cell(nets[baseline_of(name)], 'eval', 'whitebox', nrm, 'pgd')}%"
        + {1: "", 0: " (within noise: NOT above the baseline)", -1: " (lower: NOT above the baseline)"}[c]
        for nrm, c in cmp.items()
    )
    out.append(
        {
            "claim": "harder to generate: white-box PGD accuracy above the baseline's at the training radii",
            "net": name,
            "verdict": _verdict(wins, len(cmp) - wins, len(cmp)),
            "text": text,
        }
    )
    return out


def claim_clean(name: str, nets: dict[str, Any], n_test: int) -> dict[str, Any]:
    """Claim 3: clean accuracy does not suffer (the paper: it improves), on the n_test test images behind test_acc."""
    net, base = nets[name], nets[baseline_of(name)]
    a, b = net["test_acc"], base["test_acc"]
    c = compare(a, b, n_test, n_test, (spread(net, "test_acc"), spread(base, "test_acc")), len(net.get("runs") or [None]))
    words = {
        1: "higher than the baseline (improves)",
        0: "within noise of the baseline (does not suffer, does not improve)",
        -1: "LOWER than the baseline (it suffers)",
    }
    return {
        "claim": "clean accuracy does not suffer",
        "net": name,
        "verdict": "not supported" if c < 0 else "supported",
        "text": f"{cell(net, 'test_acc', digits=2)}% vs baseline {cell(base, 'test_acc', digits=2)}%: {words[c]}",
    }


def caveat_masking(name: str, nets: dict[str, Any]) -> dict[str, Any] | None:
    """Later work: single-step accuracy overstates robustness when PGD finds much more (gradient masking)."""
    ev, norm = nets[name]["eval"], nets[name].get("norm")
    wb = ev["whitebox"].get(norm) if norm else None
    if not wb or "fgsm" not in wb:
        return None
    gap = wb["fgsm"] - wb["pgd"]
    return {
        "claim": "single-step robustness holds up under PGD (later work: it often does not)",
        "net": name,
        "verdict": "not supported" if gap > 0.1 else "supported",
        "text": f"white-box {NORM_LABEL[norm]} single-step {pct(wb['fgsm'])}% vs PGD {pct(wb['pgd'])}% (gap {pct(gap)} pt)",
    }


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every claim for every non-baseline net, computed from ``results['nets']``."""
    nets, sets, out = results["nets"], results["transfer_sets"], []
    for name in nets:
        if name.rpartition("/")[2] == "baseline":
            continue
        out.append(claim_transfer(name, nets, sets))
        out.extend(claim_harder(name, nets))
        out.append(claim_clean(name, nets, results.get("n_test", 10000)))
        caveat = caveat_masking(name, nets)
        if caveat:
            out.append(caveat)
    return out
