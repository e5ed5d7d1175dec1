"""The ``robustopt`` command line.

Commands live in :mod:`robustopt.cli.commands`: each module there has ``register(app)``. This
module only builds the app and turns errors into one clear line and a non-zero exit
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import traceback

import typer

from robustopt.cli import commands
from robustopt.errors import RobustoptError

app = typer.Typer(
    name="robustopt",
    help="Robust optimisation (adversarial training) and honest robustness evaluation for PyTorch classifiers.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """robustopt: make classifiers locally stable, and measure it honestly."""
    if debug:
        os.environ["ROBUSTOPT_DEBUG"] = "1"


for _mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
    importlib.import_module(f"robustopt.cli.commands.{_mod}").register(app)


def _one_line(message: str) -> str:
    """Join a message's lines, so that every error is exactly one line on stderr."""
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip())


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, mapping every failure to a one-line message and exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("ROBUSTOPT_DEBUG") == "1"
    try:
        app(args=args, prog_name="robustopt")  # usage errors: click prints usage and exits 2
    except RobustoptError as e:
        if debug:
            traceback.print_exc()
        print(f"robustopt: error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # the environment: permission denied, disk full, a path that is a file
        if debug:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"robustopt: error: {_one_line(e.strerror or str(e))}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("robustopt: interrupted; finished epochs and checkpoints are kept (use --resume)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a bare traceback
        if debug:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"robustopt: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
