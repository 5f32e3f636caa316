"""Input checks shared by the public entry points (amounts, user ids, times)."""

from __future__ import annotations

import json
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
# Decimals are immutable: the small whole amounts most calls pass are made once.
_SMALL_LIMIT = 1024
_SMALL = tuple(Decimal(number) for number in range(_SMALL_LIMIT))


def amount(value: Any, *, name: str = "amount", positive: bool = False) -> Decimal:  # noqa: C901
    """Return ``value`` as a finite, non-negative Decimal of at most 10**15.

    Accepts ``int``, ``Decimal`` or a finite ``float`` (converted through
    ``str`` so 0.1 stays 0.1). Rejects ``bool``, ``str`` and everything else.
    With ``positive=True`` zero is rejected too.
    """
    cls = type(value)
    if cls is int:
        if 0 <= value <= _MAX_INT and (value or not positive):
            # The common case: whole numbers have no places to check.
            return _SMALL[value] if value < _SMALL_LIMIT else Decimal(value)
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


# Strings found free of control characters: user ids and model names repeat on every
# call, and a lookup costs a fifth of the regular expression's search. Bounded.
_CLEAN: dict[str, None] = {}
_CLEAN_LIMIT = 4096


def _has_control(value: str) -> bool:
    """Tell whether ``value`` holds a control character; remember it if it does not."""
    if _CONTROL.search(value):
        return True
    if len(_CLEAN) >= _CLEAN_LIMIT:
        _CLEAN.clear()
    _CLEAN[value] = None
    return False


USER_IDS: dict[str, None] = {}
"""The user ids ``user_id`` passed: checking one again is ``type(v) is str and v in USER_IDS``."""


def user_id(value: Any) -> str:
    """Return ``value`` if it is a valid user id: 1-256 characters, no control characters."""
    if type(value) is not str:
        raise InvalidInput(f"user_id must be a str, got {type(value).__name__} {value!r}")
    if value in USER_IDS:
        return value
    if not value or len(value) > MAX_USER_ID_LENGTH:
        raise InvalidInput(f"user_id must have 1 to 256 characters, got {len(value)}")
    if _CONTROL.search(value):
        raise InvalidInput(
            f"user_id must not contain control characters or lone surrogates, got {value!r}"
        )
    if len(USER_IDS) >= _CLEAN_LIMIT:
        USER_IDS.clear()
    USER_IDS[value] = None
    return value


def optional_text(
    value: Any, *, name: str, max_length: int = 256, remember: bool = True
) -> str | None:
    """Return ``value`` if it is ``None`` or a str of 1..``max_length`` printable characters.

    ``remember=False`` for values that do not repeat (hold ids): they would
    only push the user ids and model names out of the cache of clean strings.
    """
    if value is None:
        return None
    if type(value) is not str or not value or len(value) > max_length:
        raise InvalidInput(f"{name} must be a str of 1 to {max_length} characters, got {value!r}")
    if value not in _CLEAN and (_has_control(value) if remember else _CONTROL.search(value)):
        raise InvalidInput(
            f"{name} must not contain control characters or lone surrogates, got {value!r}"
        )
    return value


MODELS: dict[str, None] = {}
"""The model names ``model`` passed: checking one again is ``type(v) is str and v in MODELS``."""


def model(value: Any) -> str | None:
    """Return ``value`` if it is ``None`` or a valid model name (as ``optional_text``)."""
    checked = optional_text(value, name="model")
    if checked is not None:
        if len(MODELS) >= _CLEAN_LIMIT:
            MODELS.clear()
        MODELS[checked] = None
    return checked


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


MAX_METADATA_KEYS = 256
"""The most keys one entry's metadata may have."""
MAX_METADATA_BYTES = 64 * 1024
"""The most bytes one entry's metadata may take as compact UTF-8 JSON (``{"k":"v"}``)."""
_INT64 = 2**63


def metadata(value: Any) -> dict[str, Any] | None:
    """Return ``value`` as a plain dict of str keys to JSON scalars, else raise ``InvalidInput``.

    Checked by value, not by type: subclasses of ``dict``, ``str``, ``int`` and
    ``float`` (an ``IntEnum`` member, a str enum) are accepted when their value
    is, and copied into plain ``dict`` / ``str`` / ``int`` / ``float``, so
    what is stored is what was checked. Values are flat: str, int of at most
    64 bits, finite float, bool or None (no lists, no nested dicts). At most
    ``MAX_METADATA_KEYS`` keys and ``MAX_METADATA_BYTES`` of JSON.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(f"metadata must be a dict, got {type(value).__name__}")
    if dict.__len__(value) > MAX_METADATA_KEYS:
        raise InvalidInput(
            f"metadata must have at most {MAX_METADATA_KEYS} keys, got {dict.__len__(value)}"
        )
    plain: dict[str, Any] = {}
    size = 2  # {} (each item below counts the comma or closing brace after it, once)
    for key, item in dict.items(value):  # the dict's contents, whatever items() says
        if not isinstance(key, str):
            raise InvalidInput(f"metadata keys must be str, got {key!r}")
        name = str.__str__(key)  # a plain copy of a str subclass's text
        if _SURROGATE.search(name):
            raise InvalidInput(f"metadata keys must be str without lone surrogates, got {name!r}")
        if name in plain:
            raise InvalidInput(f"metadata has the key {name!r} twice")
        plain[name] = copied = _metadata_value(name, item)
        size += _json_size(name) + 1 + _json_size(copied) + (1 if len(plain) > 1 else 0)
    if size > MAX_METADATA_BYTES:
        raise InvalidInput(
            f"metadata must take at most {MAX_METADATA_BYTES} bytes as JSON, got {size}"
        )
    return plain


def _metadata_value(name: str, item: Any) -> str | float | bool | None:
    """One metadata value, as a plain JSON scalar."""
    if item is None or item is True or item is False:  # bool cannot be subclassed
        return item
    if isinstance(item, str):
        text = str.__str__(item)
        if _SURROGATE.search(text):
            raise InvalidInput(f"metadata[{name!r}] must not contain lone surrogates")
        return text
    if isinstance(item, int):
        number = int.__int__(item)  # the value, not what a subclass's __int__ says
        if not -_INT64 <= number < _INT64:
            raise InvalidInput(f"metadata[{name!r}] must be an int of at most 64 bits")
        return number
    if isinstance(item, float):
        real = float.__float__(item)
        if not math.isfinite(real):
            raise InvalidInput(f"metadata[{name!r}] must be a finite float, got {real!r}")
        return real
    raise InvalidInput(
        f"metadata[{name!r}] must be a str, int, finite float, bool or None, "
        f"got {type(item).__name__}"
    )


def _json_size(value: str | float | bool | None) -> int:
    """Bytes of ``value`` in compact UTF-8 JSON."""
    if isinstance(value, str):
        return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    return len(json.dumps(value))
