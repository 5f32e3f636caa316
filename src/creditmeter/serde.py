"""Turning records into JSON text and back, for every store that stores text.

One private cattrs converter (never the global one): ``Decimal`` as a string,
so no digit is lost; datetimes as ISO-8601 in UTC; enums by value; fields left
at their default omitted. Every document carries a ``schema`` number so a
future layout can still read what an older one wrote.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, TypeVar

import cattrs

from creditmeter.exceptions import StoreError
from creditmeter.models import Account, LedgerEntry

__all__ = [
    "SCHEMA_VERSION",
    "account_from_json",
    "account_split",
    "account_to_json",
    "entry_from_json",
    "entry_split",
    "entry_to_json",
    "to_plain",
]

SCHEMA_VERSION = 1
_T = TypeVar("_T")


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(omit_if_default=True)
    converter.register_unstructure_hook(Decimal, str)
    converter.register_structure_hook(Decimal, _structure_decimal)
    converter.register_unstructure_hook(datetime, _datetime_text)
    converter.register_structure_hook(datetime, _structure_datetime)
    return converter


def _structure_decimal(value: Any, _: type) -> Decimal:
    if type(value) is not str:
        msg = f"expected a decimal string, got {value!r}"
        raise TypeError(msg)
    result = Decimal(value)
    if not result.is_finite():
        msg = f"expected a finite decimal, got {value!r}"
        raise ValueError(msg)
    return result


def _datetime_text(value: datetime) -> str:
    if value.tzinfo is not timezone.utc:
        value = value.astimezone(timezone.utc)
    return value.isoformat()


def _structure_datetime(value: Any, _: type) -> datetime:
    result = datetime.fromisoformat(value)
    if result.tzinfo is None:
        msg = f"expected an aware datetime, got {value!r}"
        raise ValueError(msg)
    return result.astimezone(timezone.utc)


_converter = _make_converter()
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def to_plain(record: Any) -> dict[str, Any]:
    """Return a record as a dict of JSON types (with its ``schema`` number)."""
    data: dict[str, Any] = _converter.unstructure(record)
    data["schema"] = SCHEMA_VERSION
    return data


def _from_json(text: str | bytes, cls: type[_T], user_id: str | None) -> _T:
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            msg = "not a JSON object"
            raise TypeError(msg)
        schema = data.pop("schema", None)
        if schema != SCHEMA_VERSION:
            msg = f"unknown schema {schema!r}"
            raise ValueError(msg)
        return _converter.structure(data, cls)
    except Exception as exc:
        whose = "" if user_id is None else f" of user {user_id!r}"
        raise StoreError(f"stored {cls.__name__}{whose} is corrupt: {exc}") from exc


def account_to_json(account: Account) -> str:
    """Serialize an account."""
    if account.refill is not None or account.holds or account.blocks:
        return _dumps(to_plain(account))
    # The common shape, written by hand: it is on every commit's path, and the
    # result is the same text the converter writes (a test holds them equal).
    return (
        f'{{"user_id":{_string(account.user_id)},"balance":"{account.balance}",'
        f'"version":{account.version:d},"created_at":"{_time(account.created_at)}",'
        f'"updated_at":"{_time(account.updated_at)}",'
        f'"last_refill":"{_time(account.last_refill)}","schema":{SCHEMA_VERSION}}}'
    )


def account_split(account: Account) -> tuple[str, str, str, str, str]:
    """``account_to_json`` cut around three values: ``a + balance + b + version + c + updated + d``.

    It returns ``(a, b, c, updated, d)``; ``updated`` is the text of
    ``updated_at``, inside its quotes. For a store
    that computes these three itself (``commit_delta``) and writes the same
    text the converter would, bar the balance's notation. The first such key
    is the account's own: every value before it is a number, a time or an
    encoded string, inside which a quote is always escaped.
    """
    text = account_to_json(account)
    start = text.index(_BALANCE_KEY) + len(_BALANCE_KEY)
    end = text.index('"', start)
    version = text.index(_VERSION_KEY, end) + len(_VERSION_KEY)
    version_end = text.index(",", version)
    updated = text.index(_UPDATED_KEY, version_end) + len(_UPDATED_KEY)
    updated_end = text.index('"', updated)
    return (
        text[:start],
        text[end:version],
        text[version_end:updated],
        text[updated:updated_end],
        text[updated_end:],
    )


def entry_split(entry: LedgerEntry) -> tuple[str, str]:
    """``entry_to_json`` cut around its ``balance_after``: ``a + balance_after + b``."""
    text = entry_to_json(entry)
    start = text.index(_BALANCE_AFTER_KEY) + len(_BALANCE_AFTER_KEY)
    return text[:start], text[text.index('"', start) :]


_BALANCE_KEY = ',"balance":"'
_VERSION_KEY = ',"version":'
_UPDATED_KEY = ',"updated_at":"'
_BALANCE_AFTER_KEY = ',"balance_after":"'


def account_from_json(text: str | bytes, *, user_id: str | None = None) -> Account:
    """Read an account written by ``account_to_json``; ``StoreError`` naming the user if corrupt."""
    return _from_json(text, Account, user_id)


def entry_to_json(entry: LedgerEntry) -> str:
    """Serialize a ledger entry."""
    if (
        entry.usage is not None
        or entry.rates is not None
        or entry.metadata is not None
        or entry.drawn
    ):
        return _dumps(to_plain(entry))
    optional = ""
    if entry.request_id is not None:
        optional += f',"request_id":{_string(entry.request_id)}'
    if entry.model is not None:
        optional += f',"model":{_string(entry.model)}'
    if entry.cost is not None:
        optional += f',"cost":"{entry.cost}"'
    return (
        f'{{"id":{_string(entry.id)},"user_id":{_string(entry.user_id)},'
        f'"kind":"{entry.kind.value}","amount":"{entry.amount}",'
        f'"balance_after":"{entry.balance_after}","at":"{_time(entry.at)}"'
        f'{optional},"schema":{SCHEMA_VERSION}}}'
    )


_string = json.encoder.encode_basestring
_TIME_CACHE: dict[datetime, str] = {}


def _time(value: datetime) -> str:
    """ISO-8601 text of a UTC time, remembered: an account repeats its times on every write."""
    text = _TIME_CACHE.get(value)
    if text is None:
        if len(_TIME_CACHE) >= 4096:
            _TIME_CACHE.clear()
        text = _TIME_CACHE[value] = _datetime_text(value)
    return text


def entry_from_json(text: str | bytes, *, user_id: str | None = None) -> LedgerEntry:
    """Read an entry written by ``entry_to_json``; ``StoreError`` naming the user if corrupt."""
    return _from_json(text, LedgerEntry, user_id)
