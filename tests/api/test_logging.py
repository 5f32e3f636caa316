"""Logging: only under the ``creditmeter`` logger, never one user's balance in another's record.

Inputs tried: two users with balances of distinct digits, each through a
failing ``on_event`` callback, a failing callback behind ``fan_out``, and a
metered call whose result carries no usage (each path that logs during a
run); and the package's source, read for loggers outside ``creditmeter``,
calls on the root logger and ``warnings.warn``.
"""

from __future__ import annotations

import ast
import logging
from decimal import Decimal
from pathlib import Path

import pytest

import creditmeter
from creditmeter import BalanceConfig, BalanceManager, MemoryStore, TokenUsage
from creditmeter.otel import fan_out
from creditmeter.testing import FakeClock

SOURCE = Path(creditmeter.__file__).parent
LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}


def fail(event: object) -> None:
    raise RuntimeError(repr(event))  # the event's own user and balance, as a sink might say


def spellings(balance: Decimal) -> set[str]:
    whole = int(balance)
    return {str(balance), str(whole), f"{whole:,}", f"{whole:_}"}


def record_text(record: logging.LogRecord) -> str:
    return logging.Formatter("%(name)s %(message)s").format(record)


@pytest.mark.parametrize("through_fan_out", [False, True])
def test_a_record_about_one_user_never_shows_the_other(caplog, through_fan_out):
    users = {"alice-7f3": Decimal(13579), "bob-2c8": Decimal(8642097531)}
    on_event = fan_out(fail, lambda event: None) if through_fan_out else fail
    manager = BalanceManager(
        MemoryStore(),
        BalanceConfig(enabled=True, start_balance=0),
        clock=FakeClock(),
        on_event=on_event,
        low_balance_threshold=13000,
    )

    @manager.metered(user="user_id", model="model", estimate=lambda **_: 40)
    def ask(*, user_id, model):
        return {"no": "usage"}

    with caplog.at_level(logging.DEBUG, logger="creditmeter"):
        for user, amount in users.items():
            manager.grant(user, amount)
        for user in users:
            manager.charge(user, model="gpt-4o-mini", usage=TokenUsage(input=2000, output=100))
            ask(user_id=user, model="gpt-4o")
            held = manager.hold(user, 7)
            manager.settle(held, 3)
            manager.charge(user, 700)  # alice crosses the low-balance threshold

    balances = {user: set() for user in users}
    for user in users:
        for entry in manager.ledger(user):
            if entry.balance_after >= 1000:  # the opening 0 is everyone's
                balances[user] |= spellings(entry.balance_after)
    (alice, bob) = users
    assert not balances[alice] & balances[bob]

    records = caplog.records
    assert records, "the run logs nothing: the check below would be vacuous"
    assert {record.levelname for record in records} == {"WARNING", "ERROR"}
    about = dict.fromkeys(users, 0)
    for record in records:
        assert record.name == "creditmeter" or record.name.startswith("creditmeter.")
        text = record_text(record)
        for user, other in ((alice, bob), (bob, alice)):
            if user in text:
                about[user] += 1
                assert other not in text, text
                leaked = [shown for shown in balances[other] if shown in text]
                assert not leaked, text
    assert all(count >= 6 for count in about.values()), about


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def test_the_source_logs_only_under_creditmeter_and_never_warns():
    problems = []
    for path in sorted(SOURCE.rglob("*.py")):
        where = path.relative_to(SOURCE.parent)
        for call in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            func = call.func
            if not isinstance(func, ast.Attribute) or not isinstance(func.value, ast.Name):
                continue
            owner, name = func.value.id, func.attr
            if owner == "warnings" and name == "warn":
                problems.append(f"{where}:{call.lineno}: warnings.warn")
            elif owner == "logging" and name in LOG_METHODS:
                problems.append(f"{where}:{call.lineno}: logs on the root logger")
            elif owner == "logging" and name == "getLogger":
                arg = call.args[0] if call.args else None
                scoped = (isinstance(arg, ast.Name) and arg.id == "__name__") or (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and (arg.value == "creditmeter" or arg.value.startswith("creditmeter."))
                )
                if not scoped:
                    problems.append(f"{where}:{call.lineno}: a logger outside creditmeter")
    assert problems == []
