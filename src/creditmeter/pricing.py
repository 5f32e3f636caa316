"""Pricing tokens as LibreChat does: its rate table, its key matching, its tiers.

A rate ("multiplier") is USD per million tokens, so with 1,000,000 credits to
the dollar the cost of ``n`` tokens is ``n * rate`` credits. ``Pricing``
answers which rate applies to a model and token kind, and what a call's
``TokenUsage`` costs, in exact ``Decimal`` credits.

The table ships as data (``data/librechat_rates.json``, transcribed from
LibreChat with its source recorded in ``Pricing.source``); a gateway's own
prices are given in the shape of a LibreChat ``tokenConfig``: model name →
``prompt`` / ``completion`` / ``write`` / ``read``, where the name ``'*'``
prices every model the config does not list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from decimal import ROUND_DOWN, Decimal
from importlib import resources
from typing import Any, Literal

import attrs

from creditmeter import _validate
from creditmeter._exact import EXACT
from creditmeter.config import load_yaml
from creditmeter.exceptions import ConfigError, InvalidInput
from creditmeter.usage import TokenUsage

__all__ = ["Cost", "ModelRate", "Pricing", "RateKind", "Rates"]

RateKind = Literal["prompt", "completion", "cache_write", "cache_read"]
RATE_KINDS: tuple[RateKind, ...] = ("prompt", "completion", "cache_write", "cache_read")

_ONE = Decimal(1)
_ZERO = Decimal(0)
_CANCEL_RATE = Decimal("1.15")  # LibreChat's multiplier for an incomplete (cancelled) completion
_KEY_CACHE_LIMIT = 4096
_WILDCARD = "*"  # the tokenConfig entry for every model the config does not list


@attrs.frozen(kw_only=True)
class ModelRate:
    """Rates for one model or table key; a missing rate falls back as LibreChat's does."""

    prompt: Decimal | None = None
    completion: Decimal | None = None
    cache_write: Decimal | None = None
    cache_read: Decimal | None = None


@attrs.frozen(kw_only=True)
class PremiumRate:
    """A long-context tier: these rates apply when the input count is above ``threshold``."""

    threshold: int
    prompt: Decimal
    completion: Decimal


@attrs.frozen(kw_only=True)
class Rates:
    """The four rates one call was priced with (USD per million tokens)."""

    prompt: Decimal
    completion: Decimal
    cache_write: Decimal
    cache_read: Decimal


@attrs.frozen(kw_only=True)
class Cost:
    """What one call costs, in credits: prompt side, completion side and total.

    ``prompt`` covers uncached input, cache writes and cache reads. ``key`` is
    the rate-table key the model matched (``None``: an override, or no match).
    """

    prompt: Decimal
    completion: Decimal
    total: Decimal
    rates: Rates
    key: str | None
    premium: bool = False


def _rate_value(value: object, *, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    try:
        return _validate.amount(value, name=where)
    except InvalidInput as exc:
        raise ConfigError(str(exc)) from None


_RATE_KEYS = {
    "prompt": "prompt",
    "completion": "completion",
    "write": "cache_write",
    "read": "cache_read",
    "cache_write": "cache_write",
    "cache_read": "cache_read",
}


def _model_rate(model: str, value: object) -> ModelRate:
    if not isinstance(value, Mapping):
        raise ConfigError(f"rates of model {model!r} must be a mapping, got {value!r}")
    fields: dict[str, Decimal] = {}
    for key, number in value.items():
        name = _RATE_KEYS.get(key) if isinstance(key, str) else None
        if name is None:
            raise ConfigError(
                f"unknown rate {key!r} for model {model!r}; known: prompt, completion, write, read"
            )
        fields[name] = _rate_value(number, where=f"{model}.{key}")
    return ModelRate(**fields)


def _overrides(mapping: object) -> dict[str, ModelRate]:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"rates must map model names to rates, got {type(mapping).__name__}")
    result: dict[str, ModelRate] = {}
    for model, value in mapping.items():
        if not isinstance(model, str) or not model:
            raise ConfigError(f"a model name must be a non-empty str, got {model!r}")
        result[model] = _model_rate(model, value)
    return result


@attrs.frozen(kw_only=True)
class Pricing:
    """A rate table plus exact per-model overrides; prices ``TokenUsage`` in credits.

    Build one with ``Pricing.librechat()`` (the table LibreChat ships; the
    managers' default), ``Pricing.from_mapping(...)`` or
    ``Pricing.from_yaml(...)``, and add overrides with ``with_rates(...)``.
    """

    token_values: Mapping[str, ModelRate]
    cache_values: Mapping[str, ModelRate] = attrs.field(factory=dict)
    premium_values: Mapping[str, PremiumRate] = attrs.field(factory=dict)
    legacy: tuple[tuple[str, str], ...] = ()
    overrides: Mapping[str, ModelRate] = attrs.field(factory=dict)
    default_rate: Decimal = Decimal(6)
    source: Mapping[str, str] = attrs.field(factory=dict)
    # Table keys in the order a match is tried: longest first, later-defined first.
    _search: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)
    _keys: dict[str, str | None] = attrs.field(init=False, eq=False, repr=False, factory=dict)
    _resolved: dict[str, _Resolved] = attrs.field(init=False, eq=False, repr=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        order = list(self.token_values)
        ranked = sorted(range(len(order)), key=lambda i: (-len(order[i]), -i))
        object.__setattr__(self, "_search", tuple(order[i] for i in ranked))

    # --- construction ---------------------------------------------------------

    @classmethod
    def librechat(cls) -> Pricing:
        """LibreChat's published rate table (see ``source`` for the exact upstream version)."""
        return _librechat()

    @classmethod
    def from_mapping(cls, rates: Mapping[str, Any], *, fallback: bool = True) -> Pricing:
        """Prices from a LibreChat ``tokenConfig``: model → prompt / completion / write / read.

        A ``'*'`` entry prices every model not listed. Without one, with
        ``fallback=True`` (the default) models not listed are priced by
        LibreChat's table; with ``False`` they get the default rate (6).
        """
        base = _librechat() if fallback else cls(token_values={})
        return base.with_rates(rates)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, fallback: bool = True) -> Pricing:
        """Read model rates from YAML: the mapping itself, or under a ``tokenConfig`` key."""
        document = load_yaml(path)
        if isinstance(document, Mapping) and "tokenConfig" in document:
            document = document["tokenConfig"]
        return cls.from_mapping(document, fallback=fallback)

    def with_rates(self, rates: Mapping[str, Any]) -> Pricing:
        """A copy with exact per-model overrides added (same shape as ``from_mapping``)."""
        return attrs.evolve(self, overrides={**self.overrides, **_overrides(rates)})

    # --- lookups --------------------------------------------------------------

    def key_for(self, model: str) -> str | None:
        """The table key a model name matches, or ``None``.

        The name is lowercased. A vendor-prefixed id (``moonshotai/kimi-k2``)
        is matched by its part after the last ``/`` first, then as a whole, so
        the vendor's name cannot decide the price. The longest table key
        contained wins (on equal length, the later-defined key); failing that,
        the first legacy rule whose text is contained, in the same order.
        Results are cached per name.
        """
        keys = self._keys
        try:
            return keys[model]
        except KeyError:
            pass
        found = self._match(model.lower())
        if len(keys) >= _KEY_CACHE_LIMIT:
            keys.clear()
        keys[model] = found
        return found

    def _match(self, name: str) -> str | None:
        """The key for a lowercased name: its last ``/`` segment first, then all of it."""
        tail = name[name.rfind("/") + 1 :]
        names = (tail, name) if tail and tail != name else (name,)
        for part in names:
            for key in self._search:
                if key in part:
                    return key
        for part in names:
            for text, key in self.legacy:
                if text in part:
                    return key
        return None

    def rate(
        self, model: str | None, kind: RateKind, *, input_token_count: int | None = None
    ) -> Decimal:
        """The rate for one kind of token of ``model``, as LibreChat chooses it.

        An exact per-model override first, else a ``'*'`` override; then the
        premium tier when ``input_token_count`` is strictly above its
        threshold; then the table; an unknown model gets the default rate (6)
        and no model at all gets 1. Cache rates fall back to the (possibly
        premium) prompt rate.
        """
        rates = self._pick(model, input_token_count)[0]
        return getattr(rates, kind)  # type: ignore[no-any-return]

    def _pick(self, model: str | None, input_token_count: int | None) -> tuple[Rates, _Resolved]:
        """The rates for a model at an input size: resolved once per model name, then cached."""
        if model is None:
            return _UNIT_RATES, _NO_MODEL
        resolved = self._resolved.get(model)
        if resolved is None:
            resolved = self._resolve(model)
            if len(self._resolved) >= _KEY_CACHE_LIMIT:
                self._resolved.clear()
            self._resolved[model] = resolved
        premium = resolved.premium
        if (
            premium is not None
            and input_token_count is not None
            and input_token_count > resolved.threshold
        ):
            return premium, resolved
        return resolved.standard, resolved

    def _resolve(self, model: str) -> _Resolved:
        default = self.default_rate
        override = self.overrides.get(model)
        if override is None:
            wildcard = self.overrides.get(_WILDCARD)
            if wildcard is not None:
                # As LibreChat reads '*' for a model its config does not list: every
                # rate from that entry, never the table or a premium tier; cache tokens
                # without a rate of their own are charged at the entry's prompt rate.
                prompt = _first(wildcard.prompt, default)
                standard = Rates(
                    prompt=prompt,
                    completion=_first(wildcard.completion, default),
                    cache_write=_first(wildcard.cache_write, prompt),
                    cache_read=_first(wildcard.cache_read, prompt),
                )
                return _Resolved(standard=standard, key=None)
        key = self.key_for(model)
        if override is not None:
            # An exact override: its own rates, no premium tier; cache rates from it,
            # else from the table's cache entry for the key, else the prompt rate.
            prompt = _first(override.prompt, default)
            table_cache = self.cache_values.get(key) if key is not None else None
            standard = Rates(
                prompt=prompt,
                completion=_first(override.completion, default),
                cache_write=_first(
                    override.cache_write, table_cache.cache_write if table_cache else None, prompt
                ),
                cache_read=_first(
                    override.cache_read, table_cache.cache_read if table_cache else None, prompt
                ),
            )
            return _Resolved(standard=standard, key=None)
        if key is None:
            return _Resolved(
                standard=Rates(
                    prompt=default, completion=default, cache_write=default, cache_read=default
                ),
                key=None,
            )
        entry = self.token_values.get(key)
        cache = self.cache_values.get(key)

        def rates(prompt: Decimal, completion: Decimal) -> Rates:
            return Rates(
                prompt=prompt,
                completion=completion,
                cache_write=_first(cache.cache_write if cache else None, prompt),
                cache_read=_first(cache.cache_read if cache else None, prompt),
            )

        standard = rates(
            _first(entry.prompt if entry else None, default),
            _first(entry.completion if entry else None, default),
        )
        tier = self.premium_values.get(key)
        if tier is None:
            return _Resolved(standard=standard, key=key)
        return _Resolved(
            standard=standard,
            key=key,
            premium=rates(tier.prompt, tier.completion),
            threshold=tier.threshold,
        )

    def cost(self, model: str | None, usage: TokenUsage, *, incomplete: bool = False) -> Cost:
        """Price one call's usage in credits, exactly.

        ``incomplete=True`` is LibreChat's cancel rate for a stream cut short:
        the completion part is multiplied by 1.15 and rounded toward zero to
        a whole credit (its recorded rate is multiplied by 1.15 too).
        """
        if not isinstance(usage, TokenUsage):
            raise InvalidInput(f"usage must be a TokenUsage, got {type(usage).__name__}")
        rates, resolved = self._pick(model, usage.prompt_total)
        prompt_cost, completion_cost, rates = _priced(usage, rates, incomplete=incomplete)
        return Cost(
            prompt=prompt_cost,
            completion=completion_cost,
            total=EXACT.add(prompt_cost, completion_cost),
            rates=rates,
            key=resolved.key,
            premium=resolved.premium is not None and usage.prompt_total > resolved.threshold,
        )

    def price(
        self, model: str | None, usage: TokenUsage, *, incomplete: bool = False
    ) -> tuple[Decimal, Rates]:
        """The total of ``cost()`` and the rates it used, without building a ``Cost``."""
        resolved = None if model is None else self._resolved.get(model)  # _pick, inline
        if resolved is not None and resolved.premium is None and not incomplete:
            # The common case: no premium tier, so the prompt's size does not matter.
            # resolved.summer.total(usage), inline: this runs on every priced charge.
            tokens, output, written, cached = (
                usage.input,
                usage.output,
                usage.cache_write,
                usage.cache_read,
            )
            present = (tokens > 0) | (output > 0) << 1 | (written > 0) << 2 | (cached > 0) << 3
            terms = resolved.summer.known.get(present)
            if terms is None:
                return resolved.summer.total(usage), resolved.standard
            exponent, prompt, completion, write, read = terms
            units = tokens * prompt + output * completion + written * write + cached * read
            return Decimal(units).scaleb(exponent, EXACT), resolved.standard
        rates, resolved = self._pick(model, usage.prompt_total)
        if not incomplete:
            summer = resolved.summer if rates is resolved.standard else resolved.summer_premium
            assert summer is not None  # a premium rate has its scaled form
            return summer.total(usage), rates
        prompt_cost, completion_cost, rates = _priced(usage, rates, incomplete=incomplete)
        return EXACT.add(prompt_cost, completion_cost), rates

    def prompt_cost(self, model: str | None, input_tokens: int) -> Decimal:
        """The cost of ``input_tokens`` prompt tokens: what LibreChat's balance check prices."""
        return self.cost(model, TokenUsage(input=input_tokens)).total


# A rate as a whole coefficient and a power of ten: (coefficient, exponent).
_Scaled = tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]


def _scaled(rates: Rates | None) -> _Scaled | None:
    if rates is None:
        return None
    parts = []
    for rate in (rates.prompt, rates.completion, rates.cache_write, rates.cache_read):
        sign, digits, exponent = rate.as_tuple()
        assert isinstance(exponent, int)  # rates are finite
        coefficient = int("".join(map(str, digits)) or "0")
        parts.append((-coefficient if sign else coefficient, exponent))
    return (parts[0], parts[1], parts[2], parts[3])


# Which counts of a usage are above zero, as bits: input 1, output 2, cache write 4, read 8.
_Terms = tuple[int, int, int, int, int]  # the sum's exponent, then each count's multiplier


def _terms(scaled: _Scaled, present: int) -> _Terms:
    """The exponent of the sum of the ``present`` counts' terms, and each count's multiplier."""
    (prompt, prompt_exp), (completion, completion_exp), (write, write_exp), (read, read_exp) = (
        scaled
    )
    exponent = prompt_exp if present & 1 else 0  # the prompt part: its first term, or a zero
    if present & 4 and write_exp < exponent:
        exponent = write_exp
    if present & 8 and read_exp < exponent:
        exponent = read_exp
    exponent = min(exponent, completion_exp if present & 2 else 0)  # the completion part
    return (
        exponent,
        prompt * 10 ** (prompt_exp - exponent) if present & 1 else 0,
        completion * 10 ** (completion_exp - exponent) if present & 2 else 0,
        write * 10 ** (write_exp - exponent) if present & 4 else 0,
        read * 10 ** (read_exp - exponent) if present & 8 else 0,
    )


class _Summer:
    """What ``_priced`` adds up to for one set of rates, in whole numbers: the same Decimal.

    ``_priced`` multiplies each count by its rate and adds the products (a
    count of zero adds a zero of exponent 0): the sum's exponent is the
    smallest of its terms'. Here each term is a whole multiplier at that
    exponent, worked out once per combination of counts above zero (at most
    16), and one ``Decimal`` is made at the end: a third of the time.
    """

    __slots__ = ("_scaled", "known")

    def __init__(self, scaled: _Scaled) -> None:
        self._scaled = scaled
        self.known: dict[int, _Terms] = {}  # the terms of each set of counts met so far

    def total(self, usage: TokenUsage) -> Decimal:
        """The priced sum of ``usage``'s counts, as ``_priced`` would add it up."""
        tokens, output, written, cached = (
            usage.input,
            usage.output,
            usage.cache_write,
            usage.cache_read,
        )
        present = (tokens > 0) | (output > 0) << 1 | (written > 0) << 2 | (cached > 0) << 3
        terms = self.known.get(present)
        if terms is None:
            terms = self.known[present] = _terms(self._scaled, present)
        exponent, prompt, completion, write, read = terms
        units = tokens * prompt + output * completion + written * write + cached * read
        return Decimal(units).scaleb(exponent, EXACT)  # EXACT.scaleb, in two thirds the time


@attrs.frozen
class _Resolved:
    """A model's rates worked out once: standard, and premium above ``threshold``.

    Each also as whole coefficients and exponents (``_Scaled``), for its ``_Summer``.
    """

    standard: Rates
    key: str | None
    premium: Rates | None = None
    threshold: int = 0
    scaled: _Scaled = attrs.field(
        init=False, default=attrs.Factory(lambda self: _scaled(self.standard), takes_self=True)
    )
    scaled_premium: _Scaled | None = attrs.field(
        init=False, default=attrs.Factory(lambda self: _scaled(self.premium), takes_self=True)
    )
    summer: _Summer = attrs.field(
        init=False, default=attrs.Factory(lambda self: _Summer(self.scaled), takes_self=True)
    )
    summer_premium: _Summer | None = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda self: None if self.scaled_premium is None else _Summer(self.scaled_premium),
            takes_self=True,
        ),
    )


_UNIT_RATES = Rates(prompt=_ONE, completion=_ONE, cache_write=_ONE, cache_read=_ONE)
_NO_MODEL = _Resolved(standard=_UNIT_RATES, key=None)


def _priced(usage: TokenUsage, rates: Rates, *, incomplete: bool) -> tuple[Decimal, Decimal, Rates]:
    """Prompt and completion cost of ``usage`` at ``rates`` (with the cancel rate if cut short)."""
    mul, add = EXACT.multiply, EXACT.add
    prompt_cost = mul(usage.input, rates.prompt) if usage.input else _ZERO
    if usage.cache_write:
        prompt_cost = add(prompt_cost, mul(usage.cache_write, rates.cache_write))
    if usage.cache_read:
        prompt_cost = add(prompt_cost, mul(usage.cache_read, rates.cache_read))
    completion_cost = mul(usage.output, rates.completion) if usage.output else _ZERO
    if incomplete:
        rates = attrs.evolve(rates, completion=mul(rates.completion, _CANCEL_RATE))
        completion_cost = mul(completion_cost, _CANCEL_RATE).to_integral_value(ROUND_DOWN)
    return prompt_cost, completion_cost, rates


def _first(*rates: Decimal | None) -> Decimal:
    """The first rate that is set (zero counts as set)."""
    for value in rates:
        if value is not None:
            return value
    raise AssertionError("the last fallback is always set")  # pragma: no cover


_LIBRECHAT: Pricing | None = None


def _librechat() -> Pricing:
    global _LIBRECHAT  # noqa: PLW0603 - the shipped table is parsed once per process
    if _LIBRECHAT is None:
        text = resources.files("creditmeter").joinpath("data/librechat_rates.json").read_text()
        _LIBRECHAT = _from_table(json.loads(text, parse_float=Decimal))
    return _LIBRECHAT


def _from_table(table: Mapping[str, Any]) -> Pricing:
    def rate(value: object) -> Decimal | None:
        return None if value is None else Decimal(str(value))

    return Pricing(
        token_values={
            key: ModelRate(prompt=rate(v.get("prompt")), completion=rate(v.get("completion")))
            for key, v in table["token_values"].items()
        },
        cache_values={
            key: ModelRate(cache_write=rate(v.get("write")), cache_read=rate(v.get("read")))
            for key, v in table["cache_token_values"].items()
        },
        premium_values={
            key: PremiumRate(
                threshold=int(v["threshold"]),
                prompt=Decimal(str(v["prompt"])),
                completion=Decimal(str(v["completion"])),
            )
            for key, v in table["premium_token_values"].items()
        },
        legacy=tuple((rule["contains"], rule["key"]) for rule in table["legacy_model_matching"]),
        default_rate=Decimal(str(table["default_rate"])),
        source=dict(table["source"]),
    )
