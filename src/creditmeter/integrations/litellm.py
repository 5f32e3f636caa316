"""``CreditMeterLogger``: meter LiteLLM calls, as a library or behind LiteLLM's proxy.

A LiteLLM ``CustomLogger``. Register it once and every successful call is
charged to its user::

    meter_logger = CreditMeterLogger(meter)          # a BalanceManager or AsyncBalanceManager
    litellm.callbacks = [meter_logger]

- **After a call** (``log_success_event`` for ``litellm.completion``,
  ``async_log_success_event`` for ``litellm.acompletion`` and the proxy; for a
  stream, the single event LiteLLM sends with the assembled response once the
  stream ends): the usage LiteLLM reports is charged at creditmeter's prices,
  or, with ``cost_source="litellm"``, LiteLLM's own ``response_cost`` (USD)
  times 1,000,000 credits (creditmeter's prices when LiteLLM could not price
  the call). The request id is ``"litellm:" + litellm_call_id``, so an event
  delivered twice charges once. A failed call is never charged.
- **Before a call, behind the proxy**: ``async_pre_call_hook`` refuses a user
  whose available balance is used up with ``fastapi.HTTPException(402)``,
  which the proxy answers as an OpenAI-style error carrying LibreChat's
  ``token_balance`` payload.
- **Before a call, as a library**: LiteLLM ignores exceptions raised in its
  pre-API-call logging hooks, so a refusal cannot come from there. Wrap the
  call instead: ``completion = meter_logger.guard(litellm.completion)`` raises
  ``InsufficientBalance`` before LiteLLM runs.

When the store fails (``StoreError``), ``on_store_error`` decides for the
checks before a call: ``"closed"`` (the default) refuses it (``guard``
raises the ``StoreError``, the proxy answers ``503``); ``"open"`` lets it run
unchecked, with a warning. A charge the store cannot take is logged (one
line) and reported to the manager's ``on_event`` as an ``Unmetered`` event.

The user is the call's OpenAI ``user`` field by default; ``user_from=
"metadata.<key>"`` reads the call's metadata (behind the proxy,
``"metadata.user_api_key_user_id"`` is the owner of the API key), and a
callable receives a ``LiteLLMCall``. A call without a user is logged (a
warning) and neither checked nor charged.

Importing this module imports ``litellm``, which fetches its model cost map
from the network unless ``LITELLM_LOCAL_MODEL_COST_MAP=True`` is set first.
"""

from __future__ import annotations

import asyncio
import decimal
import functools
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, cast

import attrs

try:
    import litellm
    from litellm.integrations.custom_logger import CustomLogger
except ImportError as _missing:
    raise ModuleNotFoundError(
        "creditmeter.integrations.litellm needs LiteLLM: pip install 'creditmeter[litellm]' "
        f"({_missing})",
        name="litellm",
    ) from _missing

from creditmeter import _validate
from creditmeter._exact import EXACT
from creditmeter.aio import AsyncBalanceManager
from creditmeter.events import Unmetered
from creditmeter.exceptions import ConfigError, InsufficientBalance, InvalidInput, StoreError
from creditmeter.manager import BalanceManager
from creditmeter.metering import OnStoreError, check_store_policy, report_unmetered
from creditmeter.usage import TokenUsage

if TYPE_CHECKING:
    from datetime import datetime

    from litellm.caching.dual_cache import DualCache
    from litellm.types.proxy.auth.user_api_key_auth import UserAPIKeyAuth
    from litellm.types.utils import CallTypesLiteral

__all__ = [
    "CREDITS_PER_USD",
    "REQUEST_PREFIX",
    "RETRY_AFTER",
    "USD_DIGITS",
    "CostSource",
    "CreditMeterLogger",
    "LiteLLMCall",
    "UserFrom",
    "usd_to_credits",
]

P = ParamSpec("P")
T = TypeVar("T")

CostSource = Literal["creditmeter", "litellm"]
"""Where a charge's amount comes from: creditmeter's pricing of the usage, or LiteLLM's cost."""

CREDITS_PER_USD = Decimal(1_000_000)
"""LibreChat's unit: 1 USD is 1,000,000 credits."""

REQUEST_PREFIX = "litellm:"
"""A charge's request id is this prefix and LiteLLM's ``litellm_call_id``."""

RETRY_AFTER = 5
"""Seconds the proxy's ``503`` (the store failed before a call) asks a client to wait."""

USD_DIGITS = 15
"""Significant digits kept of LiteLLM's float cost: a float holds 15 exactly, the rest is noise."""

logger = logging.getLogger("creditmeter.litellm")


@attrs.frozen
class LiteLLMCall:
    """What a ``user_from`` callable sees of one LiteLLM call.

    ``hook`` tells where it comes from: ``"call"`` (the arguments of a call
    wrapped by ``guard``), ``"pre_call"`` (the proxy's request ``data``) or
    ``"success"`` (LiteLLM's logging ``kwargs``); ``kwargs`` is that mapping,
    as LiteLLM gave it. ``metadata`` is the call's metadata: ``metadata=`` of a
    library call; behind the proxy, the request's metadata, in which the proxy
    puts ``user_api_key_user_id`` and the other ``user_api_key_*`` fields.
    """

    hook: Literal["call", "pre_call", "success"]
    model: str | None
    user: Any
    metadata: Mapping[str, Any]
    messages: Any
    kwargs: Mapping[str, Any] = attrs.field(repr=False)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> LiteLLMCall:
        """The call of ``litellm.completion(**arguments)`` (or ``acompletion``)."""
        return cls(
            hook="call",
            model=_text(arguments.get("model")),
            user=arguments.get("user"),
            metadata=_metadata(arguments),
            messages=arguments.get("messages"),
            kwargs=arguments,
        )

    @classmethod
    def from_request(cls, data: Mapping[str, Any]) -> LiteLLMCall:
        """The call the proxy is about to make for a request (its pre-call hook's ``data``)."""
        call = cls.from_arguments(data)
        return attrs.evolve(call, hook="pre_call")

    @classmethod
    def from_event(cls, kwargs: Mapping[str, Any]) -> LiteLLMCall:
        """The call a success or failure event reports (the event's ``kwargs``)."""
        params = kwargs.get("litellm_params")
        return cls(
            hook="success",
            model=_text(kwargs.get("model")),
            user=kwargs.get("user"),
            metadata=_metadata(params) if isinstance(params, Mapping) else {},
            messages=kwargs.get("messages"),
            kwargs=kwargs,
        )


UserFrom = str | Callable[[LiteLLMCall], "str | None"]
"""``"user"``, ``"metadata.<key>"``, or a callable over a ``LiteLLMCall`` returning the user id."""


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _metadata(holder: Mapping[str, Any]) -> Mapping[str, Any]:
    """The call's metadata: ``metadata``, else ``litellm_metadata`` (some proxy routes use it)."""
    for name in ("metadata", "litellm_metadata"):
        found = holder.get(name)
        if isinstance(found, Mapping) and found:
            return found
    return {}


def _user_reader(user_from: object) -> Callable[[LiteLLMCall], object]:
    if callable(user_from):
        return cast("Callable[[LiteLLMCall], object]", user_from)
    if user_from == "user":
        return lambda call: call.user
    if isinstance(user_from, str) and user_from.startswith("metadata.") and len(user_from) > 9:
        key = user_from[len("metadata.") :]
        return lambda call: call.metadata.get(key)
    raise ConfigError(
        f"user_from must be 'user', 'metadata.<key>' or a callable, got {user_from!r}"
    )


@attrs.frozen
class _Charge:
    """One charge worked out from a success event."""

    user: str
    model: str | None
    usage: TokenUsage | None
    amount: Decimal | None
    request_id: str | None
    metadata: dict[str, Any]


class CreditMeterLogger(CustomLogger):
    """A LiteLLM callback that checks users before calls and charges them after.

    ``meter`` is a ``BalanceManager`` or an ``AsyncBalanceManager``:

    - with a ``BalanceManager``, sync events charge in LiteLLM's logging
      thread, and async events and hooks run it in a worker thread
      (``asyncio.to_thread``), never blocking the event loop;
    - with an ``AsyncBalanceManager``, async events and hooks await it on
      LiteLLM's loop. Sync ``litellm.completion`` calls report only sync
      events, which cannot await it: they are not charged, and each one logs
      an error. Use a ``BalanceManager`` if you make sync calls.

    ``user_from`` finds the user (see ``UserFrom``); ``cost_source`` picks
    creditmeter's pricing (``"creditmeter"``, the default) or LiteLLM's
    ``response_cost`` (``"litellm"``; a call LiteLLM could not price is
    charged at creditmeter's prices, with a warning). With
    ``estimate_prompt=True`` the checks before a call price the prompt
    (``litellm.token_counter``) as LibreChat does, instead of only asking
    whether anything is left. ``on_store_error`` is what a check does when
    the store fails: refuse the call (``"closed"``) or let it run (``"open"``).
    """

    def __init__(
        self,
        meter: BalanceManager | AsyncBalanceManager,
        *,
        user_from: UserFrom = "user",
        cost_source: CostSource = "creditmeter",
        estimate_prompt: bool = False,
        on_store_error: OnStoreError = "closed",
    ) -> None:
        if not isinstance(meter, (BalanceManager, AsyncBalanceManager)):
            raise TypeError(
                f"CreditMeterLogger needs a BalanceManager or an AsyncBalanceManager, "
                f"got {type(meter).__name__}"
            )
        if cost_source not in ("creditmeter", "litellm"):
            raise ConfigError(
                f"cost_source must be 'creditmeter' or 'litellm', got {cost_source!r}"
            )
        if type(estimate_prompt) is not bool:
            raise ConfigError(f"estimate_prompt must be True or False, got {estimate_prompt!r}")
        self.on_store_error = check_store_policy(on_store_error)
        super().__init__()
        self.meter = meter
        self.user_from = user_from
        self.cost_source: CostSource = cost_source
        self.estimate_prompt = estimate_prompt
        self._read_user = _user_reader(user_from)

    def __repr__(self) -> str:
        return (
            f"CreditMeterLogger({self.meter!r}, user_from={self.user_from!r}, "
            f"cost_source={self.cost_source!r})"
        )

    # --- who pays -------------------------------------------------------------------

    def user_of(self, call: LiteLLMCall) -> str | None:
        """The user who pays for ``call``, or ``None`` (with a warning) when it names none."""
        found = self._read_user(call)
        if found is None or found == "":
            logger.warning(
                "a LiteLLM call of model %r names no user (user_from=%r): not metered",
                call.model,
                self.user_from,
            )
            return None
        try:
            return _validate.user_id(found)
        except InvalidInput as exc:
            logger.warning("a LiteLLM call of model %r is not metered: %s", call.model, exc)
            return None

    # --- before a call ----------------------------------------------------------------

    def _check_arguments(self, call: LiteLLMCall) -> tuple[str, dict[str, Any]] | None:
        """The user and the ``require`` arguments for a check, or ``None`` for no check."""
        user = self.user_of(call)
        if user is None:
            return None
        if not self.estimate_prompt or call.model is None or not call.messages:
            return user, {}
        try:
            tokens = litellm.token_counter(model=call.model, messages=call.messages)
        except Exception as exc:  # noqa: BLE001 - any tokenizer failure: check without a price
            logger.warning("could not count the prompt tokens of %r: %s", call.model, exc)
            return user, {}
        return user, {"model": call.model, "input_tokens": int(tokens)}

    def check(self, call: LiteLLMCall) -> None:
        """Raise ``InsufficientBalance`` if the user of ``call`` cannot pay (sync manager).

        When the store fails, raise its ``StoreError`` (``on_store_error="closed"``)
        or let the call go with a warning (``"open"``).
        """
        meter = self.meter
        if not isinstance(meter, BalanceManager):
            raise TypeError("check() needs a BalanceManager; use acheck() with an async one")
        found = self._check_arguments(call)
        if found is not None:
            user, options = found
            try:
                meter.require(user, **options)
            except StoreError as exc:
                self._unchecked(user, call, exc)

    async def acheck(self, call: LiteLLMCall) -> None:
        """Raise ``InsufficientBalance`` if the user of ``call`` cannot pay (either manager).

        A store that fails is handled as in ``check``.
        """
        found = self._check_arguments(call)
        if found is None:
            return
        user, options = found
        meter = self.meter
        try:
            if isinstance(meter, AsyncBalanceManager):
                await meter.require(user, **options)
            else:
                await asyncio.to_thread(functools.partial(meter.require, user, **options))
        except StoreError as exc:
            self._unchecked(user, call, exc)

    def _unchecked(self, user: str, call: LiteLLMCall, exc: StoreError) -> None:
        if self.on_store_error == "closed":
            raise exc
        logger.warning(
            "the store failed checking user %r before a LiteLLM call of %r (%s); letting it run "
            "unchecked (on_store_error='open')",
            user,
            call.model,
            exc,
        )

    def guard(self, func: Callable[P, T]) -> Callable[P, T]:
        """Wrap ``litellm.completion`` or ``litellm.acompletion``: refuse before LiteLLM runs.

        The wrapped function checks the call's user first and raises
        ``InsufficientBalance`` if they cannot pay; it charges nothing itself
        (this logger charges on LiteLLM's success event). A coroutine function
        works with either manager, a sync one needs a ``BalanceManager``.
        """
        signature = inspect.signature(func)
        spread = next(
            (p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None
        )

        def call_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> LiteLLMCall:
            arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
            if spread is not None:
                arguments.update(arguments.pop(spread, {}))
            return LiteLLMCall.from_arguments(arguments)

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                await self.acheck(call_of(args, kwargs))
                return await func(*args, **kwargs)

            return cast("Callable[P, T]", guarded_async)
        if not isinstance(self.meter, BalanceManager):
            raise TypeError(
                f"{getattr(func, '__qualname__', func)!r} is not async: guard it with a "
                "CreditMeterLogger over a BalanceManager, or guard litellm.acompletion"
            )

        @functools.wraps(func)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            self.check(call_of(args, kwargs))
            return func(*args, **kwargs)

        return guarded

    async def async_pre_call_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,  # noqa: ARG002 - LiteLLM passes these by name
        cache: DualCache,  # noqa: ARG002
        data: dict[str, Any],
        call_type: CallTypesLiteral,  # noqa: ARG002
    ) -> None:
        """The proxy's hook before each call: refuse a user who cannot pay with HTTP 402.

        Raises ``fastapi.HTTPException(402, detail={"error": message,
        "type": "token_balance", "balance", "tokenCost"[, "promptTokens"]})``,
        which the proxy turns into its OpenAI-style error response (the
        detail lands in ``error.provider_specific_fields``). When the store
        fails and ``on_store_error="closed"``, raises
        ``HTTPException(503, headers={"Retry-After": "5"})`` and logs one line.
        Without FastAPI installed it raises the creditmeter error itself.
        """
        call = LiteLLMCall.from_request(data)
        try:
            await self.acheck(call)
        except InsufficientBalance as refused:
            error = _http_refusal(refused)
            if error is refused:
                raise
            raise error from refused
        except StoreError as failed:
            logger.error(  # noqa: TRY400 - one line: the outage is the news, not a traceback
                "the store failed before a LiteLLM proxy call of %r (%s); answered 503",
                call.model,
                failed,
            )
            error = _http_unavailable(failed)
            if error is failed:
                raise
            raise error from None

    # --- after a call -----------------------------------------------------------------

    def log_success_event(
        self,
        kwargs: dict[str, Any],
        response_obj: Any,
        start_time: datetime | None,  # noqa: ARG002 - LiteLLM passes these by name
        end_time: datetime | None,  # noqa: ARG002
    ) -> None:
        """Charge a finished sync call (LiteLLM runs this in its logging thread)."""
        charge = None
        try:
            charge = self._charge_of(kwargs, response_obj)
            if charge is None:
                return
            meter = self.meter
            if isinstance(meter, AsyncBalanceManager):
                logger.error(
                    "a sync LiteLLM call of user %r was not charged: a CreditMeterLogger over "
                    "an AsyncBalanceManager charges async calls only (request %s)",
                    charge.user,
                    charge.request_id,
                )
                return
            _charge_with(meter, charge)
        except StoreError as exc:
            self._unmetered(charge, exc, kwargs)
        except Exception:
            logger.exception("charging a LiteLLM call failed (call %s)", _call_id(kwargs))

    async def async_log_success_event(
        self,
        kwargs: dict[str, Any],
        response_obj: Any,
        start_time: datetime | None,  # noqa: ARG002 - LiteLLM passes these by name
        end_time: datetime | None,  # noqa: ARG002
    ) -> None:
        """Charge a finished async call, or a proxy call (on LiteLLM's loop)."""
        charge = None
        try:
            charge = self._charge_of(kwargs, response_obj)
            if charge is None:
                return
            meter = self.meter
            if isinstance(meter, AsyncBalanceManager):
                await meter.charge(
                    charge.user,
                    charge.amount,
                    model=charge.model,
                    usage=charge.usage,
                    request_id=charge.request_id,
                    metadata=charge.metadata,
                )
            else:
                await asyncio.to_thread(_charge_with, meter, charge)
        except StoreError as exc:
            self._unmetered(charge, exc, kwargs)
        except Exception:
            logger.exception("charging a LiteLLM call failed (call %s)", _call_id(kwargs))

    def _unmetered(self, charge: _Charge | None, exc: StoreError, kwargs: dict[str, Any]) -> None:
        if charge is None:  # not from the store's charge: a bug, with its traceback
            logger.error("charging a LiteLLM call failed (call %s)", _call_id(kwargs), exc_info=exc)
            return
        event = Unmetered(
            user_id=charge.user,
            operation="charge",
            error=str(exc),
            model=charge.model,
            usage=charge.usage,
            amount=charge.amount,
            request_id=charge.request_id,
        )
        report_unmetered(self.meter, event, what="a LiteLLM call", log=logger)

    def _charge_of(self, kwargs: Mapping[str, Any], response: Any) -> _Charge | None:
        """What to charge for a success event, or ``None`` (logged) when nothing can be."""
        call = LiteLLMCall.from_event(kwargs)
        user = self.user_of(call)
        if user is None:
            return None
        model = call.model or _text(getattr(response, "model", None))
        call_id = _call_id(kwargs)
        request_id = None if call_id is None else REQUEST_PREFIX + call_id
        metadata: dict[str, Any] = {"source": "litellm"}
        response_id = _text(getattr(response, "id", None))
        if response_id is not None:
            metadata["response_id"] = response_id
        usd = _response_cost(kwargs)
        if usd is not None:
            metadata["response_cost_usd"] = usd
        try:
            usage = TokenUsage.from_response(response)
        except InvalidInput as exc:
            logger.warning("unreadable usage in a LiteLLM response (%s)", exc)
            usage = None
        amount = None
        if self.cost_source == "litellm":
            if usd is not None:
                amount = usd_to_credits(usd)
            elif usage is not None:
                logger.warning(
                    "LiteLLM could not price model %r; charging %r at creditmeter's prices",
                    model,
                    user,
                )
        if amount is None and usage is None:
            logger.warning(
                "a LiteLLM call of user %r, model %r reported no usage: not charged", user, model
            )
            return None
        return _Charge(
            user=user,
            model=model,
            usage=usage,
            amount=amount,
            request_id=request_id,
            metadata=metadata,
        )


def _charge_with(meter: BalanceManager, charge: _Charge) -> None:
    meter.charge(
        charge.user,
        charge.amount,
        model=charge.model,
        usage=charge.usage,
        request_id=charge.request_id,
        metadata=charge.metadata,
    )


def _call_id(kwargs: Mapping[str, Any]) -> str | None:
    found = kwargs.get("litellm_call_id")
    if found is None:
        params = kwargs.get("litellm_params")
        if isinstance(params, Mapping):
            found = params.get("litellm_call_id")
    return _text(found)


def _response_cost(kwargs: Mapping[str, Any]) -> float | None:
    """LiteLLM's cost of the call in USD, if it priced the call.

    When LiteLLM cannot price a call (a model missing from its price map) it
    leaves ``response_cost`` unset but reports 0.0 in its logging payload,
    with the failure beside it: that is no price, not a price of zero.
    """
    if kwargs.get("response_cost_failure_debug_information") is not None:
        return None
    cost = kwargs.get("response_cost")
    if cost is None:
        payload = kwargs.get("standard_logging_object")
        if isinstance(payload, Mapping) and payload.get("response_cost_failure_debug_info") is None:
            cost = payload.get("response_cost")
    if type(cost) is int:
        cost = float(cost)
    if type(cost) is not float or not math.isfinite(cost) or cost < 0:
        return None
    return cost


def usd_to_credits(usd: float) -> Decimal:
    """A LiteLLM cost in USD (a float) as credits, without the float's noise.

    The float is read through its shortest repr (``Decimal(repr(usd))``),
    rounded to ``USD_DIGITS`` significant digits (LiteLLM sums float prices,
    so 0.00022499999999999997 stands for 0.000225), then times 1,000,000:
    225 credits, not 224.99999999999997. At most 30 decimal places are kept.
    """
    exact = Decimal(repr(usd))
    if not exact:
        return Decimal(0)
    step = Decimal(1).scaleb(max(exact.adjusted() - USD_DIGITS + 1, -36))
    amount = EXACT.multiply(_ROUNDING.quantize(exact, step), CREDITS_PER_USD)
    if amount == amount.to_integral_value():
        return amount.quantize(Decimal(1))
    return EXACT.normalize(amount)


_ROUNDING = decimal.Context(prec=100, rounding=decimal.ROUND_HALF_EVEN)


def _http_unavailable(failed: StoreError) -> Exception:
    """The error the proxy turns into an HTTP 503 answer when the store failed."""
    try:
        from fastapi import HTTPException  # noqa: PLC0415 - the proxy has it; a library may not
    except ImportError:
        return failed
    return HTTPException(
        status_code=503,
        detail={"error": "the credit store is unavailable: try again later", "type": "store"},
        headers={"Retry-After": str(RETRY_AFTER)},
    )


def _http_refusal(refused: InsufficientBalance) -> Exception:
    """The error the proxy turns into an HTTP 402 answer with LibreChat's payload."""
    try:
        from fastapi import HTTPException  # noqa: PLC0415 - the proxy has it; a library may not
    except ImportError:
        return refused
    return HTTPException(status_code=402, detail={"error": str(refused), **refused.to_dict()})
