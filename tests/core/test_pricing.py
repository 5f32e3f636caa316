"""Pricing as LibreChat does it: the worked examples of shared/pricing/README.md and the rules.

Inputs tried: the README's worked model names; names that need the longest-key
and later-key rules and the legacy fallbacks; vendor-prefixed ids; a ``'*'``
override; structured (cached) prompts; premium tiers at, just under and just
over their threshold; overrides with and without cache rates; incomplete
completions; no model; bad rate tables.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    ConfigError,
    InvalidInput,
    Pricing,
    Rates,
    TokenUsage,
)

RATES_JSON = Path(__file__).parents[2] / "src" / "creditmeter" / "data" / "librechat_rates.json"


@pytest.fixture(scope="module")
def pricing():
    return Pricing.librechat()


D = Decimal


@pytest.mark.parametrize(
    ("model", "key", "prompt", "completion", "write", "read"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini", "0.15", "0.6", "0.15", "0.075"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet", "3", "15", "3.75", "0.3"),
        ("gpt-4", "8k", "30", "60", "30", "30"),
        ("gpt-3.5-turbo", "4k", "1.5", "2", "1.5", "1.5"),
        ("chatgpt-4o-latest", "gpt-4o", "2.5", "10", None, None),
        ("claude-opus-4-6", "claude-opus-4-6", "5", "25", "6.25", "0.5"),
        ("gemini-3.1-pro-preview", "gemini-3.1", "2", "12", "2", "0.2"),
        ("some-unknown-model", None, "6", "6", "6", "6"),
    ],
)
def test_worked_examples(pricing, model, key, prompt, completion, write, read):
    assert pricing.key_for(model) == key
    assert pricing.rate(model, "prompt") == D(prompt)
    assert pricing.rate(model, "completion") == D(completion)
    if write is not None:
        assert pricing.rate(model, "cache_write") == D(write)
        assert pricing.rate(model, "cache_read") == D(read)


def test_gemini_premium_tier_strictly_above_threshold(pricing):
    model = "gemini-3.1-pro-preview"
    assert pricing.rate(model, "prompt", input_token_count=200_000) == 2
    assert pricing.rate(model, "prompt", input_token_count=200_001) == 4
    assert pricing.rate(model, "completion", input_token_count=200_001) == 18
    # Cache rates come from the cache table, premium or not.
    assert pricing.rate(model, "cache_read", input_token_count=200_001) == D("0.2")


def test_premium_counts_input_cache_write_and_cache_read(pricing):
    model = "gemini-3.1-pro-preview"
    under = TokenUsage(input=100_000, cache_write=50_000, cache_read=50_000, output=1000)
    over = TokenUsage(input=100_000, cache_write=50_000, cache_read=50_001, output=1000)
    cheap, dear = pricing.cost(model, under), pricing.cost(model, over)
    assert not cheap.premium
    assert dear.premium
    assert cheap.completion == 1000 * 12
    assert dear.completion == 1000 * 18  # the completion of that request at the premium rate
    assert dear.prompt == 100_000 * 4 + 50_000 * 2 + 50_001 * D("0.2")


def test_cache_rates_fall_back_to_the_premium_prompt_rate(pricing):
    # gpt-5.4 has a premium tier; does it have cache rates? Fall back only if it has none.
    model = "gpt-5.4"
    data = json.loads(RATES_JSON.read_text())
    usage = TokenUsage(input=272_001, cache_write=10, cache_read=10)
    cost = pricing.cost(model, usage)
    assert cost.premium
    cached = data["cache_token_values"].get("gpt-5.4")
    expected_write = D(str(cached["write"])) if cached and "write" in cached else D(5)
    expected_read = D(str(cached["read"])) if cached and "read" in cached else D(5)
    assert cost.rates.cache_write == expected_write
    assert cost.rates.cache_read == expected_read


def test_structured_prompt_prices_each_kind_at_its_rate(pricing):
    usage = TokenUsage(input=1000, cache_write=2000, cache_read=3000, output=400)
    cost = pricing.cost("claude-3-5-sonnet-20241022", usage)
    assert cost.prompt == 1000 * 3 + 2000 * D("3.75") + 3000 * D("0.3")
    assert cost.completion == 400 * 15
    assert cost.total == cost.prompt + cost.completion
    assert cost.key == "claude-3-5-sonnet"


def test_longest_key_wins_then_later_defined(pricing):
    assert pricing.key_for("gpt-4o-mini") == "gpt-4o-mini"  # not "gpt-4o"
    assert pricing.key_for("GPT-4O-MINI") == "gpt-4o-mini"  # lowercased
    assert pricing.key_for("o3-32k") == "32k"  # longest, not the later-defined "o3"
    # Equal length: the later-defined key wins; build a table to show it.
    table = Pricing(
        token_values={
            "abc": pricing.token_values["gpt-4o"],
            "xyz": pricing.token_values["gpt-4o-mini"],
        }
    )
    assert table.key_for("abc-xyz") == "xyz"
    assert table.key_for("xyz-abc") == "xyz"


def test_a_vendor_prefix_is_matched_after_the_last_slash(pricing):
    # shared/pricing/README.md: "moonshotai" contains "moonshot"; the id's last segment decides.
    # Before the fix: "moonshot" (2 / 5) for both moonshotai ids.
    assert pricing.key_for("moonshotai/kimi-k2") == "kimi-k2"
    assert pricing.rate("moonshotai/kimi-k2", "prompt") == D("0.6")
    assert pricing.rate("moonshotai/Kimi-K2-Instruct", "completion") == D("2.5")
    assert pricing.key_for("openai/gpt-4o") == "gpt-4o"
    # The last segment first even where the whole id holds a longer key; then the whole id.
    table = Pricing(
        token_values={
            "vendorwide": pricing.token_values["gpt-4o"],
            "m1": pricing.token_values["gpt-4o-mini"],
        },
        legacy=(("old", "m1"),),
    )
    assert table.key_for("vendorwide/m1-chat") == "m1"  # before: "vendorwide", the longer key
    assert table.key_for("vendorwide/other") == "vendorwide"
    assert table.key_for("acme/old-model") == "m1"  # legacy rules see the prefixed id too
    assert table.key_for("acme/") is None


def test_legacy_fallbacks_in_order(pricing):
    assert pricing.key_for("gpt-3.5-turbo-16k-0613") == "16k"
    assert pricing.key_for("gpt-4-32k-0314") == "32k"
    assert pricing.key_for("gpt-4-turbo-preview") == "gpt-4-1106"


def test_no_model_prices_at_one(pricing):
    assert pricing.rate(None, "prompt") == 1
    assert pricing.rate(None, "cache_read") == 1
    assert pricing.cost(None, TokenUsage(input=10, output=5)).total == 15


def test_incomplete_completion_rounds_toward_zero(pricing):
    # 75 tokens x 10 = 750 credits; x 1.15 = 862.5 -> 862 (LibreChat: ceil of -862.5).
    cost = pricing.cost("gpt-4o", TokenUsage(output=75), incomplete=True)
    assert cost.completion == 862
    assert cost.rates.completion == D("11.5")
    full = pricing.cost("gpt-4o", TokenUsage(input=100, output=75), incomplete=True)
    assert full.prompt == 250  # the prompt part is unaffected
    assert full.total == 250 + 862


def test_overrides_are_exact_and_skip_premium(pricing):
    custom = pricing.with_rates(
        {
            "gemini-3.1-pro-preview": {"prompt": 1, "completion": 2},
            "house-model": {"prompt": D("0.5"), "write": 0, "read": 0.25},
        }
    )
    assert custom.rate("gemini-3.1-pro-preview", "prompt", input_token_count=10**6) == 1
    assert custom.rate("gemini-3.1-pro-preview", "cache_read") == D("0.2")  # table cache rate
    assert custom.rate("gemini-3.1-pro-preview-2", "prompt") == 2  # not exact: the table
    assert custom.rate("house-model", "prompt") == D("0.5")
    assert custom.rate("house-model", "completion") == 6  # missing -> 6
    assert custom.rate("house-model", "cache_write") == 0  # zero is a rate, not "missing"
    assert custom.rate("house-model", "cache_read") == D("0.25")
    assert pricing.rate("gemini-3.1-pro-preview", "prompt") == 2  # the original is unchanged


def test_from_mapping_without_fallback_prices_unknown_at_default():
    own = Pricing.from_mapping({"mine": {"prompt": 1, "completion": 1}}, fallback=False)
    assert own.rate("mine", "prompt") == 1
    assert own.rate("gpt-4o", "prompt") == 6


def test_from_yaml(tmp_path):
    path = tmp_path / "rates.yaml"
    path.write_text("tokenConfig:\n  my-model:\n    prompt: 0.2\n    completion: 0.8\n")
    assert Pricing.from_yaml(path).rate("my-model", "completion") == D("0.8")


def test_a_star_override_prices_the_models_not_listed(pricing):
    # Before the fix '*' was only a model named "*": gpt-4o kept the table's 2.5 / 10.
    custom = pricing.with_rates({"*": {"prompt": 1, "completion": 3, "read": D("0.1")}})
    cost = custom.cost("gpt-4o", TokenUsage(input=100, cache_write=10, cache_read=1000, output=10))
    assert cost.rates == Rates(prompt=1, completion=3, cache_write=1, cache_read=D("0.1"))
    assert cost.total == 100 + 10 + 100 + 30
    assert cost.key is None


@pytest.mark.parametrize(
    "rates",
    [
        {"m": {"prompt": -1}},
        {"m": {"prompt": "abc"}},
        {"m": {"prompt": float("nan")}},
        {"m": {"prompt": True}},
        {"m": {"input": 1}},
        {"m": 5},
        {"": {"prompt": 1}},
        ["m"],
    ],
    ids=["negative", "text", "nan", "bool", "unknown-kind", "not-a-mapping", "empty-name", "list"],
)
def test_bad_rates_are_config_errors(pricing, rates):
    with pytest.raises(ConfigError):
        pricing.with_rates(rates)


def test_the_table_keeps_its_source(pricing):
    assert pricing.source["repo"] == "danny-avila/LibreChat"
    assert len(pricing.source["commit"]) == 40


COUNTS = st.integers(min_value=0, max_value=10**9)
MODELS = st.sampled_from(
    [None, "gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "gemini-3.1-pro", "gpt-5.4", "unknown"]
)


@given(model=MODELS, a=COUNTS, b=COUNTS, c=COUNTS, d=COUNTS, incomplete=st.booleans())
def test_cost_is_exact_non_negative_and_additive(pricing, model, a, b, c, d, incomplete):
    usage = TokenUsage(input=a, output=b, cache_write=c, cache_read=d)
    cost = pricing.cost(model, usage, incomplete=incomplete)
    assert cost.total >= 0
    assert cost.total == cost.prompt + cost.completion
    r = cost.rates
    assert cost.prompt == a * r.prompt + c * r.cache_write + d * r.cache_read
    if not incomplete:
        assert cost.completion == b * r.completion
    for value in (cost.prompt, cost.completion, cost.total):
        assert isinstance(value, Decimal)
        assert value == Decimal(str(value))  # exact: no float ever touched it


def test_charge_with_usage_moves_the_balance_by_the_cost(store, clock):
    manager = BalanceManager(store, BalanceConfig(enabled=True, start_balance=10**9), clock=clock)
    usage = TokenUsage(input=1200, output=300, cache_read=5000)
    expected = Pricing.librechat().cost("gpt-4o-mini", usage)
    entry = manager.charge("u", model="gpt-4o-mini", usage=usage, request_id="r1")
    assert entry.amount == -expected.total
    assert entry.cost == expected.total
    assert entry.rates == expected.rates
    assert entry.model == "gpt-4o-mini"
    assert entry.usage == usage
    assert manager.balance("u") == 10**9 - expected.total
    stored = manager.ledger("u")[-1]
    assert stored == entry  # model, usage and rates survive the store
    assert manager.charge("u", model="gpt-4o-mini", usage=usage, request_id="r1") == entry


def test_check_prices_the_prompt_like_librechat(store, clock):
    manager = BalanceManager(store, BalanceConfig(enabled=True, start_balance=1000), clock=clock)
    assert manager.check("u", model="gpt-4o", input_tokens=400).allowed  # 400 x 2.5 = 1000
    result = manager.check("u", model="gpt-4o", input_tokens=401)
    assert not result.allowed
    assert result.cost == D("1002.5")
    with pytest.raises(Exception) as caught:
        manager.require("u", model="gpt-4o", input_tokens=401)
    assert caught.value.to_dict()["promptTokens"] == 401


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": "gpt-4o"},
        {"input_tokens": -1},
        {"input_tokens": 1.5},
        {"input_tokens": True},
        {"cost": 5, "input_tokens": 5},
    ],
    ids=["model-without-tokens", "negative-tokens", "fractional-tokens", "bool-tokens", "both"],
)
def test_check_rejects_bad_pricing_input(manager, kwargs):
    with pytest.raises(InvalidInput):
        manager.check("u", **kwargs)


def test_charge_with_custom_pricing(store, clock):
    pricing = Pricing.librechat().with_rates({"house": {"prompt": 2, "completion": 4}})
    manager = BalanceManager(store, BalanceConfig(enabled=True), pricing=pricing, clock=clock)
    entry = manager.charge("u", model="house", usage=TokenUsage(input=10, output=10))
    assert entry.cost == 60


class CountedUsage(TokenUsage):
    """A TokenUsage subclass: priced through the general path, not the exact-type one."""


def test_a_priced_cost_above_the_limit_is_refused_and_writes_nothing(store, clock):
    """Tried: 10**10 prompt tokens at 10**6 credits a token (10**16 credits) as a charge
    of a TokenUsage (the fast path), of a subclass of it, as a strict and an idempotent
    charge, and as a settle; and a cost of exactly 10**15, which is accepted."""
    pricing = Pricing.librechat().with_rates({"dear": {"prompt": 10**6, "completion": 1}})
    manager = BalanceManager(store, BalanceConfig(enabled=True), pricing=pricing, clock=clock)
    manager.grant("u", 100)
    hold = manager.hold("u", 1)
    before = (store.load("u"), manager.ledger("u"))
    too_much = TokenUsage(input=10**10)
    attempts = [
        lambda: manager.charge("u", model="dear", usage=too_much),
        lambda: manager.charge("u", model="dear", usage=CountedUsage(input=10**10)),
        lambda: manager.charge("u", model="dear", usage=too_much, strict=True, request_id="r"),
        lambda: manager.settle(hold, model="dear", usage=too_much),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidInput, match=r"above 10\*\*15 credits"):
            attempt()
        assert (store.load("u"), manager.ledger("u")) == before
    entry = manager.charge("u", model="dear", usage=TokenUsage(input=10**9))
    assert entry.cost == 10**15
