"""Mean ± std over seeds, airbench style: every figure of a reproduce run summarised over K training seeds.

A reproduce run with ``seeds = K`` trains and evaluates every net K times (seeds ``seed … seed+K-1``), each
replica exactly as a single-seed run. :func:`mean_std` folds the K results trees (nested dicts and lists of
the same shape) into two trees of that shape: the mean and the sample standard deviation (``ddof = 1``) of
every number. Strings, booleans and ``None`` are taken from the first seed; the per-image DeepFool distance
lists (``dists``) are pooled, since the bootstrap of :mod:`robustopt.reproduce.claims` resamples images.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

POOLED = {"dists"}  # per-image lists: concatenated over seeds, not averaged


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mean_std_numbers(values: list[float | int]) -> tuple[float | int, float | None]:
    """The mean (the value itself, type kept, when all agree) and the std (None for a single value)."""
    spread = statistics.stdev(values) if len(values) > 1 and all(math.isfinite(v) for v in values) else None
    if all(v == values[0] for v in values):
        return values[0], spread
    finite = [float(v) for v in values if math.isfinite(v)]
    return (statistics.fmean(finite) if finite else float(values[0])), spread


def mean_std(trees: list[Any]) -> tuple[Any, Any]:
    """(mean tree, std tree) of K trees of one shape; a number's std is None for K = 1.

    >>> mean_std([{"acc": 0.98, "curve": [[0, 0.9]]}, {"acc": 0.99, "curve": [[0, 0.8]]}])[0]["acc"]
    0.985
    """
    first = trees[0]
    if _is_number(first) and all(_is_number(t) for t in trees):
        return _mean_std_numbers(trees)
    if isinstance(first, dict):
        mean, std = {}, {}
        for key in first:
            if key in POOLED:
                mean[key] = [v for t in trees for v in t.get(key, [])]
                continue
            mean[key], std[key] = mean_std([t[key] for t in trees if key in t])
        return mean, std
    if isinstance(first, (list, tuple)) and all(isinstance(t, (list, tuple)) and len(t) == len(first) for t in trees):
        pairs = [mean_std([t[i] for t in trees]) for i in range(len(first))]
        return [m for m, _ in pairs], [s for _, s in pairs]
    return first, None


def combine_seeds(replicas: list[tuple[int, dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Per net: the mean over seeds of every figure, its std under ``std`` (several seeds only) and each run under ``runs``.

    ``replicas`` holds (seed, training info per net, evaluation per net) for every seed."""
    per_seed = [
        {name: {**info[name], "eval": {k: v for k, v in evals[name].items() if k != "key"}} for name in info}
        for _, info, evals in replicas
    ]
    nets = {}
    for name in per_seed[0]:
        trees = [p[name] for p in per_seed]
        mean, std = mean_std(trees)
        mean["runs"] = [
            {
                "seed": t["seed"],
                "status": t["status"],
                "run_dir": t["run_dir"],
                "test_acc": t["test_acc"],
                "clean": t["eval"]["clean"],
                "train_seconds": t["train_seconds"],
                "eval_seconds": t["eval"].get("eval_seconds"),
            }
            for t in trees
        ]
        if len(trees) > 1:
            mean["std"] = std
        nets[name] = mean
    return nets


def plus_minus(mean: float | None, std: float | None, digits: int = 1, scale: float = 100.0) -> str:
    """``98.7 ± 0.1`` (in % by default); just the mean when there is no spread (one seed: std None)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def at(tree: Any, *path: Any) -> Any:
    """``tree[p0][p1]…``, or None where the path does not exist (e.g. no std tree for one seed)."""
    for key in path:
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def cell(net: dict[str, Any], *path: Any, digits: int = 1, scale: float = 100.0) -> str:
    """One table cell: the mean at ``path`` in a net's results, ± its std over seeds when there are several."""
    return plus_minus(at(net, *path), at(net.get("std"), *path), digits, scale)
