"""Certified accuracy against ε: the guaranteed lower bound (verified) next to an attack's upper bound (matplotlib, Agg).

:func:`certified_curve_plot` draws one panel per norm and one colour per model: a solid line with dots for the
verified accuracy, a dashed line for the attacked accuracy at the same ε, and the gap between them shaded (robust
accuracy lies somewhere in the shaded band). The PNG is written atomically (:func:`robustopt.files.save_figure`).
The curves come from :func:`robustopt.evaluation.report.certified_curve` or any dict of the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustopt.files import save_figure

NORM_LABEL = {"linf": "ℓ∞", "l2": "ℓ2", "l1": "ℓ1"}
DPI = 90


def certified_curve_plot(
    panels: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path, *, title: str = "", dpi: int = DPI
) -> Path:
    """Write the PNG and return its path.

    Args:
        panels: ``{norm: {label: curve}}``; a curve has ``eps`` (list), ``verified`` (list of fractions), optionally
            ``attacked`` (list, entries may be None), ``method`` and ``attack`` (names for the legend).
        path: the PNG file; title: above the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.6 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (norm, curves) in zip(axes[0], panels.items(), strict=False):
        for i, (label, c) in enumerate(curves.items()):
            _draw(ax, f"C{i % 10}", label if len(curves) > 1 else "", c)
        ax.set_xlabel(f"{NORM_LABEL.get(norm, norm)} ε (pixel units)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return save_figure(fig, Path(path), dpi=dpi)
    finally:
        plt.close(fig)


def _draw(ax: Any, colour: str, label: str, c: Mapping[str, Any]) -> None:
    """One model's verified (solid) and attacked (dashed) curves, the gap between them shaded."""
    eps = [float(e) for e in c["eps"]]
    ver = [100 * float(v) for v in c["verified"]]
    prefix = f"{label}: " if label else ""
    ax.plot(eps, ver, color=colour, marker="o", ms=3, label=f"{prefix}verified ({c.get('method', 'certified')})")
    pairs = [(e, 100 * float(a)) for e, a in zip(eps, c.get("attacked") or [], strict=False) if a is not None]
    if pairs:
        ax.plot([e for e, _ in pairs], [a for _, a in pairs], color=colour, ls="--", marker="x", ms=3,
                label=f"{prefix}{c.get('attack') or 'attack'} (upper bound)")  # fmt: skip
        lower = [v for e, v in zip(eps, ver, strict=True) if e in {p for p, _ in pairs}]
        if len(lower) == len(pairs):
            ax.fill_between([e for e, _ in pairs], lower, [a for _, a in pairs], color=colour, alpha=0.12)
