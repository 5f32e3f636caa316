"""``main()``: run the ``creditmeter`` command and turn every way it ends into an exit status.

0 when it worked (or the reader of its output went away early:
``creditmeter export | head``), 1 for a creditmeter error (bad amount or user
id, bad store URL, unreadable config, corrupt store) or a failed command, 2
for a usage error, 130 when interrupted. An error is one line on stderr,
with any password from the store URL hidden.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from creditmeter.cli.commands import cli
from creditmeter.cli.session import scrub
from creditmeter.exceptions import CreditMeterError

__all__ = ["main"]


def _fail(message: str, code: int) -> int:
    click.echo(f"creditmeter: error: {' '.join(scrub(message).split())}", err=True)
    return code


def _invoke(args: list[str]) -> object:
    """Run the command as ``cli.main(standalone_mode=False)`` does, minus its EPIPE handling.

    click turns a closed stdout into exit status 1 inside ``main``; here the
    ``BrokenPipeError`` reaches ``main()`` below, which ends quietly with 0.
    """
    if os.environ.get("_CREDITMETER_COMPLETE"):  # shell completion: click answers and exits
        cli.main(args=args, prog_name="creditmeter")
    try:
        with cli.make_context("creditmeter", args) as ctx:
            return cli.invoke(ctx)
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so flushing what is left at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # no real file behind sys.stdout
        pass


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command and exit: 0, 1 (an error) or 2 (a usage error), one line on stderr."""
    try:
        result = _invoke(list(sys.argv[1:] if argv is None else argv))
    except click.exceptions.NoArgsIsHelpError as exc:  # bare "creditmeter": the help
        exc.show()
        code = exc.exit_code
    except click.UsageError as exc:
        hint = "" if exc.ctx is None else f" (see '{exc.ctx.command_path} --help')"
        code = _fail(exc.format_message() + hint, exc.exit_code)
    except click.ClickException as exc:
        code = _fail(exc.format_message(), exc.exit_code)
    except CreditMeterError as exc:  # every mistake the library names, in one place
        code = _fail(str(exc), 1)
    except (click.Abort, KeyboardInterrupt):
        code = _fail("interrupted", 130)
    except BrokenPipeError:  # the reader went away (creditmeter export | head): not an error
        _quiet_stdout()
        code = 0
    else:
        code = result if isinstance(result, int) else 0
    sys.exit(code)
