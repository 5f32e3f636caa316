"""What the ``creditmeter`` command's global options chose, and the helpers every command uses.

A ``Session`` is made by the command group from ``--store``, ``--config`` and
``--json``; it opens the config and the store only when a command first needs
them, and closes the store when the command ends. Passwords in store URLs are
remembered here (``scrub``) so no error message repeats one, whatever wrote it.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.text import Text

from creditmeter import _validate, rules
from creditmeter._urls import passwords, redact
from creditmeter.cli import format as fmt
from creditmeter.config import BalanceConfig, load_config
from creditmeter.exceptions import ConfigError, CreditMeterError
from creditmeter.manager import BalanceManager
from creditmeter.models import Account
from creditmeter.stores import BalanceStore, open_store

__all__ = [
    "DEFAULT_STORE",
    "NO_CONFIG_WARNING",
    "Session",
    "json_option",
    "open_url",
    "pass_session",
    "scrub",
    "usage_error",
]

DEFAULT_STORE = "sqlite:///./creditmeter.db"
NO_CONFIG_WARNING = (
    "creditmeter: warning: balances are disabled because no config was given: accounts open "
    "at 0 and charges move no credits; give one with --config PATH (or CREDITMETER_CONFIG), "
    "or set CHECK_BALANCE=true"
)
_JSON_KEY = "creditmeter.json"
_F = TypeVar("_F", bound=Callable[..., Any])
_SECRETS: set[str] = set()  # passwords in store URLs, kept out of error messages


class Session:
    """What the global options chose; the config and store are opened on first use."""

    def __init__(self, ctx: click.Context, store_url: str, config_path: str | None) -> None:
        source = ctx.get_parameter_source("store_url")
        self.ctx = ctx
        self.store_url = store_url
        self.config_path = config_path
        _SECRETS.update(passwords(store_url))
        # Typed on the command line: repeat it in suggested commands, and the demo may use
        # it (CREDITMETER_STORE is the operator's real store: the demo never touches it).
        self.store_typed = source is click.core.ParameterSource.COMMANDLINE
        self._config: BalanceConfig | None = None
        self._manager: BalanceManager | None = None
        self._console: Console | None = None

    @property
    def json(self) -> bool:
        """Whether ``--json`` was given, before or after the command name."""
        return bool(self.ctx.meta.get(_JSON_KEY))

    @property
    def config(self) -> BalanceConfig:
        """``load_config(--config, os.environ)``, built once."""
        if self._config is None:
            self._config = load_config(self.config_path, os.environ)
        return self._config

    @property
    def manager(self) -> BalanceManager:
        """A manager over the store ``--store`` names, opened once and closed at exit."""
        if self._manager is None:
            config = self.config  # a bad config is reported before a store file is created
            manager = BalanceManager(open_url(self.store_url), config)
            self.ctx.call_on_close(manager.close)
            self._manager = manager
        return self._manager

    @property
    def console(self) -> Console:
        """The console people read."""
        if self._console is None:
            self._console = fmt.console()
        return self._console

    def warn_if_balances_off(self) -> None:
        """Say on stderr that balances are off when no config turned them on or off."""
        given = self.config_path is not None or "CHECK_BALANCE" in os.environ
        if not given and not self.config.enabled:
            click.echo(NO_CONFIG_WARNING, err=True)

    def now(self) -> datetime:
        """The manager's clock."""
        return self.manager.clock()

    def show(self, plain: object, human: Callable[[], object]) -> None:
        """Print ``plain`` as JSON with ``--json``, else what ``human()`` renders.

        ``human()`` returns a renderable, a str, or a list of them; text is not
        wrapped, so a suggested command stays on one line to copy.
        """
        if self.json:
            click.echo(fmt.dumps(plain))
            return
        shown = human()
        for item in shown if isinstance(shown, list) else [shown]:
            text = isinstance(item, (str, Text))
            self.console.print(Text(item) if isinstance(item, str) else item, soft_wrap=text)

    def account(self, user_id: str) -> Account:
        """The user's stored account (open holds only); an error if the user has none."""
        user_id = _validate.user_id(user_id)
        account = self.manager.store.load(user_id)
        if account is None:
            raise click.ClickException(
                f"user {user_id!r} has no account in {redact(self.store_url)}; "
                "'creditmeter grant' or 'creditmeter set' opens one"
            )
        return rules.open_holds(account, self.now())

    def command(self, *words: str) -> str:
        """A command line to suggest, with ``--store`` if it was typed."""
        store = f" --store {shlex.quote(redact(self.store_url))}" if self.store_typed else ""
        return f"creditmeter{store} {' '.join(words)}"


pass_session = click.make_pass_decorator(Session)


def open_url(url: str) -> BalanceStore:
    """``open_store(url)``; a URL too malformed to parse is a ``ConfigError``, not a traceback."""
    try:
        return open_store(url)
    except CreditMeterError:
        raise
    except ValueError as exc:  # urlsplit's "Invalid IPv6 URL" and the like, from a driver
        raise ConfigError(f"bad store URL {redact(url)!r}: {exc}") from None


def _want_json(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_JSON_KEY] = True


def json_option(function: _F) -> _F:
    """``--json``, accepted before the command name and after it."""
    option = click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        callback=_want_json,
        help="Print machine-readable JSON (amounts as exact decimal strings).",
    )
    return option(function)


def usage_error(message: str) -> NoReturn:
    """End the command with a usage error (exit status 2)."""
    raise click.UsageError(message, click.get_current_context())


def scrub(message: str) -> str:
    """``message`` with every password seen in a store URL replaced by ``***``."""
    for secret in _SECRETS:
        message = message.replace(secret, "***")
    return message
