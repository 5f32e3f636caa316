"""``price()`` sums in whole numbers: the same Decimal, digit for digit, as the products do.

Tried: every count 0 or up to 10**10 (zero counts leave their term out),
rates with 0-6 places, whole rates, zero rates, rates with a positive exponent
(``1E+1``) and trailing zeros (``3.000``); and the shipped table's models.
"""

from __future__ import annotations

from decimal import Decimal

from hypothesis import example, given, settings
from hypothesis import strategies as st

from creditmeter import Pricing, TokenUsage
from creditmeter._exact import EXACT
from creditmeter.pricing import Rates, _priced, _Resolved

counts = st.one_of(st.just(0), st.integers(0, 10**10))
rates_ = st.one_of(
    st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False),
    st.sampled_from([Decimal(0), Decimal("1E+1"), Decimal("3.000"), Decimal("0.15"), Decimal(75)]),
)


@settings(max_examples=500, deadline=None)
@given(counts, counts, counts, counts, rates_, rates_, rates_, rates_)
@example(1, 1, 0, 0, Decimal("1E+1"), Decimal("1E+1"), Decimal(0), Decimal(0))  # 2E+1, not 20
@example(0, 1, 0, 5, Decimal("1E+1"), Decimal("1E+2"), Decimal(0), Decimal("1E+1"))
@example(0, 0, 0, 0, Decimal("0.15"), Decimal("0.6"), Decimal("0.3"), Decimal("0.075"))
def test_total_equals_the_sum_of_the_products(i, o, w, r, p, c, cw, cr) -> None:  # type: ignore[no-untyped-def]
    usage = TokenUsage(input=i, output=o, cache_write=w, cache_read=r)
    rates = Rates(prompt=p, completion=c, cache_write=cw, cache_read=cr)
    prompt_cost, completion_cost, _ = _priced(usage, rates, incomplete=False)
    expected = EXACT.add(prompt_cost, completion_cost)
    summer = _Resolved(standard=rates, key=None).summer
    for got in (summer.total(usage), summer.total(usage)):  # terms worked out, then reused
        assert got == expected
        assert str(got) == str(expected)
        assert got.as_tuple() == expected.as_tuple()


def test_a_summer_keeps_one_set_of_terms_per_combination_of_counts() -> None:
    """Each of the 16 combinations of counts above zero is worked out once and reused."""
    rates = Rates(
        prompt=Decimal("2.5"),
        completion=Decimal(10),
        cache_write=Decimal("3.125"),
        cache_read=Decimal("1.25"),
    )
    summer = _Resolved(standard=rates, key=None).summer
    for mask in range(16):
        counts = [(mask >> bit & 1) * (bit + 1) * 100 for bit in range(4)]
        usage = TokenUsage(
            input=counts[0], output=counts[1], cache_write=counts[2], cache_read=counts[3]
        )
        first, again = summer.total(usage), summer.total(usage)
        prompt, completion, _ = _priced(usage, rates, incomplete=False)
        assert str(first) == str(again) == str(EXACT.add(prompt, completion))
    assert len(summer.known) == 16


def test_every_shipped_model_prices_as_cost_does() -> None:
    pricing = Pricing.librechat()
    usage = TokenUsage(input=1234, output=567, cache_write=89, cache_read=1011)
    big = TokenUsage(input=300_000, output=10)  # past any premium threshold
    for key in pricing.token_values:
        for used in (usage, big):
            total, rates = pricing.price(key, used)
            cost = pricing.cost(key, used)
            assert (str(total), rates) == (str(cost.total), cost.rates)
