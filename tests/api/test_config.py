"""BalanceConfig, RefillSettings and RetryPolicy: defaults, key spellings, YAML, validation.

LibreChat's ``balance`` keys are camelCase in ``librechat.yaml``; creditmeter
accepts those or snake_case. Every bad key or value must be a ``ConfigError``
that names the key the way the user spelled it. LibreChat's legacy
environment (CHECK_BALANCE, START_BALANCE) is read too, alone or under a YAML.
"""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import pytest

from creditmeter import BalanceConfig, ConfigError, RefillSettings, RetryPolicy, load_config

CAMEL = {
    "enabled": True,
    "startBalance": 5000,
    "autoRefillEnabled": True,
    "refillIntervalValue": 2,
    "refillIntervalUnit": "weeks",
    "refillAmount": 750,
    "refillMode": "on_interval",
    "allowNegativeBalance": True,
    "refillExpires": True,
}
SNAKE = {
    "enabled": True,
    "start_balance": 5000,
    "auto_refill_enabled": True,
    "refill_interval_value": 2,
    "refill_interval_unit": "weeks",
    "refill_amount": 750,
    "refill_mode": "on_interval",
    "allow_negative_balance": True,
    "refill_expires": True,
}

# A librechat.yaml as LibreChat's docs show one, trimmed: the balance section
# sits among version, cache, interface, registration and endpoints.
LIBRECHAT_YAML = """\
# For more information, see the Configuration Guide:
# https://www.librechat.ai/docs/configuration/librechat_yaml

# Configuration version (required)
version: 1.2.1

# Cache settings: Set to true to enable caching
cache: true

# Custom interface configuration
interface:
  customWelcome: "Welcome to LibreChat! Enjoy your experience."
  privacyPolicy:
    externalUrl: 'https://librechat.ai/privacy-policy'
    openNewTab: true
  termsOfService:
    externalUrl: 'https://librechat.ai/tos'
    openNewTab: true
  endpointsMenu: true
  modelSelect: true
  parameters: true

registration:
  socialLogins: ['github', 'google', 'discord', 'openid', 'facebook', 'apple']

balance:
  enabled: true
  startBalance: 50000
  autoRefillEnabled: true
  refillIntervalValue: 1
  refillIntervalUnit: 'months'
  refillAmount: 25000

fileConfig:
  endpoints:
    assistants:
      fileLimit: 5
      fileSizeLimit: 10
  serverFileSizeLimit: 100

endpoints:
  custom:
    - name: 'groq'
      apiKey: '${GROQ_API_KEY}'
      baseURL: 'https://api.groq.com/openai/v1/'
      models:
        default: ['llama3-70b-8192', 'llama3-8b-8192', 'mixtral-8x7b-32768']
        fetch: false
      titleConvo: true
      titleModel: 'mixtral-8x7b-32768'
      modelDisplayLabel: 'groq'
    - name: 'Mistral'
      apiKey: '${MISTRAL_API_KEY}'
      baseURL: 'https://api.mistral.ai/v1'
      models:
        default: ['mistral-tiny', 'mistral-small', 'mistral-medium']
        fetch: true
      titleConvo: true
      titleModel: 'mistral-tiny'
      dropParams: ['stop', 'user', 'frequency_penalty', 'presence_penalty']
"""


def write(tmp_path: Path, text: str, name: str = "librechat.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- defaults ------------------------------------------------------------------


def test_balance_config_defaults_are_librechats() -> None:
    config = BalanceConfig()
    assert config.enabled is False
    assert config.start_balance == Decimal(20000)
    assert config.auto_refill_enabled is False
    assert config.refill_interval_value == 30
    assert config.refill_interval_unit == "days"
    assert config.refill_amount == Decimal(10000)
    assert config.refill_mode == "when_depleted"
    assert config.allow_negative_balance is False
    assert config.refill_expires is False  # refills pile up, as LibreChat's do


def test_amounts_are_decimals() -> None:
    config = BalanceConfig(start_balance=0.1, refill_amount=7)
    assert type(config.start_balance) is Decimal
    assert type(config.refill_amount) is Decimal
    assert config.start_balance == Decimal("0.1")  # through str, not binary float
    assert type(BalanceConfig().start_balance) is Decimal


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.attempts, policy.timeout, policy.initial_backoff, policy.max_backoff) == (
        10,
        2.0,
        0.001,
        0.25,
    )


def test_config_refill_property_mirrors_the_refill_keys() -> None:
    config = BalanceConfig.from_mapping(CAMEL)
    assert config.refill == RefillSettings(
        enabled=True, interval_value=2, interval_unit="weeks", amount=Decimal(750)
    )


def test_empty_mapping_gives_defaults() -> None:
    assert BalanceConfig.from_mapping({}) == BalanceConfig()


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        BalanceConfig(True)  # type: ignore[misc]


# --- from_mapping -----------------------------------------------------------------


def test_camel_and_snake_case_give_equal_configs() -> None:
    camel = BalanceConfig.from_mapping(CAMEL)
    snake = BalanceConfig.from_mapping(SNAKE)
    assert camel == snake
    assert camel == BalanceConfig(**SNAKE)
    assert camel != BalanceConfig()


def test_spellings_may_be_mixed() -> None:
    mixed = {"enabled": True, "startBalance": 1, "refill_amount": 2, "refillIntervalUnit": "hours"}
    assert BalanceConfig.from_mapping(mixed) == BalanceConfig(
        enabled=True, start_balance=1, refill_amount=2, refill_interval_unit="hours"
    )


@pytest.mark.parametrize("unit", ["seconds", "minutes", "hours", "days", "weeks", "months"])
def test_every_interval_unit_is_accepted(unit: str) -> None:
    assert BalanceConfig.from_mapping({"refillIntervalUnit": unit}).refill_interval_unit == unit


@pytest.mark.parametrize("mode", ["when_depleted", "on_interval", "top_up"])
def test_every_refill_mode_is_accepted(mode: str) -> None:
    assert BalanceConfig.from_mapping({"refillMode": mode}).refill_mode == mode


def test_amounts_accept_int_float_and_decimal() -> None:
    for value in (12, 12.0, Decimal(12)):
        assert BalanceConfig.from_mapping({"startBalance": value}).start_balance == Decimal(12)


def test_from_mapping_does_not_keep_a_reference_to_the_input() -> None:
    mapping = dict(CAMEL)
    config = BalanceConfig.from_mapping(mapping)
    mapping["startBalance"] = 1
    assert config.start_balance == Decimal(5000)


BAD_MAPPINGS = [
    pytest.param({"startBalanse": 10}, "startBalanse", id="unknown-key"),
    pytest.param({"balance": {"enabled": True}}, "balance", id="unknown-key-balance"),
    pytest.param({"enabled": "yes"}, "enabled", id="enabled-str-yes"),
    pytest.param({"enabled": 1}, "enabled", id="enabled-int-1"),
    pytest.param({"autoRefillEnabled": "true"}, "autoRefillEnabled", id="autoRefillEnabled-str"),
    pytest.param({"auto_refill_enabled": None}, "auto_refill_enabled", id="snake-bool-none"),
    pytest.param({"startBalance": -5}, "startBalance", id="startBalance-negative"),
    pytest.param({"start_balance": -5}, "start_balance", id="start_balance-negative"),
    pytest.param({"startBalance": "20000"}, "startBalance", id="startBalance-str"),
    pytest.param({"startBalance": float("nan")}, "startBalance", id="startBalance-nan"),
    pytest.param({"startBalance": float("inf")}, "startBalance", id="startBalance-inf"),
    pytest.param({"startBalance": Decimal("NaN")}, "startBalance", id="startBalance-decimal-nan"),
    pytest.param({"startBalance": 10**16}, "startBalance", id="startBalance-1e16"),
    pytest.param({"startBalance": True}, "startBalance", id="startBalance-bool"),
    pytest.param({"startBalance": None}, "startBalance", id="startBalance-none"),
    pytest.param(
        {"refillIntervalUnit": "fortnight"}, "refillIntervalUnit", id="refillIntervalUnit-fortnight"
    ),
    pytest.param(
        {"refillIntervalUnit": "Days"}, "refillIntervalUnit", id="refillIntervalUnit-Days"
    ),
    pytest.param({"refillIntervalUnit": 30}, "refillIntervalUnit", id="refillIntervalUnit-int"),
    pytest.param({"refillIntervalValue": 0}, "refillIntervalValue", id="refillIntervalValue-0"),
    pytest.param({"refillIntervalValue": -1}, "refillIntervalValue", id="refillIntervalValue-neg"),
    pytest.param({"refillIntervalValue": 1.5}, "refillIntervalValue", id="refillIntervalValue-1.5"),
    pytest.param({"refillIntervalValue": 2.0}, "refillIntervalValue", id="refillIntervalValue-2.0"),
    pytest.param(
        {"refillIntervalValue": "30"}, "refillIntervalValue", id="refillIntervalValue-str"
    ),
    pytest.param(
        {"refillIntervalValue": True}, "refillIntervalValue", id="refillIntervalValue-bool"
    ),
    pytest.param({"refillAmount": True}, "refillAmount", id="refillAmount-bool"),
    pytest.param({"refillAmount": -1}, "refillAmount", id="refillAmount-negative"),
    pytest.param({"refillAmount": Decimal("1e16")}, "refillAmount", id="refillAmount-1e16"),
    pytest.param({"refillMode": "sometimes"}, "refillMode", id="refillMode-unknown"),
    pytest.param({"allowNegativeBalance": "no"}, "allowNegativeBalance", id="allowNegative-str"),
    pytest.param({"refillExpires": "true"}, "refillExpires", id="refillExpires-str"),
    pytest.param({"refillExpires": 1}, "refillExpires", id="refillExpires-int-1"),
    pytest.param({"refillExpires": None}, "refillExpires", id="refillExpires-none"),
    pytest.param({"refill_expires": 0}, "refill_expires", id="refill_expires-int-0"),
    pytest.param({"refillexpires": True}, "refillexpires", id="refillexpires-unknown-case"),
]


@pytest.mark.parametrize(("mapping", "key"), BAD_MAPPINGS)
def test_bad_mapping_raises_config_error_naming_the_key(mapping: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        BalanceConfig.from_mapping(mapping)
    assert repr(key) in str(caught.value)


def test_error_names_the_bad_key_among_good_ones() -> None:
    mapping = {"enabled": True, "refillAmount": 5, "refillIntervalValue": 0, "startBalance": 1}
    with pytest.raises(ConfigError) as caught:
        BalanceConfig.from_mapping(mapping)
    message = str(caught.value)
    assert "'refillIntervalValue'" in message
    # the snake_case name is internal; the user wrote camelCase
    assert "refill_interval_value" not in message


def test_error_says_what_was_expected() -> None:
    with pytest.raises(ConfigError) as caught:
        BalanceConfig.from_mapping({"refillIntervalUnit": "fortnight"})
    message = str(caught.value)
    assert "'fortnight'" in message
    for unit in ("seconds", "minutes", "hours", "days", "weeks", "months"):
        assert unit in message


def test_unknown_key_error_lists_the_known_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        BalanceConfig.from_mapping({"startBalanse": 10})
    assert "startBalance" in str(caught.value)


@pytest.mark.parametrize(
    "mapping",
    [
        pytest.param({"startBalance": 1, "start_balance": 1}, id="camel-then-snake"),
        pytest.param({"start_balance": 1, "startBalance": 2}, id="snake-then-camel"),
        pytest.param({"refillIntervalUnit": "days", "refill_interval_unit": "days"}, id="unit"),
    ],
)
def test_key_given_in_both_spellings_is_rejected(mapping: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        BalanceConfig.from_mapping(mapping)
    message = str(caught.value)
    assert any(repr(key) in message for key in mapping)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param([("enabled", True)], id="list-of-pairs"),
        pytest.param("enabled: true", id="str"),
        pytest.param(None, id="none"),
        pytest.param(42, id="int"),
    ],
)
def test_non_mapping_is_rejected(value: Any) -> None:
    with pytest.raises(ConfigError):
        BalanceConfig.from_mapping(value)


def test_non_str_key_is_rejected() -> None:
    with pytest.raises(ConfigError):
        BalanceConfig.from_mapping({1: True})


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="startBalance"):
        BalanceConfig.from_mapping({"startBalance": -5})


# --- direct construction --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        pytest.param({"enabled": "yes"}, "enabled", id="enabled-str"),
        pytest.param({"start_balance": -1}, "start_balance", id="start_balance-negative"),
        pytest.param({"start_balance": "5"}, "start_balance", id="start_balance-str"),
        pytest.param({"refill_interval_value": 0}, "refill_interval_value", id="interval-0"),
        pytest.param({"refill_interval_unit": "fortnight"}, "refill_interval_unit", id="unit"),
        pytest.param({"refill_amount": float("nan")}, "refill_amount", id="amount-nan"),
        pytest.param({"refill_mode": "never"}, "refill_mode", id="mode"),
        pytest.param({"allow_negative_balance": 0}, "allow_negative_balance", id="neg-int"),
        pytest.param({"refill_expires": "yes"}, "refill_expires", id="refill-expires-str"),
        pytest.param({"refill_expires": 1}, "refill_expires", id="refill-expires-int"),
    ],
)
def test_direct_construction_validates(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        BalanceConfig(**kwargs)


# --- from_yaml ------------------------------------------------------------------------


def test_from_yaml_reads_the_balance_section_of_a_librechat_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, LIBRECHAT_YAML)
    assert BalanceConfig.from_yaml(path) == BalanceConfig(
        enabled=True,
        start_balance=50000,
        auto_refill_enabled=True,
        refill_interval_value=1,
        refill_interval_unit="months",
        refill_amount=25000,
    )


def test_from_yaml_accepts_a_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, LIBRECHAT_YAML)
    assert BalanceConfig.from_yaml(str(path)) == BalanceConfig.from_yaml(path)


def test_from_yaml_file_holding_only_the_balance_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        enabled: true
        startBalance: 1000
        refillIntervalUnit: hours
        refill_amount: 10.5
        """,
        name="balance.yaml",
    )
    assert BalanceConfig.from_yaml(path) == BalanceConfig(
        enabled=True,
        start_balance=1000,
        refill_interval_unit="hours",
        refill_amount=Decimal("10.5"),
    )


def test_refill_expires_is_read_in_either_spelling_and_from_yaml(tmp_path: Path) -> None:
    assert BalanceConfig.from_mapping({"refillExpires": True}).refill_expires is True
    assert BalanceConfig.from_mapping({"refill_expires": True}).refill_expires is True
    assert BalanceConfig.from_mapping({"refillExpires": False}) == BalanceConfig()
    with pytest.raises(ConfigError, match="given twice"):
        BalanceConfig.from_mapping({"refillExpires": True, "refill_expires": True})
    text = LIBRECHAT_YAML.replace(
        "  refillAmount: 25000\n", "  refillAmount: 25000\n  refillExpires: true\n"
    )
    assert "refillExpires" in text
    assert BalanceConfig.from_yaml(write(tmp_path, text)).refill_expires is True
    path = write(tmp_path, "balance:\n  refill_expires: true\n", name="snake.yaml")
    assert BalanceConfig.from_yaml(path) == BalanceConfig(refill_expires=True)
    path = write(tmp_path, "balance:\n  refillExpires: 'true'\n", name="quoted.yaml")
    with pytest.raises(ConfigError, match="'refillExpires'"):
        BalanceConfig.from_yaml(path)


def test_from_yaml_empty_balance_section_gives_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1.2.1\ncache: true\nbalance:\n")
    assert BalanceConfig.from_yaml(path) == BalanceConfig()


def test_from_yaml_bad_value_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1.2.1\nbalance:\n  enabled: true\n  startBalance: -5\n")
    with pytest.raises(ConfigError, match="'startBalance'"):
        BalanceConfig.from_yaml(path)


def test_from_yaml_quoted_yes_is_not_a_bool(tmp_path: Path) -> None:
    path = write(tmp_path, "balance:\n  enabled: 'yes'\n")
    with pytest.raises(ConfigError, match="'enabled'"):
        BalanceConfig.from_yaml(path)


def test_from_yaml_unknown_key_in_balance_section(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1.2.1\nbalance:\n  enabled: true\n  tokenCredits: 5\n")
    with pytest.raises(ConfigError, match="'tokenCredits'"):
        BalanceConfig.from_yaml(path)


def test_from_yaml_without_balance_section(tmp_path: Path) -> None:
    text = LIBRECHAT_YAML.replace("balance:", "not_balance:")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="balance"):
        BalanceConfig.from_yaml(path)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("balance: [unclosed\n", id="unclosed-flow-list"),
        pytest.param("balance:\n  enabled: true\n startBalance: 5\n", id="bad-indent"),
        pytest.param("balance:\n\tenabled: true\n", id="tab-indent"),
        pytest.param("a: b: c\n", id="nested-colon"),
    ],
)
def test_from_yaml_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        BalanceConfig.from_yaml(path)
    assert str(path) in str(caught.value)


def test_from_yaml_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "librechat.yaml"
    with pytest.raises(ConfigError) as caught:
        BalanceConfig.from_yaml(path)
    assert str(path) in str(caught.value)


def test_from_yaml_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        BalanceConfig.from_yaml(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("- enabled: true\n- startBalance: 5\n", id="top-level-list"),
        pytest.param("just a string\n", id="top-level-str"),
        pytest.param("", id="empty-file"),
        pytest.param("balance:\n  - enabled: true\n", id="balance-is-a-list"),
        pytest.param("balance: 5\n", id="balance-is-a-number"),
    ],
)
def test_from_yaml_wrong_shape(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError):
        BalanceConfig.from_yaml(path)


# --- RetryPolicy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"attempts": 0}, id="attempts-0"),
        pytest.param({"attempts": -1}, id="attempts-negative"),
        pytest.param({"attempts": 2.0}, id="attempts-float"),
        pytest.param({"attempts": True}, id="attempts-bool"),
        pytest.param({"attempts": "3"}, id="attempts-str"),
        pytest.param({"timeout": -0.5}, id="timeout-negative"),
        pytest.param({"timeout": float("nan")}, id="timeout-nan"),
        pytest.param({"timeout": float("inf")}, id="timeout-inf"),
        pytest.param({"timeout": True}, id="timeout-bool"),
        pytest.param({"timeout": "2"}, id="timeout-str"),
        pytest.param({"initial_backoff": -0.001}, id="initial-backoff-negative"),
        pytest.param({"initial_backoff": False}, id="initial-backoff-bool"),
        pytest.param({"max_backoff": True}, id="max-backoff-bool"),
        pytest.param({"initial_backoff": 0.5, "max_backoff": 0.25}, id="max-below-initial"),
        pytest.param({"max_backoff": 0.0001}, id="max-below-default-initial"),
    ],
)
def test_retry_policy_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)


def test_retry_policy_accepts_edges() -> None:
    assert RetryPolicy(attempts=1).attempts == 1
    assert RetryPolicy(timeout=0).timeout == 0
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.1)
    assert policy.max_backoff == policy.initial_backoff
    assert RetryPolicy(initial_backoff=0, max_backoff=0).max_backoff == 0


# --- RefillSettings ---------------------------------------------------------------------------


def test_refill_settings_valid() -> None:
    settings = RefillSettings(enabled=True, interval_value=3, interval_unit="months", amount=0.25)
    assert settings.amount == Decimal("0.25")
    assert type(settings.amount) is Decimal
    assert RefillSettings(enabled=False, interval_value=1, interval_unit="days").amount == 0


def test_refill_settings_fields_are_required() -> None:
    with pytest.raises(TypeError):
        RefillSettings(enabled=True, interval_value=1)  # type: ignore[call-arg]


REFILL_OK: dict[str, Any] = {
    "enabled": True,
    "interval_value": 1,
    "interval_unit": "days",
    "amount": 100,
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("enabled", "yes", id="enabled-str"),
        pytest.param("enabled", 1, id="enabled-int"),
        pytest.param("enabled", None, id="enabled-none"),
        pytest.param("interval_value", 0, id="interval-0"),
        pytest.param("interval_value", -3, id="interval-negative"),
        pytest.param("interval_value", 1.5, id="interval-float"),
        pytest.param("interval_value", True, id="interval-bool"),
        pytest.param("interval_unit", "fortnight", id="unit-fortnight"),
        pytest.param("interval_unit", None, id="unit-none"),
        pytest.param("amount", -1, id="amount-negative"),
        pytest.param("amount", float("nan"), id="amount-nan"),
        pytest.param("amount", Decimal("Infinity"), id="amount-decimal-inf"),
        pytest.param("amount", True, id="amount-bool"),
        pytest.param("amount", "100", id="amount-str"),
        pytest.param("amount", 10**16, id="amount-1e16"),
    ],
)
def test_refill_settings_rejects(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        RefillSettings(**{**REFILL_OK, field: value})


# --- immutability -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instance", "field", "value"),
    [
        pytest.param(BalanceConfig(), "enabled", True, id="BalanceConfig"),
        pytest.param(BalanceConfig(), "start_balance", Decimal(1), id="BalanceConfig-amount"),
        pytest.param(RetryPolicy(), "attempts", 3, id="RetryPolicy"),
        pytest.param(RefillSettings(**REFILL_OK), "amount", Decimal(5), id="RefillSettings"),
    ],
)
def test_configs_are_frozen(instance: Any, field: str, value: Any) -> None:
    before = getattr(instance, field)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(instance, field, value)
    assert getattr(instance, field) == before


def test_configs_are_hashable_and_comparable() -> None:
    assert hash(BalanceConfig.from_mapping(CAMEL)) == hash(BalanceConfig.from_mapping(SNAKE))
    assert len({RetryPolicy(), RetryPolicy()}) == 1


# --- LibreChat's environment --------------------------------------------------------


def test_from_env_reads_the_legacy_variables():
    assert BalanceConfig.from_env({}) == BalanceConfig()
    config = BalanceConfig.from_env({"CHECK_BALANCE": "True ", "START_BALANCE": "750"})
    assert config.enabled
    assert config.start_balance == 750
    assert not BalanceConfig.from_env({"CHECK_BALANCE": "yes"}).enabled  # only "true" is true
    with pytest.raises(ConfigError, match="START_BALANCE"):
        BalanceConfig.from_env({"START_BALANCE": "lots"})


def test_load_config_overlays_the_yaml_on_the_environment(tmp_path):
    env = {"CHECK_BALANCE": "true", "START_BALANCE": "500"}
    path = tmp_path / "librechat.yaml"
    path.write_text("version: 1.2.1\nbalance:\n  startBalance: 42\n  autoRefillEnabled: true\n")
    config = load_config(path, env=env)
    assert config.enabled  # from the environment
    assert config.start_balance == 42  # the YAML wins
    assert config.auto_refill_enabled
    path.write_text("version: 1.2.1\nendpoints: {}\n")
    assert load_config(path, env=env).start_balance == 500
    assert load_config(env={}) == BalanceConfig()
    path.write_text("balance:\n  enabled: false\n  start_balance: 3\n")
    overlaid = load_config(path, env=env)
    assert not overlaid.enabled
    assert overlaid.start_balance == 3
