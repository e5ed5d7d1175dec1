"""The command line: :mod:`robustopt.cli.app` builds the app; one module per command in ``commands``."""

from robustopt.cli.app import app, main

__all__ = ["app", "main"]
