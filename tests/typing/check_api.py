"""What a type checker sees of the public API: checked by ``mypy --strict tests/typing``.

Not a test module (pytest collects ``test_*.py`` only) and never run: mypy
reads it. ``assert_type`` fails the check when a type is not exactly the one
named: ``metered`` keeps the decorated function's signature (plain, async,
generator, async generator), and the managers' methods return exact types,
the async ones once awaited. The ``type: ignore`` lines are the negative
checks: a call the signature forbids must be an error, and with
``warn_unused_ignores`` (part of ``--strict``) an ignore that no longer
silences one fails the check too.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from decimal import Decimal
from typing import Any

from creditmeter import (
    Account,
    AsyncBalanceManager,
    AsyncMemoryStore,
    AsyncReservation,
    BalanceCheck,
    BalanceManager,
    BatchResult,
    ChargeItem,
    GrantItem,
    Hold,
    LedgerEntry,
    MemoryStore,
    Reservation,
    TokenUsage,
)

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # pragma: no cover - the checker reads one branch
    from typing_extensions import assert_type


def sync_manager(meter: BalanceManager) -> None:
    """Each method of ``BalanceManager`` returns exactly what DESIGN.md says."""
    assert_type(meter.account("u"), Account)
    assert_type(meter.balance("u"), Decimal)
    assert_type(meter.ledger("u", limit=2), list[LedgerEntry])
    assert_type(meter.users(), list[str])
    assert_type(meter.grant("u", 5, reason="welcome"), LedgerEntry)
    assert_type(meter.charge("u", 5), LedgerEntry)
    assert_type(meter.charge("u", model="gpt-4o", usage=TokenUsage(input=3)), LedgerEntry)
    assert_type(meter.set_balance("u", 0), LedgerEntry)
    assert_type(meter.maybe_refill("u"), LedgerEntry | None)
    assert_type(meter.check("u", 5), BalanceCheck)
    assert_type(meter.require("u", 5), BalanceCheck)
    held = meter.hold("u", 5)
    assert_type(held, Hold)
    assert_type(meter.settle(held, 3), LedgerEntry)
    assert_type(meter.release(held), LedgerEntry)
    assert_type(meter.configure_refill("u", None), Account)
    assert_type(meter.reserve("u", 5), Reservation)
    with meter.reserve("u", 5) as reservation:
        assert_type(reservation, Reservation)
        assert_type(reservation.settle(3), LedgerEntry)
    with BalanceManager(MemoryStore()) as opened:
        assert_type(opened, BalanceManager)
    meter.charge("u", "5")  # type: ignore[arg-type]  # amounts are numbers, never text
    assert_type(meter.charge_many([ChargeItem("u", 5)]), list[BatchResult])
    assert_type(meter.grant_many([GrantItem("u", 5, request_id="g")]), list[BatchResult])
    meter.charge_many([GrantItem("u", 5)])  # type: ignore[list-item]  # a grant is not a charge


async def async_manager(meter: AsyncBalanceManager) -> None:
    """The async twins: coroutines whose awaited values are the sync methods' types."""
    assert_type(meter.charge("u", 5), Coroutine[Any, Any, LedgerEntry]).close()
    assert_type(await meter.charge_many([ChargeItem("u", 5)]), list[BatchResult])
    assert_type(await meter.account("u"), Account)
    assert_type(await meter.balance("u"), Decimal)
    assert_type(await meter.ledger("u"), list[LedgerEntry])
    assert_type(await meter.users(), list[str])
    assert_type(await meter.grant("u", 5), LedgerEntry)
    assert_type(await meter.charge("u", 5), LedgerEntry)
    assert_type(await meter.set_balance("u", 0), LedgerEntry)
    assert_type(await meter.maybe_refill("u"), LedgerEntry | None)
    assert_type(await meter.check("u", 5), BalanceCheck)
    assert_type(await meter.require("u", 5), BalanceCheck)
    held = await meter.hold("u", 5)
    assert_type(held, Hold)
    assert_type(await meter.settle(held, 3), LedgerEntry)
    assert_type(await meter.release(held), LedgerEntry)
    assert_type(await meter.configure_refill("u", None), Account)
    async with meter.reserve("u", 5) as reservation:
        assert_type(reservation, AsyncReservation)
        assert_type(await reservation.settle(3), LedgerEntry)
    async with AsyncBalanceManager(AsyncMemoryStore()) as opened:
        assert_type(opened, AsyncBalanceManager)
    entry: LedgerEntry = meter.charge("u", 5)  # type: ignore[assignment]  # not awaited
    del entry


def metered_signatures(meter: BalanceManager, ameter: AsyncBalanceManager) -> None:
    """``metered`` returns a function of the same parameters and return type."""

    @meter.metered(user="user_id", model="model")
    def ask(prompt: str, *, user_id: str, model: str = "gpt-4o") -> dict[str, int]:
        return {"tokens": len(prompt)}

    assert_type(ask("hi", user_id="alice"), dict[str, int])
    ask(1, user_id="alice")  # type: ignore[arg-type]  # the parameters are kept, too
    ask("hi")  # type: ignore[call-arg]  # user_id is still required

    @meter.metered(user="user_id")
    def stream(user_id: str) -> Iterator[str]:
        yield user_id

    assert_type(stream("alice"), Iterator[str])

    @ameter.metered(user="user_id")
    async def ask_async(prompt: str, *, user_id: str) -> list[str]:
        return [prompt, user_id]

    assert_type(ask_async("hi", user_id="alice"), Coroutine[Any, Any, list[str]]).close()

    @ameter.metered(user="user_id")
    async def stream_async(user_id: str) -> AsyncIterator[str]:
        yield user_id

    assert_type(stream_async("alice"), AsyncIterator[str])
