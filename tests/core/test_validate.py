"""Input checks: the cache of clean strings never lets a bad one through and stays bounded."""

from __future__ import annotations

from decimal import Decimal

import pytest

from creditmeter import _validate
from creditmeter.exceptions import InvalidInput

BAD = ["a\x00b", "tab\there", "nl\n", "del\x7f", "c1\x85", "lone\ud800"]


def test_clean_strings_are_remembered_within_a_bound() -> None:
    for number in range(_validate._CLEAN_LIMIT + 500):
        assert _validate.user_id(f"user-{number}") == f"user-{number}"
        assert len(_validate._CLEAN) <= _validate._CLEAN_LIMIT


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_string_is_refused_every_time(bad: str) -> None:
    """Tried: NUL, tab, newline, DEL, a C1 control and a lone surrogate, twice each."""
    for _ in range(2):
        with pytest.raises(InvalidInput, match="control characters"):
            _validate.user_id(bad)
        with pytest.raises(InvalidInput, match="control characters"):
            _validate.optional_text(bad, name="model")
    assert bad not in _validate._CLEAN


def test_a_clean_string_seen_as_a_model_is_still_checked_for_length_as_a_user() -> None:
    long = "m" * 300
    assert _validate.optional_text(long, name="reason", max_length=1000) == long
    with pytest.raises(InvalidInput, match="1 to 256"):
        _validate.user_id(long)


def test_request_ids_do_not_fill_the_cache_of_clean_strings() -> None:
    """Request ids seldom repeat: remembering them would push user ids out."""
    from creditmeter import BalanceManager, MemoryStore  # noqa: PLC0415

    meter = BalanceManager(MemoryStore())
    for number in range(200):
        meter.charge("u", 1, request_id=f"request-{number}")
    assert not any(key.startswith("request-") for key in _validate._CLEAN)
    with pytest.raises(InvalidInput, match="control characters"):
        meter.charge("u", 1, request_id="request-\x00")


@pytest.mark.parametrize("number", [0, 1, 7, 1023, 1024, 10**15])
def test_whole_amounts_come_back_as_the_same_decimal_whether_made_once_or_now(number: int) -> None:
    """Tried: zero, small amounts made once at import, the first one made per call, the most."""
    made = _validate.amount(number)
    assert type(made) is Decimal
    assert str(made) == str(Decimal(number))  # the same digits and exponent, not only equal
    assert made.as_tuple() == Decimal(number).as_tuple()


@pytest.mark.parametrize(
    ("bad", "positive"), [(-1, False), (10**15 + 1, False), (True, False), (0, True)]
)
def test_whole_amounts_out_of_range_are_refused(bad: int, positive: bool) -> None:
    """Tried: below zero, above 10**15, a bool (an int subclass), zero where positive is asked."""
    with pytest.raises(InvalidInput):
        _validate.amount(bad, positive=positive)
