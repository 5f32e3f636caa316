"""The ``creditmeter`` command's helpers: reading its arguments, describing what it found.

Nothing here opens a store. The commands read accounts and entries and hands
them here: to be described as JSON-ready dicts (amounts as exact decimal
strings, times as ISO-8601 UTC), as CSV rows or JSON lines, or as ``rich``
tables for people.

Credits print one way everywhere: the exact decimal with no exponent and no
trailing zeros (``19982.9``, ``-6500``, ``0``), as a JSON string or a CSV
field (``plain``); people's tables and sentences add thousands separators
(``19,982.9``, ``money``). Output that is not a terminal is neither wrapped
at 80 columns nor padded with trailing spaces (``console``).

The argument types (credits, refill intervals, times, expiries, report
groupings) live here too, and so do the
refill questions ("which settings apply?", "when is the next refill due, and
if none applies now, why not?"), worked out with ``rules`` so ``balance``,
``refill`` and ``refill-settings`` answer alike.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import IO, TYPE_CHECKING, Any, Literal, NamedTuple, TextIO, cast

import attrs
import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from creditmeter import _validate, rules
from creditmeter._exact import EXACT
from creditmeter.config import BalanceConfig, IntervalUnit, RefillSettings
from creditmeter.exceptions import InvalidInput
from creditmeter.models import Account, CreditBlock, EntryKind, LedgerEntry
from creditmeter.pricing import Cost
from creditmeter.queries import GROUP_KEYS, GroupKey, Period, UsageRow
from creditmeter.serde import to_plain
from creditmeter.usage import TokenUsage

__all__ = [
    "CSV_HEADER",
    "EXPIRY_HELP",
    "MAX_INTERVAL",
    "USAGE_FIELDS",
    "Amount",
    "Every",
    "Expiry",
    "GroupBy",
    "Moment",
    "RefillStatus",
    "account_plain",
    "account_table",
    "account_view",
    "block_plain",
    "blocks_table",
    "console",
    "credits_text",
    "csv_row",
    "drawn_plain",
    "drawn_text",
    "dumps",
    "entry_line",
    "every",
    "ledger_table",
    "money",
    "next_refill_text",
    "parse_by",
    "parse_every",
    "parse_expiry",
    "parse_moment",
    "period_label",
    "plain",
    "plural",
    "price_plain",
    "price_view",
    "record_plain",
    "refill_plain",
    "refill_status",
    "settings_text",
    "usage_fields",
    "usage_plain",
    "usage_table",
    "users_plain",
    "users_view",
    "when",
    "write_entries",
    "write_ledgers",
    "write_usage_csv",
]

if TYPE_CHECKING:  # click >= 8.4 makes ParamType generic; older ones cannot subscript it
    _DecimalParam = click.ParamType[Decimal]
    _IntervalParam = click.ParamType[tuple[int, IntervalUnit]]
    _MomentParam = click.ParamType[datetime]
    _GroupByParam = click.ParamType[tuple[GroupKey, ...]]
else:
    _DecimalParam = _IntervalParam = _MomentParam = _GroupByParam = click.ParamType

_ZERO = Decimal(0)
_ONE = Decimal(1)
Source = Literal["account", "config"]


# --- plain values -------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def dumps(data: object, *, indent: int | None = 2) -> str:
    """JSON text: decimals as exact strings, datetimes as ISO-8601, non-ASCII kept."""
    separators = (",", ": ") if indent is not None else (",", ":")
    return json.dumps(
        data, indent=indent, ensure_ascii=False, separators=separators, default=_json_default
    )


def _trim(text: str) -> str:
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def plain(value: Decimal) -> str:
    """Credits for machines (JSON, CSV): exact, no exponent, no trailing zeros: ``-6500``."""
    return _trim(f"{value:f}")


def money(value: Decimal) -> str:
    """Credits for people: ``plain`` with thousands separated: ``19,982.9``."""
    return _trim(f"{value:,f}")


def credits_text(value: Decimal) -> str:
    """``1 credit``, ``5,000 credits``, ``0.5 credits``: an amount in a sentence."""
    return f"{money(value)} credit{'' if abs(value) == _ONE else 's'}"


def record_plain(record: Any) -> dict[str, Any]:
    """``serde.to_plain(record)`` with every Decimal, nested ones too, written by ``plain``."""
    return _plain_decimals(record, to_plain(record))


def _plain_decimals(record: Any, data: dict[str, Any]) -> dict[str, Any]:
    for field in attrs.fields(type(record)):
        if field.name not in data:
            continue
        value, written = getattr(record, field.name), data[field.name]
        if isinstance(value, Decimal):
            data[field.name] = plain(value)
        elif attrs.has(type(value)) and isinstance(written, dict):
            _plain_decimals(value, written)
        elif isinstance(value, (tuple, list)) and isinstance(written, list):
            for index, (item, item_data) in enumerate(zip(value, written, strict=False)):
                if attrs.has(type(item)) and isinstance(item_data, dict):
                    _plain_decimals(item, item_data)
                elif isinstance(item, tuple):  # LedgerEntry.drawn: (block id, credits) pairs
                    written[index] = [plain(v) if isinstance(v, Decimal) else v for v in item]
    return data


def when(moment: datetime) -> str:
    """A UTC time for people, to the second."""
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def plural(count: int, unit: str, units: str | None = None) -> str:
    """``1 entry``, ``3 entries``: a count and its noun (``units`` when not ``unit + "s"``)."""
    return f"{count:,} {unit if count == 1 else units or unit + 's'}"


def every(value: int, unit: str) -> str:
    """An interval for people: ``30 days``, ``1 second``."""
    return plural(value, unit.removesuffix("s"))


def _span(delta: timedelta) -> str:
    """A rough length of time: its two largest units."""
    seconds = int(delta.total_seconds())
    parts: list[str] = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(plural(count, unit))
    return ", ".join(parts[:2]) or "less than a second"


# --- arguments ----------------------------------------------------------------


class Amount(_DecimalParam):
    """A number of credits, read as a Decimal; a bad one is ``InvalidInput`` (exit status 1)."""

    name = "amount"

    def __init__(self, label: str, *, positive: bool) -> None:
        self.label = label
        self.positive = positive

    def convert(
        self,
        value: Any,
        param: click.Parameter | None,  # noqa: ARG002 - click's signature
        ctx: click.Context | None,  # noqa: ARG002
    ) -> Decimal:
        """Parse ``value`` as a finite, non-negative Decimal of at most 10**15."""
        if isinstance(value, Decimal):
            return value
        text = str(value)
        try:
            number = Decimal(text.strip())
        except InvalidOperation:
            raise InvalidInput(f"{self.label} must be a number of credits, got {text!r}") from None
        if not number.is_finite():
            raise InvalidInput(f"{self.label} must be a finite number, got {text!r}")
        try:
            return _validate.amount(number, name=self.label, positive=self.positive)
        except InvalidInput as exc:
            raise InvalidInput(str(exc).replace(repr(number), repr(text))) from None


_UNITS: dict[str, IntervalUnit] = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), "seconds"),
    **dict.fromkeys(("min", "mins", "minute", "minutes"), "minutes"),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), "hours"),
    **dict.fromkeys(("d", "day", "days"), "days"),
    **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), "weeks"),
    **dict.fromkeys(("mo", "mon", "month", "months"), "months"),
}
_EVERY = re.compile(r"([0-9]+)\s*([a-z]+)")
MAX_INTERVAL_YEARS = 100
_MAX_SECONDS = MAX_INTERVAL_YEARS * 31_556_952  # seconds in a mean Gregorian year
MAX_INTERVAL: dict[IntervalUnit, int] = {
    "seconds": _MAX_SECONDS,
    "minutes": _MAX_SECONDS // 60,
    "hours": _MAX_SECONDS // 3600,
    "days": _MAX_SECONDS // 86400,
    "weeks": _MAX_SECONDS // (7 * 86400),
    "months": MAX_INTERVAL_YEARS * 12,
}
"""The longest refill interval ``--every`` takes, per unit: 100 years."""


def parse_every(text: str, *, label: str = "--every") -> tuple[int, IntervalUnit]:
    """Read an interval such as ``30d``, ``12h``, ``2weeks``, ``1month`` or ``90s``."""
    match = _EVERY.fullmatch(text.strip().lower())
    if match is None:
        raise InvalidInput(
            f"{label} must be a whole number and a unit, such as 30d, 12h, 2weeks, 1month "
            f"or 90s, got {text!r}"
        )
    digits, word = match[1].lstrip("0") or "0", match[2]
    unit = _UNITS.get(word)
    if unit is None:
        if word == "m":
            raise InvalidInput(f"{label}: 'm' is ambiguous; write min (minutes) or mo (months)")
        raise InvalidInput(
            f"{label} has an unknown unit {word!r} in {text!r}; "
            "units: s, min, h, d, w, mo (or seconds, minutes, hours, days, weeks, months)"
        )
    limit = MAX_INTERVAL[unit]
    if len(digits) > len(str(limit)) or int(digits) > limit:
        raise InvalidInput(
            f"{label} {text!r} is too large: at most {limit:,} {unit} ({MAX_INTERVAL_YEARS} years)"
        )
    value = int(digits)
    if value < 1:
        raise InvalidInput(f"{label} must be at least 1 {unit.removesuffix('s')}, got {text!r}")
    return value, unit


class Every(_IntervalParam):
    """A refill interval (see ``parse_every``); a bad one is ``InvalidInput`` (exit status 1)."""

    name = "interval"

    def convert(
        self,
        value: Any,
        param: click.Parameter | None,  # noqa: ARG002 - click's signature
        ctx: click.Context | None,  # noqa: ARG002
    ) -> tuple[int, IntervalUnit]:
        """Parse ``value`` into ``(value, unit)``."""
        if isinstance(value, tuple):
            return value
        return parse_every(str(value))


_NOW_KEY = "creditmeter.now"  # one "now" per command line, shared by --since and --until
_SPAN = re.compile(r"[0-9]+\s*[a-z]+")
MOMENT_HELP = (
    "An ISO date (2026-11-01: 00:00 UTC that day) or date and time (2026-11-01T13:30; "
    "without an offset it is UTC), or a span back from now: 30d, 12h, 2w, 90min, 1mo."
)


def parse_moment(text: str, *, now: datetime) -> datetime:
    """Read a time as UTC: an ISO date or datetime, or a span before ``now`` such as ``30d``.

    A date means 00:00 UTC; a datetime without an offset is taken as UTC, one
    with an offset (or ``Z``) is converted to UTC. A span takes the units of
    ``--every`` (months are calendar months). A bad value is ``InvalidInput``.
    """
    raw = text.strip()
    if _SPAN.fullmatch(raw.lower()):
        value, unit = parse_every(raw, label="a span back from now")
        try:
            return rules.add_interval(now.astimezone(timezone.utc), -value, unit)
        except (OverflowError, ValueError):
            raise InvalidInput(f"{text!r} reaches back before the year 1") from None
    iso = raw[:-1] + "+00:00" if raw[-1:] in ("Z", "z") else raw  # Python 3.10 reads no "Z"
    try:
        moment = datetime.fromisoformat(iso) if iso else None
    except ValueError:
        moment = None
    if moment is None:
        raise InvalidInput(
            "expected an ISO date or time (2026-11-01, 2026-11-01T13:30, "
            f"2026-11-01T13:30+02:00) or a span back from now (30d, 12h, 2w), got {text!r}"
        )
    if moment.tzinfo is None or moment.utcoffset() is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


class Moment(_MomentParam):
    """A time option (see ``parse_moment``); a bad one is a usage error naming the option."""

    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        """Parse ``value``; spans count back from one clock reading per command line."""
        if isinstance(value, datetime):
            return value
        now = datetime.now(timezone.utc)
        if ctx is not None:
            now = ctx.meta.setdefault(_NOW_KEY, now)
        try:
            return parse_moment(str(value), now=now)
        except InvalidInput as exc:
            self.fail(str(exc), param, ctx)


EXPIRY_HELP = (
    "TIME is a span from now (30d, 12h, 2w, 90min, 1mo: calendar months), an ISO date "
    "(2027-01-01: gone from 00:00 UTC that day) or date and time (2027-01-01T13:30; "
    "without an offset it is UTC), and must be in the future."
)


def parse_expiry(text: str, *, now: datetime) -> datetime:
    """Read an expiry as UTC: a span after ``now`` such as ``30d``, or an ISO date or datetime.

    Unlike ``parse_moment`` (which looks back), a span counts forward: an
    expiry is always ahead. A date means 00:00 UTC, a datetime without an
    offset is UTC. A bad value, or a time not after ``now``, is ``InvalidInput``.
    """
    raw = text.strip()
    now = now.astimezone(timezone.utc)
    if _SPAN.fullmatch(raw.lower()):
        value, unit = parse_every(raw, label="a span from now")
        try:
            return rules.add_interval(now, value, unit)
        except (OverflowError, ValueError):
            raise InvalidInput(f"{text!r} from now reaches past the year 9999") from None
    try:
        moment = parse_moment(raw, now=now)
    except InvalidInput:
        raise InvalidInput(
            "expected a span from now (30d, 12h, 2w, 1mo), an ISO date (2027-01-01) or "
            f"an ISO date and time (2027-01-01T13:30, 2027-01-01T13:30+02:00), got {text!r}"
        ) from None
    if moment <= now:
        raise InvalidInput(
            f"{when(moment)} is not in the future (now {when(now)}): an expiry must come after now"
        )
    return moment


class Expiry(_MomentParam):
    """``grant --expires`` (see ``parse_expiry``); a bad one is a usage error naming the option."""

    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        """Parse ``value``; a span counts forward from one clock reading per command line."""
        if isinstance(value, datetime):
            return value
        now = datetime.now(timezone.utc)
        if ctx is not None:
            now = ctx.meta.setdefault(_NOW_KEY, now)
        try:
            return parse_expiry(str(value), now=now)
        except InvalidInput as exc:
            self.fail(str(exc), param, ctx)


def parse_by(text: str) -> tuple[GroupKey, ...]:
    """Read ``--by``: a comma list of user, model and period, in the order of ``GROUP_KEYS``."""
    words = [word.strip().lower() for word in text.split(",")]
    if not any(words):
        raise InvalidInput(f"give a comma list of {', '.join(GROUP_KEYS)}, got {text!r}")
    seen: set[str] = set()
    for word in words:
        if word not in GROUP_KEYS:
            raise InvalidInput(
                f"unknown key {word!r} in {text!r}; choose among {', '.join(GROUP_KEYS)}"
            )
        if word in seen:
            raise InvalidInput(f"{word!r} is given twice in {text!r}")
        seen.add(word)
    return tuple(key for key in GROUP_KEYS if key in seen)


class GroupBy(_GroupByParam):
    """``--by``'s comma list (see ``parse_by``); a bad one is a usage error naming the option."""

    name = "keys"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[GroupKey, ...]:
        """Parse ``value`` into group keys."""
        if isinstance(value, tuple):
            return cast("tuple[GroupKey, ...]", value)
        try:
            return parse_by(str(value))
        except InvalidInput as exc:
            self.fail(str(exc), param, ctx)


# --- refill status ------------------------------------------------------------


class RefillStatus(NamedTuple):
    """The refill settings that apply to an account and what they mean now."""

    settings: RefillSettings
    source: Source
    mode: str
    next_at: datetime | None
    """When the next refill is due; ``None`` when refills are off or never come."""
    due_amount: Decimal
    """What a refill would add now (``rules.refill_due``); zero when none applies."""
    why_not: str | None
    """Why no refill applies now, or ``None`` when one does."""


def refill_status(account: Account, config: BalanceConfig, now: datetime) -> RefillStatus:
    """Work out which refill settings apply to ``account`` and whether one is due at ``now``."""
    settings = rules.effective_refill(account, config)
    source: Source = "account" if account.refill is not None else "config"
    due_amount = rules.refill_due(account, config=config, now=now)
    next_at: datetime | None = None
    why: str | None = None
    if not config.enabled:
        why = "balances are disabled in the config (balance.enabled / CHECK_BALANCE)"
    elif not settings.enabled:
        why = (
            "refills are disabled in the account's settings (refill-settings --enabled)"
            if source == "account"
            else "refills are disabled in the config (balance.autoRefillEnabled)"
        )
    elif settings.amount <= _ZERO:
        why = "the refill amount is 0"
    else:
        try:
            next_at = rules.add_interval(
                account.last_refill, settings.interval_value, settings.interval_unit
            )
        except (OverflowError, ValueError):  # past year 9999
            why = "the refill interval never ends"
    if next_at is not None and due_amount <= _ZERO:
        if now < next_at:
            why = f"the next refill is not due until {when(next_at)}"
        elif config.refill_mode == "when_depleted":
            why = (
                f"the balance is not spent yet (available {money(account.available)}; "
                "refill mode when_depleted refills only a spent balance)"
            )
        else:
            why = f"the balance is already at the top-up amount {money(settings.amount)}"
    return RefillStatus(settings, source, config.refill_mode, next_at, due_amount, why)


def next_refill_text(status: RefillStatus, now: datetime) -> str:
    """One sentence on the next refill: when it is due, or why none will come."""
    if status.next_at is None:
        return f"No refill will come: {status.why_not}."
    if status.next_at > now:
        return f"Next refill due {when(status.next_at)}."
    if status.why_not is not None:
        return f"A refill is due now, but {status.why_not}."
    return f"A refill of {credits_text(status.due_amount)} is due now."


def _next_refill(status: RefillStatus, now: datetime) -> str | None:
    if status.next_at is None:
        return None
    return "now" if status.next_at <= now else status.next_at.isoformat()


def refill_plain(status: RefillStatus) -> dict[str, Any]:
    """The refill settings that apply, as a JSON-ready dict."""
    settings = status.settings
    return {
        "source": status.source,
        "enabled": settings.enabled,
        "amount": plain(settings.amount),
        "interval_value": settings.interval_value,
        "interval_unit": settings.interval_unit,
        "every": every(settings.interval_value, settings.interval_unit),
        "mode": status.mode,
    }


def settings_text(status: RefillStatus) -> str:
    """``10,000 credits every 30 days, enabled (the config's settings; mode when_depleted)``."""
    settings = status.settings
    whose = "own settings" if status.source == "account" else "the config's settings"
    state = "enabled" if settings.enabled else "disabled"
    return (
        f"{credits_text(settings.amount)} every "
        f"{every(settings.interval_value, settings.interval_unit)}, {state} "
        f"({whose}; mode {status.mode})"
    )


# --- accounts -----------------------------------------------------------------


def block_plain(block: CreditBlock) -> dict[str, Any]:
    """A credit block as a JSON-ready dict.

    ``amount`` is what remains of ``granted``; ``expires_at`` is null for a
    block that never expires.
    """
    return {
        "id": block.id,
        "amount": plain(block.amount),
        "granted": plain(block.granted),
        "priority": block.priority,
        "expires_at": None if block.expires_at is None else block.expires_at.isoformat(),
        "granted_at": block.granted_at.isoformat(),
        "request_id": block.request_id,
    }


def account_plain(account: Account, config: BalanceConfig, now: datetime) -> dict[str, Any]:
    """Everything ``creditmeter balance --json`` reports about one account.

    ``blocks`` are the open credit blocks in the order charges draw them;
    ``unrestricted`` is the plain balance, drawn after them (``balance`` counts both).
    """
    status = refill_status(account, config, now)
    return {
        "user": account.user_id,
        "balance": plain(account.balance),
        "available": plain(account.available),
        "unrestricted": plain(account.unrestricted),
        "blocks": [block_plain(block) for block in account.blocks],
        "held": plain(account.held),
        "holds": [record_plain(hold) for hold in account.holds],
        "balances_enabled": config.enabled,
        "refill": refill_plain(status),
        "last_refill": account.last_refill.isoformat(),
        "next_refill": _next_refill(status, now),
        "refill_due_now": plain(status.due_amount),
        "created_at": account.created_at.isoformat(),
        "updated_at": account.updated_at.isoformat(),
        "version": account.version,
    }


def _facts(title: str) -> Table:
    table = Table(title=title, show_header=False, box=box.SIMPLE, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    return table


def account_table(account: Account, config: BalanceConfig, now: datetime) -> Table:
    """The ``creditmeter balance`` view of one account."""
    status = refill_status(account, config, now)
    table = _facts(f"Account {account.user_id}")
    table.add_row("Balance", Text(money(account.balance)))
    if account.blocks:
        in_blocks = _ZERO
        for block in account.blocks:
            in_blocks = EXACT.add(in_blocks, block.amount)
        blocks = plural(len(account.blocks), "open credit block")
        table.add_row("In blocks", Text(f"{money(in_blocks)} in {blocks} (drawn first)"))
        table.add_row("Plain balance", Text(f"{money(account.unrestricted)} (drawn last)"))
    held = account.held
    count = len(account.holds)
    available = money(account.available)
    if count:
        available += f" ({money(held)} held by {plural(count, 'open hold')})"
    table.add_row("Available", Text(available))
    for hold in account.holds:
        table.add_row(
            "", Text(f"hold {hold.id}: {money(hold.amount)} until {when(hold.expires_at)}")
        )
    table.add_row("Balances", "enabled" if config.enabled else "disabled in the config")
    table.add_row("Refill", Text(settings_text(status)))
    table.add_row("Last refill", when(account.last_refill))
    if status.next_at is None:
        upcoming = f"never: {status.why_not}"
    elif status.next_at <= now:
        upcoming = "now"
        if status.why_not is not None:
            upcoming += f", but {status.why_not}"
    else:
        upcoming = f"{when(status.next_at)} (in {_span(status.next_at - now)})"
    table.add_row("Next refill", Text(upcoming))
    return table


def _expiry_text(block: CreditBlock, now: datetime) -> str:
    if block.expires_at is None:
        return "never"
    if block.expires_at <= now:
        return f"{when(block.expires_at)} (expired)"
    return f"{when(block.expires_at)} (in {_span(block.expires_at - now)})"


def blocks_table(account: Account, now: datetime) -> Table:
    """An account's open credit blocks, in the order charges draw them."""
    table = Table(
        title=f"Credit blocks of {account.user_id}, in the order charges draw them",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    table.add_column("Block")
    table.add_column("Remaining", justify="right")
    table.add_column("Granted", justify="right")
    table.add_column("Priority", justify="right")
    table.add_column("Expires (UTC)", no_wrap=True)
    for block in account.blocks:
        table.add_row(
            Text(block.id),
            money(block.amount),
            money(block.granted),
            str(block.priority),
            _expiry_text(block, now),
        )
    return table


def account_view(account: Account, config: BalanceConfig, now: datetime) -> list[object]:
    """The ``creditmeter balance`` view: the account, then its credit blocks if it has any."""
    shown: list[object] = [account_table(account, config, now)]
    if account.blocks:
        shown.append(blocks_table(account, now))
    return shown


def users_plain(
    accounts: list[Account], *, total: int, offset: int, limit: int, next_page: str | None
) -> dict[str, Any]:
    """What ``creditmeter list --json`` reports: one page of accounts."""
    after = offset + limit
    return {
        "users": [
            {
                "user": account.user_id,
                "balance": plain(account.balance),
                "available": plain(account.available),
                "updated_at": account.updated_at.isoformat(),
            }
            for account in accounts
        ],
        "total": total,
        "offset": offset,
        "limit": limit,
        "next_offset": after if after < total else None,
        "next_page": next_page,
    }


def users_view(
    accounts: list[Account], *, total: int, offset: int, next_page: str | None
) -> list[object]:
    """One page of accounts as a table, and a line saying which page and how to get the next."""
    if not total:
        return ["The store has no users yet."]
    if not accounts:
        return [f"No users at offset {offset}: the store has {total}."]
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("User")
    table.add_column("Balance", justify="right")
    table.add_column("Available", justify="right")
    table.add_column("Last change (UTC)", no_wrap=True)
    for account in accounts:
        table.add_row(
            Text(account.user_id),
            money(account.balance),
            money(account.available),
            account.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    shown = f"Users {offset + 1}-{offset + len(accounts)} of {total}."
    return [table, shown + (f" Next page: {next_page}" if next_page else "")]


# --- ledger entries -----------------------------------------------------------

CSV_HEADER = (
    "id",
    "user_id",
    "kind",
    "amount",
    "balance_after",
    "at",
    "request_id",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "cost",
    "rate_prompt",
    "rate_completion",
    "rate_cache_write",
    "rate_cache_read",
    "metadata",
    "drawn",
)
"""The CSV columns of an entry. ``metadata`` and ``drawn`` are JSON text (or empty):
``drawn`` is ``[["<block id>","30"],...]``, the credit blocks the entry took from."""


def _text(value: object) -> str:
    if isinstance(value, Decimal):
        return plain(value)
    return "" if value is None else str(value)


def csv_row(entry: LedgerEntry) -> list[str]:
    """One entry as a row under ``CSV_HEADER``."""
    usage, rates = entry.usage, entry.rates
    tokens = (
        ["", "", "", ""]
        if usage is None
        else [str(usage.input), str(usage.output), str(usage.cache_write), str(usage.cache_read)]
    )
    priced = (
        ["", "", "", ""]
        if rates is None
        else [
            plain(rate)
            for rate in (rates.prompt, rates.completion, rates.cache_write, rates.cache_read)
        ]
    )
    return [
        entry.id,
        entry.user_id,
        entry.kind.value,
        plain(entry.amount),
        plain(entry.balance_after),
        entry.at.isoformat(),
        _text(entry.request_id),
        _text(entry.model),
        *tokens,
        _text(entry.cost),
        *priced,
        "" if entry.metadata is None else dumps(entry.metadata, indent=None),
        dumps(drawn_plain(entry), indent=None) if entry.drawn else "",
    ]


def drawn_plain(entry: LedgerEntry) -> list[list[str]]:
    """``entry.drawn`` as JSON-ready pairs: ``[["<block id>", "30"], ...]``."""
    return [[block_id, plain(amount)] for block_id, amount in entry.drawn]


def drawn_text(entry: LedgerEntry) -> str:
    """What an entry took from credit blocks, for people: ``blocks: 30 + 10, plain: 5``.

    An ``EXPIRE`` entry names the block it wrote off; a charge says what each
    block gave, in the order drawn, and what the plain balance paid after them.
    """
    if not entry.drawn:
        return ""
    if entry.kind is EntryKind.EXPIRE:
        return ", ".join(f"block {block_id}" for block_id, _ in entry.drawn)
    from_blocks = _ZERO
    for _, amount in entry.drawn:
        from_blocks = EXACT.add(from_blocks, amount)
    text = "blocks: " + " + ".join(money(amount) for _, amount in entry.drawn)
    rest = EXACT.subtract(entry.amount.copy_negate(), from_blocks)
    return text + (f", plain: {money(rest)}" if rest > _ZERO else "")


def entry_line(entry: LedgerEntry) -> str:
    """One ``creditmeter export`` JSON line: the entry as ``record_plain`` writes it."""
    return dumps(record_plain(entry), indent=None)


def _entry_writer(handle: IO[str], form: str) -> Callable[[LedgerEntry], object]:
    """Write the CSV header if ``form`` is csv; return what writes one entry."""
    if form != "csv":
        return lambda entry: handle.write(entry_line(entry) + "\n")
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    return lambda entry: writer.writerow(csv_row(entry))


def write_ledgers(
    users: Iterable[str],
    ledger: Callable[[str], Iterable[LedgerEntry]],
    handle: IO[str],
    form: str,
) -> tuple[int, int]:
    """Write each user's ``ledger(user)`` as it is read, as JSON lines or CSV.

    Only one user's entries are held at a time. Returns (users, entries).
    """
    write = _entry_writer(handle, form)
    users_seen = entries = 0
    for user in users:
        users_seen += 1
        for entry in ledger(user):
            write(entry)
            entries += 1
    return users_seen, entries


def write_entries(entries: Iterable[LedgerEntry], handle: IO[str], form: str) -> tuple[int, int]:
    """Write ``entries`` as they are read, as JSON lines or CSV; return (users, entries).

    ``users`` counts the distinct users among the entries written.
    """
    write = _entry_writer(handle, form)
    users: set[str] = set()
    count = 0
    for entry in entries:
        write(entry)
        users.add(entry.user_id)
        count += 1
    return len(users), count


def _tokens(usage: TokenUsage) -> str:
    parts = [f"{usage.input:,} in", f"{usage.output:,} out"]
    if usage.cache_write:
        parts.append(f"{usage.cache_write:,} cache write")
    if usage.cache_read:
        parts.append(f"{usage.cache_read:,} cache read")
    return ", ".join(parts)


def _detail(entry: LedgerEntry) -> str:
    parts: list[str] = []
    if entry.model is not None:
        parts.append(entry.model)
    if entry.usage is not None:
        parts.append(_tokens(entry.usage))
    if entry.cost is not None and entry.cost != entry.amount.copy_negate():  # -x would round
        parts.append(f"cost {money(entry.cost)}")
    metadata: Mapping[str, Any] = entry.metadata or {}
    parts.extend(f"{key}: {value}" for key, value in metadata.items())
    if entry.request_id is not None:
        parts.append(f"request {entry.request_id}")
    return "; ".join(parts)


def ledger_table(
    user_id: str, entries: Iterable[LedgerEntry], *, title: str | None = None
) -> Table:
    """A user's ledger entries, oldest first, under ``title`` (``Ledger of USER``).

    A ``Drawn`` column (``drawn_text``) is added when an entry shown took
    from a credit block, so a ledger without blocks looks as it always did.
    """
    title = f"Ledger of {user_id}" if title is None else title
    shown = list(entries)
    drawn = any(entry.drawn for entry in shown)
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("When (UTC)", no_wrap=True)
    table.add_column("Kind")
    table.add_column("Amount", justify="right")
    table.add_column("Balance", justify="right")
    if drawn:
        table.add_column("Drawn")
    table.add_column("Detail")
    for entry in shown:
        sign = "+" if entry.amount > _ZERO else ""
        cells = [
            entry.at.strftime("%Y-%m-%d %H:%M:%S"),
            entry.kind.value,
            Text(sign + money(entry.amount)),
            Text(money(entry.balance_after)),
        ]
        if drawn:
            cells.append(Text(drawn_text(entry)))
        table.add_row(*cells, Text(_detail(entry)))
    return table


# --- usage reports ------------------------------------------------------------

USAGE_FIELDS = ("calls", "input", "output", "cache_write", "cache_read", "cost", "charged")
"""The sums of a usage report's row, after its group keys (``usage_fields``)."""

_KEY_FIELDS: dict[GroupKey, str] = {"user": "user", "model": "model", "period": "period"}
_PERIOD_FORMATS: dict[Period, str] = {
    "hour": "%Y-%m-%d %H:00",
    "day": "%Y-%m-%d",
    "week": "week of %Y-%m-%d",
    "month": "%Y-%m",
}
NO_MODEL = "(no model)"
"""How tables and plots name the charges made without a model."""


def usage_fields(by: Iterable[GroupKey]) -> list[str]:
    """The fields of a report grouped ``by``: its keys (user, model, period), then the sums."""
    keys = set(by)
    return [_KEY_FIELDS[key] for key in GROUP_KEYS if key in keys] + list(USAGE_FIELDS)


def period_label(start: datetime, period: Period) -> str:
    """A period for people, by its UTC start: ``2026-11-01``, ``2026-11``, ``week of ...``."""
    return start.astimezone(timezone.utc).strftime(_PERIOD_FORMATS[period])


def _usage_values(row: UsageRow) -> dict[str, Any]:
    usage = row.usage
    return {
        "user": row.user_id,
        "model": row.model,
        "period": None if row.period_start is None else row.period_start.isoformat(),
        "calls": row.calls,
        "input": usage.input,
        "output": usage.output,
        "cache_write": usage.cache_write,
        "cache_read": usage.cache_read,
        "cost": plain(row.cost),
        "charged": plain(row.charged),
    }


def usage_plain(rows: Iterable[UsageRow], by: Iterable[GroupKey]) -> list[dict[str, Any]]:
    """A usage report as JSON-ready dicts: the grouped keys and the sums (amounts as text)."""
    fields = usage_fields(by)
    return [{name: values[name] for name in fields} for values in map(_usage_values, rows)]


def write_usage_csv(rows: Iterable[UsageRow], by: Iterable[GroupKey], handle: IO[str]) -> None:
    """A usage report as CSV under a header of ``usage_fields(by)``."""
    fields = usage_fields(by)
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(fields)
    for values in map(_usage_values, rows):
        writer.writerow(["" if values[name] is None else str(values[name]) for name in fields])


def usage_table(
    rows: list[UsageRow], by: Iterable[GroupKey], period: Period | None, *, title: str
) -> Table:
    """A usage report for people: a row per group, exact sums, and a total line."""
    keys = set(by)
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        title_justify="left",
        caption="cost: the calls' priced cost; charged: what balances paid "
        "(less where a charge was clamped at zero).",
        caption_justify="left",
    )
    if "user" in keys:
        table.add_column("User")
    if "model" in keys:
        table.add_column("Model")
    if "period" in keys:
        table.add_column("Period (UTC)", no_wrap=True)
    for name in ("Calls", "Input", "Output", "Cache write", "Cache read", "Cost", "Charged"):
        table.add_column(name, justify="right")
    sums = [0, 0, 0, 0, 0]
    cost = charged = _ZERO
    for row in rows:
        cells: list[Text | str] = []
        if "user" in keys:
            cells.append(Text(row.user_id or ""))
        if "model" in keys:
            cells.append(Text(NO_MODEL if row.model is None else row.model))
        if "period" in keys:
            start = row.period_start
            cells.append("" if start is None or period is None else period_label(start, period))
        counts = (
            row.calls,
            row.usage.input,
            row.usage.output,
            row.usage.cache_write,
            row.usage.cache_read,
        )
        sums = [total + count for total, count in zip(sums, counts, strict=True)]
        cost, charged = EXACT.add(cost, row.cost), EXACT.add(charged, row.charged)
        cells.extend(f"{count:,}" for count in counts)
        cells.extend((money(row.cost), money(row.charged)))
        table.add_row(*cells)
    table.add_section()
    label = ["total"] + [""] * (len(keys & set(GROUP_KEYS)) - 1)
    table.add_row(
        *label, *(f"{count:,}" for count in sums), money(cost), money(charged), style="bold"
    )
    return table


# --- prices -------------------------------------------------------------------


def _usd(amount: Decimal) -> str:
    return plain(amount.scaleb(-6, EXACT))  # 1,000,000 credits = 1 USD


def price_plain(model: str, usage: TokenUsage, cost: Cost, *, incomplete: bool) -> dict[str, Any]:
    """What ``creditmeter price --json`` reports."""
    return {
        "model": model,
        "key": cost.key,
        "premium": cost.premium,
        "incomplete": incomplete,
        "usage": {
            "input": usage.input,
            "output": usage.output,
            "cache_write": usage.cache_write,
            "cache_read": usage.cache_read,
        },
        "rates": {
            "prompt": plain(cost.rates.prompt),
            "completion": plain(cost.rates.completion),
            "cache_write": plain(cost.rates.cache_write),
            "cache_read": plain(cost.rates.cache_read),
        },
        "prompt": plain(cost.prompt),
        "completion": plain(cost.completion),
        "total": plain(cost.total),
        "usd": _usd(cost.total),
    }


def price_view(model: str, usage: TokenUsage, cost: Cost, *, incomplete: bool) -> list[object]:
    """What one call of ``model`` with ``usage`` would be charged, and at which rates."""
    table = Table(title=f"Price of {model}", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("Tokens")
    table.add_column("Count", justify="right")
    table.add_column("Rate (credits/token)", justify="right")
    table.add_column("Credits", justify="right")
    rates = cost.rates
    for name, count, rate, charged in (
        ("input", usage.input, rates.prompt, usage.input * rates.prompt),
        (
            "cache write",
            usage.cache_write,
            rates.cache_write,
            usage.cache_write * rates.cache_write,
        ),
        ("cache read", usage.cache_read, rates.cache_read, usage.cache_read * rates.cache_read),
        ("output", usage.output, rates.completion, cost.completion),
    ):
        table.add_row(name, f"{count:,}", money(rate), money(charged))
    table.add_section()
    table.add_row("total", f"{usage.total:,}", "", money(cost.total), style="bold")
    matched = f"table key {cost.key!r}" if cost.key is not None else "no table key (default rate)"
    notes = [matched, "premium (long-context) rates" if cost.premium else "standard rates"]
    if incomplete:
        notes.append("completion at the 1.15 cancel rate")
    notes.append(f"{_usd(cost.total)} USD")
    return [table, "; ".join(notes) + "."]


# The width of output that is not a terminal (a pipe, a file) when COLUMNS does not say:
# wide enough that rich wraps no table, and _Unpadded drops the padding of short lines.
PIPE_WIDTH = 10_000


def console(*, markup: bool = False, file: TextIO | None = None) -> Console:
    """A console for people on ``file`` (stdout); without ``markup``, user data is plain text.

    When ``file`` is not a terminal, lines are neither wrapped at 80 columns (unless
    ``COLUMNS`` sets a width) nor padded with trailing spaces.
    """
    stream = sys.stdout if file is None else file
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return _Console(file=file, markup=markup, emoji=markup, highlight=False)
    width = None if os.environ.get("COLUMNS", "").strip().isdigit() else PIPE_WIDTH
    unpadded = cast("IO[str]", _Unpadded(stream))  # write, flush and isatty are what rich uses
    return _Console(file=unpadded, width=width, markup=markup, emoji=markup, highlight=False)


class _Console(Console):
    """A rich console that lets a closed pipe reach ``main()`` (which exits 0)."""

    def on_broken_pipe(self) -> None:
        """Print nothing more and raise ``BrokenPipeError`` (rich would exit with status 1)."""
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")


class _Unpadded:
    """A text stream that drops the spaces at the end of each line written to it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._spaces = ""  # trailing spaces held back until the rest of their line is seen

    def write(self, text: str) -> int:
        """Write ``text`` without the spaces that end its lines."""
        whole = self._spaces + text
        body = whole.rstrip(" ")
        self._spaces = whole[len(body) :]
        self._stream.write(re.sub(r" +\n", "\n", body))
        return len(text)

    def flush(self) -> None:
        """Flush the stream underneath."""
        self._stream.flush()

    def isatty(self) -> bool:
        """Never a terminal."""
        return False
