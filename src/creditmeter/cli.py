"""The ``creditmeter`` command: see and change balances without writing Python.

``creditmeter [--store URL] [--config PATH] [--json] COMMAND ...`` with the
commands ``balance``, ``list``, ``grant``, ``set``, ``refill``,
``refill-settings``, ``ledger``, ``export``, ``price`` and ``demo``. The store
is opened with ``open_store`` and the config built with ``load_config`` (the
legacy environment variables, then the YAML file's ``balance:`` section), as
LibreChat builds it. Output is a rich table for people, or JSON with
``--json``; amounts in JSON and CSV are exact decimal strings with no trailing
zeros (``_cli_format.plain``).

Reading commands never open an account; ``grant``, ``set`` and
``refill-settings`` do, as a first charge would. ``grant`` and ``set`` warn
on stderr when no config was given, since balances are then disabled.

Errors end the command with one line on stderr: exit status 1 for a
creditmeter error (bad amount or user id, bad store URL, unreadable config,
corrupt store) or a failed command, 2 for a usage error. A reader that goes
away early (``creditmeter export | head``) ends the command quietly, status 0.
Needs the ``[cli]`` extra (click and rich); helpers are in ``_cli_format``.
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

try:
    import click
    from rich.console import Console
    from rich.text import Text
except ImportError as _missing:  # pragma: no cover - tested in a subprocess without click
    # The console script imports this module before it can call main(): say it here.
    sys.stderr.write(
        f"creditmeter: the command needs {(_missing.name or 'click').partition('.')[0]}: "
        "pip install 'creditmeter[cli]'\n"
    )
    raise SystemExit(1) from None

from creditmeter import _cli_format as fmt
from creditmeter import _validate, rules
from creditmeter._version import __version__
from creditmeter.config import BalanceConfig, IntervalUnit, RefillSettings, load_config
from creditmeter.exceptions import ConfigError, CreditMeterError
from creditmeter.manager import BalanceManager
from creditmeter.models import Account, LedgerEntry
from creditmeter.pricing import Pricing
from creditmeter.stores import BalanceStore, open_store
from creditmeter.usage import MAX_TOKENS, TokenUsage

__all__ = ["DEFAULT_STORE", "cli", "main"]

DEFAULT_STORE = "sqlite:///./creditmeter.db"
DEFAULT_PAGE = 50
MAX_PAGE = 10_000
_JSON_KEY = "creditmeter.json"
_F = TypeVar("_F", bound=Callable[..., Any])
_SECRETS: set[str] = set()  # passwords in store URLs, kept out of error messages
NO_CONFIG_WARNING = (
    "creditmeter: warning: balances are disabled because no config was given: accounts open "
    "at 0 and charges move no credits; give one with --config PATH (or CREDITMETER_CONFIG), "
    "or set CHECK_BALANCE=true"
)


class Session:
    """What the global options chose; the config and store are opened on first use."""

    def __init__(self, ctx: click.Context, store_url: str, config_path: str | None) -> None:
        source = ctx.get_parameter_source("store_url")
        self.ctx = ctx
        self.store_url = store_url
        self.config_path = config_path
        password = fmt.password_of(store_url)
        if password is not None:
            _SECRETS.add(password)
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
            manager = BalanceManager(_open_store(self.store_url), config)
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
                f"user {user_id!r} has no account in {fmt.redact(self.store_url)}; "
                "'creditmeter grant' or 'creditmeter set' opens one"
            )
        return rules.open_holds(account, self.now())

    def command(self, *words: str) -> str:
        """A command line to suggest, with ``--store`` if it was typed."""
        store = f" --store {shlex.quote(fmt.redact(self.store_url))}" if self.store_typed else ""
        return f"creditmeter{store} {' '.join(words)}"


pass_session = click.make_pass_decorator(Session)


def _open_store(url: str) -> BalanceStore:
    """``open_store(url)``; a URL too malformed to parse is a ``ConfigError``, not a traceback."""
    try:
        return open_store(url)
    except CreditMeterError:
        raise
    except ValueError as exc:  # urlsplit's "Invalid IPv6 URL" and the like, from a driver
        raise ConfigError(f"bad store URL {fmt.redact(url)!r}: {exc}") from None


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


def _usage(message: str) -> NoReturn:
    raise click.UsageError(message, click.get_current_context())


_CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# AMOUNT may look like an option ("-5"): let it through to be refused by name.
_AMOUNT_CONTEXT: dict[str, Any] = {**_CONTEXT, "ignore_unknown_options": True}


@click.group(context_settings=_CONTEXT)
@click.option(
    "--store",
    "store_url",
    envvar="CREDITMETER_STORE",
    default=DEFAULT_STORE,
    show_default=True,
    show_envvar=True,
    metavar="URL",
    help="The store: memory://, sqlite:///relative.db, sqlite:////absolute.db, "
    "redis://host:6379/0, rediss://host:6380/0 (TLS), or postgresql://user@host/db "
    "(postgres:// too).",
)
@click.option(
    "--config",
    "config_path",
    envvar="CREDITMETER_CONFIG",
    show_envvar=True,
    metavar="PATH",
    help="A librechat.yaml (its balance: section) or a balance-only YAML file. "
    "CHECK_BALANCE and START_BALANCE in the environment count too.",
)
@json_option
@click.version_option(__version__, "--version", prog_name="creditmeter")
@click.pass_context
def cli(ctx: click.Context, store_url: str, config_path: str | None) -> None:
    """See and change creditmeter balances: LibreChat's balance rules, from the shell."""
    ctx.obj = Session(ctx, store_url, config_path)


@cli.command(context_settings=_CONTEXT)
@click.argument("user")
@json_option
@pass_session
def balance(session: Session, user: str) -> None:
    """Show USER's balance, holds, refill settings and when the next refill is due."""
    account = session.account(user)
    config, now = session.config, session.now()
    session.show(
        fmt.account_plain(account, config, now), lambda: fmt.account_table(account, config, now)
    )


@cli.command("list", context_settings=_CONTEXT)
@click.option("--limit", type=click.IntRange(1, MAX_PAGE), help=f"Users per page [{DEFAULT_PAGE}].")
@click.option("--offset", type=click.IntRange(min=0), help="Users to skip [0].")
@click.option("--page", type=click.IntRange(min=1), help="Page number, from 1.")
@click.option("--page-size", type=click.IntRange(1, MAX_PAGE), help=f"[{DEFAULT_PAGE}]")
@json_option
@pass_session
def list_users(
    session: Session,
    *,
    limit: int | None,
    offset: int | None,
    page: int | None,
    page_size: int | None,
) -> None:
    """List every user and balance, sorted by user id, a page at a time."""
    by_page = page is not None or page_size is not None
    if by_page and (limit is not None or offset is not None):
        _usage("use --limit/--offset or --page/--page-size, not both")
    size = (page_size if by_page else limit) or DEFAULT_PAGE
    start = ((page or 1) - 1) * size if by_page else offset or 0
    store = session.manager.store
    users = store.users()
    now = session.now()
    accounts = [
        rules.open_holds(account, now)
        for account in map(store.load, users[start : start + size])
        if account is not None
    ]
    after = start + size
    if after >= len(users):
        hint = None
    elif by_page:
        hint = session.command("list", "--page", str(after // size + 1), "--page-size", str(size))
    else:
        hint = session.command("list", "--offset", str(after), "--limit", str(size))
    total = len(users)
    session.show(
        fmt.users_plain(accounts, total=total, offset=start, limit=size, next_page=hint),
        lambda: fmt.users_view(accounts, total=total, offset=start, next_page=hint),
    )


def _replayed(session: Session, user: str, request_id: str | None) -> bool:
    if request_id is None:
        return False
    return session.manager.store.find_request(_validate.user_id(user), request_id) is not None


def _changed(session: Session, entry: LedgerEntry, *, replayed: bool, verb: str) -> None:
    account = session.account(entry.user_id)
    plain = {
        "user": entry.user_id,
        "balance": fmt.plain(account.balance),
        "replayed": replayed,
        "entry": fmt.record_plain(entry),
    }
    reason = (entry.metadata or {}).get("reason")
    text = verb + ("" if reason is None else f" (reason: {reason})")
    text += f". Balance: {fmt.money(account.balance)}"
    if replayed:
        text = f"Request {entry.request_id} was already applied; nothing changed. Balance: "
        text += fmt.money(account.balance)
    session.show(plain, lambda: text)
    session.warn_if_balances_off()


@cli.command(context_settings=_AMOUNT_CONTEXT)
@click.argument("user")
@click.argument("amount", type=fmt.Amount("AMOUNT", positive=True))
@click.option("--reason", help="Why, kept on the ledger entry.")
@click.option("--request-id", help="Make the grant idempotent: a repeat changes nothing.")
@json_option
@pass_session
def grant(
    session: Session, *, user: str, amount: Decimal, reason: str | None, request_id: str | None
) -> None:
    """Add AMOUNT credits to USER's balance (opening the account if new)."""
    replayed = _replayed(session, user, request_id)
    entry = session.manager.grant(user, amount, reason=reason, request_id=request_id)
    verb = f"Granted {fmt.credits_text(amount)} to {entry.user_id}"
    _changed(session, entry, replayed=replayed, verb=verb)


@cli.command("set", context_settings=_AMOUNT_CONTEXT)
@click.argument("user")
@click.argument("amount", type=fmt.Amount("AMOUNT", positive=False))
@click.option("--reason", help="Why, kept on the ledger entry.")
@click.option("--request-id", help="Make the change idempotent: a repeat changes nothing.")
@json_option
@pass_session
def set_balance(
    session: Session, *, user: str, amount: Decimal, reason: str | None, request_id: str | None
) -> None:
    """Set USER's balance to AMOUNT credits (an adjust entry of the difference)."""
    replayed = _replayed(session, user, request_id)
    entry = session.manager.set_balance(user, amount, reason=reason, request_id=request_id)
    change = ("+" if entry.amount >= 0 else "") + fmt.money(entry.amount)
    verb = f"Set the balance of {entry.user_id} to {fmt.money(amount)} ({change})"
    _changed(session, entry, replayed=replayed, verb=verb)


@cli.command(context_settings=_CONTEXT)
@click.argument("user")
@json_option
@pass_session
def refill(session: Session, user: str) -> None:
    """Apply USER's refill if one is due; say what happened either way."""
    user = session.account(user).user_id
    entry = session.manager.maybe_refill(user)
    account = session.account(user)
    now = session.now()
    status = fmt.refill_status(account, session.config, now)
    reason = None if entry is not None else status.why_not or "no refill was due"
    plain = {
        "user": user,
        "refilled": entry is not None,
        "amount": None if entry is None else fmt.plain(entry.amount),
        "balance": fmt.plain(account.balance),
        "reason": reason,
        "next_refill": None if status.next_at is None else status.next_at.isoformat(),
        "entry": None if entry is None else fmt.record_plain(entry),
    }
    if entry is not None:
        text = f"Refilled {user}: +{fmt.credits_text(entry.amount)}. "
        text += f"Balance: {fmt.money(account.balance)}."
        text += " " + fmt.next_refill_text(status, now)
    else:
        text = f"No refill for {user}: {reason}. Balance: {fmt.money(account.balance)}."
    session.show(plain, lambda: text)


@cli.command("refill-settings", context_settings=_CONTEXT)
@click.argument("user")
@click.option("--enabled/--disabled", default=None, help="Turn USER's refills on or off.")
@click.option("--amount", type=fmt.Amount("--amount", positive=False), help="Credits per refill.")
@click.option("--every", type=fmt.Every(), help="The interval: 30d, 12h, 2weeks, 1month, 90s...")
@click.option("--reset", is_flag=True, help="Drop USER's own settings: follow the config again.")
@json_option
@pass_session
def refill_settings(
    session: Session,
    *,
    user: str,
    enabled: bool | None,
    amount: Decimal | None,
    every: tuple[int, IntervalUnit] | None,
    reset: bool,
) -> None:
    """Give USER their own refill settings, or --reset to the config's.

    Options left out keep the value of USER's current settings (their own, or
    the config's).
    """
    changes = enabled is not None or amount is not None or every is not None
    if reset and changes:
        _usage("--reset cannot be combined with --enabled/--disabled, --amount or --every")
    if not reset and not changes:
        _usage("give --enabled/--disabled, --amount, --every or --reset")
    manager, config = session.manager, session.config
    user = _validate.user_id(user)
    settings: RefillSettings | None = None
    if not reset:
        stored = manager.store.load(user)
        current = config.refill if stored is None else rules.effective_refill(stored, config)
        value, unit = every or (current.interval_value, current.interval_unit)
        settings = RefillSettings(
            enabled=current.enabled if enabled is None else enabled,
            interval_value=value,
            interval_unit=unit,
            amount=current.amount if amount is None else amount,
        )
    account = manager.configure_refill(user, settings)
    now = session.now()
    status = fmt.refill_status(account, config, now)
    plain = {
        "user": user,
        "refill": fmt.refill_plain(status),
        "next_refill": None if status.next_at is None else status.next_at.isoformat(),
    }
    text = f"Refill settings of {user}: {fmt.settings_text(status)}. "
    text += fmt.next_refill_text(status, now)
    session.show(plain, lambda: text)


@cli.command(context_settings=_CONTEXT)
@click.argument("user")
@click.option("--limit", type=click.IntRange(min=1), help="Only the newest N entries.")
@click.option("--format", "form", type=click.Choice(["table", "json", "csv"]), help="[table]")
@json_option
@pass_session
def ledger(session: Session, *, user: str, limit: int | None, form: str | None) -> None:
    """Show USER's ledger entries, oldest first (--format json: plain JSON)."""
    if form is not None and form != "json" and session.json:
        _usage(f"--json and --format {form} contradict each other")
    form = form or ("json" if session.json else "table")
    user = session.account(user).user_id
    entries = session.manager.ledger(user, limit=limit)
    if form == "json":
        click.echo(fmt.dumps([fmt.record_plain(entry) for entry in entries]))
    elif form == "csv":
        fmt.write_ledgers([user], lambda _: entries, sys.stdout, "csv")
    else:
        session.console.print(fmt.ledger_table(user, entries))


@cli.command(context_settings=_CONTEXT)
@click.option("--format", "form", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (put in place only once complete) instead of stdout.",
)
@json_option
@pass_session
def export(session: Session, *, form: str, output: Path | None) -> None:
    """Write every user's ledger, streamed one user at a time, as JSON lines or CSV."""
    manager = session.manager
    if output is None:
        fmt.write_ledgers(manager.users(), manager.store.ledger, sys.stdout, form)
        sys.stdout.flush()
        return
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as handle:
            users, entries = fmt.write_ledgers(manager.users(), manager.store.ledger, handle, form)
        partial.replace(output)
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    plain = {"output": str(output), "format": form, "users": users, "entries": entries}
    counted = f"{fmt.plural(entries, 'entry', 'entries')} of {fmt.plural(users, 'user')}"
    text = f"Exported {counted} to {output} ({form})."
    session.show(plain, lambda: text)


_TOKENS = click.IntRange(0, MAX_TOKENS)


@cli.command(context_settings=_CONTEXT)
@click.argument("model")
@click.option("--input", "input_tokens", type=_TOKENS, required=True, help="Uncached input tokens.")
@click.option("--output", "output_tokens", type=_TOKENS, required=True, help="Output tokens.")
@click.option("--cache-write", type=_TOKENS, default=0, help="Prompt tokens written to a cache.")
@click.option("--cache-read", type=_TOKENS, default=0, help="Prompt tokens read from a cache.")
@click.option("--incomplete", is_flag=True, help="A stream cut short: LibreChat's cancel rate.")
@json_option
@pass_session
def price(
    session: Session,
    *,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_write: int,
    cache_read: int,
    incomplete: bool,
) -> None:
    """Show what a call of MODEL would be charged, and at which rates (LibreChat's table)."""
    model = _validate.optional_text(model, name="MODEL") or model
    usage = TokenUsage(
        input=input_tokens, output=output_tokens, cache_write=cache_write, cache_read=cache_read
    )
    cost = Pricing.librechat().cost(model, usage, incomplete=incomplete)
    session.show(
        fmt.price_plain(model, usage, cost, incomplete=incomplete),
        lambda: fmt.price_view(model, usage, cost, incomplete=incomplete),
    )


@cli.command(context_settings=_CONTEXT)
@click.option("--users", type=click.IntRange(min=1), help="Simulated users [the demo's: 5].")
@click.option("--calls", type=click.IntRange(min=1), help="Model calls [the demo's: 40].")
@json_option
@pass_session
def demo(session: Session, *, users: int | None, calls: int | None) -> None:
    """Run a simulated gateway end to end, on a temporary store unless --store is given.

    Only a --store on the command line counts: CREDITMETER_STORE names the real store,
    and the demo never touches it. A store given with --store must hold no user.
    """
    try:
        module = importlib.import_module("creditmeter.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "creditmeter.demo":
            raise
        raise click.ClickException("this installation has no demo (creditmeter.demo)") from None
    run_demo = cast("Callable[..., dict[str, Any]]", module.run_demo)
    sizes = {name: value for name, value in (("users", users), ("calls", calls)) if value}
    summary = run_demo(
        store_url=session.store_url if session.store_typed else None,
        console=None if session.json else fmt.console(markup=True),
        **sizes,
    )
    balanced = summary.get("ledger_balanced") is True
    verdict = "yes" if balanced else "NO"
    session.show(summary, lambda: f"Every user's ledger sums to their balance: {verdict}")
    if not balanced:
        raise click.ClickException("the demo's ledger does not balance")


def _fail(message: str, code: int) -> int:
    for secret in _SECRETS:
        message = message.replace(secret, "***")
    click.echo(f"creditmeter: error: {' '.join(message.split())}", err=True)
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


if __name__ == "__main__":
    main()
