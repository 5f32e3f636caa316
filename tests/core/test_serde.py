"""Stored text: the hand-written fast path writes exactly what the cattrs converter writes.

Accounts are drawn with and without credit blocks, entries with and without
``drawn``: the text of those without is the fast path's (and has no
``blocks`` or ``drawn`` key, as before blocks existed); every one reads back
equal.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditmeter import EntryKind, RefillSettings, StoreError
from creditmeter.models import Account, CreditBlock, LedgerEntry
from creditmeter.serde import (
    _datetime_text,
    _dumps,
    account_from_json,
    account_split,
    account_to_json,
    entry_from_json,
    entry_split,
    entry_to_json,
    to_plain,
)
from creditmeter.usage import TokenUsage

TEXT = st.text(min_size=1, max_size=40).filter(
    lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)
)
AMOUNTS = st.decimals(
    min_value=-(10**15), max_value=10**15, places=6, allow_nan=False, allow_infinity=False
)
TIMES = st.datetimes(  # hypothesis wants naive bounds and adds the zone itself
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=datetime(2100, 1, 1),  # noqa: DTZ001
    timezones=st.just(timezone.utc),
)
POSITIVE = st.decimals(
    min_value=Decimal("1e-30"), max_value=10**15, places=30, allow_nan=False, allow_infinity=False
)
BLOCKS = st.lists(
    st.builds(
        CreditBlock,
        id=TEXT,
        amount=POSITIVE,
        granted=POSITIVE,
        priority=st.integers(0, 100),
        expires_at=st.none() | TIMES,
        granted_at=TIMES,
        request_id=st.none() | TEXT,
    ),
    max_size=3,
).map(tuple)
DRAWN = st.lists(st.tuples(TEXT, POSITIVE), max_size=3).map(tuple)
ZONES = st.sampled_from(
    [timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)


@given(
    user=TEXT,
    balance=AMOUNTS,
    version=st.integers(1, 2**40),
    times=st.lists(TIMES, min_size=3, max_size=3),
    zone=ZONES,
    blocks=st.just(()) | BLOCKS,
)
def test_account_fast_path_matches_the_converter(user, balance, version, times, zone, blocks):
    created, updated, refilled = (t.astimezone(zone) for t in times)
    account = Account(
        user_id=user,
        balance=balance,
        version=version,
        created_at=created,
        updated_at=updated,
        last_refill=refilled,
        blocks=blocks,
    )
    text = account_to_json(account)
    assert text == _dumps(to_plain(account))
    assert ("blocks" in json.loads(text)) == bool(blocks)
    assert account_from_json(text) == account


@given(
    entry_id=TEXT,
    user=TEXT,
    kind=st.sampled_from(list(EntryKind)),
    amount=AMOUNTS,
    after=AMOUNTS,
    at=TIMES,
    request_id=st.none() | TEXT,
    model=st.none() | TEXT,
    cost=st.none() | AMOUNTS,
    drawn=st.just(()) | DRAWN,
)
def test_entry_fast_path_matches_the_converter(
    entry_id, user, kind, amount, after, at, request_id, model, cost, drawn
):
    entry = LedgerEntry(
        id=entry_id,
        user_id=user,
        kind=kind,
        amount=amount,
        balance_after=after,
        at=at,
        request_id=request_id,
        model=model,
        cost=cost,
        drawn=drawn,
    )
    text = entry_to_json(entry)
    assert text == _dumps(to_plain(entry))
    assert ("drawn" in json.loads(text)) == bool(drawn)
    assert entry_from_json(text) == entry


@pytest.mark.parametrize(
    "text",
    ['{"schema": 99}', "[]", "{", '{"schema": 1}', '{"schema":1,"user_id":"a","balance":"NaN"}'],
    ids=["future-schema", "not-an-object", "not-json", "missing-fields", "nan-balance"],
)
def test_corrupt_text_is_a_store_error(text):
    with pytest.raises(StoreError):
        account_from_json(text)


def test_times_come_back_in_utc():
    moment = datetime(2025, 6, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    account = Account(
        user_id="u",
        balance=Decimal(1),
        version=1,
        created_at=moment,
        updated_at=moment,
        last_refill=moment,
    )
    loaded = account_from_json(account_to_json(account))
    assert loaded.created_at == moment
    assert loaded.created_at.tzinfo is timezone.utc


# --- the cuts a delta statement writes its numbers into ---------------------------

# Text that looks like the keys cut at, in every value before and after them.
TRICKY = TEXT | st.sampled_from(
    ['","balance":"1', "x\\", '"', ',"version":7,', ',"updated_at":"', ',"balance_after":"2']
)
REFILLS = st.none() | st.builds(
    RefillSettings,
    enabled=st.booleans(),
    interval_value=st.integers(1, 12),
    interval_unit=st.sampled_from(["days", "months"]),
    amount=POSITIVE,
)


@given(
    user=TRICKY,
    balance=AMOUNTS,
    new_balance=AMOUNTS,
    version=st.integers(1, 2**40),
    times=st.lists(TIMES, min_size=4, max_size=4),
    refill=REFILLS,
)
def test_an_account_cut_and_filled_with_new_numbers_is_the_text_of_the_new_account(
    user, balance, new_balance, version, times, refill
):
    """What ``commit_delta`` writes: the cuts around balance, version and ``updated_at``."""
    created, updated, refilled, later = times
    account = Account(
        user_id=user,
        balance=balance,
        version=version,
        created_at=created,
        updated_at=updated,
        last_refill=refilled,
        refill=refill,
    )
    a, b, c, updated_text, d = account_split(account)
    assert a + str(balance) + b + str(version) + c + updated_text + d == account_to_json(account)
    assert updated_text == _datetime_text(updated)
    moved = attrs.evolve(account, balance=new_balance, version=version + 1, updated_at=later)
    filled = a + str(new_balance) + b + str(version + 1) + c + _datetime_text(later) + d
    assert filled == account_to_json(moved)
    assert account_from_json(filled) == moved


@given(
    entry_id=TRICKY,
    user=TRICKY,
    after=AMOUNTS,
    new_after=AMOUNTS,
    request_id=st.none() | TRICKY,
    note=TRICKY,
)
def test_an_entry_cut_and_filled_with_a_new_balance_is_the_text_of_the_new_entry(
    entry_id, user, after, new_after, request_id, note
):
    entry = LedgerEntry(
        id=entry_id,
        user_id=user,
        kind=EntryKind.CHARGE,
        amount=Decimal(-1),
        balance_after=after,
        at=datetime(2026, 12, 3, tzinfo=timezone.utc),
        request_id=request_id,
        usage=TokenUsage(input=3),
        cost=Decimal(1),
        metadata={"note": note, ',"balance_after":"': note},
    )
    a, b = entry_split(entry)
    assert a + str(after) + b == entry_to_json(entry)
    filled = a + str(new_after) + b
    assert filled == entry_to_json(attrs.evolve(entry, balance_after=new_after))
    assert entry_from_json(filled) == attrs.evolve(entry, balance_after=new_after)
