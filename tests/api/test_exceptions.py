"""The error tree: hierarchy, pickling (errors cross process pools), LibreChat's payload."""

from __future__ import annotations

import json
import pickle
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

import creditmeter
from creditmeter import (
    Account,
    ConfigError,
    CreditMeterError,
    DuplicateRequest,
    EntryKind,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
    LedgerEntry,
    RefillSettings,
    ReplicationTimeout,
    StoreError,
    TokenUsage,
    VersionConflict,
)

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)

ACCOUNT = Account(
    user_id="alice",
    balance=Decimal("12.5"),
    version=7,
    created_at=T0,
    updated_at=T0,
    last_refill=T0,
    refill=RefillSettings(enabled=True, interval_value=1, interval_unit="days", amount=5),
)
ENTRY = LedgerEntry(
    id="e-1",
    user_id="alice",
    kind=EntryKind.CHARGE,
    amount=Decimal(-5),
    balance_after=Decimal("7.5"),
    at=T0,
    request_id="req-1",
    model="gpt-4o",
    usage=TokenUsage(input=10, output=20),
    cost=Decimal(5),
    metadata={"route": "/chat"},
)

# (error, the attributes it must keep through pickling)
ERRORS: list[Any] = [
    pytest.param(CreditMeterError("base"), (), id="CreditMeterError"),
    pytest.param(InvalidInput("amount must be finite"), (), id="InvalidInput"),
    pytest.param(ConfigError("balance config key 'x' unknown"), (), id="ConfigError"),
    pytest.param(StoreError("database disk image is malformed"), (), id="StoreError"),
    pytest.param(
        ReplicationTimeout("alice", wanted=2, confirmed=1),
        ("user_id", "wanted", "confirmed"),
        id="ReplicationTimeout",
    ),
    pytest.param(
        InsufficientBalance(
            "alice",
            balance=Decimal(100),
            available=Decimal(40),
            cost=Decimal("50.5"),
            prompt_tokens=12,
        ),
        ("user_id", "balance", "available", "cost", "prompt_tokens"),
        id="InsufficientBalance",
    ),
    pytest.param(
        InsufficientBalance("bob", balance=Decimal(0), available=Decimal(0), cost=None),
        ("user_id", "balance", "available", "cost", "prompt_tokens"),
        id="InsufficientBalance-no-cost",
    ),
    pytest.param(
        IdempotencyConflict("alice", "req-1", detail="cost was 5, now 6"),
        ("user_id", "request_id", "detail"),
        id="IdempotencyConflict",
    ),
    pytest.param(
        IdempotencyConflict("alice", "req-1"),
        ("user_id", "request_id", "detail"),
        id="IdempotencyConflict-no-detail",
    ),
    pytest.param(
        VersionConflict("alice", expected=6, current=ACCOUNT),
        ("user_id", "expected", "current"),
        id="VersionConflict",
    ),
    pytest.param(
        VersionConflict("alice", expected=None, current=None),
        ("user_id", "expected", "current"),
        id="VersionConflict-no-account",
    ),
    pytest.param(
        DuplicateRequest("alice", "req-1", entry=ENTRY),
        ("user_id", "request_id", "entry"),
        id="DuplicateRequest",
    ),
]


@pytest.mark.parametrize(("error", "attributes"), ERRORS)
@pytest.mark.parametrize("protocol", [0, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_errors_pickle_round_trip(error: Exception, attributes: tuple[str, ...], protocol: int):
    copy = pickle.loads(pickle.dumps(error, protocol=protocol))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    for name in attributes:
        assert getattr(copy, name) == getattr(error, name), name


def test_every_exported_error_is_covered_by_the_pickle_test() -> None:
    covered = {param.values[0].__class__ for param in ERRORS}
    exported = {
        value
        for value in vars(creditmeter).values()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert exported == covered


def test_attributes_of_unpickled_errors_keep_their_types() -> None:
    error = InsufficientBalance(
        "alice", balance=Decimal(1), available=Decimal("0.5"), cost=Decimal(2), prompt_tokens=3
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy.balance) is Decimal
    assert type(copy.cost) is Decimal
    conflict = pickle.loads(pickle.dumps(VersionConflict("alice", expected=6, current=ACCOUNT)))
    assert conflict.current == ACCOUNT
    duplicate = pickle.loads(pickle.dumps(DuplicateRequest("alice", "req-1", entry=ENTRY)))
    assert duplicate.entry == ENTRY
    assert duplicate.entry.kind is EntryKind.CHARGE


def test_error_messages_carry_their_facts() -> None:
    message = str(
        InsufficientBalance("alice", balance=Decimal(100), available=Decimal(40), cost=Decimal(50))
    )
    assert "'alice'" in message
    assert "40" in message
    assert "50" in message
    message = str(IdempotencyConflict("bob", "req-9", detail="cost was 5, now 6"))
    assert "'req-9'" in message
    assert "'bob'" in message
    assert "cost was 5, now 6" in message
    message = str(VersionConflict("carol", expected=3, current=ACCOUNT))
    assert "'carol'" in message
    assert "3" in message
    assert "7" in message  # the version found


# --- LibreChat's token_balance payload --------------------------------------------------


def test_to_dict_is_librechats_token_balance_payload() -> None:
    error = InsufficientBalance(
        "alice", balance=Decimal(150), available=Decimal(150), cost=Decimal(2000), prompt_tokens=87
    )
    assert error.to_dict() == {
        "type": "token_balance",
        "balance": 150,
        "tokenCost": 2000,
        "promptTokens": 87,
    }


def test_to_dict_without_prompt_tokens_has_no_prompt_tokens_key() -> None:
    error = InsufficientBalance(
        "alice", balance=Decimal(150), available=Decimal(150), cost=Decimal(2000)
    )
    assert error.to_dict() == {"type": "token_balance", "balance": 150, "tokenCost": 2000}


def test_to_dict_with_zero_prompt_tokens_keeps_the_key() -> None:
    error = InsufficientBalance(
        "alice", balance=Decimal(0), available=Decimal(0), cost=Decimal(1), prompt_tokens=0
    )
    assert error.to_dict()["promptTokens"] == 0


def test_to_dict_is_json_serializable_with_plain_numbers() -> None:
    error = InsufficientBalance(
        "alice",
        balance=Decimal("10.25"),
        available=Decimal("10.25"),
        cost=Decimal("12.5"),
        prompt_tokens=3,
    )
    payload = error.to_dict()
    assert json.loads(json.dumps(payload)) == {
        "type": "token_balance",
        "balance": 10.25,
        "tokenCost": 12.5,
        "promptTokens": 3,
    }
    # integral amounts are ints, as LibreChat's JSON numbers would print
    whole = InsufficientBalance(
        "alice", balance=Decimal("5.000"), available=Decimal("5.000"), cost=Decimal(6)
    ).to_dict()
    assert type(whole["balance"]) is int
    assert type(whole["tokenCost"]) is int


def test_to_dict_without_cost_is_still_serializable() -> None:
    payload = InsufficientBalance(
        "alice", balance=Decimal(0), available=Decimal(0), cost=None
    ).to_dict()
    assert payload["type"] == "token_balance"
    assert "tokenCost" in payload
    json.dumps(payload)


def test_to_dict_survives_pickling() -> None:
    error = InsufficientBalance(
        "alice", balance=Decimal(3), available=Decimal(3), cost=Decimal(4), prompt_tokens=9
    )
    assert pickle.loads(pickle.dumps(error)).to_dict() == error.to_dict()


def test_to_error_body_wraps_the_payload_in_openais_error_object() -> None:
    error = InsufficientBalance(
        "alice", balance=Decimal(150), available=Decimal(100), cost=Decimal(2000), prompt_tokens=8
    )
    body = error.to_error_body()
    assert body == {
        "error": {
            "message": "user 'alice' cannot pay cost 2000: available 100 (balance 150)",
            "type": "insufficient_quota",
            "param": None,
            "code": "token_balance",
        },
        **error.to_dict(),
    }
    assert json.loads(json.dumps(body)) == body
    unpriced = InsufficientBalance("bob", balance=Decimal(0), available=Decimal(0), cost=None)
    assert unpriced.to_error_body()["error"]["message"] == str(unpriced)


# --- hierarchy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        InvalidInput,
        ConfigError,
        InsufficientBalance,
        IdempotencyConflict,
        VersionConflict,
        DuplicateRequest,
        StoreError,
    ],
)
def test_every_error_is_a_credit_meter_error(cls: type[Exception]) -> None:
    assert issubclass(cls, CreditMeterError)


def test_credit_meter_error_is_an_exception() -> None:
    assert issubclass(CreditMeterError, Exception)


@pytest.mark.parametrize("cls", [InvalidInput, ConfigError])
def test_input_and_config_errors_are_value_errors(cls: type[Exception]) -> None:
    assert issubclass(cls, ValueError)
    with pytest.raises(ValueError, match="bad"):
        raise cls("bad")


@pytest.mark.parametrize(
    "cls",
    [InsufficientBalance, IdempotencyConflict, VersionConflict, DuplicateRequest, StoreError],
)
def test_other_errors_are_not_value_errors(cls: type[Exception]) -> None:
    assert not issubclass(cls, ValueError)


def test_siblings_are_distinct() -> None:
    classes = [
        InvalidInput,
        ConfigError,
        InsufficientBalance,
        IdempotencyConflict,
        VersionConflict,
        DuplicateRequest,
        StoreError,
    ]
    for cls in classes:
        for other in classes:
            if cls is not other:
                assert not issubclass(cls, other), (cls, other)
