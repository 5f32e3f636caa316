"""Records turned into plain JSON-ready dicts: amounts as exact decimal strings, times ISO-8601.

The API answers with these dicts and the console's templates show them, so
both say the same thing. Nothing here decides a rule: whether a refill is
due comes from ``rules.refill_due``, and when the next one comes from
``rules.add_interval`` over the account's effective settings.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from creditmeter import rules
from creditmeter.config import BalanceConfig
from creditmeter.models import Account, BalanceCheck, CreditBlock, Hold, LedgerEntry
from creditmeter.queries import UsageRow
from creditmeter.usage import TokenUsage

__all__ = [
    "account_plain",
    "block_plain",
    "check_plain",
    "dec",
    "entry_plain",
    "hold_plain",
    "next_refill",
    "summary_plain",
    "usage_plain",
    "when",
]


def dec(value: Decimal | None) -> str | None:
    """An exact decimal string without exponent or trailing zeros (``"1500"``, ``"0.25"``)."""
    if value is None:
        return None
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in {"-0", ""} else text


def when(value: datetime | None) -> str | None:
    """An ISO-8601 time, or ``None``."""
    return None if value is None else value.isoformat()


def usage_dict(usage: TokenUsage | None) -> dict[str, int] | None:
    """Token counts as a dict."""
    if usage is None:
        return None
    return {
        "input": usage.input,
        "output": usage.output,
        "cache_write": usage.cache_write,
        "cache_read": usage.cache_read,
    }


def hold_plain(hold: Hold) -> dict[str, Any]:
    """A hold: its id is what ``settle`` and ``release`` take."""
    return {
        "id": hold.id,
        "user_id": hold.user_id,
        "amount": dec(hold.amount),
        "created_at": when(hold.created_at),
        "expires_at": when(hold.expires_at),
        "request_id": hold.request_id,
    }


def block_plain(block: CreditBlock, now: datetime) -> dict[str, Any]:
    """A credit block, with whether its expiry has passed (written off at the next write)."""
    return {
        "id": block.id,
        "amount": dec(block.amount),
        "granted": dec(block.granted),
        "priority": block.priority,
        "expires_at": when(block.expires_at),
        "expired": block.expires_at is not None and block.expires_at <= now,
        "granted_at": when(block.granted_at),
    }


def next_refill(account: Account, config: BalanceConfig, now: datetime) -> dict[str, Any]:
    """The refill settings that apply, where they come from, and when the next refill is due."""
    settings = rules.effective_refill(account, config)
    next_at: datetime | None = None
    if config.enabled and settings.enabled and settings.amount > 0:
        try:
            next_at = rules.add_interval(
                account.last_refill, settings.interval_value, settings.interval_unit
            )
        except (OverflowError, ValueError):  # past the year 9999: never
            next_at = None
    return {
        "source": "account" if account.refill is not None else "config",
        "enabled": settings.enabled,
        "amount": dec(settings.amount),
        "interval_value": settings.interval_value,
        "interval_unit": settings.interval_unit,
        "mode": config.refill_mode,
        "balances_enabled": config.enabled,
        "last_refill": when(account.last_refill),
        "next_refill_at": when(next_at),
        "due_now": dec(rules.refill_due(account, config=config, now=now)),
    }


def summary_plain(account: Account) -> dict[str, Any]:
    """One row of the users list: balance, available, held, last activity."""
    return {
        "user_id": account.user_id,
        "balance": dec(account.balance),
        "available": dec(account.available),
        "held": dec(account.held),
        "holds": len(account.holds),
        "last_activity": when(account.updated_at),
    }


def account_plain(account: Account, config: BalanceConfig, now: datetime) -> dict[str, Any]:
    """A user's account: balance, holds, blocks, refill settings and the next refill."""
    return {
        **summary_plain(account),
        "created_at": when(account.created_at),
        "version": account.version,
        "hold_list": [hold_plain(hold) for hold in account.holds],
        "blocks": [block_plain(block, now) for block in account.blocks],
        "refill": next_refill(account, config, now),
    }


def entry_plain(entry: LedgerEntry) -> dict[str, Any]:
    """A ledger entry."""
    return {
        "id": entry.id,
        "user_id": entry.user_id,
        "kind": entry.kind.value,
        "amount": dec(entry.amount),
        "balance_after": dec(entry.balance_after),
        "at": when(entry.at),
        "request_id": entry.request_id,
        "model": entry.model,
        "usage": usage_dict(entry.usage),
        "cost": dec(entry.cost),
        "metadata": entry.metadata,
    }


def check_plain(result: BalanceCheck) -> dict[str, Any]:
    """The answer of a balance check."""
    return {
        "allowed": result.allowed,
        "balance": dec(result.balance),
        "available": dec(result.available),
        "cost": dec(result.cost),
    }


def usage_plain(row: UsageRow) -> dict[str, Any]:
    """One row of a usage report."""
    return {
        "user_id": row.user_id,
        "model": row.model,
        "period_start": when(row.period_start),
        "calls": row.calls,
        "usage": usage_dict(row.usage),
        "cost": dec(row.cost),
        "charged": dec(row.charged),
    }
