"""Certified local stability: provable lower bounds on robust accuracy (IBP, CROWN, randomized smoothing).

Attacks give an upper bound on robust accuracy; :func:`certify` gives a guaranteed lower bound.
Certified training losses (IBP, CROWN-IBP, Gaussian noise) are in :mod:`robustopt.certify.training`.
"""

from robustopt.certify.core import BOUND_METHODS, METHODS, CertifyResult, certify, check_supported, margin_bounds
from robustopt.certify.layers import Residual

__all__ = ["BOUND_METHODS", "METHODS", "CertifyResult", "Residual", "certify", "check_supported", "margin_bounds"]
