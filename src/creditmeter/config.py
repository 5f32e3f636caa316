"""Configuration: LibreChat's ``balance`` section, per-account refill settings, retries.

``BalanceConfig`` has LibreChat's six keys with LibreChat's defaults, plus
three of creditmeter's own (``refill_mode``, ``allow_negative_balance`` and
``refill_expires``). It
reads LibreChat's camelCase keys or snake_case ones, from a mapping or from
the ``balance:`` section of a ``librechat.yaml``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Literal, get_args

import attrs

from creditmeter import _validate
from creditmeter.exceptions import ConfigError, InvalidInput

__all__ = [
    "BalanceConfig",
    "IntervalUnit",
    "RefillMode",
    "RefillSettings",
    "RetryPolicy",
    "load_config",
]

IntervalUnit = Literal["seconds", "minutes", "hours", "days", "weeks", "months"]
RefillMode = Literal["when_depleted", "on_interval", "top_up"]

INTERVAL_UNITS: tuple[str, ...] = get_args(IntervalUnit)
REFILL_MODES: tuple[str, ...] = get_args(RefillMode)


def _check_bool(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not bool:
        raise ConfigError(f"{attribute.name} must be true or false, got {value!r}")


def _check_interval_value(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not int or value < 1:
        raise ConfigError(f"{attribute.name} must be a whole number of at least 1, got {value!r}")


def _check_unit(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in INTERVAL_UNITS:
        raise ConfigError(
            f"{attribute.name} must be one of {', '.join(INTERVAL_UNITS)}, got {value!r}"
        )


def _check_mode(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in REFILL_MODES:
        raise ConfigError(
            f"{attribute.name} must be one of {', '.join(REFILL_MODES)}, got {value!r}"
        )


def _amount_field(default: int, name: str) -> Any:
    def convert(value: object) -> Decimal:
        try:
            return _validate.amount(value, name=name)
        except InvalidInput as exc:
            raise ConfigError(str(exc)) from None

    return attrs.field(default=Decimal(default), converter=convert)


@attrs.frozen(kw_only=True)
class RefillSettings:
    """One account's own refill schedule; overrides the config's refill keys for that account."""

    enabled: bool = attrs.field(validator=_check_bool)
    interval_value: int = attrs.field(validator=_check_interval_value)
    interval_unit: IntervalUnit = attrs.field(validator=_check_unit)
    amount: Decimal = _amount_field(0, "amount")


@attrs.frozen(kw_only=True)
class BalanceConfig:
    """How balances behave: LibreChat's ``balance`` keys and defaults, plus three of our own.

    ``refill_mode`` chooses when a due refill happens: ``"when_depleted"``
    (LibreChat: only when the balance cannot cover the cost), ``"on_interval"``
    (whenever an interval has passed) or ``"top_up"`` (raise the balance to
    ``refill_amount``). ``allow_negative_balance`` lets a charge take the
    balance below zero instead of clamping it at zero. ``refill_expires``
    makes each refill a credit block that expires at the next refill ("use
    it or lose it"), instead of credits that pile up.
    """

    enabled: bool = attrs.field(default=False, validator=_check_bool)
    start_balance: Decimal = _amount_field(20000, "start_balance")
    auto_refill_enabled: bool = attrs.field(default=False, validator=_check_bool)
    refill_interval_value: int = attrs.field(default=30, validator=_check_interval_value)
    refill_interval_unit: IntervalUnit = attrs.field(default="days", validator=_check_unit)
    refill_amount: Decimal = _amount_field(10000, "refill_amount")
    refill_mode: RefillMode = attrs.field(default="when_depleted", validator=_check_mode)
    allow_negative_balance: bool = attrs.field(default=False, validator=_check_bool)
    refill_expires: bool = attrs.field(default=False, validator=_check_bool)

    @property
    def refill(self) -> RefillSettings:
        """The refill schedule that accounts without their own settings follow."""
        return RefillSettings(
            enabled=self.auto_refill_enabled,
            interval_value=self.refill_interval_value,
            interval_unit=self.refill_interval_unit,
            amount=self.refill_amount,
        )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> BalanceConfig:
        """Build a config from LibreChat camelCase keys or snake_case keys.

        Raises ``ConfigError`` naming the key for an unknown key, a key given
        twice (once in each spelling) or a value of the wrong type or range.
        """
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"balance config must be a mapping, got {type(mapping).__name__}")
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            name = _KEYS.get(key) if isinstance(key, str) else None
            if name is None:
                known = ", ".join(sorted(_CAMEL))
                raise ConfigError(f"unknown balance config key {key!r}; known keys: {known}")
            if name in kwargs:
                raise ConfigError(f"balance config key {key!r} is given twice")
            _check_plain_type(key, name, value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            # Name the key as the user spelled it.
            raise ConfigError(_respell(str(exc), mapping)) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> BalanceConfig:
        """Read the ``balance:`` section of a librechat.yaml, or a file holding only that section.

        Needs PyYAML (``pip install creditmeter[yaml]``).
        """
        return cls.from_mapping(balance_section(load_yaml(path), source=os.fspath(path)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BalanceConfig:
        """Read LibreChat's legacy variables: ``CHECK_BALANCE`` and ``START_BALANCE``."""
        return cls.from_mapping(_legacy_env(os.environ if env is None else env))


def load_config(
    yaml_path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> BalanceConfig:
    """Build the config as LibreChat's ``getBalanceConfig`` does.

    Start from the legacy environment variables (``CHECK_BALANCE`` turns
    balances on, ``START_BALANCE`` sets the start balance), then overlay the
    ``balance:`` section of the YAML file, if one is given and has one.
    """
    merged: dict[str, Any] = dict(_legacy_env(os.environ if env is None else env))
    if yaml_path is not None:
        document = load_yaml(yaml_path)
        if (
            isinstance(document, Mapping)
            and "balance" not in document
            and not any(key in _KEYS for key in document)
        ):
            section: Mapping[str, Any] = {}  # a librechat.yaml without a balance section
        else:
            section = balance_section(document, source=os.fspath(yaml_path))
        for key, value in section.items():
            name = _KEYS.get(key) if isinstance(key, str) else None
            merged.pop(_SNAKE_TO_CAMEL.get(name or "", ""), None)
            merged[key] = value
    return BalanceConfig.from_mapping(merged)


def _legacy_env(env: Mapping[str, str]) -> dict[str, Any]:
    """LibreChat's legacy balance variables as config keys (absent ones left out)."""
    found: dict[str, Any] = {}
    check = env.get("CHECK_BALANCE")
    if check is not None:
        found["enabled"] = check.strip().lower() == "true"  # LibreChat's isEnabled
    start = env.get("START_BALANCE")
    if start is not None and start.strip():
        try:
            found["startBalance"] = int(start.strip())
        except ValueError:
            raise ConfigError(
                f"START_BALANCE must be a whole number of credits, got {start!r}"
            ) from None
    return found


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file with PyYAML's safe loader; errors become ``ConfigError``."""
    try:
        import yaml  # noqa: PLC0415 - an optional dependency, imported only when used
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("reading YAML needs PyYAML: pip install 'creditmeter[yaml]'") from None
    try:
        with open(path, encoding="utf-8") as handle:  # noqa: PTH123
            return yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc.strerror}") from None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {os.fspath(path)!r} is not valid YAML: {exc}") from None


def balance_section(document: Any, *, source: str) -> Mapping[str, Any]:
    """Return the balance section of a parsed YAML document.

    A document with a top-level ``balance`` key gives that value; a document
    with any balance key at the top is itself the section.
    """
    if not isinstance(document, Mapping):
        raise ConfigError(f"config file {source!r} must hold a mapping")
    if "balance" in document:
        section = document["balance"]
        if section is None:
            return {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"'balance' in {source!r} must be a mapping")
        return section
    if any(key in _KEYS for key in document):
        return document  # a balance-only file; from_mapping names any unknown key
    raise ConfigError(f"config file {source!r} has no 'balance' section")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a manager retries a lost compare-and-set: ``attempts`` tries within ``timeout`` seconds.

    The first retry runs at once from the account the conflict reported; later
    ones wait a jittered exponential backoff from ``initial_backoff`` up to
    ``max_backoff`` seconds.
    """

    attempts: int = attrs.field(default=10)
    timeout: float = attrs.field(default=2.0)
    initial_backoff: float = attrs.field(default=0.001)
    max_backoff: float = attrs.field(default=0.25)

    def __attrs_post_init__(self) -> None:
        if type(self.attempts) is not int or self.attempts < 1:
            raise ConfigError(
                f"attempts must be a whole number of at least 1, got {self.attempts!r}"
            )
        for name in ("timeout", "initial_backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an int too large for a float
                finite = False
            if not finite or value < 0:
                raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if self.max_backoff < self.initial_backoff:
            raise ConfigError("max_backoff must be at least initial_backoff")


_CAMEL = {
    "enabled": "enabled",
    "startBalance": "start_balance",
    "autoRefillEnabled": "auto_refill_enabled",
    "refillIntervalValue": "refill_interval_value",
    "refillIntervalUnit": "refill_interval_unit",
    "refillAmount": "refill_amount",
    "refillMode": "refill_mode",
    "allowNegativeBalance": "allow_negative_balance",
    "refillExpires": "refill_expires",
}
_KEYS = {**_CAMEL, **{snake: snake for snake in _CAMEL.values()}}
_SNAKE_TO_CAMEL = {snake: camel for camel, snake in _CAMEL.items()}

_EXPECTED: dict[str, tuple[str, tuple[type, ...]]] = {
    "enabled": ("true or false", (bool,)),
    "auto_refill_enabled": ("true or false", (bool,)),
    "allow_negative_balance": ("true or false", (bool,)),
    "refill_expires": ("true or false", (bool,)),
    "start_balance": ("a number", (int, float, Decimal)),
    "refill_amount": ("a number", (int, float, Decimal)),
    "refill_interval_value": ("a whole number", (int,)),
    "refill_interval_unit": (f"one of {', '.join(INTERVAL_UNITS)}", (str,)),
    "refill_mode": (f"one of {', '.join(REFILL_MODES)}", (str,)),
}


def _check_plain_type(key: str, name: str, value: object) -> None:
    wanted, types = _EXPECTED[name]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise ConfigError(f"balance config key {key!r} must be {wanted}, got {value!r}")


def _respell(message: str, mapping: Mapping[str, Any]) -> str:
    for key in mapping:
        name = _KEYS[key]
        if message.startswith(name + " "):
            return f"balance config key {key!r}{message[len(name) :]}"
    return message
