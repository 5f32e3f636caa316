"""Metadata is checked by value, not by type, and capped in size; what is stored is plain.

Inputs tried, through grant, charge and settle on MemoryStore, through grant
(refused) or charge (accepted) on SQLite, and some once async:

- refused (InvalidInput, nothing written): an int subclass worth 2**80 and
  one worth 10**5000 (before the fix the first passed the 64-bit check that a
  plain 2**80 fails, and the second was stored by MemoryStore and raised an
  untyped ValueError in SQLite), a plain 2**63, an IntEnum member worth 2**64,
  a float subclass holding NaN or infinity, a str subclass value or key with a
  lone surrogate, a list subclass value, a dict subclass value, a tuple value,
  two str-subclass keys that compare unequal but hold the same text, more
  than 64 KiB of JSON, more than 256 keys, a dict subclass whose ``items()``
  lies (the real contents are checked).
- accepted and stored as plain ``int`` / ``float`` / ``str`` / ``bool`` /
  ``dict``: an int subclass worth 2**63 - 1, an IntEnum member, a float
  subclass, a str subclass key and value, a dict subclass, True and False
  (``bool`` cannot be subclassed), exactly 256 keys, exactly 64 KiB of JSON.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Callable
from typing import Any

import pytest

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceConfig,
    BalanceManager,
    InvalidInput,
    MemoryStore,
)
from creditmeter._validate import MAX_METADATA_BYTES, MAX_METADATA_KEYS


class Int(int):
    """An int subclass, as ORMs and enums hand out."""


class Float(float):
    pass


class Str(str):
    __slots__ = ()


class NeverEqual(str):
    """A str subclass whose instances are all distinct dict keys, whatever their text."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)


class Dict(dict):  # type: ignore[type-arg]
    pass


class Lying(dict):  # type: ignore[type-arg]
    """A dict subclass whose items() hides what it holds."""

    def items(self):  # type: ignore[override]
        return [("fine", 1)]


class List(list):  # type: ignore[type-arg]
    pass


class Big(enum.IntEnum):
    HUGE = 2**64
    SMALL = 7


def json_of(size: int) -> dict[str, str]:
    """One key whose compact JSON (``{"k":"..."}``) is ``size`` bytes."""
    return {"k": "x" * (size - len('{"k":""}'))}


REFUSED: dict[str, Any] = {
    "int-subclass-2**80": {"n": Int(2**80)},
    "int-subclass-10**5000": {"n": Int(10**5000)},
    "int-2**63": {"n": 2**63},
    "intenum-2**64": {"n": Big.HUGE},
    "float-subclass-nan": {"f": Float("nan")},
    "float-subclass-inf": {"f": Float("inf")},
    "str-subclass-surrogate-value": {"s": Str("a\udc00")},
    "str-subclass-surrogate-key": {Str("k\udc00"): 1},
    "list-subclass-value": {"l": List([1])},
    "dict-subclass-value": {"d": Dict(a=1)},
    "tuple-value": {"t": (1, 2)},
    "duplicate-keys": {NeverEqual("k"): 1, NeverEqual("k"): 2},
    "json-over-64KiB": json_of(MAX_METADATA_BYTES + 1),
    "too-many-keys": {f"k{n}": n for n in range(MAX_METADATA_KEYS + 1)},
    "lying-dict": Lying(n=Int(2**80)),
}

ACCEPTED: dict[str, tuple[Any, dict[str, Any]]] = {
    "int-subclass-max": ({"n": Int(2**63 - 1)}, {"n": 2**63 - 1}),
    "intenum": ({"n": Big.SMALL}, {"n": 7}),
    "float-subclass": ({"f": Float(1.5)}, {"f": 1.5}),
    "str-subclass": ({Str("k"): Str("v")}, {"k": "v"}),
    "dict-subclass": (Dict(a=1), {"a": 1}),
    "bools": ({"t": True, "f": False, "none": None}, {"t": True, "f": False, "none": None}),
    "256-keys": (
        {f"k{n}": n for n in range(MAX_METADATA_KEYS)},
        {f"k{n}": n for n in range(MAX_METADATA_KEYS)},
    ),
    "json-of-64KiB": (json_of(MAX_METADATA_BYTES), json_of(MAX_METADATA_BYTES)),
}

CALLS: dict[str, Callable[[BalanceManager, Any], Any]] = {
    "grant": lambda m, meta: m.grant("u", 1, metadata=meta),
    "charge": lambda m, meta: m.charge("u", 1, metadata=meta),
    "settle": lambda m, meta: m.settle(m.hold("u", 1, request_id="held"), 1, metadata=meta),
}


@pytest.fixture
def meter(store: Any) -> BalanceManager:
    manager = BalanceManager(store, BalanceConfig(enabled=True))
    manager.grant("u", 1)
    return manager


def snapshot(meter: BalanceManager) -> tuple[Any, ...]:
    account = meter.store.load("u")
    return (account.balance, account.version, meter.store.ledger("u"))


def calls_for(meter: BalanceManager, one: str) -> list[str]:
    """Every call on MemoryStore; on SQLite one (the check comes before any store is asked)."""
    return list(CALLS) if isinstance(meter.store, MemoryStore) else [one]


@pytest.mark.parametrize("metadata", REFUSED.values(), ids=REFUSED.keys())
def test_refused_metadata_writes_nothing(meter, metadata):
    for call in calls_for(meter, "grant"):
        if call == "settle":
            meter.hold("u", 1, request_id="held")
        before = snapshot(meter)
        with pytest.raises(InvalidInput, match="metadata"):
            CALLS[call](meter, metadata)
        assert snapshot(meter) == before, call


@pytest.mark.parametrize(("metadata", "stored"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_metadata_is_stored_plain(meter, metadata, stored):
    for call in calls_for(meter, "charge"):
        entry = CALLS[call](meter, metadata)
        for written in (entry, meter.ledger("u")[-1]):
            assert written.metadata == stored, call
            assert type(written.metadata) is dict
            for key, value in written.metadata.items():
                assert type(key) is str
                assert type(value) is type(stored[key]), (call, key)
        size = len(json.dumps(entry.metadata, separators=(",", ":"), ensure_ascii=False).encode())
        assert size <= MAX_METADATA_BYTES


def test_the_caller_metadata_is_copied(meter):
    metadata = Dict(route=Str("/chat"))
    entry = meter.grant("u", 1, metadata=metadata)
    metadata["route"] = "/changed"
    assert meter.ledger("u")[-1].metadata == entry.metadata == {"route": "/chat"}


def test_async_metadata_is_checked_alike():
    async def main() -> None:
        async with AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True)) as m:
            await m.grant("u", 1)
            with pytest.raises(InvalidInput, match="metadata"):
                await m.charge("u", 1, metadata={"n": Int(10**5000)})
            entry = await m.charge("u", 1, metadata={"n": Big.SMALL})
            assert type(entry.metadata["n"]) is int
            assert len(await m.ledger("u")) == 3

    asyncio.run(asyncio.wait_for(main(), 10))
