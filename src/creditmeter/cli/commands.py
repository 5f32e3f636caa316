"""The ``creditmeter`` command group and its commands, one function each.

Each command reads its arguments, asks the ``Session`` for the config and the
manager, and hands what it found to ``format`` to be shown as a table or as
JSON. Reading commands never open an account; ``grant``, ``set`` and
``refill-settings`` do, as a first charge would. Every argument is checked
before the store is opened, so a bad one writes nothing (not even a new
SQLite file).
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from creditmeter import _validate, rules
from creditmeter._exact import EXACT
from creditmeter._version import __version__
from creditmeter.cli import format as fmt
from creditmeter.cli import plot as plotting
from creditmeter.cli.demo import run_demo
from creditmeter.cli.serve import serve
from creditmeter.cli.session import (
    DEFAULT_STORE,
    Session,
    json_option,
    pass_session,
    usage_error,
)
from creditmeter.config import IntervalUnit, RefillSettings
from creditmeter.manager import BalanceManager
from creditmeter.models import LedgerEntry
from creditmeter.pricing import Pricing
from creditmeter.queries import GROUP_KEYS, PERIODS, GroupKey, Period
from creditmeter.usage import MAX_TOKENS, TokenUsage

__all__ = ["cli"]

DEFAULT_PAGE = 50
MAX_PAGE = 10_000
SCAN_PAGE = 1000  # entries read at a time by a scan over a time range
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
    "redis://host:6379/0, rediss://host:6380/0 (TLS), redis+cluster://host:7000 "
    "(rediss+cluster:// with TLS), postgresql://user@host/db (postgres:// too), "
    "or a scheme registered with register_store.",
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
    """Show USER's balance, holds, credit blocks, refill settings and the next refill."""
    account = session.account(user)
    config, now = session.config, session.now()
    session.show(
        fmt.account_plain(account, config, now), lambda: fmt.account_view(account, config, now)
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
        usage_error("use --limit/--offset or --page/--page-size, not both")
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


def _changed(
    session: Session,
    entry: LedgerEntry,
    *,
    replayed: bool,
    verb: str,
    extra: dict[str, Any] | None = None,
) -> None:
    account = session.account(entry.user_id)
    plain = {
        "user": entry.user_id,
        "balance": fmt.plain(account.balance),
        "replayed": replayed,
        "entry": fmt.record_plain(entry),
        **(extra or {}),
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
@click.option(
    "--expires",
    type=fmt.Expiry(),
    metavar="TIME",
    help="Make the credits a block that expires at TIME: what is left of it then is "
    f"written off. {fmt.EXPIRY_HELP}",
)
@click.option(
    "--priority",
    type=click.IntRange(0, rules.MAX_PRIORITY),
    metavar="N",
    help=f"Make the credits a block drawn in order of priority, 0 to {rules.MAX_PRIORITY}, "
    f"lowest first (an expiring block given none gets {rules.DEFAULT_PRIORITY}).",
)
@json_option
@pass_session
def grant(
    session: Session,
    *,
    user: str,
    amount: Decimal,
    reason: str | None,
    request_id: str | None,
    expires: datetime | None,
    priority: int | None,
) -> None:
    """Add AMOUNT credits to USER's balance (opening the account if new).

    With --expires or --priority the credits form a credit block: charges draw
    blocks first (by priority, then the earliest expiry, then the oldest
    grant) and the plain balance last. 'creditmeter balance' lists the blocks.
    """
    user = _validate.user_id(user)
    replayed = _replayed(session, user, request_id)
    entry = session.manager.grant(
        user, amount, reason=reason, request_id=request_id, expires_at=expires, priority=priority
    )
    verb = f"Granted {fmt.credits_text(amount)} to {entry.user_id}"
    extra: dict[str, Any] = {}
    if expires is not None or priority is not None:
        found = [b for b in session.account(user).blocks if b.id == entry.id]
        block = found[0] if found else None
        extra["block"] = None if block is None else fmt.block_plain(block)
        if block is not None:
            at = block.expires_at
            ends = "never expires" if at is None else f"expires {fmt.when(at)}"
            verb += f" as credit block {block.id} (priority {block.priority}; {ends})"
    _changed(session, entry, replayed=replayed, verb=verb, extra=extra)


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


@cli.command(context_settings=_CONTEXT)
@click.argument("user")
@json_option
@pass_session
def expire(session: Session, user: str) -> None:
    """Write off what is left of USER's credit blocks that have expired.

    One expire entry per block, of minus what it still held. Any other
    operation on USER does the same first; this keeps the ledger current
    without waiting for one.
    """
    user = session.account(user).user_id
    entries = session.manager.expire(user)
    account = session.account(user)
    gone = Decimal(0)
    for entry in entries:
        gone = EXACT.add(gone, entry.amount)
    dated = [b.expires_at for b in account.blocks if b.expires_at is not None]
    upcoming = min(dated) if dated else None
    plain = {
        "user": user,
        "expired": len(entries),
        "amount": fmt.plain(gone),
        "balance": fmt.plain(account.balance),
        "next_expiry": None if upcoming is None else upcoming.isoformat(),
        "entries": [fmt.record_plain(entry) for entry in entries],
    }
    if entries:
        count = fmt.plural(len(entries), "credit block")
        text = f"Expired {count} of {user}: {fmt.credits_text(gone.copy_negate())} written off."
    else:
        text = f"Nothing to expire for {user}: no credit block has reached its expiry."
    text += f" Balance: {fmt.money(account.balance)}."
    if upcoming is not None:
        text += f" Next expiry {fmt.when(upcoming)}."
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
        usage_error("--reset cannot be combined with --enabled/--disabled, --amount or --every")
    if not reset and not changes:
        usage_error("give --enabled/--disabled, --amount, --every or --reset")
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


_F = Callable[..., Any]


def time_range(what: str) -> Callable[[_F], _F]:
    """``--since`` and ``--until``: keep the ``what`` made in ``[since, until)``."""

    def decorate(function: _F) -> _F:
        until = click.option(
            "--until",
            type=fmt.Moment(),
            metavar="TIME",
            help=f"Only {what} made before TIME (not at it). Same forms as --since.",
        )
        since = click.option(
            "--since",
            type=fmt.Moment(),
            metavar="TIME",
            help=f"Only {what} made at or after TIME. {fmt.MOMENT_HELP}",
        )
        return since(until(function))

    return decorate


def _check_range(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        usage_error(f"--since ({since.isoformat()}) must be before --until ({until.isoformat()})")


def _span_text(since: datetime | None, until: datetime | None) -> str:
    if since is None and until is None:
        return ""
    start = "the start" if since is None else fmt.when(since)
    return f", {start} to {'now' if until is None else fmt.when(until)}"


def _form(session: Session, form: str | None) -> str:
    """``--format``, or what ``--json`` asks for, or a table; refuse the two at odds."""
    if form is not None and form != "json" and session.json:
        usage_error(f"--json and --format {form} contradict each other")
    return form or ("json" if session.json else "table")


def scan(
    manager: BalanceManager,
    *,
    user: str | None = None,
    since: datetime | None,
    until: datetime | None,
) -> Iterator[LedgerEntry]:
    """Every entry (of ``user``) made in ``[since, until)``, in commit order, a page a read."""
    after: str | None = None
    while True:
        page = manager.entries(user=user, since=since, until=until, after=after, limit=SCAN_PAGE)
        yield from page.entries
        if page.next is None or page.next == after:
            return
        after = page.next


@cli.command(context_settings=_CONTEXT)
@click.argument("user")
@click.option("--limit", type=click.IntRange(min=1), help="Only the newest N entries.")
@click.option("--format", "form", type=click.Choice(["table", "json", "csv"]), help="[table]")
@time_range("entries")
@json_option
@pass_session
def ledger(
    session: Session,
    *,
    user: str,
    limit: int | None,
    form: str | None,
    since: datetime | None,
    until: datetime | None,
) -> None:
    """Show USER's ledger entries, oldest first (--format json: plain JSON).

    With --limit and a time range, the newest N entries of the range.
    """
    form = _form(session, form)
    _check_range(since, until)
    user = session.account(user).user_id
    if since is None and until is None:
        entries = session.manager.ledger(user, limit=limit)
    else:
        found = scan(session.manager, user=user, since=since, until=until)
        entries = list(deque(found, maxlen=limit) if limit is not None else found)
    if form == "json":
        click.echo(fmt.dumps([fmt.record_plain(entry) for entry in entries]))
    elif form == "csv":
        fmt.write_ledgers([user], lambda _: entries, sys.stdout, "csv")
    else:
        title = f"Ledger of {user}{_span_text(since, until)}"
        session.console.print(fmt.ledger_table(user, entries, title=title))


@cli.command(context_settings=_CONTEXT)
@click.option("--format", "form", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (put in place only once complete) instead of stdout.",
)
@time_range("entries")
@json_option
@pass_session
def export(
    session: Session,
    *,
    form: str,
    output: Path | None,
    since: datetime | None,
    until: datetime | None,
) -> None:
    """Write every user's ledger, streamed one user at a time, as JSON lines or CSV.

    With --since or --until, only the entries made in that range, in the order
    they were committed (users interleaved), read a page at a time; the
    summary then counts the users those entries belong to.
    """
    _check_range(since, until)
    manager = session.manager

    def write(handle: Any) -> tuple[int, int]:
        if since is None and until is None:
            return fmt.write_ledgers(manager.users(), manager.store.ledger, handle, form)
        return fmt.write_entries(scan(manager, since=since, until=until), handle, form)

    if output is None:
        write(sys.stdout)
        sys.stdout.flush()
        return
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as handle:
            users, entries = write(handle)
        partial.replace(output)
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    plain = {"output": str(output), "format": form, "users": users, "entries": entries}
    counted = f"{fmt.plural(entries, 'entry', 'entries')} of {fmt.plural(users, 'user')}"
    text = f"Exported {counted} to {output} ({form})."
    session.show(plain, lambda: text)


def _grouping(
    by: tuple[GroupKey, ...] | None, period: Period | None, *, plot: bool
) -> tuple[tuple[GroupKey, ...], Period | None]:
    """``--by`` and ``--period`` as the manager takes them (see ``usage``'s help)."""
    keys: set[GroupKey] = set(by or ("model",))
    if period is not None or plot:
        keys.add("period")
    if "period" in keys and period is None:
        period = "day"
    return tuple(key for key in GROUP_KEYS if key in keys), period


def _usage_title(
    user: str | None,
    keys: tuple[GroupKey, ...],
    period: Period | None,
    since: datetime | None,
    until: datetime | None,
) -> str:
    whose = "all users" if user is None else user
    split = ", ".join(key for key in keys if key != "period")
    title = f"Usage of {whose}" + (f" by {split}" if split else "")
    if period is not None:
        title += f", per {period}"
    return title + _span_text(since, until)


@cli.command("usage", context_settings=_CONTEXT)
@click.option("--user", help="Only USER's charges.")
@time_range("charges")
@click.option(
    "--by",
    type=fmt.GroupBy(),
    metavar="KEYS",
    help="Group rows by a comma list of user, model and period [model].",
)
@click.option(
    "--period",
    type=click.Choice(PERIODS),
    help="Split rows by UTC hour, day, week (from Monday) or month; adds period to --by "
    "[day when --by has period, or with --plot].",
)
@click.option("--format", "form", type=click.Choice(["table", "csv", "json"]), help="[table]")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE.png",
    help="Also draw the credits charged (the charged column) per period as stacked bars, "
    "by model (by user with --by user and no model), into a PNG. Without --period, per "
    "day. Needs matplotlib: pip install 'creditmeter[plot]'.",
)
@json_option
@pass_session
def usage_report(
    session: Session,
    *,
    user: str | None,
    since: datetime | None,
    until: datetime | None,
    by: tuple[GroupKey, ...] | None,
    period: Period | None,
    form: str | None,
    plot: Path | None,
) -> None:
    """Sum the charges made: calls, tokens, priced cost and credits charged, per group.

    Only charges count (settled holds included); grants, refills and releases
    do not. Sums are exact. CSV and JSON give one record per row (amounts as
    exact decimal strings, periods as their ISO start); the table adds a total.
    """
    form = _form(session, form)
    keys, period = _grouping(by, period, plot=plot is not None)
    _check_range(since, until)
    if plot is not None:
        if plot.suffix.lower() != ".png":
            usage_error(f"--plot writes a PNG: give a file name ending in .png, got {plot}")
        plotting.require()
    user_id = None if user is None else _validate.user_id(user)
    rows = session.manager.usage(user=user_id, since=since, until=until, by=keys, period=period)
    title = _usage_title(user_id, keys, period, since, until)
    if plot is not None and period is not None:
        series = plotting.spend_series(rows, keys, period)
        stacked = "" if series.stacked_by is None else f" by {series.stacked_by}"
        plot_title = f"Credits charged (the charged column) per {period}{stacked}\n{title}"
        plotting.save(series, plot, title=plot_title)
    if form == "json":
        click.echo(fmt.dumps(fmt.usage_plain(rows, keys)))
    elif form == "csv":
        fmt.write_usage_csv(rows, keys, sys.stdout)
    else:
        lines: list[object] = [fmt.usage_table(rows, keys, period, title=title)]
        if not rows:
            lines = [f"No charges in this report ({title})."]
        if plot is not None:
            lines.append(f"Saved the plot of credits charged per {period} to {plot}.")
        for line in lines:
            session.console.print(line, soft_wrap=isinstance(line, str))


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


cli.add_command(serve)
