"""Every error creditmeter raises, under one base class.

```
CreditMeterError
 ├── InvalidInput (also ValueError)      bad amount, id, datetime, usage
 ├── ConfigError  (also ValueError)      bad configuration key or value
 ├── InsufficientBalance                 user_id, balance, available, cost;
 │                                       to_dict(): LibreChat's token_balance payload,
 │                                       to_error_body(): that and OpenAI's "error"
 ├── IdempotencyConflict                 request_id reused with other parameters
 ├── VersionConflict                     a store's compare-and-set lost (retried)
 ├── DuplicateRequest                    a store found the request_id already applied
 └── StoreError                          a backend failed or its data is corrupt
      └── ReplicationTimeout              written, but fewer replicas than asked confirmed
                                          it in time: it may be lost in a failover
```

Errors carry their facts as attributes, read well as ``str()``, and survive
pickling (so they cross process pools unchanged).
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from creditmeter.models import Account, LedgerEntry

__all__ = [
    "ConfigError",
    "CreditMeterError",
    "DuplicateRequest",
    "IdempotencyConflict",
    "InsufficientBalance",
    "InvalidInput",
    "ReplicationTimeout",
    "StoreError",
    "VersionConflict",
]


class CreditMeterError(Exception):
    """The base of every error raised by creditmeter."""


class InvalidInput(CreditMeterError, ValueError):
    """An argument was malformed: an amount, a user id, a datetime or a usage."""


class ConfigError(CreditMeterError, ValueError):
    """A configuration key is unknown or its value has the wrong type or range."""


class InsufficientBalance(CreditMeterError):
    """The user's available balance cannot pay for the requested cost."""

    def __init__(
        self,
        user_id: str,
        *,
        balance: Decimal,
        available: Decimal,
        cost: Decimal | None,
        prompt_tokens: int | None = None,
    ) -> None:
        self.user_id = user_id
        self.balance = balance
        self.available = available
        self.cost = cost
        self.prompt_tokens = prompt_tokens
        wanted = "a positive balance" if cost is None else f"cost {cost}"
        super().__init__(
            f"user {user_id!r} cannot pay {wanted}: available {available} (balance {balance})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (
                type(self),
                (self.user_id,),
                {
                    "balance": self.balance,
                    "available": self.available,
                    "cost": self.cost,
                    "prompt_tokens": self.prompt_tokens,
                },
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return LibreChat's ``token_balance`` error payload for this refusal."""
        payload: dict[str, Any] = {
            "type": "token_balance",
            "balance": _json_number(self.available),
            "tokenCost": _json_number(self.cost if self.cost is not None else Decimal(0)),
        }
        if self.prompt_tokens is not None:
            payload["promptTokens"] = self.prompt_tokens
        return payload

    def to_error_body(self) -> dict[str, Any]:
        """Return the body of an HTTP 402 answer: OpenAI's error object and LibreChat's payload.

        ``{"error": {"message", "type": "insufficient_quota", "param": None,
        "code": "token_balance"}, "type": "token_balance", "balance",
        "tokenCost"[, "promptTokens"]}``: the OpenAI and Anthropic SDKs show
        ``error.message`` in their exception, LibreChat reads the rest.
        """
        error = {
            "message": str(self),
            "type": "insufficient_quota",
            "param": None,
            "code": "token_balance",
        }
        return {"error": error, **self.to_dict()}


class IdempotencyConflict(CreditMeterError):
    """A request id was reused with parameters other than the ones first applied."""

    def __init__(self, user_id: str, request_id: str, *, detail: str = "") -> None:
        self.user_id = user_id
        self.request_id = request_id
        self.detail = detail
        message = f"request id {request_id!r} of user {user_id!r} was already used"
        super().__init__(f"{message} with other parameters{': ' + detail if detail else ''}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), (self.user_id, self.request_id), {"detail": self.detail}))


class VersionConflict(CreditMeterError):
    """A store's compare-and-set lost: the account changed since it was read.

    ``current`` is the stored account when the store could return it in the
    same round trip, else ``None``. Managers retry these; callers see one only
    when the retry policy is exhausted.
    """

    def __init__(
        self, user_id: str, *, expected: int | None, current: Account | None = None
    ) -> None:
        self.user_id = user_id
        self.expected = expected
        self.current = current
        found = "no account" if current is None else f"version {current.version}"
        super().__init__(
            f"account {user_id!r} changed concurrently: expected version {expected}, found {found}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (type(self), (self.user_id,), {"expected": self.expected, "current": self.current}),
        )


class DuplicateRequest(CreditMeterError):
    """A store found the commit's request id already recorded for that user.

    ``entry`` is the ledger entry that applied it first.
    """

    def __init__(self, user_id: str, request_id: str, *, entry: LedgerEntry) -> None:
        self.user_id = user_id
        self.request_id = request_id
        self.entry = entry
        super().__init__(f"request id {request_id!r} of user {user_id!r} was already applied")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), (self.user_id, self.request_id), {"entry": self.entry}))


class StoreError(CreditMeterError):
    """A storage backend failed, or the data it holds is corrupt."""


class ReplicationTimeout(StoreError):
    """A commit was written, but fewer replicas than asked confirmed it within the timeout.

    Raised by a Redis Cluster store with ``min_replicas`` set: the master
    applied the commit, and it stays applied unless that master fails before a
    replica copies it, so the write may not be durable. Repeating the
    operation with the same ``request_id`` is safe (it is applied at most
    once). ``wanted`` replicas were asked for, ``confirmed`` answered.
    """

    def __init__(self, user_id: str, *, wanted: int, confirmed: int) -> None:
        self.user_id = user_id
        self.wanted = wanted
        self.confirmed = confirmed
        super().__init__(
            f"the write of user {user_id!r} was applied, but only {confirmed} of {wanted} "
            "replicas confirmed it in time: it may not be durable (a failover can lose it)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (type(self), (self.user_id,), {"wanted": self.wanted, "confirmed": self.confirmed}),
        )


def _rebuild(cls: type[Exception], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
    return cls(*args, **kwargs)


def _json_number(value: Decimal) -> int | float:
    integral = value.to_integral_value()
    return int(integral) if integral == value else float(value)
