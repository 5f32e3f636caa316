"""Bad input is refused, and a refused call leaves the store exactly as it was.

Run against MemoryStore and SQLiteStore (the ``manager`` fixture), on a user
that already has an account ("alice") and on one that has none ("carol"). The
three big cross products (every bad amount, user id and clock through every
method) run on MemoryStore only (``MEMORY_ONLY``): the manager refuses them
before it reaches a store, and every other refusal below still runs on both.
After every refused call the store's users, each account and each ledger are
compared with a snapshot taken before it.

Inputs tried:

- amounts, through grant, charge, set_balance, maybe_refill(cost=), check(cost)
  and require(cost): -1, -0.5, Decimal("-1"), NaN, inf, -inf, True, False,
  "10", b"10", Decimal("NaN"), Decimal("sNaN"), Decimal("Infinity"),
  Decimal("-Infinity"), 10**16, 10**15 + 1, 1e16, Decimal("1e16"),
  Decimal("1E+999999"), Fraction(1, 3), 1j, [10]; None for grant, charge,
  set_balance and maybe_refill (check and require take None as "no cost").
  10**15 and 0 are accepted (the boundaries).
- an amount too precise to add exactly to a balance (Decimal("1e-30")).
- user ids, through every write and read method: "", "x" * 257, "a\\x00b",
  "a\\nb", "a\\tb", "\\x7f", "a\\x85b" (C1), 5, None, b"alice", a lone surrogate;
  "x" * 256 and "é" * 256 are accepted.
- request ids: "", 5, b"r", "r" * 257, "a\\nb", a lone surrogate.
- metadata: a list, a str, a non-str key, a nested dict, a list value, NaN,
  a Decimal value, a lone surrogate; reason: 5, "", "a\\x00b".
- charge: no amount and no usage, usage that is not a TokenUsage, model 5,
  strict "yes", incomplete "no", incomplete=True with an amount.
- grant (credit blocks): expires_at naive, with a tzinfo without offset, now,
  a microsecond ago, a day ago, an ISO str, a date, a timestamp; priority -1,
  101, True, 1.5, 5.0, "5", None with a past expiry; priorities 0 and 100
  and an expiry a microsecond ahead are accepted.
- check: a cost together with a model; ledger: limit -1, True, "5", and 10**20
  (which must return every entry).
- clocks returning a naive datetime, a datetime whose tzinfo has no offset,
  a date, a float timestamp, an ISO string, None.
- a request id reused with another amount, cost, model, target or kind
  (IdempotencyConflict), including a strict charge that could not pay now;
  the same parameters return the original entry, same id.
- SQLite files: 4096 bytes of junk, an SQLite header followed by junk, a real
  store truncated to 100 bytes / one page / half, another application's
  SQLite database, a creditmeter store with an unknown schema number, a
  directory, a path in a missing directory: ``SQLiteStore(path)`` raises
  StoreError and the file's bytes are unchanged.
- corrupt rows written behind the store's back: account data that is not
  JSON, a JSON list, an unknown schema, a NaN balance, empty; a ledger row
  that is not JSON: reads and writes raise StoreError and nothing changes.
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
    MemoryStore,
    SQLiteStore,
    StoreError,
)
from creditmeter.stores.base import BalanceStore
from creditmeter.testing import FakeClock

Call = Callable[[BalanceManager, Any], Any]

EXISTING = "alice"
NEW = "carol"
TARGETS = [pytest.param(EXISTING, id="existing-user"), pytest.param(NEW, id="new-user")]


# --- helpers ------------------------------------------------------------------------


def snapshot(store: BalanceStore) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Everything a caller can see in a store: its users, their accounts and ledgers."""
    users = store.users()
    return users, {u: store.load(u) for u in users}, {u: store.ledger(u) for u in users}


def refused(store: BalanceStore, error: type[Exception], call: Callable[[], Any]) -> Any:
    """Run ``call``, expect ``error``, and check the store did not change; return the error."""
    before = snapshot(store)
    with pytest.raises(error) as caught:
        call()
    assert snapshot(store) == before
    return caught.value


def invalid(store: BalanceStore, call: Callable[[], Any]) -> InvalidInput:
    error = refused(store, InvalidInput, call)
    assert isinstance(error, ValueError)
    return error


# Overrides the parametrisation of conftest's store_factory: MemoryStore only.
MEMORY_ONLY = pytest.mark.parametrize("store_factory", ["memory"], indirect=True)


@pytest.fixture
def seeded(manager: BalanceManager) -> BalanceManager:
    """The manager, with two users on record: alice (a grant) and bob (a charge)."""
    manager.grant(EXISTING, 5, request_id="seed-grant", metadata={"source": "seed"})
    manager.charge("bob", 3, model="gpt-4o", request_id="seed-charge")
    return manager


# --- amounts ------------------------------------------------------------------------

AMOUNT_CALLS: dict[str, Callable[[BalanceManager, str, Any], Any]] = {
    "grant": lambda m, u, x: m.grant(u, x),
    "charge": lambda m, u, x: m.charge(u, x),
    "set_balance": lambda m, u, x: m.set_balance(u, x),
    "maybe_refill": lambda m, u, x: m.maybe_refill(u, cost=x),
    "check": lambda m, u, x: m.check(u, x),
    "require": lambda m, u, x: m.require(u, x),
}
AMOUNT_METHODS = [pytest.param(name, id=name) for name in AMOUNT_CALLS]
NONE_NOT_MEANINGFUL = [
    pytest.param(name, id=name) for name in ("grant", "charge", "set_balance", "maybe_refill")
]

BAD_AMOUNTS = [
    pytest.param(-1, id="minus-1"),
    pytest.param(-0.5, id="minus-0.5"),
    pytest.param(Decimal(-1), id="Decimal-minus-1"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(float("inf"), id="inf"),
    pytest.param(float("-inf"), id="minus-inf"),
    pytest.param(True, id="True"),
    pytest.param(False, id="False"),
    pytest.param("10", id="str-10"),
    pytest.param(b"10", id="bytes-10"),
    pytest.param(Decimal("NaN"), id="Decimal-NaN"),
    pytest.param(Decimal("sNaN"), id="Decimal-sNaN"),
    pytest.param(Decimal("Infinity"), id="Decimal-Infinity"),
    pytest.param(Decimal("-Infinity"), id="Decimal-minus-Infinity"),
    pytest.param(10**16, id="10**16"),
    pytest.param(10**15 + 1, id="10**15+1"),
    pytest.param(1e16, id="float-1e16"),
    pytest.param(Decimal("1e16"), id="Decimal-1e16"),
    pytest.param(Decimal("1E+999999"), id="Decimal-1E+999999"),
    pytest.param(Fraction(1, 3), id="Fraction"),
    pytest.param(1j, id="complex"),
    pytest.param([10], id="list"),
]


@MEMORY_ONLY
@pytest.mark.parametrize("user", TARGETS)
@pytest.mark.parametrize("value", BAD_AMOUNTS)
@pytest.mark.parametrize("method", AMOUNT_METHODS)
def test_bad_amount_is_invalid_input(seeded: BalanceManager, method: str, value: Any, user: str):
    invalid(seeded.store, lambda: AMOUNT_CALLS[method](seeded, user, value))


@pytest.mark.parametrize("user", TARGETS)
@pytest.mark.parametrize("method", NONE_NOT_MEANINGFUL)
def test_none_amount_is_invalid_input(seeded: BalanceManager, method: str, user: str):
    invalid(seeded.store, lambda: AMOUNT_CALLS[method](seeded, user, None))


@pytest.mark.parametrize("method", ["check", "require"])
def test_none_cost_means_no_cost_for_check_and_require(seeded: BalanceManager, method: str):
    result = AMOUNT_CALLS[method](seeded, EXISTING, None)
    assert result.allowed
    assert result.cost is None


@pytest.mark.parametrize("value", [pytest.param(10**15, id="10**15"), pytest.param(0, id="zero")])
@pytest.mark.parametrize(
    "method", [pytest.param(n, id=n) for n in ("charge", "set_balance", "maybe_refill", "check")]
)
def test_boundary_amounts_are_accepted(seeded: BalanceManager, method: str, value: int):
    AMOUNT_CALLS[method](seeded, EXISTING, value)


def test_largest_grant_is_accepted(seeded: BalanceManager):
    entry = seeded.grant(EXISTING, Decimal(10**15))
    assert entry.amount == Decimal(10**15)


def test_require_of_the_largest_cost_is_a_refusal_not_bad_input(seeded: BalanceManager):
    refused(seeded.store, InsufficientBalance, lambda: seeded.require(EXISTING, 10**15))


@pytest.mark.parametrize("method", ["grant", "charge"])
def test_amount_too_precise_is_refused_or_applied_exactly(seeded: BalanceManager, method: str):
    before = seeded.balance(EXISTING)
    try:
        entry = AMOUNT_CALLS[method](seeded, EXISTING, Decimal("1e-30"))
    except InvalidInput:
        assert seeded.balance(EXISTING) == before
    else:
        with localcontext() as exact:
            exact.prec = 100
            assert before + entry.amount == entry.balance_after
            assert seeded.balance(EXISTING) == entry.balance_after


# --- user ids -------------------------------------------------------------------------

USER_CALLS: dict[str, Callable[[BalanceManager, Any], Any]] = {
    "grant": lambda m, u: m.grant(u, 1),
    "charge": lambda m, u: m.charge(u, 1),
    "set_balance": lambda m, u: m.set_balance(u, 1),
    "maybe_refill": lambda m, u: m.maybe_refill(u),
    "check": lambda m, u: m.check(u, 1),
    "require": lambda m, u: m.require(u, 1),
    "account": lambda m, u: m.account(u),
    "balance": lambda m, u: m.balance(u),
    "ledger": lambda m, u: m.ledger(u),
}
USER_METHODS = [pytest.param(name, id=name) for name in USER_CALLS]

BAD_USER_IDS = [
    pytest.param("", id="empty"),
    pytest.param("x" * 257, id="257-chars"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\tb", id="tab"),
    pytest.param("\x7f", id="del"),
    pytest.param("a\x85b", id="c1-control"),
    pytest.param(5, id="int"),
    pytest.param(None, id="none"),
    pytest.param(b"alice", id="bytes"),
]


@MEMORY_ONLY
@pytest.mark.parametrize("user", BAD_USER_IDS)
@pytest.mark.parametrize("method", USER_METHODS)
def test_bad_user_id_is_invalid_input(seeded: BalanceManager, method: str, user: Any):
    invalid(seeded.store, lambda: USER_CALLS[method](seeded, user))


@pytest.mark.parametrize("method", [pytest.param(n, id=n) for n in ("grant", "charge")])
def test_user_id_with_lone_surrogate_is_invalid_input(seeded: BalanceManager, method: str):
    invalid(seeded.store, lambda: USER_CALLS[method](seeded, "a\ud800"))


@pytest.mark.parametrize(
    "user", [pytest.param("x" * 256, id="256-ascii"), pytest.param("é" * 256, id="256-accented")]
)
@pytest.mark.parametrize("method", USER_METHODS)
def test_longest_user_id_is_accepted(seeded: BalanceManager, method: str, user: str):
    USER_CALLS[method](seeded, user)
    assert user in seeded.users() or method == "ledger"
    if method != "ledger":
        assert seeded.account(user).user_id == user
        assert seeded.ledger(user)[-1].user_id == user


# --- request ids, metadata, reasons, other arguments ------------------------------------

REQUEST_CALLS: dict[str, Callable[[BalanceManager, Any], Any]] = {
    "grant": lambda m, r: m.grant(EXISTING, 1, request_id=r),
    "charge": lambda m, r: m.charge(EXISTING, 1, request_id=r),
    "set_balance": lambda m, r: m.set_balance(EXISTING, 1, request_id=r),
}


@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param("", id="empty"),
        pytest.param(5, id="int"),
        pytest.param(b"r", id="bytes"),
        pytest.param("r" * 257, id="257-chars"),
        pytest.param("a\nb", id="newline"),
    ],
)
@pytest.mark.parametrize("method", [pytest.param(n, id=n) for n in REQUEST_CALLS])
def test_bad_request_id_is_invalid_input(seeded: BalanceManager, method: str, request_id: Any):
    invalid(seeded.store, lambda: REQUEST_CALLS[method](seeded, request_id))


@pytest.mark.parametrize("method", [pytest.param(n, id=n) for n in REQUEST_CALLS])
def test_request_id_with_lone_surrogate_is_invalid_input(seeded: BalanceManager, method: str):
    invalid(seeded.store, lambda: REQUEST_CALLS[method](seeded, "r\ud800"))


METADATA_CALLS: dict[str, Callable[[BalanceManager, Any], Any]] = {
    "grant": lambda m, meta: m.grant(EXISTING, 1, metadata=meta),
    "charge": lambda m, meta: m.charge(EXISTING, 1, metadata=meta),
}


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param(["a", "b"], id="list"),
        pytest.param("reason", id="str"),
        pytest.param({1: "a"}, id="int-key"),
        pytest.param({("a",): "b"}, id="tuple-key"),
        pytest.param({"a": {"b": 1}}, id="nested-dict"),
        pytest.param({"a": [1, 2]}, id="list-value"),
        pytest.param({"a": float("nan")}, id="nan-value"),
        pytest.param({"a": float("inf")}, id="inf-value"),
        pytest.param({"a": Decimal(1)}, id="Decimal-value"),
        pytest.param({"a": b"x"}, id="bytes-value"),
    ],
)
@pytest.mark.parametrize("method", [pytest.param(n, id=n) for n in METADATA_CALLS])
def test_bad_metadata_is_invalid_input(seeded: BalanceManager, method: str, metadata: Any):
    invalid(seeded.store, lambda: METADATA_CALLS[method](seeded, metadata))


@pytest.mark.parametrize(
    "metadata",
    [pytest.param({"k": "v\udc00"}, id="value"), pytest.param({"k\udc00": "v"}, id="key")],
)
def test_metadata_with_lone_surrogate_is_invalid_input(seeded: BalanceManager, metadata: Any):
    invalid(seeded.store, lambda: seeded.grant(EXISTING, 1, metadata=metadata))


def test_metadata_is_copied(seeded: BalanceManager):
    meta = {"route": "/chat"}
    entry = seeded.grant(EXISTING, 1, metadata=meta)
    meta["route"] = "/changed"
    assert entry.metadata == {"route": "/chat"}
    assert seeded.ledger(EXISTING)[-1].metadata == {"route": "/chat"}


REASON_CALLS: dict[str, Callable[[BalanceManager, Any], Any]] = {
    "grant": lambda m, r: m.grant(EXISTING, 1, reason=r),
    "set_balance": lambda m, r: m.set_balance(EXISTING, 1, reason=r),
}


@pytest.mark.parametrize(
    "reason",
    [pytest.param(5, id="int"), pytest.param("", id="empty"), pytest.param("a\x00b", id="nul")],
)
@pytest.mark.parametrize("method", [pytest.param(n, id=n) for n in REASON_CALLS])
def test_bad_reason_is_invalid_input(seeded: BalanceManager, method: str, reason: Any):
    invalid(seeded.store, lambda: REASON_CALLS[method](seeded, reason))


@pytest.mark.parametrize("user", TARGETS)
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="neither-amount-nor-usage"),
        pytest.param({"model": "gpt-4o"}, id="model-only"),
        pytest.param({"usage": {"input": 5}}, id="usage-dict"),
        pytest.param({"usage": 5}, id="usage-int"),
        pytest.param({"amount": 1, "model": 5}, id="model-int"),
        pytest.param({"amount": 1, "model": ""}, id="model-empty"),
        pytest.param({"amount": 1, "strict": "yes"}, id="strict-str"),
        pytest.param({"amount": 1, "strict": 1}, id="strict-int"),
        pytest.param({"amount": 1, "incomplete": "no"}, id="incomplete-str"),
        pytest.param({"amount": 1, "incomplete": True}, id="incomplete-with-amount"),
    ],
)
def test_bad_charge_arguments_are_invalid_input(
    seeded: BalanceManager, kwargs: dict[str, Any], user: str
):
    invalid(seeded.store, lambda: seeded.charge(user, **kwargs))


@pytest.mark.parametrize("method", ["check", "require"])
def test_cost_and_model_together_are_invalid_input(seeded: BalanceManager, method: str):
    call = getattr(seeded, method)
    invalid(seeded.store, lambda: call(EXISTING, 10, model="gpt-4o", input_tokens=5))


@pytest.mark.parametrize(
    "limit",
    [pytest.param(-1, id="minus-1"), pytest.param(True, id="True"), pytest.param("5", id="str")],
)
def test_bad_ledger_limit_is_invalid_input(seeded: BalanceManager, limit: Any):
    invalid(seeded.store, lambda: seeded.ledger(EXISTING, limit=limit))


@contextlib.contextmanager
def open_store(kind: str, tmp_path: Path) -> Iterator[BalanceStore]:
    store: BalanceStore = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "s.db")
    try:
        yield store
    finally:
        store.close()


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("memory", id="memory"),
        pytest.param(
            "sqlite",
            id="sqlite",
        ),
    ],
)
def test_huge_ledger_limit_returns_every_entry(kind: str, tmp_path: Path):
    with open_store(kind, tmp_path) as store:
        manager = BalanceManager(store, BalanceConfig(enabled=True), clock=FakeClock())
        manager.grant(EXISTING, 1)
        assert manager.ledger(EXISTING, limit=10**20) == manager.ledger(EXISTING)


# --- clocks -----------------------------------------------------------------------------


class _NoOffset(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return None


BAD_CLOCKS = [
    pytest.param(lambda: datetime(2025, 1, 2, 12, 0), id="naive-datetime"),  # noqa: DTZ001
    pytest.param(lambda: datetime(2025, 1, 2, tzinfo=_NoOffset()), id="tzinfo-without-offset"),
    pytest.param(lambda: date(2025, 1, 2), id="date"),
    pytest.param(lambda: 1735776000.0, id="float-timestamp"),
    pytest.param(lambda: "2025-01-02T00:00:00Z", id="iso-str"),
    pytest.param(lambda: None, id="none"),
]
CLOCK_CALLS: dict[str, Callable[[BalanceManager, str], Any]] = {
    "grant": lambda m, u: m.grant(u, 1),
    "charge": lambda m, u: m.charge(u, 1),
    "charge-strict": lambda m, u: m.charge(u, 1, strict=True),
    "set_balance": lambda m, u: m.set_balance(u, 1),
    "maybe_refill": lambda m, u: m.maybe_refill(u),
    "check": lambda m, u: m.check(u, 1),
    "require": lambda m, u: m.require(u, 1),
}


@MEMORY_ONLY
@pytest.mark.parametrize("user", TARGETS)
@pytest.mark.parametrize("bad_clock", BAD_CLOCKS)
@pytest.mark.parametrize("method", [pytest.param(n, id=n) for n in CLOCK_CALLS])
def test_bad_clock_is_invalid_input(
    seeded: BalanceManager, method: str, bad_clock: Callable[[], Any], user: str
):
    manager = BalanceManager(seeded.store, seeded.config, clock=bad_clock)
    invalid(seeded.store, lambda: CLOCK_CALLS[method](manager, user))


@pytest.mark.parametrize("bad_clock", BAD_CLOCKS)
@pytest.mark.parametrize("method", ["account", "balance"])
def test_bad_clock_when_opening_an_account_is_invalid_input(
    seeded: BalanceManager, method: str, bad_clock: Callable[[], Any]
):
    manager = BalanceManager(seeded.store, seeded.config, clock=bad_clock)
    invalid(seeded.store, lambda: getattr(manager, method)(NEW))


def test_bad_clock_leaves_the_manager_usable(seeded: BalanceManager, clock: FakeClock):
    broken = BalanceManager(seeded.store, seeded.config, clock=lambda: datetime(2025, 1, 2))  # noqa: DTZ001
    invalid(seeded.store, lambda: broken.charge(EXISTING, 1))
    entry = seeded.charge(EXISTING, 1)
    assert entry.balance_after == Decimal(20000 + 5 - 1)


def test_aware_non_utc_clock_is_stored_as_utc(seeded: BalanceManager):
    plus14 = timezone(timedelta(hours=14))
    manager = BalanceManager(
        seeded.store, seeded.config, clock=lambda: datetime(2025, 1, 2, 10, tzinfo=plus14)
    )
    entry = manager.grant(NEW, 1)
    assert entry.at == datetime(2025, 1, 1, 20, tzinfo=timezone.utc)
    assert entry.at.utcoffset() == timedelta(0)


# --- grant's credit-block arguments -----------------------------------------------------

_NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)  # where the fixture's FakeClock stands


@pytest.mark.parametrize("user", TARGETS)
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"expires_at": datetime(2026, 1, 1)}, id="expires-naive"),  # noqa: DTZ001
        pytest.param({"expires_at": datetime(2026, 1, 1, tzinfo=_NoOffset())}, id="no-offset"),
        pytest.param({"expires_at": _NOW}, id="expires-now"),
        pytest.param({"expires_at": _NOW - timedelta(microseconds=1)}, id="expires-1us-ago"),
        pytest.param({"expires_at": _NOW - timedelta(days=1)}, id="expires-past"),
        pytest.param({"expires_at": "2026-01-01T00:00:00+00:00"}, id="expires-iso-str"),
        pytest.param({"expires_at": date(2026, 1, 1)}, id="expires-date"),
        pytest.param({"expires_at": 1_800_000_000.0}, id="expires-timestamp"),
        pytest.param({"priority": -1}, id="priority-minus-1"),
        pytest.param({"priority": 101}, id="priority-101"),
        pytest.param({"priority": True}, id="priority-True"),
        pytest.param({"priority": 1.5}, id="priority-1.5"),
        pytest.param({"priority": 5.0}, id="priority-5.0"),
        pytest.param({"priority": "5"}, id="priority-str"),
        pytest.param({"priority": 5, "expires_at": _NOW}, id="good-priority-bad-expiry"),
    ],
)
def test_bad_grant_arguments_are_invalid_input(
    seeded: BalanceManager, kwargs: dict[str, Any], user: str
):
    invalid(seeded.store, lambda: seeded.grant(user, 1, **kwargs))


def test_grant_argument_bounds_are_accepted(seeded: BalanceManager):
    seeded.grant(EXISTING, 1, priority=0)
    seeded.grant(EXISTING, 1, priority=100)
    seeded.grant(EXISTING, 1, expires_at=_NOW + timedelta(microseconds=1))
    assert [b.priority for b in seeded.account(EXISTING).blocks] == [0, 50, 100]


# --- idempotency --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(
            lambda m: m.grant(EXISTING, 10, request_id="dup"),
            lambda m: m.grant(EXISTING, 11, request_id="dup"),
            id="grant-other-amount",
        ),
        pytest.param(
            lambda m: m.charge(EXISTING, 5, request_id="dup"),
            lambda m: m.charge(EXISTING, 6, request_id="dup"),
            id="charge-other-amount",
        ),
        pytest.param(
            lambda m: m.charge(EXISTING, 5, model="gpt-4o", request_id="dup"),
            lambda m: m.charge(EXISTING, 5, model="gpt-4o-mini", request_id="dup"),
            id="charge-other-model",
        ),
        pytest.param(
            lambda m: m.set_balance(EXISTING, 100, request_id="dup"),
            lambda m: m.set_balance(EXISTING, 200, request_id="dup"),
            id="set_balance-other-target",
        ),
        pytest.param(
            lambda m: m.grant(EXISTING, 5, request_id="dup"),
            lambda m: m.charge(EXISTING, 5, request_id="dup"),
            id="grant-then-charge",
        ),
        pytest.param(
            lambda m: m.charge(EXISTING, 5, request_id="dup"),
            lambda m: m.set_balance(EXISTING, 5, request_id="dup"),
            id="charge-then-set_balance",
        ),
        pytest.param(
            lambda m: m.set_balance(EXISTING, 5, request_id="dup"),
            lambda m: m.grant(EXISTING, 5, request_id="dup"),
            id="set_balance-then-grant",
        ),
        pytest.param(
            lambda m: m.grant(NEW, 10, request_id="dup"),
            lambda m: m.grant(NEW, 11, request_id="dup"),
            id="grant-that-opened-the-account",
        ),
        pytest.param(
            lambda m: m.charge(EXISTING, 5, strict=True, request_id="dup"),
            lambda m: m.charge(EXISTING, 6, strict=True, request_id="dup"),
            id="strict-charge-other-amount",
        ),
    ],
)
@pytest.mark.parametrize("fresh_manager", [False, True], ids=["same-manager", "fresh-manager"])
def test_request_id_reused_with_other_parameters_conflicts(
    seeded: BalanceManager, first: Call, second: Call, fresh_manager: bool
):
    original = first(seeded)
    other = (
        BalanceManager(seeded.store, seeded.config, clock=seeded.clock) if fresh_manager else seeded
    )
    error = refused(seeded.store, IdempotencyConflict, lambda: second(other))
    assert error.request_id == "dup"
    assert error.user_id == original.user_id
    # The original is still the one on record, and still replays.
    assert seeded.store.find_request(original.user_id, "dup") == original


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: m.grant(EXISTING, 10, request_id="dup"), id="grant"),
        pytest.param(lambda m: m.charge(EXISTING, 5, request_id="dup"), id="charge"),
        pytest.param(
            lambda m: m.charge(EXISTING, 5, model="gpt-4o", strict=True, request_id="dup"),
            id="charge-strict",
        ),
        pytest.param(lambda m: m.set_balance(EXISTING, 100, request_id="dup"), id="set_balance"),
        pytest.param(lambda m: m.grant(NEW, 10, request_id="dup"), id="grant-opening"),
        pytest.param(lambda m: m.charge(NEW, 5, request_id="dup"), id="charge-opening"),
    ],
)
@pytest.mark.parametrize("fresh_manager", [False, True], ids=["same-manager", "fresh-manager"])
def test_request_id_reused_with_same_parameters_returns_the_original_entry(
    seeded: BalanceManager, call: Call, fresh_manager: bool
):
    original = call(seeded)
    other = (
        BalanceManager(seeded.store, seeded.config, clock=seeded.clock) if fresh_manager else seeded
    )
    before = snapshot(seeded.store)
    again = call(other)
    assert again == original
    assert again.id == original.id
    assert snapshot(seeded.store) == before


def test_replay_after_the_balance_moved_returns_the_original(seeded: BalanceManager):
    original = seeded.set_balance(EXISTING, 100, request_id="set-once")
    seeded.charge(EXISTING, 10)
    before = snapshot(seeded.store)
    again = seeded.set_balance(EXISTING, 100, request_id="set-once")
    assert again == original
    assert again.id == original.id
    assert seeded.balance(EXISTING) == Decimal(90)  # not set back to 100
    assert snapshot(seeded.store) == before


def test_strict_charge_replayed_when_it_could_no_longer_pay(seeded: BalanceManager):
    original = seeded.charge(EXISTING, 5, strict=True, request_id="strict")
    seeded.set_balance(EXISTING, 0)
    before = snapshot(seeded.store)
    again = seeded.charge(EXISTING, 5, strict=True, request_id="strict")
    assert again == original
    assert again.id == original.id
    assert snapshot(seeded.store) == before


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(lambda m: m.charge(EXISTING, 5, strict=True, request_id="dup"), id="charge"),
        pytest.param(lambda m: m.grant(EXISTING, 5, request_id="dup"), id="grant"),
    ],
)
def test_strict_charge_that_cannot_pay_with_a_reused_request_id_conflicts(
    seeded: BalanceManager, first: Call
):
    first(seeded)
    seeded.set_balance(EXISTING, 0)
    refused(
        seeded.store,
        IdempotencyConflict,
        lambda: seeded.charge(EXISTING, 999, strict=True, request_id="dup"),
    )


def test_strict_charge_refused_with_a_new_request_id_records_nothing(seeded: BalanceManager):
    seeded.set_balance(EXISTING, 0)
    refused(
        seeded.store,
        InsufficientBalance,
        lambda: seeded.charge(EXISTING, 999, strict=True, request_id="never"),
    )
    assert seeded.store.find_request(EXISTING, "never") is None


def test_request_ids_belong_to_one_user(seeded: BalanceManager):
    mine = seeded.grant(EXISTING, 10, request_id="shared")
    theirs = seeded.grant("bob", 11, request_id="shared")
    assert theirs.id != mine.id
    assert theirs.amount == Decimal(11)


# --- corrupt SQLite files ----------------------------------------------------------------


def _junk() -> bytes:
    return random.Random(20250101).randbytes(4096)


def _real_store_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "real.db"
    with SQLiteStore(path) as store:
        manager = BalanceManager(store, BalanceConfig(enabled=True), clock=FakeClock())
        for number in range(200):
            manager.grant(f"user-{number}", 5, request_id=f"r-{number}", metadata={"n": number})
    return path.read_bytes()


def _truncated(path: Path, tmp_path: Path, size: int | None) -> None:
    """Write a real store's file cut to ``size`` bytes (half of it when None)."""
    data = _real_store_bytes(tmp_path)
    assert len(data) > 8 * 4096  # many pages, so half of it loses real data
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def _other_app(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        conn.execute("INSERT INTO notes (body) VALUES ('keep me')")
        conn.commit()


def _unknown_schema(path: Path) -> None:
    SQLiteStore(path).close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE creditmeter_meta SET value = '99' WHERE key = 'schema'")
        conn.commit()


CORRUPT_FILES: list[Any] = [
    pytest.param(lambda path, tmp: path.write_bytes(_junk()), id="4096-bytes-of-junk"),
    pytest.param(
        lambda path, tmp: path.write_bytes(b"SQLite format 3\x00" + _junk()[16:]),
        id="sqlite-header-then-junk",
    ),
    pytest.param(lambda path, tmp: _truncated(path, tmp, 100), id="truncated-100-bytes"),
    pytest.param(lambda path, tmp: _truncated(path, tmp, 4096), id="truncated-one-page"),
    pytest.param(lambda path, tmp: _truncated(path, tmp, None), id="truncated-half"),
    pytest.param(lambda path, tmp: _other_app(path), id="another-apps-database"),
    pytest.param(lambda path, tmp: _unknown_schema(path), id="unknown-creditmeter-schema"),
]


@pytest.mark.parametrize("make", CORRUPT_FILES)
def test_corrupt_sqlite_file_is_a_store_error_and_left_as_it_was(
    tmp_path: Path, make: Callable[[Path, Path], Any]
):
    path = tmp_path / "credits.db"
    make(path, tmp_path)
    before = path.read_bytes()
    assert before  # the case really wrote a file
    try:
        store = SQLiteStore(path)
    except StoreError:
        pass
    else:
        store.close()
        pytest.fail(f"SQLiteStore opened a corrupt file {path}")
    assert path.read_bytes() == before
    # and it is refused again, the same way, the second time
    with pytest.raises(StoreError):
        SQLiteStore(path)
    assert path.read_bytes() == before


def test_store_error_names_the_file(tmp_path: Path):
    path = tmp_path / "junk.db"
    path.write_bytes(_junk())
    with pytest.raises(StoreError, match=r"junk\.db"):
        SQLiteStore(path)


def test_another_apps_database_keeps_its_data(tmp_path: Path):
    path = tmp_path / "app.db"
    _other_app(path)
    with pytest.raises(StoreError):
        SQLiteStore(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
        rows = conn.execute("SELECT body FROM notes").fetchall()
    assert tables == ["notes"]
    assert rows == [("keep me",)]


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda tmp: tmp, id="a-directory"),
        pytest.param(lambda tmp: tmp / "missing" / "credits.db", id="in-a-missing-directory"),
    ],
)
def test_unusable_path_is_a_store_error(tmp_path: Path, where: Callable[[Path], Path]):
    with pytest.raises(StoreError):
        SQLiteStore(where(tmp_path))


# --- corrupt rows --------------------------------------------------------------------------


def _nan_balance(data: str) -> str:
    document = json.loads(data)
    document["balance"] = "NaN"
    return json.dumps(document)


CORRUPT_ACCOUNT_DATA = [
    pytest.param(lambda data: "{not json", id="not-json"),
    pytest.param(lambda data: "[]", id="json-list"),
    pytest.param(lambda data: "", id="empty"),
    pytest.param(lambda data: json.dumps({**json.loads(data), "schema": 99}), id="unknown-schema"),
    pytest.param(_nan_balance, id="nan-balance"),
]


def _raw_rows(path: Path) -> tuple[list[Any], list[Any]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        accounts = conn.execute("SELECT * FROM creditmeter_accounts ORDER BY user_id").fetchall()
        ledger = conn.execute("SELECT * FROM creditmeter_ledger ORDER BY seq").fetchall()
    return accounts, ledger


def _execute(path: Path, sql: str, *params: Any) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(sql, params)
        conn.commit()


@pytest.fixture
def sqlite_manager(tmp_path: Path) -> Iterator[BalanceManager]:
    with SQLiteStore(tmp_path / "credits.db") as store:
        manager = BalanceManager(store, BalanceConfig(enabled=True), clock=FakeClock())
        manager.grant(EXISTING, 5, request_id="seed")
        manager.grant("bob", 7)
        yield manager


CORRUPT_ROW_CALLS: dict[str, Callable[[BalanceManager], Any]] = {
    "balance": lambda m: m.balance(EXISTING),
    "account": lambda m: m.account(EXISTING),
    "grant": lambda m: m.grant(EXISTING, 1),
    "charge": lambda m: m.charge(EXISTING, 1),
    "set_balance": lambda m: m.set_balance(EXISTING, 1),
    "maybe_refill": lambda m: m.maybe_refill(EXISTING),
    "check": lambda m: m.check(EXISTING, 1),
    "require": lambda m: m.require(EXISTING, 1),
}


@pytest.mark.parametrize("corrupt", CORRUPT_ACCOUNT_DATA)
@pytest.mark.parametrize("method", [pytest.param(n, id=n) for n in CORRUPT_ROW_CALLS])
def test_corrupt_account_row_is_a_store_error(
    sqlite_manager: BalanceManager, method: str, corrupt: Callable[[str], str]
):
    store = sqlite_manager.store
    assert isinstance(store, SQLiteStore)
    path = Path(store.path)
    (_, _, data), *_ = _raw_rows(path)[0]
    _execute(
        path, "UPDATE creditmeter_accounts SET data = ? WHERE user_id = ?", corrupt(data), EXISTING
    )
    raw_before = _raw_rows(path)
    # A manager that has not seen alice yet must read her row, and find it corrupt.
    manager = BalanceManager(store, sqlite_manager.config, clock=sqlite_manager.clock)
    with pytest.raises(StoreError, match=f"of user {EXISTING!r} is corrupt"):
        CORRUPT_ROW_CALLS[method](manager)
    assert _raw_rows(path) == raw_before
    # Other users are unaffected.
    assert manager.balance("bob") == Decimal(20007)


def test_corrupt_ledger_row_is_a_store_error(sqlite_manager: BalanceManager):
    store = sqlite_manager.store
    assert isinstance(store, SQLiteStore)
    path = Path(store.path)
    _execute(path, "UPDATE creditmeter_ledger SET data = '{not json' WHERE request_id = ?", "seed")
    raw_before = _raw_rows(path)
    with pytest.raises(StoreError, match=f"of user {EXISTING!r} is corrupt"):
        sqlite_manager.ledger(EXISTING)
    with pytest.raises(StoreError, match=f"of user {EXISTING!r} is corrupt"):
        store.find_request(EXISTING, "seed")
    # Replaying the request must read the corrupt entry: refused, and rolled back.
    manager = BalanceManager(store, sqlite_manager.config, clock=sqlite_manager.clock)
    with pytest.raises(StoreError):
        manager.grant(EXISTING, 5, request_id="seed")
    assert _raw_rows(path) == raw_before
    assert len(sqlite_manager.ledger("bob")) == 2
