"""Input checks shared by the public entry points (amounts, user ids, times)."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from creditmeter.exceptions import InvalidInput

MAX_AMOUNT = Decimal(10) ** 15
MAX_USER_ID_LENGTH = 256

# C0 and C1 control characters, DEL, and lone surrogates (which no store can encode).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAX_DECIMAL_PLACES = 30
_ZERO = Decimal(0)
_MAX_INT = 10**15


def amount(value: Any, *, name: str = "amount", positive: bool = False) -> Decimal:  # noqa: C901
    """Return ``value`` as a finite, non-negative Decimal of at most 10**15.

    Accepts ``int``, ``Decimal`` or a finite ``float`` (converted through
    ``str`` so 0.1 stays 0.1). Rejects ``bool``, ``str`` and everything else.
    With ``positive=True`` zero is rejected too.
    """
    cls = type(value)
    if cls is int:
        if 0 <= value <= _MAX_INT and (value or not positive):
            return Decimal(value)  # the common case: whole numbers have no places to check
        result = Decimal(value)
    elif cls is Decimal:
        if not value.is_finite():
            raise InvalidInput(f"{name} must be a finite number, got {value!r}")
        result = value
    elif cls is float:
        if not math.isfinite(value):
            raise InvalidInput(f"{name} must be a finite number, got {value!r}")
        result = Decimal(str(value))
    elif isinstance(value, bool) or not isinstance(value, (int, Decimal, float)):
        raise InvalidInput(
            f"{name} must be an int, Decimal or finite float, got {type(value).__name__} {value!r}"
        )
    else:  # subclasses of int/float/Decimal (not bool)
        return amount(_plain(value), name=name, positive=positive)
    if result < _ZERO or (positive and result == _ZERO):
        wanted = "positive" if positive else "zero or more"
        raise InvalidInput(f"{name} must be {wanted}, got {value!r}")
    if result > MAX_AMOUNT:
        raise InvalidInput(f"{name} must be at most 10**15, got {value!r}")
    exponent = result.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_DECIMAL_PLACES and _places(result) > 30:
        raise InvalidInput(f"{name} must have at most 30 decimal places, got {value!r}")
    return result


def _places(value: Decimal) -> int:
    """Decimal places of ``value`` once trailing zeros are dropped."""
    digits = value.as_tuple().digits
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # finite here
    trailing = 0
    for digit in reversed(digits):
        if digit != 0:
            break
        trailing += 1
    return max(-(exponent + trailing), 0)


def _plain(value: float | Decimal) -> int | float | Decimal:
    if isinstance(value, Decimal):
        return Decimal(value)
    if isinstance(value, int):
        return int(value)
    return float(value)


def user_id(value: Any) -> str:
    """Return ``value`` if it is a valid user id: 1-256 characters, no control characters."""
    if type(value) is not str:
        raise InvalidInput(f"user_id must be a str, got {type(value).__name__} {value!r}")
    if not value or len(value) > MAX_USER_ID_LENGTH:
        raise InvalidInput(f"user_id must have 1 to 256 characters, got {len(value)}")
    if _CONTROL.search(value):
        raise InvalidInput(
            f"user_id must not contain control characters or lone surrogates, got {value!r}"
        )
    return value


def optional_text(value: Any, *, name: str, max_length: int = 256) -> str | None:
    """Return ``value`` if it is ``None`` or a str of 1..``max_length`` printable characters."""
    if value is None:
        return None
    if type(value) is not str or not value or len(value) > max_length:
        raise InvalidInput(f"{name} must be a str of 1 to {max_length} characters, got {value!r}")
    if _CONTROL.search(value):
        raise InvalidInput(
            f"{name} must not contain control characters or lone surrogates, got {value!r}"
        )
    return value


def aware(value: Any, *, name: str = "clock()") -> datetime:
    """Return ``value`` as an aware UTC datetime; naive or non-datetime values are rejected."""
    if type(value) is not datetime and not isinstance(value, datetime):
        raise InvalidInput(f"{name} must return a datetime, got {type(value).__name__}")
    tz = value.tzinfo
    if tz is timezone.utc:
        return value
    if tz is None or value.utcoffset() is None:
        raise InvalidInput(f"{name} returned a naive datetime {value!r}; use an aware UTC time")
    return value.astimezone(timezone.utc)


_METADATA_VALUE = (str, int, float, bool, type(None))


def metadata(value: Any) -> dict[str, Any] | None:
    """Return a copy of ``value`` if it maps str keys to JSON scalars, else raise."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(f"metadata must be a dict, got {type(value).__name__}")
    for key, item in value.items():
        if type(key) is not str or _SURROGATE.search(key):
            raise InvalidInput(f"metadata keys must be str without lone surrogates, got {key!r}")
        if isinstance(item, str) and _SURROGATE.search(item):
            raise InvalidInput(f"metadata[{key!r}] must not contain lone surrogates")
        if type(item) is int and not -(2**63) <= item < 2**63:
            raise InvalidInput(f"metadata[{key!r}] must be an int of at most 64 bits")
        if not isinstance(item, _METADATA_VALUE) or (
            isinstance(item, float) and not math.isfinite(item)
        ):
            raise InvalidInput(
                f"metadata[{key!r}] must be a str, int, finite float, bool or None, got {item!r}"
            )
    return dict(value)
