"""The reproduce plots (matplotlib, Agg backend, small PNGs).

* ``accuracy_vs_eps.png``: white-box PGD accuracy against ε, one panel per norm, one line per net;
* ``minimal_perturbations.png``: the empirical CDF of DeepFool's minimal perturbation sizes per net
  (a curve further right = adversarial examples need larger perturbations: the paper's "harder to generate");
* ``examples.png``: test images where the nets disagree, each net attacked by its own white-box PGD in its training
  norm, with predictions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from robustopt.data.datasets import Dataset, to_float  # noqa: E402
from robustopt.files import save_figure
from robustopt.reproduce.claims import NORM_LABEL  # noqa: E402
from robustopt.reproduce.seeds import at  # noqa: E402

DPI = 90


def _seeds_note(results: dict[str, Any]) -> str:
    k = len(results.get("seeds") or [1])
    return f", mean ± std over {k} seeds" if k > 1 else ""


def accuracy_vs_eps(results: dict[str, Any], path: Path) -> None:
    """One panel per norm: PGD accuracy (%) against ε in pixel units, one line per net (a band: ± std over seeds);
    dotted = the training radius. The title says the attack, its steps and the number of images; one legend below."""
    nets, s = results["nets"], results["schedule"]
    norms = list(next(iter(nets.values()))["eval"]["curves"])
    fig, axes = plt.subplots(1, len(norms), figsize=(4.2 * len(norms), 3.6), squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=True):
        for name, net in nets.items():
            pts = np.array(net["eval"]["curves"][norm], dtype=float)
            (line,) = ax.plot(pts[:, 0], 100 * pts[:, 1], marker="o", ms=3, label=name)
            sd = at(net.get("std"), "eval", "curves", norm)
            if sd is not None:
                band = 100 * np.array([[0.0 if v is None else v for v in row] for row in sd], dtype=float)[:, 1]
                ax.fill_between(pts[:, 0], 100 * pts[:, 1] - band, 100 * pts[:, 1] + band, color=line.get_color(), alpha=0.2)
        if norm in results["radii"]:
            ax.axvline(results["radii"][norm]["pixel"], color="grey", ls=":", lw=1, label="training radius")
        ax.set_title(f"{NORM_LABEL[norm]}", fontsize=9)
        ax.set_xlabel(f"{NORM_LABEL[norm]} ε (pixel units)")
        ax.set_ylabel("white-box PGD accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    handles, labels = {}, []
    for ax in axes[0]:  # one legend for every panel: each net once, the dotted line once
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    labels = list(handles)
    fig.suptitle(
        f"White-box PGD-{s['curve_steps']} (1 restart) on the first {s['curve_n']} test images{_seeds_note(results)}",
        fontsize=9,
    )
    fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=min(len(labels), 4), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 0.95))
    save_figure(fig, path, dpi=DPI)
    plt.close(fig)


def minimal_cdf(results: dict[str, Any], path: Path) -> None:
    """Empirical CDF of DeepFool minimal distances per net, one panel per norm (failures never reach 1); with several
    seeds the images of every seed are pooled."""
    nets = results["nets"]
    norms = list(next(iter(nets.values()))["eval"]["minimal"])
    fig, axes = plt.subplots(1, len(norms), figsize=(4.6 * len(norms), 3.4), squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=True):
        for name, net in nets.items():
            dists = net["eval"]["minimal"][norm].get("dists") or []
            d = np.array([math.inf if v is None else v for v in dists], dtype=float)
            if len(d) == 0:
                continue
            found = np.sort(d[np.isfinite(d)])
            ax.step(found, np.arange(1, len(found) + 1) / len(d), where="post", label=name)
        ax.set_xlabel(f"minimal {NORM_LABEL[norm]} perturbation (DeepFool, pixel units)")
        ax.set_ylabel("fraction of images fooled")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=DPI)
    plt.close(fig)


def _show(ax: Any, img: np.ndarray, title: str, wrong: bool) -> None:
    """img (C, H, W) in [0, 1]."""
    ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=7, color="red" if wrong else "black")
    ax.set_xticks([])
    ax.set_yticks([])


def disagreements(correct: np.ndarray, k: int) -> tuple[np.ndarray, bool]:
    """Up to ``k`` columns of ``correct`` (nets × images, bool) where the nets disagree (some fooled, some not);
    the first ``k`` images when they never do. Returns (indices, whether they disagree)."""
    split = correct.any(0) & ~correct.all(0)
    idx = np.flatnonzero(split)[:k]
    return (idx, True) if len(idx) else (np.arange(min(k, correct.shape[1])), False)


def examples_grid(
    results: dict[str, Any], examples: dict[str, tuple[dict[str, Any], dict[str, Any]]], data: Dataset, path: Path
) -> None:
    """Row 0: clean test images with labels; then per net its own white-box attack (its training norm and radius) with
    its prediction (red = fooled). The columns are images where the nets disagree, picked from each net's pool."""
    names = [n for n in results["nets"] if n in examples]
    pool = min(len(examples[n][0]["pred"]) for n in names)
    y = data.y_test[:pool].numpy()
    preds = np.stack([examples[n][0]["pred"][:pool].cpu().numpy() for n in names])
    cols, disagree = disagreements(preds == y[None], max(results["schedule"]["examples"], 1))
    x = to_float(data.x_test[:pool]).numpy()
    size = (0.8 * len(cols) + 1.4, 0.85 * (len(names) + 1) + 0.4)
    fig, axes = plt.subplots(len(names) + 1, len(cols), figsize=size, squeeze=False)
    for j, c in enumerate(cols):
        _show(axes[0][j], x[c], f"label {y[c]}", False)
        for i, name in enumerate(names, 1):
            pred = int(preds[i - 1][c])
            _show(axes[i][j], examples[name][0]["x_adv"][c].cpu().numpy(), f"→ {pred}", pred != y[c])
    axes[0][0].set_ylabel("clean", fontsize=7)
    for i, name in enumerate(names, 1):
        about = examples[name][1]
        eps = about.get("eps", float(examples[name][0]["eps"]))
        attack = f"{about.get('attack', 'PGD')} {NORM_LABEL.get(about.get('norm'), '')}".strip()
        axes[i][0].set_ylabel(f"{name}\n{attack} ε={eps:.3g}", fontsize=6)
    what = "where the nets disagree" if disagree else "(the nets agree on every pooled image)"
    fig.suptitle(f"Each net's own white-box attack; test images {what}; red = fooled", fontsize=7)
    fig.tight_layout(pad=0.3)
    save_figure(fig, path, dpi=72)
    plt.close(fig)


def certified_vs_eps(results: dict[str, Any], path: Path) -> bool:
    """IBP verified accuracy against ε beside each net's PGD curve (same ε, same images); False when nothing was certified."""
    from robustopt.certify.plots import certified_curve_plot

    s, panels = results["schedule"], {}
    for name, net in results["nets"].items():
        for norm, ver in (net["eval"].get("curves_verified") or {}).items():
            pgd = net["eval"]["curves"][norm]
            if ver and len(ver) == len(pgd):
                curve = {"eps": [e for e, _ in ver], "verified": [v for _, v in ver], "attacked": [a for _, a in pgd]}
                panels.setdefault(norm, {})[name] = {**curve, "method": "IBP", "attack": f"PGD-{s['curve_steps']}"}
    if not panels:
        return False
    title = f"Verified (IBP, lower bound) and white-box PGD-{s['curve_steps']} (upper bound), first {s['curve_n']} test images"
    certified_curve_plot(panels, path, title=title + _seeds_note(results), dpi=DPI)
    return True


def make_plots(results: dict[str, Any], out: Path, data: Dataset) -> list[str]:
    """Write the three PNGs into ``out``; returns their file names."""
    from robustopt.errors import CheckpointError
    from robustopt.tensors import load_tensors

    accuracy_vs_eps(results, out / "accuracy_vs_eps.png")
    minimal_cdf(results, out / "minimal_perturbations.png")
    examples = {}
    for name in results["nets"]:
        try:
            examples[name] = load_tensors(out / "eval" / f"{name.replace('/', '-')}.examples.safetensors")
        except CheckpointError:
            continue
    names = ["accuracy_vs_eps.png", "minimal_perturbations.png"]
    if certified_vs_eps(results, out / "certified_vs_eps.png"):
        names.append("certified_vs_eps.png")
    if examples and results["schedule"]["examples"] > 0:
        examples_grid(results, examples, data, out / "examples.png")
        names.append("examples.png")
    return names
