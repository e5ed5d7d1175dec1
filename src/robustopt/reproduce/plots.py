"""The reproduce plots (matplotlib, Agg backend, small PNGs).

* ``accuracy_vs_eps.png``: white-box PGD accuracy against ε, one panel per norm, one line per net;
* ``minimal_perturbations.png``: the empirical CDF of DeepFool's minimal perturbation sizes per net
  (a curve further right = adversarial examples need larger perturbations: the paper's "harder to generate");
* ``examples.png``: clean test images and each net's own white-box PGD adversarial examples, with predictions.
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
from robustopt.reproduce.claims import NORM_LABEL  # noqa: E402

DPI = 90


def accuracy_vs_eps(results: dict[str, Any], path: Path) -> None:
    """One panel per norm: PGD accuracy (%) against ε in pixel units, one line per net; dotted = training radius."""
    nets = results["nets"]
    norms = list(next(iter(nets.values()))["eval"]["curves"])
    fig, axes = plt.subplots(1, len(norms), figsize=(4.2 * len(norms), 3.4), squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=True):
        for name, net in nets.items():
            pts = np.array(net["eval"]["curves"][norm])
            ax.plot(pts[:, 0], 100 * pts[:, 1], marker="o", ms=3, label=name)
        if norm in results["radii"]:
            ax.axvline(results["radii"][norm]["pixel"], color="grey", ls=":", lw=1)
        ax.set_xlabel(f"{NORM_LABEL[norm]} ε (pixel units)")
        ax.set_ylabel("white-box PGD accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def minimal_cdf(results: dict[str, Any], evals: dict[str, Any], path: Path) -> None:
    """Empirical CDF of DeepFool minimal distances per net, one panel per norm (failures never reach 1)."""
    norms = list(next(iter(evals.values()))["minimal"])
    fig, axes = plt.subplots(1, len(norms), figsize=(4.6 * len(norms), 3.4), squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=True):
        for name in results["nets"]:
            d = np.array([math.inf if v is None else v for v in evals[name]["minimal"][norm]["dists"]], dtype=float)
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
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _show(ax: Any, img: np.ndarray, title: str, wrong: bool) -> None:
    """img (C, H, W) in [0, 1]."""
    ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=7, color="red" if wrong else "black")
    ax.set_xticks([])
    ax.set_yticks([])


def examples_grid(results: dict[str, Any], examples: dict[str, dict[str, Any]], data: Dataset, path: Path) -> None:
    """Row 0: clean images with labels; then per net its PGD adversarial images with its prediction (red = fooled)."""
    names = [n for n in results["nets"] if n in examples]
    k = min(len(examples[n]["pred"]) for n in names)
    x = to_float(data.x_test[:k]).numpy()
    y = data.y_test[:k].numpy()
    fig, axes = plt.subplots(len(names) + 1, k, figsize=(0.8 * k + 1.0, 0.85 * (len(names) + 1)), squeeze=False)
    for j in range(k):
        _show(axes[0][j], x[j], f"label {y[j]}", False)
        for i, name in enumerate(names, 1):
            pred = int(examples[name]["pred"][j])
            _show(axes[i][j], examples[name]["x_adv"][j].cpu().numpy(), f"→ {pred}", pred != y[j])
    axes[0][0].set_ylabel("clean", fontsize=7)
    for i, name in enumerate(names, 1):
        eps = float(examples[name]["eps"])
        axes[i][0].set_ylabel(f"{name}\nε={eps:.3g}", fontsize=6)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def make_plots(results: dict[str, Any], evals: dict[str, Any], out: Path, data: Dataset) -> list[str]:
    """Write the three PNGs into ``out``; returns their file names."""
    from robustopt.errors import CheckpointError
    from robustopt.runs import load_tensors

    accuracy_vs_eps(results, out / "accuracy_vs_eps.png")
    minimal_cdf(results, evals, out / "minimal_perturbations.png")
    examples = {}
    for name in results["nets"]:
        try:
            examples[name], _ = load_tensors(out / "eval" / f"{name.replace('/', '-')}.examples.safetensors")
        except CheckpointError:
            continue
    names = ["accuracy_vs_eps.png", "minimal_perturbations.png"]
    if examples:
        examples_grid(results, examples, data, out / "examples.png")
        names.append("examples.png")
    return names
