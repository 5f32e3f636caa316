"""Matching model names as LibreChat does: vendor-prefixed ids, case, and ``'*'`` in a tokenConfig.

Issue 12, parts 18 and 19.

Part 18. Hosts such as OpenRouter, NVIDIA NIM and Together name models with a
vendor prefix (``moonshotai/kimi-k2``, ``moonshotai/Kimi-K2-Instruct``). Matching
the longest table key anywhere in the id let the vendor decide: ``moonshotai``
contains ``moonshot`` (2.0 / 5.0), longer than ``kimi-k2`` (0.6 / 2.5), so those
calls cost 3.3x too much on input. LibreChat's matcher tries the segment after
the last ``/`` first, then the whole id. Inputs tried: for every key of the
table, ``<vendor>/<key>`` with the vendor of its family, and the same id in
other letter case; real ids from OpenRouter, Together and NIM (mixed case,
``-Instruct`` suffixes, a double ``openrouter/<vendor>/`` prefix); ids whose
part after the last ``/`` is empty or names no model (LibreChat's own cases);
a vendor prefix with an unknown model.
Before the fix 4 of the 741 generated ids priced at ``moonshot`` (``kimi`` and
``kimi-k2`` behind ``moonshotai/``, each in two cases), and so did the
hand-picked moonshotai ids below: 18 tests of this file failed, 265 passed.

Part 19. In a gateway's tokenConfig a ``'*'`` entry prices every model the
config does not list, cache writes and reads included. Inputs tried: ``'*'``
with and without cache rates, with no prompt rate, beside exact entries (which
keep their own rates), with the table's premium models, from YAML, built with
``from_mapping`` and ``with_rates``; a bad ``'*'`` entry. Before the fix ``'*'``
was a model named ``*`` and every other model kept the table's rates.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    ConfigError,
    MemoryStore,
    Pricing,
    TokenUsage,
)

D = Decimal
TABLE = Pricing.librechat()

# Every key of the table belongs to one family, named by the vendor prefix the
# hosts use for it. A key no family claims fails test_every_key_has_a_family.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("anthropic", ("claude",)),
    ("openai", ("gpt-", "chat-latest", "o1", "o3", "o4", "4k", "8k", "16k", "32k")),
    ("google", ("gemini", "gemma")),
    ("meta-llama", ("llama",)),
    (
        "mistralai",
        ("mistral", "mixtral", "codestral", "devstral", "voxtral", "ministral", "pixtral"),
    ),
    ("deepseek", ("deepseek",)),
    ("qwen", ("qwen", "qwq")),
    ("x-ai", ("grok",)),
    ("moonshotai", ("kimi", "moonshot")),
    ("cohere", ("command",)),
    ("z-ai", ("glm",)),
    ("amazon", ("nova-", "titan-")),
    ("ai21", ("j2-", "jamba")),
    ("hcompany", ("holo",)),
)


def vendor_of(key: str) -> str | None:
    return next((vendor for vendor, starts in FAMILIES if key.startswith(starts)), None)


# Small and long-context usage: the second crosses every premium threshold.
USAGES = (
    TokenUsage(input=1000, output=500, cache_write=200, cache_read=300),
    TokenUsage(input=1_000_000, output=500, cache_write=200, cache_read=300),
)


def assert_prices_alike(pricing: Pricing, model: str, bare: str) -> None:
    """``model`` gets the key, rates, tier and totals of ``bare``, for small and long input."""
    assert pricing.key_for(model) == pricing.key_for(bare), model
    for usage in USAGES:
        assert pricing.cost(model, usage) == pricing.cost(bare, usage), (model, usage)


def test_every_key_has_a_family():
    assert [key for key in TABLE.token_values if vendor_of(key) is None] == []
    assert {vendor_of(key) for key in TABLE.token_values} == {vendor for vendor, _ in FAMILIES}


@pytest.mark.parametrize("key", list(TABLE.token_values))
def test_vendor_prefixed_key_prices_like_the_bare_key(key):
    vendor = vendor_of(key)
    assert vendor is not None
    assert TABLE.key_for(key) == key
    for model in (f"{vendor}/{key}", f"{vendor.title()}/{key.upper()}", key.upper()):
        assert_prices_alike(TABLE, model, key)


@pytest.mark.parametrize(
    ("model", "key", "prompt", "completion"),
    [
        # The ids: OpenRouter / NIM, then Together.
        ("moonshotai/kimi-k2", "kimi-k2", "0.6", "2.5"),
        ("moonshotai/Kimi-K2-Instruct", "kimi-k2", "0.6", "2.5"),
        ("moonshotai/kimi-k2-instruct", "kimi-k2", "0.6", "2.5"),
        ("moonshotai/Kimi-K2-Instruct-0905", "kimi-k2", "0.6", "2.5"),  # not kimi-k2-0905
        ("moonshotai/kimi-k2-thinking", "kimi-k2-thinking", "0.6", "2.5"),
        ("moonshotai/kimi-k2.5", "kimi-k2.5", "0.6", "3"),
        ("openrouter/moonshotai/kimi-k2", "kimi-k2", "0.6", "2.5"),
        ("MOONSHOTAI/KIMI-K2", "kimi-k2", "0.6", "2.5"),
        # The part after the last "/" names no key: the whole id decides.
        ("moonshotai/some-new-model", "moonshot", "2", "5"),
        ("gpt-3.5-turbo-1106/openai", "gpt-3.5-turbo-1106", "1", "2"),
        ("gpt-4-1106/openai/", "gpt-4-1106", "10", "30"),
        # Other hosts' spellings.
        ("meta-llama/Llama-3.3-70B-Instruct-Turbo", "llama-3.3-70b", "2.65", "3.5"),
        ("deepseek-ai/DeepSeek-R1", "deepseek-r1", "0.4", "2"),
        ("Qwen/Qwen3-235B-A22B", "qwen3-235b-a22b", "0.08", "0.55"),
        ("x-ai/grok-4-fast", "grok-4-fast", "0.2", "0.5"),
        ("anthropic/claude-3.5-sonnet", "claude-3.5-sonnet", "3", "15"),
        ("google/gemini-2.5-flash-lite", "gemini-2.5-flash-lite", "0.1", "0.4"),
        # Legacy rules still apply to a prefixed id.
        ("openai/gpt-4", "8k", "30", "60"),
        ("openai/gpt-4-turbo-preview", "gpt-4-1106", "10", "30"),
        ("openai/gpt-3.5-turbo", "4k", "1.5", "2"),
    ],
)
def test_prefixed_ids_from_hosts(model, key, prompt, completion):
    assert TABLE.key_for(model) == key
    assert TABLE.rate(model, "prompt") == D(prompt)
    assert TABLE.rate(model, "completion") == D(completion)


def test_kimi_k2_through_a_host_costs_what_kimi_k2_costs():
    usage = TokenUsage(input=1_000_000, output=100_000, cache_read=500_000)
    cost = TABLE.cost("moonshotai/Kimi-K2-Instruct", usage)
    assert cost.key == "kimi-k2"
    assert cost.total == 1_000_000 * D("0.6") + 500_000 * D("0.15") + 100_000 * D("2.5")


def test_a_charge_through_the_manager_uses_the_prefixed_match():
    with MemoryStore() as store:
        meter = BalanceManager(store, BalanceConfig(enabled=True, start_balance=10**9))
        entry = meter.charge("u", model="moonshotai/kimi-k2", usage=TokenUsage(input=1000))
        assert entry.cost == 600
        assert entry.rates is not None
        assert entry.rates.prompt == D("0.6")


# --- part 19: '*' in a tokenConfig ------------------------------------------------------------

FLAT = {"*": {"prompt": 1, "completion": 2}}


def test_star_prices_every_model_the_config_does_not_list():
    pricing = Pricing.from_mapping({**FLAT, "house": {"prompt": 5, "completion": 7}})
    for model in ("gpt-4o", "claude-3-5-sonnet-20241022", "moonshotai/kimi-k2", "unknown-x"):
        assert pricing.rate(model, "prompt") == 1, model
        assert pricing.rate(model, "completion") == 2, model
        assert pricing.cost(model, TokenUsage(input=10, output=10)).key is None
    assert pricing.rate("house", "prompt") == 5  # an exact entry keeps its own rates
    assert pricing.rate("house", "completion") == 7
    assert pricing.rate(None, "prompt") == 1  # no model at all is still 1 (LibreChat)


def test_star_cache_rates_come_from_the_star_entry():
    pricing = Pricing.from_mapping({"*": {"prompt": 1, "completion": 2, "write": 3, "read": 0.25}})
    usage = TokenUsage(input=100, cache_write=10, cache_read=1000, output=5)
    cost = pricing.cost("claude-3-5-sonnet-20241022", usage)  # table cache 3.75 / 0.3: not used
    assert (cost.rates.cache_write, cost.rates.cache_read) == (3, D("0.25"))
    assert cost.total == 100 * 1 + 10 * 3 + 1000 * D("0.25") + 5 * 2


def test_star_without_cache_rates_charges_cache_tokens_at_its_prompt_rate():
    pricing = Pricing.from_mapping(FLAT)
    for model in ("claude-3-5-sonnet-20241022", "gpt-4o-mini", "unknown-x"):
        assert pricing.rate(model, "cache_write") == 1, model
        assert pricing.rate(model, "cache_read") == 1, model


def test_star_missing_a_rate_gives_the_default_rate():
    pricing = Pricing.from_mapping({"*": {"completion": 2}})
    assert pricing.rate("gpt-4o", "prompt") == 6
    assert pricing.rate("gpt-4o", "cache_read") == 6  # the (default) prompt rate
    assert pricing.rate("gpt-4o", "completion") == 2


def test_star_has_no_premium_tier():
    pricing = Pricing.from_mapping(FLAT)
    for model in ("gemini-3.1-pro-preview", "gpt-5.4"):
        cost = pricing.cost(model, TokenUsage(input=10**6, output=10))
        assert not cost.premium
        assert cost.total == 10**6 * 1 + 10 * 2


def test_an_exact_entry_is_not_filled_in_from_star():
    # LibreChat picks one entry per model: the exact one, else '*'.
    pricing = Pricing.from_mapping(
        {"*": {"prompt": 1, "completion": 2, "write": 3, "read": 4}, "house": {"prompt": 5}}
    )
    assert pricing.rate("house", "completion") == 6
    assert pricing.rate("house", "cache_write") == 5
    assert pricing.rate("house", "cache_read") == 5


def test_star_from_yaml_and_with_rates(tmp_path):
    path = tmp_path / "librechat.yaml"
    path.write_text(
        "tokenConfig:\n"
        "  '*':\n    prompt: 0.5\n    completion: 1.5\n"
        "  my-model:\n    prompt: 2\n    completion: 3\n"
    )
    pricing = Pricing.from_yaml(path)
    assert pricing.rate("gpt-4o", "prompt") == D("0.5")
    assert pricing.rate("my-model", "prompt") == 2
    later = Pricing.librechat().with_rates({"*": {"prompt": 9, "completion": 9}})
    assert later.rate("gpt-4o", "completion") == 9
    assert Pricing.librechat().rate("gpt-4o", "completion") == 10  # the shared table is unchanged


def test_without_star_unlisted_models_still_use_the_table():
    pricing = Pricing.from_mapping({"house": {"prompt": 5, "completion": 7}})
    assert pricing.rate("gpt-4o", "prompt") == D("2.5")
    assert pricing.rate("moonshotai/kimi-k2", "prompt") == D("0.6")


@pytest.mark.parametrize(
    "entry", [{"prompt": -1}, {"prompt": "1"}, {"input": 1}, 5], ids=["neg", "text", "kind", "num"]
)
def test_a_bad_star_entry_is_a_config_error(entry):
    with pytest.raises(ConfigError, match=r"\*"):
        Pricing.from_mapping({"*": entry})


# --- speed --------------------------------------------------------------------------------------


def test_matching_is_cached_and_the_cache_is_bounded():
    pricing = Pricing.from_mapping({"house": {"prompt": 1}})
    names = [f"moonshotai/kimi-k2-variant-{n}" for n in range(10_000)]
    for name in names:
        assert pricing.key_for(name) == "kimi-k2"
        pricing.cost(name, TokenUsage(input=1))
    assert len(pricing._keys) <= 4096
    assert len(pricing._resolved) <= 4096
