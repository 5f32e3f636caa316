"""Input checks: the cache of clean strings never lets a bad one through and stays bounded."""

from __future__ import annotations

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
