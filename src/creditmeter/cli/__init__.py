"""The ``creditmeter`` command: see and change balances without writing Python.

``creditmeter [--store URL] [--config PATH] [--json] COMMAND ...`` with the
commands ``balance``, ``list``, ``grant``, ``set``, ``refill``,
``refill-settings``, ``expire``, ``ledger``, ``export``, ``usage``,
``price``, ``demo`` and ``serve``. The store
is opened with ``open_store`` and the config built with ``load_config`` (the
legacy environment variables, then the YAML file's ``balance:`` section), as
LibreChat builds it. Output is a rich table for people, or JSON with
``--json``; amounts in JSON and CSV are exact decimal strings with no trailing
zeros (``format.plain``). ``grant`` and ``set`` warn on stderr when no config
was given, since balances are then disabled.

Needs the ``[cli]`` extra (click and rich). The parts:

- ``session``: what the global options chose (``Session``), opened lazily;
- ``commands``: the click group and one function per command;
- ``run``: ``main()``, the exit statuses and the one-line errors;
- ``format``: argument types and every way of showing what was found;
- ``plot``: ``usage --plot``, drawn with matplotlib (the ``[plot]`` extra), imported lazily;
- ``demo``: ``creditmeter demo``, a simulated gateway end to end;
- ``serve``: ``creditmeter serve``, the web console and JSON API (the ``[server]`` extra).
"""

from __future__ import annotations

import sys

try:  # the console script imports this package before it can call main(): say it here
    import click  # noqa: F401 - only checked for here
    import rich  # noqa: F401 - only checked for here
except ImportError as _missing:  # pragma: no cover - tested in a subprocess without click
    sys.stderr.write(
        f"creditmeter: the command needs {(_missing.name or 'click').partition('.')[0]}: "
        "pip install 'creditmeter[cli]'\n"
    )
    raise SystemExit(1) from None

from creditmeter.cli.commands import cli
from creditmeter.cli.run import main
from creditmeter.cli.session import DEFAULT_STORE, NO_CONFIG_WARNING

__all__ = ["DEFAULT_STORE", "NO_CONFIG_WARNING", "cli", "main"]
