"""Evaluation: attacks, the evaluator that enforces the threat model, sanity checks, stability measures."""
