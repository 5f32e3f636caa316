"""The hot path's record builders give the very objects the attrs constructors give."""

from __future__ import annotations

import copy
import gc
import pickle
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import attrs
import pytest

from creditmeter import RefillSettings, TokenUsage
from creditmeter.models import (
    Account,
    EntryKind,
    Hold,
    LedgerEntry,
    build_account,
    build_entry,
    build_hold,
)
from creditmeter.pricing import Rates

NOW = datetime(2026, 12, 3, 7, 0, tzinfo=timezone.utc)
RATES = Rates(
    prompt=Decimal("2.5"),
    completion=Decimal(10),
    cache_write=Decimal("2.5"),
    cache_read=Decimal("1.25"),
)
ENTRIES = [
    {
        "id": "a-1",
        "user_id": "alice",
        "kind": EntryKind.GRANT,
        "amount": Decimal(5),
        "balance_after": Decimal(5),
        "at": NOW,
    },
    {
        "id": "a-2",
        "user_id": "bob",
        "kind": EntryKind.CHARGE,
        "amount": Decimal("-3125.00"),
        "balance_after": Decimal("-3125.00"),
        "at": NOW,
        "request_id": "r-1",
        "model": "gpt-4o",
        "usage": TokenUsage(input=1000, output=200, cache_read=500),
        "cost": Decimal("3125.00"),
        "rates": RATES,
        "metadata": {"team": "x", "n": 1},
    },
]


@pytest.mark.parametrize("fields", ENTRIES, ids=["defaults", "every-field"])
def test_build_entry_is_the_attrs_record(fields: dict[str, object]) -> None:
    made = LedgerEntry(**fields)  # type: ignore[arg-type]
    built = build_entry(*(fields.get(f.name, f.default) for f in attrs.fields(LedgerEntry)))  # type: ignore[arg-type]
    assert type(built) is LedgerEntry  # not the subclass it was made as
    assert built == made
    assert repr(built) == repr(made)
    assert attrs.asdict(built) == attrs.asdict(made)
    assert attrs.evolve(built, id="other") == attrs.evolve(made, id="other")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.amount = Decimal(0)  # type: ignore[misc]


def test_build_account_is_the_attrs_record() -> None:
    hold = Hold(
        id="h",
        user_id="alice",
        amount=Decimal(7),
        created_at=NOW,
        expires_at=NOW + timedelta(minutes=5),
    )
    refill = RefillSettings(
        enabled=True, amount=Decimal(100), interval_value=1, interval_unit="days"
    )
    made = Account(
        user_id="alice",
        balance=Decimal(10),
        version=3,
        created_at=NOW,
        updated_at=NOW,
        last_refill=NOW,
        refill=refill,
        holds=(hold,),
    )
    built = build_account("alice", Decimal(10), 3, NOW, NOW, NOW, refill, (hold,), Decimal(7))
    assert type(built) is Account
    assert built == made
    assert hash(built) == hash(made)
    assert repr(built) == repr(made)
    assert built.available == made.available == Decimal(3)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.balance = Decimal(0)  # type: ignore[misc]


def test_builders_take_every_field_in_order() -> None:
    """A field added to a record must be added to its builder (the import checks it too)."""
    assert [f.name for f in attrs.fields(LedgerEntry)] == list(
        build_entry.__code__.co_varnames[: build_entry.__code__.co_argcount]
    )
    assert [f.name for f in attrs.fields(Account)] == list(
        build_account.__code__.co_varnames[: build_account.__code__.co_argcount]
    )


def test_build_hold_is_the_attrs_record() -> None:
    made = Hold(
        id="h",
        user_id="alice",
        amount=Decimal(7),
        created_at=NOW,
        expires_at=NOW + timedelta(minutes=5),
        request_id="r-1",
    )
    built = build_hold("h", "alice", Decimal(7), NOW, NOW + timedelta(minutes=5), "r-1")
    assert type(built) is Hold
    assert built == made
    assert hash(built) == hash(made)
    assert repr(built) == repr(made)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.amount = Decimal(0)  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        del built.amount  # type: ignore[misc]


def test_built_records_copy_pickle_and_serialise_as_the_class() -> None:
    """Whatever reads a built record meets the record's own class, never the builder's."""
    from creditmeter import serde  # noqa: PLC0415

    hold = build_hold("h", "alice", Decimal(7), NOW, NOW + timedelta(minutes=5))
    account = build_account("alice", Decimal(10), 3, NOW, NOW, NOW, None, (hold,), Decimal(7))
    entry = build_entry("e", "alice", EntryKind.CHARGE, Decimal(-3), Decimal(7), NOW)
    for record in (hold, account, entry):
        for again in (pickle.loads(pickle.dumps(record)), copy.copy(record), copy.deepcopy(record)):
            assert type(again) is type(record)
            assert again == record
        assert attrs.evolve(record) == record
    assert serde.account_from_json(serde.account_to_json(account)) == account
    assert serde.entry_from_json(serde.entry_to_json(entry)) == entry


def test_builders_from_many_threads_give_records_of_their_class() -> None:
    """Threads that build at once each get whole records of the right class."""
    seen: list[bool] = []

    def build(n: int) -> None:
        ok = True
        for i in range(2_000):
            made = build_hold(f"h{n}-{i}", "alice", Decimal(i), NOW, NOW)
            ok = ok and type(made) is Hold and made.id == f"h{n}-{i}" and made.amount == i
        seen.append(ok)

    threads = [threading.Thread(target=build, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == [True] * 8
    gc.collect()
    builders = [o for o in gc.get_objects() if type(o).__name__.startswith("_Settable")]
    assert builders == []  # no record is left as an instance of a builder class
