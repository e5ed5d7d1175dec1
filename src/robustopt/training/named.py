"""Named configurations: the model and data a :class:`TrainConfig` names, trained with :func:`robustopt.fit`.

This is the edge where names (a built-in dataset, ``--data PATH``, a built-in net or a
``package.module:factory``) become objects; below it, :func:`~robustopt.training.loop.run_fit`
sees a module and tensors like any user's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from robustopt.data.augment import default_augment
from robustopt.data.datasets import load_dataset
from robustopt.models import build, is_factory_spec
from robustopt.threat.model import ThreatModel
from robustopt.training.config import TrainConfig
from robustopt.training.loop import FitSummary, run_fit, stderr_log
from robustopt.training.monitor import Log


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    data_dir: str | Path | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Log | None = None,
) -> FitSummary:
    """Train the model and data ``cfg`` names (built-in, factory or file); returns the :class:`FitSummary`.

    The threat is ``cfg.norm`` / ``cfg.eps`` (defaults linf, 0.1), converted to pixels with the data's σ
    for ``eps_units="standardized"``; config.json records it in pixels."""
    data = load_dataset(cfg.data or cfg.dataset, data_dir).subset(cfg.subset)
    threat = ThreatModel(cfg.threat_norm, cfg.pixel_eps_for(data.std))
    cfg = dataclasses.replace(cfg, norm=threat.norm, eps=threat.eps, eps_units="pixel")
    torch.manual_seed(cfg.seed)  # the initial weights
    builtin = not is_factory_spec(cfg.model)
    model = build(cfg.model, cfg.model_kwargs, mean=data.mean, std=data.std, num_classes=data.num_classes,
                  input_shape=data.input_shape)  # fmt: skip
    meta = {
        "dataset": data.name,  # a built-in name, or the absolute path of the user's data
        "num_classes": data.num_classes,
        "normalization": {"mean": list(data.mean), "std": list(data.std)} if builtin else None,  # only where applied
        "augment_default": default_augment(data.kind, tuple(data.input_shape)),
        "kind": data.kind,
        "class_names": list(data.class_names) if data.class_names else None,
    }
    test = (data.x_test[: cfg.test_subset], data.y_test[: cfg.test_subset])  # [:None] is all of them
    options = {"optimizer": None, "scheduler": None, "scheduler_interval": "epoch"}
    return run_fit(model, (data.x_train, data.y_train), test, cfg, threat, out, options, device=device, resume=resume,
                   overwrite=overwrite, progress=progress, log=log or stderr_log, meta=meta)  # fmt: skip
