"""Fuzz the public inputs with Hypothesis: only CreditMeterError escapes; a refusal writes nothing.

Inputs: amounts of any type (ints of any size, floats with NaN and
infinities, Decimals with NaN, sNaN and any exponent, fractions, complex,
str, bytes, bools, containers, objects), user ids of any text (controls,
surrogates, any length) or type, request ids, reasons, metadata, models,
usage (``TokenUsage`` objects of any counts, and dicts), ttls, limits, holds,
refill settings; provider usage payloads (nested dicts and attribute objects
with the keys ``TokenUsage.from_response`` and ``StreamUsage`` look for);
config mappings (``BalanceConfig.from_mapping``, ``RefillSettings``,
``RetryPolicy``, ``load_config``'s environment, ``Pricing.from_mapping``);
YAML text written to a temp file (``load_config``, ``BalanceConfig.from_yaml``,
``Pricing.from_yaml``); store URLs (``open_store``).

Every manager call runs against MemoryStore and SQLiteStore holding two
users; when it raises, the store's users, accounts and ledgers must equal a
snapshot taken just before (a refused ``require`` may leave what ``check``
writes first: the account opened, a due refill). Nothing but
``CreditMeterError`` may escape (no test generates a wrong number of
arguments, so Python's own TypeError for that never arises).

The tests at the end pin the inputs that escaped untyped before the fixes of
d4b706d (YAML Python cannot build, huge ints in metadata, a ttl past the year
9999, a forged hold, a RetryPolicy past the float range, paths with NUL); the
generators reach those inputs too, and a rebuilt Hold whose id is None or
whose expires_at is not an aware datetime (fixed later; the generators build
holds with fields of the right types only).

Default: 75 examples per test (the store test: per store).
``CREDITMETER_LONG=1``: 2,000 examples per test.
"""

from __future__ import annotations

import contextlib
import os
import string
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    CreditMeterError,
    EntryKind,
    Hold,
    InsufficientBalance,
    MemoryStore,
    Pricing,
    RefillSettings,
    RetryPolicy,
    SQLiteStore,
    StreamUsage,
    TokenUsage,
    load_config,
    open_store,
    usage_from_stream,
)
from creditmeter.testing import FakeClock

LONG = os.environ.get("CREDITMETER_LONG") == "1"
FUZZ = settings(
    max_examples=2000 if LONG else 75,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)

# --- values of any kind ------------------------------------------------------------------


class IntSubclass(int):
    pass


class FloatSubclass(float):
    pass


ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)  # surrogates too
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.decimals(),
    st.fractions(),
    st.complex_numbers(),
    ANY_TEXT,
    st.binary(max_size=10),
    st.datetimes(),
    st.timedeltas(),
    st.builds(object),
)
ANYTHING = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.tuples(SCALARS),
    st.dictionaries(st.text(max_size=5), SCALARS, max_size=3),
    st.sets(st.integers(), max_size=3),
)
NUMBERS = st.one_of(
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.integers(),
    st.sampled_from([0, 1, 10**15, 10**15 + 1, -1, 2**63, 10**400]),
    st.floats(),
    st.floats(min_value=0, max_value=1e6),
    st.decimals(),
    st.decimals(min_value=0, max_value=10**6, places=6),
    st.sampled_from(
        [Decimal("NaN"), Decimal("sNaN"), Decimal("-0"), Decimal("1E-31"), Decimal("1E+999999")]
    ),
    st.fractions(),
    st.builds(IntSubclass, st.integers(min_value=-5, max_value=10**16)),
    st.builds(FloatSubclass, st.floats()),
)


def mostly(valid: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    """A valid value 4 times in 5, so that most calls carry one bad argument or none."""
    return st.tuples(st.integers(0, 4), valid, bad).map(lambda t: t[2] if t[0] == 0 else t[1])


PRINTABLE = st.characters(exclude_categories=("Cc", "Cs"))
AMOUNTS = mostly(
    st.one_of(
        st.integers(min_value=0, max_value=10**6),
        st.decimals(min_value=0, max_value=10**6, places=4),
        st.floats(min_value=0, max_value=1e6),
    ),
    st.one_of(NUMBERS, ANYTHING),
)
USERS = mostly(
    st.one_of(
        st.sampled_from(["alice", "bob", "carol"]),  # alice and bob exist, carol does not
        st.text(PRINTABLE, min_size=1, max_size=30),
    ),
    st.one_of(
        ANY_TEXT,
        st.text(max_size=300),
        st.sampled_from(["", "x" * 256, "x" * 257, "a\x00b", "a\nb", "\x85", "\ud800", " "]),
        ANYTHING,
    ),
)
TEXTS = mostly(
    st.one_of(st.none(), st.text(PRINTABLE, min_size=1, max_size=20)),
    st.one_of(ANY_TEXT, st.text(min_size=250, max_size=1100), ANYTHING),
)
METADATA_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**5000]),
    st.floats(),
    ANY_TEXT,
    st.decimals(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
METADATA = mostly(
    st.one_of(
        st.none(),
        st.dictionaries(
            st.text(max_size=8),
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
            max_size=3,
        ),
    ),
    st.one_of(
        st.dictionaries(st.one_of(ANY_TEXT, st.integers()), METADATA_VALUES, max_size=4), ANYTHING
    ),
)
COUNTS = st.one_of(
    st.integers(min_value=0, max_value=10**10), st.integers(), st.floats(), st.booleans()
)
TOKEN_USAGES = st.builds(
    TokenUsage,
    input=st.integers(min_value=0, max_value=10**10),
    output=st.integers(min_value=0, max_value=10**10),
    cache_write=st.integers(min_value=0, max_value=10**10),
    cache_read=st.integers(min_value=0, max_value=10**10),
)
MODELS = mostly(
    st.one_of(st.none(), st.sampled_from(["gpt-4o", "claude-3-5-sonnet", "gemini-2.5-pro", "o1"])),
    st.one_of(ANY_TEXT, ANYTHING),
)
USAGE_ARGS = mostly(
    st.one_of(st.none(), TOKEN_USAGES),
    st.dictionaries(st.text(max_size=8), COUNTS),
)
FLAGS = mostly(st.booleans(), ANYTHING)
TTLS = mostly(
    st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=30)),
    st.one_of(st.timedeltas(), st.just(timedelta.max), ANYTHING),
)
LIMITS = mostly(st.one_of(st.none(), st.integers(0, 100)), st.one_of(st.integers(), ANYTHING))
REFILL_SETTINGS = mostly(
    st.one_of(
        st.none(),
        st.builds(
            RefillSettings,
            enabled=st.booleans(),
            interval_value=st.integers(min_value=1, max_value=10**20),
            interval_unit=st.sampled_from(
                ["seconds", "minutes", "hours", "days", "weeks", "months"]
            ),
            amount=st.integers(min_value=0, max_value=10**15),
        ),
    ),
    ANYTHING,
)


# Holds as a gateway might rebuild them from a stored request: fields of the right types
# (see test_settle_of_a_hold_with_malformed_fields_is_invalid_input for the others).
FORGED_HOLDS = st.builds(
    Hold,
    id=st.one_of(st.text(PRINTABLE, min_size=1, max_size=10), ANY_TEXT),
    user_id=USERS,
    amount=AMOUNTS,
    created_at=st.just(T0),
    expires_at=st.datetimes(timezones=st.just(timezone.utc)),
)
HOLDS = st.one_of(st.just("a real hold"), FORGED_HOLDS, ANYTHING)


def optional(**strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=strategies)


def call(name: str, *args: st.SearchStrategy[Any], **kwargs: st.SearchStrategy[Any]) -> Any:
    return st.tuples(st.just(name), st.tuples(*args), optional(**kwargs))


MANAGER_CALLS = st.one_of(
    call("grant", USERS, AMOUNTS, request_id=TEXTS, reason=TEXTS, metadata=METADATA),
    call(
        "charge",
        USERS,
        st.one_of(st.none(), AMOUNTS),
        model=MODELS,
        usage=USAGE_ARGS,
        incomplete=FLAGS,
        strict=FLAGS,
        request_id=TEXTS,
        metadata=METADATA,
    ),
    call("set_balance", USERS, AMOUNTS, request_id=TEXTS, reason=TEXTS),
    call("maybe_refill", USERS, cost=AMOUNTS),
    call(
        "check",
        USERS,
        st.one_of(st.none(), AMOUNTS),
        model=MODELS,
        input_tokens=st.one_of(COUNTS, ANYTHING),
    ),
    call(
        "require",
        USERS,
        st.one_of(st.none(), AMOUNTS),
        model=MODELS,
        input_tokens=st.one_of(COUNTS, ANYTHING),
    ),
    call(
        "hold",
        USERS,
        st.one_of(st.none(), AMOUNTS),
        model=MODELS,
        usage=USAGE_ARGS,
        ttl=TTLS,
        request_id=TEXTS,
    ),
    call(
        "settle",
        HOLDS,
        st.one_of(st.none(), AMOUNTS),
        model=MODELS,
        usage=USAGE_ARGS,
        incomplete=FLAGS,
        metadata=METADATA,
    ),
    call("release", HOLDS),
    call("reserve", USERS, AMOUNTS, ttl=TTLS, request_id=TEXTS),
    call("configure_refill", USERS, REFILL_SETTINGS),
    call("account", USERS),
    call("balance", USERS),
    call("ledger", USERS, limit=LIMITS),
)

# --- the store under test --------------------------------------------------------------------


def snapshot(store: Any) -> Any:
    users = store.users()
    return users, {u: store.load(u) for u in users}, {u: store.ledger(u) for u in users}


@pytest.fixture(scope="module", params=["memory", "sqlite"])
def manager(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A manager over a store holding alice (a grant) and bob (a charge), shared by examples."""
    if request.param == "memory":
        store: Any = MemoryStore()
    else:
        path = tmp_path_factory.mktemp("fuzz") / "credits.db"
        store = SQLiteStore(path, durability="normal")
    config = BalanceConfig(
        enabled=True, auto_refill_enabled=True, refill_interval_value=1, refill_interval_unit="days"
    )
    manager = BalanceManager(store, config, clock=FakeClock(T0))
    manager.grant("alice", 5, request_id="seed-grant", metadata={"source": "seed"})
    manager.charge("bob", 3, model="gpt-4o", request_id="seed-charge")
    yield manager
    try:
        users, accounts, ledgers = snapshot(store)
        for user in users:  # what succeeded still adds up
            assert sum(e.amount for e in ledgers[user]) == accounts[user].balance
    finally:
        store.close()


def only_a_refill_or_an_opening(before: Any, after: Any, user: str) -> None:
    """A refusal may leave what a check writes first: the account opened, a due refill."""
    users, accounts, ledgers = before
    users_after, accounts_after, ledgers_after = after
    assert set(users_after) - set(users) <= {user}
    for other in users:
        if other != user:
            assert accounts_after[other] == accounts[other]
            assert ledgers_after[other] == ledgers[other]
    if user in users_after:
        kept = ledgers.get(user, [])
        assert ledgers_after[user][: len(kept)] == kept
        added = {e.kind for e in ledgers_after[user][len(kept) :]}
        assert added <= {EntryKind.OPEN, EntryKind.REFILL}, f"a refusal wrote {added}"


def run_call(manager: BalanceManager, name: str, args: tuple, kwargs: dict) -> Any:
    if name in ("settle", "release") and args[0] == "a real hold":
        manager.grant("hold-owner", 1)  # before the snapshot: writes of their own
        args = (manager.hold("hold-owner", 1), *args[1:])
    before = snapshot(manager.store)
    try:
        if name == "reserve":  # the hold is taken on entry and released on exit
            with manager.reserve(*args, **kwargs):
                pass
        else:
            getattr(manager, name)(*args, **kwargs)
    except InsufficientBalance as error:
        event(f"{name}: {type(error).__name__}")
        only_a_refill_or_an_opening(before, snapshot(manager.store), error.user_id)
    except CreditMeterError as error:
        event(f"{name}: {type(error).__name__}")
        assert snapshot(manager.store) == before, f"{name} failed and wrote something"
    else:
        event(f"{name}: done")


@FUZZ
@given(MANAGER_CALLS)
def test_manager_calls(manager: BalanceManager, drawn: Any) -> None:
    name, args, kwargs = drawn
    run_call(manager, name, args, kwargs)
    manager.clock.advance(timedelta(hours=7))  # refills come due now and then


# --- usage payloads ----------------------------------------------------------------------------

USAGE_KEYS = st.one_of(
    st.sampled_from(
        [
            "usage",
            "type",
            "message",
            "response",
            "choices",
            "candidates",
            "prompt_tokens",
            "completion_tokens",
            "prompt_tokens_details",
            "input_tokens",
            "output_tokens",
            "input_tokens_details",
            "cached_tokens",
            "cache_write_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "usage_metadata",
            "usageMetadata",
            "prompt_token_count",
            "promptTokenCount",
            "candidates_token_count",
            "candidatesTokenCount",
            "thoughts_token_count",
            "cached_content_token_count",
        ]
    ),
    st.text(max_size=5),
)
EVENT_TYPES = st.sampled_from(
    [
        "message_start",
        "message_delta",
        "content_block_delta",
        "response.completed",
        "response.incomplete",
        "response.failed",
        "response.output_text.delta",
    ]
)
LEAVES = st.one_of(COUNTS, EVENT_TYPES, SCALARS)


def as_objects(value: Any, flags: list[bool]) -> Any:
    """Turn some of the dicts into attribute objects, as SDKs return them."""
    if isinstance(value, dict):
        converted = {key: as_objects(item, flags) for key, item in value.items()}
        as_object = flags.pop() if flags else False
        if as_object and all(isinstance(key, str) and key.isidentifier() for key in converted):
            return SimpleNamespace(**converted)
        return converted
    if isinstance(value, list):
        return [as_objects(item, flags) for item in value]
    return value


PAYLOADS = st.builds(
    as_objects,
    st.recursive(
        LEAVES,
        lambda children: st.one_of(
            st.lists(children, max_size=3), st.dictionaries(USAGE_KEYS, children, max_size=6)
        ),
        max_leaves=25,
    ),
    st.lists(st.booleans(), max_size=10),
)


@FUZZ
@given(PAYLOADS)
def test_usage_from_a_response(payload: Any) -> None:
    try:
        usage = TokenUsage.from_response(payload)
    except CreditMeterError:
        return
    assert usage is None or isinstance(usage, TokenUsage)


@FUZZ
@given(st.lists(PAYLOADS, max_size=5))
def test_usage_from_a_stream(chunks: list[Any]) -> None:
    collector = StreamUsage()
    try:
        for chunk in chunks:
            collector.add(chunk)
        usage_from_stream(chunks)
    except CreditMeterError:
        return
    assert collector.usage is None or isinstance(collector.usage, TokenUsage)


@FUZZ
@given(optional(input=COUNTS, output=COUNTS, cache_write=COUNTS, cache_read=COUNTS), MODELS)
def test_token_usage_and_its_price(counts: dict[str, Any], model: Any) -> None:
    with contextlib.suppress(CreditMeterError):
        usage = TokenUsage(**counts)
        Pricing.librechat().cost(model if isinstance(model, str) else None, usage)


# --- configuration -------------------------------------------------------------------------

CONFIG_KEYS = st.one_of(
    st.sampled_from(
        [
            "enabled",
            "startBalance",
            "start_balance",
            "autoRefillEnabled",
            "auto_refill_enabled",
            "refillIntervalValue",
            "refill_interval_value",
            "refillIntervalUnit",
            "refill_interval_unit",
            "refillAmount",
            "refill_amount",
            "refillMode",
            "refill_mode",
            "allowNegativeBalance",
            "allow_negative_balance",
        ]
    ),
    st.text(max_size=8),
    st.integers(),
    st.none(),
)
CONFIG_VALUES = st.one_of(
    NUMBERS,
    st.sampled_from(["days", "months", "seconds", "when_depleted", "top_up", "on_interval"]),
    ANYTHING,
)
CONFIG_MAPPINGS = st.dictionaries(CONFIG_KEYS, CONFIG_VALUES, max_size=6)
RATE_MAPPINGS = st.one_of(
    st.dictionaries(
        st.one_of(
            st.sampled_from(["gpt-4o", "my-model", ""]),
            st.text(max_size=10),
            st.integers(),
            st.none(),
            st.binary(max_size=5),
        ),
        st.one_of(
            st.dictionaries(
                st.one_of(
                    st.sampled_from(["prompt", "completion", "write", "read", "context"]),
                    st.text(max_size=5),
                ),
                CONFIG_VALUES,
                max_size=4,
            ),
            ANYTHING,
        ),
        max_size=3,
    ),
    ANYTHING,
)


@FUZZ
@given(CONFIG_MAPPINGS)
def test_balance_config_from_a_mapping(mapping: dict[Any, Any]) -> None:
    with contextlib.suppress(CreditMeterError):
        BalanceConfig.from_mapping(mapping)


@FUZZ
@given(optional(**dict.fromkeys(["enabled", "start_balance", "refill_amount"], CONFIG_VALUES)))
def test_balance_config_keywords(kwargs: dict[str, Any]) -> None:
    with contextlib.suppress(CreditMeterError):
        BalanceConfig(**kwargs)


@FUZZ
@given(
    st.fixed_dictionaries(
        dict.fromkeys(["enabled", "interval_value", "interval_unit", "amount"], CONFIG_VALUES)
    ),
    optional(**dict.fromkeys(["attempts", "timeout", "initial_backoff", "max_backoff"], NUMBERS)),
)
def test_refill_settings_and_retry_policy(refill: dict[str, Any], retry: dict[str, Any]) -> None:
    with contextlib.suppress(CreditMeterError):
        RefillSettings(**refill)
    with contextlib.suppress(CreditMeterError):
        RetryPolicy(**retry)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["CHECK_BALANCE", "START_BALANCE", "OTHER"]),
        st.one_of(st.text(max_size=10), st.from_regex(r"\s*-?\d{1,5000}\s*", fullmatch=True)),
    )
)
def test_load_config_from_the_environment(env: dict[str, str]) -> None:
    with contextlib.suppress(CreditMeterError):
        load_config(env=env)


@FUZZ
@given(RATE_MAPPINGS, st.booleans())
def test_pricing_from_a_mapping(rates: Any, fallback: bool) -> None:
    with contextlib.suppress(CreditMeterError):
        Pricing.from_mapping(rates, fallback=fallback).cost("my-model", TokenUsage(input=10))


# --- YAML ---------------------------------------------------------------------------------

YAML_DOCUMENTS = st.one_of(
    st.fixed_dictionaries({"balance": st.one_of(CONFIG_MAPPINGS, SCALARS)}),
    CONFIG_MAPPINGS,
    st.fixed_dictionaries({"tokenConfig": RATE_MAPPINGS}),
    RATE_MAPPINGS,
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
        lambda children: st.one_of(
            st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children)
        ),
        max_leaves=10,
    ),
)


def dumped(document: Any) -> str:
    try:
        return yaml.safe_dump(document, allow_unicode=True)
    except yaml.YAMLError:
        return "{}"  # a value YAML has no tag for


YAML_TEXT = st.one_of(
    st.builds(dumped, YAML_DOCUMENTS),
    st.text(max_size=200),
    st.text(alphabet=string.printable, max_size=200),
    st.tuples(st.builds(dumped, YAML_DOCUMENTS), st.integers(min_value=0), st.text(max_size=5)).map(
        lambda t: t[0][: t[1] % (len(t[0]) + 1)] + t[2] + t[0][t[1] % (len(t[0]) + 1) :]
    ),
    # Scalars PyYAML builds by calling Python (date(), int(), chr()), which may refuse them.
    st.builds(
        "balance:\n  startBalance: {:04d}-{}-{}\n".format,
        st.integers(0, 9999),
        st.integers(0, 99),
        st.integers(0, 99),
    ),
    st.builds(lambda digits: "x: " + "7" * digits + "\n", st.integers(4200, 4400)),
    st.builds('x: "\\U{:08X}"\n'.format, st.integers(0, 2**32 - 1)),
    st.builds(lambda n: "[" * n + "]" * n, st.integers(0, 700)),  # ~500 deep: RecursionError
)


@pytest.fixture(scope="module")
def yaml_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("yaml") / "librechat.yaml"


@FUZZ
@given(YAML_TEXT)
def test_yaml_config_files(yaml_path: Path, text: str) -> None:
    yaml_path.write_bytes(text.encode())
    for read in (
        lambda: load_config(yaml_path, env={}),
        lambda: BalanceConfig.from_yaml(yaml_path),
        lambda: Pricing.from_yaml(yaml_path),
    ):
        with contextlib.suppress(CreditMeterError):
            read()
    assert yaml_path.read_bytes() == text.encode()  # read, never written


# --- store URLs ----------------------------------------------------------------------------

# Servers are never dialled: URLs of the Redis and PostgreSQL stores are left out.
SERVER_SCHEMES = {"sqlite", "redis", "rediss", "postgres", "postgresql"}


def not_a_server(url: Any) -> bool:
    return not isinstance(url, str) or url.partition(":")[0].lower() not in SERVER_SCHEMES


PATH_TEXT = st.text(st.characters(exclude_characters="/", exclude_categories=()), max_size=20)


@FUZZ
@given(
    st.one_of(
        ANY_TEXT.filter(not_a_server),
        st.builds(lambda rest: "memory:" + rest, st.text(max_size=10)),
        st.builds(lambda query: "sqlite:///{dir}/fuzz.db?" + query, st.text(max_size=30)),
        st.builds(lambda name: "sqlite:///{dir}/" + name, PATH_TEXT),
        st.builds(lambda url: "sqlite:" + url, st.text(max_size=5).filter(lambda u: "/" not in u)),
        ANYTHING.filter(not_a_server),
    )
)
def test_store_urls(yaml_path: Path, url: Any) -> None:
    if isinstance(url, str):
        url = url.replace("{dir}", str(yaml_path.parent))
    try:
        store = open_store(url)
    except CreditMeterError:
        return
    store.close()


# --- bugs found: inputs that escaped as something else (fixed in d4b706d, but one) ----------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"balance:\n  startBalance: 2001-13-45\n", id="date-out-of-range"),
        pytest.param(b"other: 0000-00-00\n", id="year-zero"),
        pytest.param(b"balance:\n  startBalance: " + b"1" * 5000 + b"\n", id="5000-digit-int"),
        pytest.param(b'x: "\\U01000000"\n', id="escape-past-unicode"),
        pytest.param(b'x: "\\U80000000"\n', id="escape-past-c-int"),
        pytest.param(b"balance:\n  enabled: \xff\xfe\n", id="not-utf-8"),
        pytest.param(b"[" * 1000 + b"]" * 1000, id="deep-nesting"),
    ],
)
@pytest.mark.parametrize("reader", ["load_config", "from_yaml", "Pricing.from_yaml"])
def test_yaml_that_python_cannot_build_is_a_config_error(
    tmp_path: Path, content: bytes, reader: str
) -> None:
    """YAML that PyYAML cannot build, or read, is a ConfigError from every reader.

    Regression (fixed in d4b706d): config.load_yaml() turned only OSError and
    yaml.YAMLError into ConfigError, and PyYAML's safe loader also raises Python's
    own errors: a date-like scalar out of
    range (2001-13-45, 0000-00-00) ValueError ('month must be in 1..12'), an integer
    of more than 4,300 digits ValueError (the int/str conversion limit), a
    double-quoted "\\U01000000" ValueError from chr() and "\\U80000000"
    OverflowError; a file that is not UTF-8 raises UnicodeDecodeError and deep
    nesting RecursionError. load_config, BalanceConfig.from_yaml and
    Pricing.from_yaml let all of them out.
    """
    path = tmp_path / "librechat.yaml"
    path.write_bytes(content)
    read = {
        "load_config": lambda: load_config(path, env={}),
        "from_yaml": lambda: BalanceConfig.from_yaml(path),
        "Pricing.from_yaml": lambda: Pricing.from_yaml(path),
    }[reader]
    with contextlib.suppress(CreditMeterError):
        read()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_metadata_with_a_huge_int_is_refused(tmp_path: Path, kind: str) -> None:
    """A metadata int too large to store is InvalidInput, on every store.

    Regression (fixed in d4b706d): _validate.metadata() accepted an int of any
    size. SQLiteStore serializes entries to JSON and Python refuses to format an
    int of more than 4,300 digits: grant/charge with metadata={"n": 10**5000}
    raised a bare ValueError from serde.entry_to_json (outside commit()'s try) on
    SQLite, while MemoryStore stored it (and repr() of the entry then raised
    ValueError too). Nothing was written.
    """
    store: Any = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "credits.db")
    with store:
        manager = BalanceManager(store, BalanceConfig(enabled=True), clock=FakeClock(T0))
        manager.grant("alice", 1)
        before = snapshot(store)
        with pytest.raises(CreditMeterError):
            manager.grant("alice", 1, metadata={"n": 10**5000})
        assert snapshot(store) == before


@pytest.mark.parametrize("ttl", [timedelta(days=999_999_999), timedelta.max])
def test_hold_with_an_enormous_ttl_is_refused(ttl: timedelta) -> None:
    """A ttl that takes now + ttl past the year 9999 is InvalidInput.

    Regression (fixed in d4b706d): hold() checked that ttl is a positive timedelta,
    not that now + ttl is a datetime: hold(user, 1, ttl=timedelta(days=999_999_999))
    raised a bare OverflowError ("date value out of range") from rules.hold.
    """
    with MemoryStore() as store:
        manager = BalanceManager(store, BalanceConfig(enabled=True), clock=FakeClock(T0))
        manager.grant("alice", 1)
        before = snapshot(store)
        with pytest.raises(CreditMeterError):
            manager.hold("alice", 1, ttl=ttl)
        assert snapshot(store) == before


@pytest.mark.parametrize("name", ["timeout", "initial_backoff", "max_backoff"])
def test_retry_policy_with_an_enormous_int_is_a_config_error(name: str) -> None:
    """Seconds past the float range are a ConfigError.

    Regression (fixed in d4b706d): RetryPolicy checked its seconds with
    math.isfinite(), which raises OverflowError ("int too large to convert to
    float") for an int above the float range instead of returning False.
    """
    with pytest.raises(CreditMeterError):
        RetryPolicy(**{name: 10**400})


def _forged(user_id: Any) -> Hold:
    return Hold(
        id="forged", user_id=user_id, amount=Decimal(1), created_at=T0, expires_at=T0 + timedelta(1)
    )


@pytest.mark.parametrize(
    "user_id",
    [
        pytest.param("", id="empty"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("x" * 300, id="300-chars"),
        pytest.param(5, id="int"),
        pytest.param(["a"], id="list"),
    ],
)
@pytest.mark.parametrize("method", ["settle", "release"])
def test_settle_of_a_hold_with_an_invalid_user_id_is_invalid_input(
    method: str, user_id: Any
) -> None:
    """A Hold rebuilt with an invalid user id is InvalidInput and writes nothing.

    Regression (fixed in d4b706d): settle() and release() checked only
    isinstance(hold, Hold), then used hold.user_id. Hold is public (a gateway may
    rebuild one from a stored request). With user_id "", "a\\x00b" or 300
    characters they opened and charged an account under an id every other method
    refuses as InvalidInput; with user_id 5, MemoryStore stored it and users()
    then raised TypeError for every caller; an unhashable user_id raised TypeError.
    """
    with MemoryStore() as store:
        manager = BalanceManager(store, BalanceConfig(enabled=True), clock=FakeClock(T0))
        manager.grant("alice", 1)
        before = snapshot(store)
        resolve = manager.settle if method == "settle" else manager.release
        amount = (1,) if method == "settle" else ()
        try:
            with pytest.raises(CreditMeterError):
                resolve(_forged(user_id), *amount)
        finally:
            after = set(store._accounts)  # users() may be broken by now
        assert after == set(before[0])


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"id": None}, id="id-none"),
        pytest.param({"id": 5}, id="id-int"),
        pytest.param({"id": ""}, id="id-empty"),
        pytest.param({"expires_at": "tomorrow"}, id="expires-at-str"),
        pytest.param({"expires_at": datetime(2025, 1, 2)}, id="expires-at-naive"),  # noqa: DTZ001 - naive on purpose
        pytest.param({"expires_at": None}, id="expires-at-none"),
    ],
)
@pytest.mark.parametrize("method", ["settle", "release"])
def test_settle_of_a_hold_with_malformed_fields_is_invalid_input(
    method: str, fields: dict[str, Any]
) -> None:
    """A Hold rebuilt with fields of the wrong type is refused, while the user holds others.

    Regression: _hold() validated the id with optional_text, which lets None
    through ("hold:" + None raised TypeError), and did not check expires_at:
    take_hold() bisects the account's open holds by expiry, so a str, None or
    naive datetime raised TypeError as soon as the user had an open hold.
    Nothing is written in any case.
    """
    with MemoryStore() as store:
        manager = BalanceManager(store, BalanceConfig(enabled=True), clock=FakeClock(T0))
        manager.hold("alice", 1)  # an open hold: settling compares expiries with it
        before = snapshot(store)
        values = {
            "id": "forged",
            "user_id": "alice",
            "amount": Decimal(1),
            "created_at": T0,
            "expires_at": T0 + timedelta(1),
        }
        forged = Hold(**{**values, **fields})
        resolve = manager.settle if method == "settle" else manager.release
        amount = (1,) if method == "settle" else ()
        with pytest.raises(CreditMeterError):
            resolve(forged, *amount)
        assert snapshot(store) == before


@pytest.mark.parametrize(
    "open_it",
    [
        pytest.param(lambda d: SQLiteStore(d / "a\x00b.db"), id="path-with-nul"),
        pytest.param(lambda d: SQLiteStore(str(d) + "/\ud800.db"), id="path-with-surrogate"),
        pytest.param(lambda d: open_store(f"sqlite:///{d}/a%00b.db"), id="url-with-%00"),
        pytest.param(lambda d: open_store(f"sqlite:///{d}/\ud800.db"), id="url-with-surrogate"),
    ],
)
def test_store_paths_sqlite_cannot_open_are_store_errors(tmp_path: Path, open_it: Any) -> None:
    """An SQLite path or URL that cannot name a file is a CreditMeterError.

    Regression (fixed in d4b706d): SQLiteStore._create_file() turned only OSError
    into StoreError. A path with a NUL character raised a bare ValueError
    ("embedded null byte") and one with a lone surrogate a bare
    UnicodeEncodeError, from SQLiteStore(path) and from open_store("sqlite:///..."),
    whose URL (%00 decodes to NUL) may come from an environment variable.
    """
    with pytest.raises(CreditMeterError):
        open_it(tmp_path).close()
