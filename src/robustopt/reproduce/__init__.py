"""Reproduction of the paper's experiments: plans, the evaluation protocol, claims, report and plots."""
