"""robustopt: robust optimisation (adversarial training) for local stability of neural nets.

Implements Shaham, Yamada & Negahban, *Understanding Adversarial Training: Increasing Local
Stability of Neural Nets through Robust Optimization* (arXiv 1511.05432), and its relatives.
"""

from __future__ import annotations

from robustopt.certify import CertifyResult, certify  # noqa: E402
from robustopt.errors import CheckpointError, ConfigError, DataError, RobustoptError, RunDirError  # noqa: E402
from robustopt.evaluation.attacks import attack_options, run_attack  # noqa: E402
from robustopt.evaluation.evaluate import EvalResult, evaluate  # noqa: E402
from robustopt.evaluation.stability import minimal_perturbations  # noqa: E402
from robustopt.loading import load_model, load_pretrained  # noqa: E402
from robustopt.models.zoo import Normalized  # noqa: E402
from robustopt.threat.model import ThreatModel  # noqa: E402
from robustopt.threat.perturb import perturb, preserve_state  # noqa: E402
from robustopt.training.config import TrainConfig  # noqa: E402
from robustopt.training.loop import FitSummary, fit  # noqa: E402
from robustopt.training.named import train  # noqa: E402
from robustopt.training.objectives import robust_loss  # noqa: E402
from robustopt.version import __version__  # noqa: E402

__all__ = [
    "CertifyResult",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EvalResult",
    "FitSummary",
    "Normalized",
    "RobustoptError",
    "RunDirError",
    "ThreatModel",
    "TrainConfig",
    "__version__",
    "attack_options",
    "certify",
    "evaluate",
    "fit",
    "load_model",
    "load_pretrained",
    "minimal_perturbations",
    "perturb",
    "preserve_state",
    "robust_loss",
    "run_attack",
    "train",
]
