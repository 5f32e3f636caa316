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
    "account_to_json",
    "entry_from_json",
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


def _from_json(text: str | bytes, cls: type[_T]) -> _T:
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
        raise StoreError(f"stored {cls.__name__} is corrupt: {exc}") from exc


def account_to_json(account: Account) -> str:
    """Serialize an account."""
    return _dumps(to_plain(account))


def account_from_json(text: str | bytes) -> Account:
    """Read an account written by ``account_to_json``; ``StoreError`` if corrupt."""
    return _from_json(text, Account)


def entry_to_json(entry: LedgerEntry) -> str:
    """Serialize a ledger entry."""
    return _dumps(to_plain(entry))


def entry_from_json(text: str | bytes) -> LedgerEntry:
    """Read an entry written by ``entry_to_json``; ``StoreError`` if corrupt."""
    return _from_json(text, LedgerEntry)
