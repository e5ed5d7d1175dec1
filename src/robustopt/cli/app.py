"""The ``robustopt`` command line.

Commands live in :mod:`robustopt.cli.commands`: each module there has ``register(app)``. This
module only builds the app and turns errors into one clear line and a non-zero exit
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from robustopt.cli import commands
from robustopt.errors import ConfigError, RobustoptError, one_line

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


def _what_is_kept(args: list[str]) -> str:
    """What an interrupted command leaves behind, and how to go on, in the words of that command."""
    command = next((a for a in args if not a.startswith("-")), "")
    if command == "train":
        return "finished epochs and checkpoints are kept (use --resume)"
    if command == "reproduce":
        return "finished runs are kept; the same command continues from them"
    if command == "evaluate":
        return "with --partial FILE, finished batches are kept and the same command continues from them"
    return "nothing was left half-written"


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. Not a KeyboardInterrupt: typer turns those into a silent exit 130 before :func:`main` sees them."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_raise_interrupted() -> Iterator[None]:
    """While the app runs, SIGINT (Ctrl-C) and SIGTERM (``kill``, a batch scheduler's time limit) raise
    :class:`Interrupted`, so ``finally`` blocks and the run lock unwind as for Ctrl-C and the user is told
    how to go on. Only the main thread may set handlers."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


PATH_OPTIONS = ("--out", "--data-dir", "--config", "--partial", "--source", "--dest", "--compare")


def check_path_options(args: list[str]) -> None:
    """Refuse an empty path option: click turns ``--out ""`` into ``.``, the current directory."""
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        given = value if eq else args[i + 1] if i + 1 < len(args) else None
        if name in PATH_OPTIONS and given is not None and not given.strip():
            raise ConfigError(f"{name} is empty; give it a path (an empty path would mean the current directory)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, mapping every failure to a one-line message and exit code.

    A torchrun worker leaves with ``os._exit`` once its command has returned (files written, process
    group destroyed): gloo's background threads are still joinable when C++ static destructors run at
    interpreter exit, which aborted a rank with SIGABRT ("terminate called without an active
    exception") or left it hanging in about 1 of 20 torchrun test runs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv is None:
        from robustopt.training import distributed

        distributed.HARD_EXIT = True
    try:
        _main(argv)
    except SystemExit as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv is None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        raise
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _main(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("ROBUSTOPT_DEBUG") == "1"
    try:
        check_path_options(args)
        with _signals_raise_interrupted():
            app(args=args, prog_name="robustopt")  # usage errors: click prints usage and exits 2
    except RobustoptError as e:
        if debug:
            traceback.print_exc()
        print(f"robustopt: error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # the environment: permission denied, disk full, a path that is a file
        if debug:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"robustopt: error: {one_line(e.strerror or str(e))}{where}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"robustopt: {how}; {_what_is_kept(args)}", file=sys.stderr)
        sys.exit(128 + signum)
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a bare traceback
        if debug:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"robustopt: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
