"""The JSON API under ``/api``: read balances and the ledger; grant, set, refill; meter calls.

Every route takes ``Authorization: Bearer <token>``: the read token reads,
the admin token reads and writes. Amounts are decimal strings in and out
(``"1500"``, ``"0.25"``); a JSON number where an amount belongs is refused.
User ids travel in request bodies and query strings (a path segment could
not carry a ``/``), except ``GET /api/users/{user_id}``, whose id is the rest
of the path. Errors have one shape (see ``errors``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from creditmeter.config import IntervalUnit
from creditmeter.models import EntryKind
from creditmeter.queries import GroupKey, Period
from creditmeter.server import present
from creditmeter.server.errors import ApiError
from creditmeter.server.security import Role
from creditmeter.server.state import Actor, ServerState
from creditmeter.usage import TokenUsage

__all__ = ["router"]

_AMOUNT_PATTERN = r"^[0-9]{1,16}(\.[0-9]{1,30})?$"
Amount = Annotated[
    str,
    Field(
        pattern=_AMOUNT_PATTERN,
        max_length=47,
        description="Credits as a decimal string: digits and at most one point.",
        examples=["1500", "0.25"],
    ),
]
UserId = Annotated[str, Field(min_length=1, max_length=256, examples=["user-42"])]
RequestId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=256,
        description="Makes the write idempotent: a retry with the same id changes nothing.",
    ),
]
Reason = Annotated[str, Field(min_length=1, max_length=1000, description="Kept on the entry.")]
Model = Annotated[str, Field(min_length=1, max_length=256, examples=["gpt-4o"])]
HoldId = Annotated[str, Field(min_length=1, max_length=251)]
Tokens = Annotated[int, Field(ge=0, le=10**10, strict=True)]
Flag = Annotated[bool, Field(strict=True)]
SmallInt = Annotated[int, Field(strict=True)]

_bearer = HTTPBearer(auto_error=False, description="The admin token, or the read token to read.")
_UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="creditmeter"'}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(_Body):
    """Token counts of one model call, as creditmeter prices them."""

    input: Tokens = 0
    output: Tokens = 0
    cache_write: Tokens = 0
    cache_read: Tokens = 0

    def tokens(self) -> TokenUsage:
        """As a ``TokenUsage``."""
        return TokenUsage(
            input=self.input,
            output=self.output,
            cache_write=self.cache_write,
            cache_read=self.cache_read,
        )


class GrantBody(_Body):
    """``POST /api/grant``."""

    user_id: UserId
    amount: Amount
    reason: Reason
    request_id: RequestId | None = None
    expires_at: datetime | None = Field(
        default=None, description="An aware time: the credits form a block that expires then."
    )
    priority: SmallInt | None = Field(default=None, ge=0, le=100)


class SetBody(_Body):
    """``POST /api/set``."""

    user_id: UserId
    amount: Amount
    reason: Reason
    request_id: RequestId | None = None


class RefillBody(_Body):
    """``POST /api/refill``."""

    user_id: UserId
    reason: Reason


class RefillSettingsBody(_Body):
    """``POST /api/refill-settings``: values left out keep what applies now."""

    user_id: UserId
    reason: Reason
    reset: Flag = False
    enabled: Flag | None = None
    amount: Amount | None = None
    interval_value: SmallInt | None = Field(default=None, ge=1, le=1_000_000)
    interval_unit: IntervalUnit | None = None


class CheckBody(_Body):
    """``POST /api/check``: a cost, or a model and prompt tokens to price."""

    user_id: UserId
    cost: Amount | None = None
    model: Model | None = None
    input_tokens: Tokens | None = None


class ChargeBody(_Body):
    """``POST /api/charge``: an amount, or a model and usage priced by creditmeter."""

    user_id: UserId
    request_id: RequestId
    amount: Amount | None = None
    model: Model | None = None
    usage: Usage | None = None
    incomplete: Flag = False
    strict: Flag = False
    metadata: dict[str, Any] | None = None


class HoldBody(_Body):
    """``POST /api/hold``: set credits aside before a call (an amount, or model and usage)."""

    user_id: UserId
    request_id: RequestId
    amount: Amount | None = None
    model: Model | None = None
    usage: Usage | None = None
    ttl_seconds: SmallInt | None = Field(default=None, ge=1, le=7 * 24 * 3600)


class SettleBody(_Body):
    """``POST /api/settle``: resolve a hold with what the call really cost."""

    user_id: UserId
    hold_id: HoldId
    amount: Amount | None = None
    model: Model | None = None
    usage: Usage | None = None
    incomplete: Flag = False
    metadata: dict[str, Any] | None = None


class ReleaseBody(_Body):
    """``POST /api/release``: resolve a hold without a charge."""

    user_id: UserId
    hold_id: HoldId


class ErrorDetail(BaseModel):
    """The inside of every error answer."""

    message: str
    type: str
    param: str | None
    code: str


class ErrorBody(BaseModel):
    """Every error answer; a ``402`` adds LibreChat's ``type``, ``balance``, ``tokenCost``."""

    model_config = ConfigDict(extra="allow")
    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (401, "No token, or a token that is not the admin or read token."),
        (422, "The request is not valid (nothing was written)."),
        (503, "The store is unavailable; retry after Retry-After seconds."),
    )
}
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    403: {"model": ErrorBody, "description": "The read token cannot write."},
    409: {"model": ErrorBody, "description": "The request id was used with other parameters."},
}
_PAY_ERRORS: dict[int | str, dict[str, Any]] = {
    **_WRITE_ERRORS,
    402: {"model": ErrorBody, "description": "Insufficient balance (LibreChat's payload)."},
}


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.creditmeter
    return state


async def _role(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Role:
    if credentials is None:
        raise ApiError(401, "a bearer token is required", "unauthorized", headers=_UNAUTHORIZED)
    state = _state(request)
    role = state.tokens.role_of(credentials.credentials)
    if role is None:  # a guess: slowed like a failed console login, per address
        await state.throttle.failed(request.client.host if request.client else "unknown")
        raise ApiError(401, "the token is not valid", "unauthorized", headers=_UNAUTHORIZED)
    return role


async def _reader(role: Annotated[Role, Depends(_role)]) -> Actor:
    return Actor(role=role, via="api")


async def _writer(role: Annotated[Role, Depends(_role)]) -> Actor:
    if role is not Role.ADMIN:
        raise ApiError(403, "the read token cannot write", "forbidden")
    return Actor(role=role, via="api")


Reader = Annotated[Actor, Depends(_reader)]
Writer = Annotated[Actor, Depends(_writer)]

router = APIRouter(prefix="/api")


@router.get("/users", responses=_ERRORS, tags=["read"])
async def list_users(
    request: Request,
    _: Reader,
    *,
    prefix: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    after: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    """Users in id order, ``limit`` at a time; ``prefix`` keeps ids that start with it.

    Pass ``next`` as ``after`` for the next page (``null``: the last page).
    """
    accounts, cursor = await _state(request).users_page(prefix=prefix, after=after, limit=limit)
    return {"users": [present.summary_plain(a) for a in accounts], "next": cursor}


@router.get("/users/{user_id:path}", responses=_ERRORS, tags=["read"])
async def get_user(request: Request, _: Reader, user_id: str) -> dict[str, Any]:
    """One user: balance, available, holds, credit blocks, refill settings, next refill."""
    state = _state(request)
    account = await state.stored(user_id)
    if account is None:
        raise ApiError(404, "no account for this user", "not_found", param="user_id")
    return present.account_plain(account, state.meter.config, state.now())


@router.get("/ledger", responses=_ERRORS, tags=["read"])
async def ledger(
    request: Request,
    _: Reader,
    *,
    user_id: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    kind: Annotated[list[EntryKind] | None, Query()] = None,
    after: Annotated[str | None, Query(min_length=1, max_length=4096)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Ledger entries in commit order (of one user, or all), a page at a time.

    Filters: ``since <= at < until`` (aware times) and ``kind`` (repeatable).
    Pass ``next`` as ``after``, with the same filters, for the next page.
    """
    page = await _state(request).meter.entries(
        user=user_id, since=since, until=until, kinds=kind, after=after, limit=limit
    )
    return {"entries": [present.entry_plain(e) for e in page.entries], "next": page.next}


@router.get("/usage", responses=_ERRORS, tags=["read"])
async def usage(
    request: Request,
    _: Reader,
    *,
    user_id: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    by: Annotated[list[GroupKey] | None, Query()] = None,
    period: Period | None = None,
) -> dict[str, Any]:
    """Charges summed in ``[since, until)``, grouped ``by`` user, model and/or period."""
    rows = await _state(request).meter.usage(
        user=user_id, since=since, until=until, by=tuple(by or ("model",)), period=period
    )
    return {"rows": [present.usage_plain(row) for row in rows]}


@router.post("/grant", responses=_WRITE_ERRORS, tags=["admin"])
async def grant(request: Request, actor: Writer, body: GrantBody) -> dict[str, Any]:
    """Add credits (a credit block with ``expires_at`` or ``priority``)."""
    entry = await _state(request).grant(
        actor,
        body.user_id,
        body.amount,
        reason=body.reason,
        request_id=body.request_id,
        expires_at=body.expires_at,
        priority=body.priority,
    )
    return {"entry": present.entry_plain(entry)}


@router.post("/set", responses=_WRITE_ERRORS, tags=["admin"])
async def set_balance(request: Request, actor: Writer, body: SetBody) -> dict[str, Any]:
    """Set the balance to ``amount``."""
    entry = await _state(request).set_balance(
        actor, body.user_id, body.amount, reason=body.reason, request_id=body.request_id
    )
    return {"entry": present.entry_plain(entry)}


@router.post("/refill", responses=_WRITE_ERRORS, tags=["admin"])
async def refill(request: Request, actor: Writer, body: RefillBody) -> dict[str, Any]:
    """Apply the user's refill if one is due (``refilled`` says whether one was)."""
    state = _state(request)
    entry = await state.refill(actor, body.user_id, reason=body.reason)
    account = await state.stored(body.user_id)
    return {
        "refilled": entry is not None,
        "entry": None if entry is None else present.entry_plain(entry),
        "account": None
        if account is None
        else present.account_plain(account, state.meter.config, state.now()),
    }


@router.post("/refill-settings", responses=_WRITE_ERRORS, tags=["admin"])
async def refill_settings(
    request: Request, actor: Writer, body: RefillSettingsBody
) -> dict[str, Any]:
    """Give the user their own refill settings, or ``reset`` to follow the config."""
    state = _state(request)
    account = await state.configure_refill(
        actor,
        body.user_id,
        reason=body.reason,
        reset=body.reset,
        enabled=body.enabled,
        amount=body.amount,
        interval_value=body.interval_value,
        interval_unit=body.interval_unit,
    )
    return {"account": present.account_plain(account, state.meter.config, state.now())}


@router.post("/check", responses=_WRITE_ERRORS, tags=["gateway"])
async def check(request: Request, _: Writer, body: CheckBody) -> dict[str, Any]:
    """Can the user pay? A due refill is applied first (so this needs the admin token)."""
    result = await _state(request).check(
        body.user_id, cost=body.cost, model=body.model, input_tokens=body.input_tokens
    )
    return present.check_plain(result)


@router.post("/charge", responses=_PAY_ERRORS, tags=["gateway"])
async def charge(request: Request, actor: Writer, body: ChargeBody) -> dict[str, Any]:
    """Charge ``amount``, or the ``usage`` of ``model`` priced by creditmeter.

    ``strict`` refuses with ``402`` when the available balance cannot pay.
    """
    entry = await _state(request).charge(
        actor,
        body.user_id,
        request_id=body.request_id,
        amount=body.amount,
        model=body.model,
        usage=None if body.usage is None else body.usage.tokens(),
        incomplete=body.incomplete,
        strict=body.strict,
        metadata=body.metadata,
    )
    return {"entry": present.entry_plain(entry)}


@router.post("/hold", responses=_PAY_ERRORS, tags=["gateway"])
async def hold(request: Request, _: Writer, body: HoldBody) -> dict[str, Any]:
    """Set credits aside for a call about to run; ``402`` when the user cannot pay."""
    ttl = None if body.ttl_seconds is None else timedelta(seconds=body.ttl_seconds)
    held = await _state(request).hold(
        body.user_id,
        request_id=body.request_id,
        amount=body.amount,
        model=body.model,
        usage=None if body.usage is None else body.usage.tokens(),
        ttl=ttl,
    )
    return {"hold": present.hold_plain(held)}


@router.post("/settle", responses=_WRITE_ERRORS, tags=["gateway"])
async def settle(request: Request, actor: Writer, body: SettleBody) -> dict[str, Any]:
    """Charge a hold's real cost (an amount, or model and usage); a retry returns the first."""
    entry = await _state(request).settle(
        actor,
        body.user_id,
        body.hold_id,
        amount=body.amount,
        model=body.model,
        usage=None if body.usage is None else body.usage.tokens(),
        incomplete=body.incomplete,
        metadata=body.metadata,
    )
    return {"entry": present.entry_plain(entry)}


@router.post("/release", responses=_WRITE_ERRORS, tags=["gateway"])
async def release(request: Request, _: Writer, body: ReleaseBody) -> dict[str, Any]:
    """Resolve a hold without a charge."""
    entry = await _state(request).release(body.user_id, body.hold_id)
    return {"entry": present.entry_plain(entry)}
