"""The HTML console: log in with a token, find users, see their ledger and spend, change balances.

Pages are rendered on the server (Jinja2) with no script at all, so the
CSP can forbid every script. A login turns the admin or read token into a
signed session cookie (HttpOnly, SameSite=Strict, Secure over https, scoped
to the app's mount path). Every form that changes something carries the
session's CSRF token; a POST without it, or from a read-only session, is
refused with 403. Links and form actions are built from the request's
``root_path``, so the console works mounted under any prefix.
"""

from __future__ import annotations

import csv
import io
import secrets
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import FormData

from creditmeter import _validate
from creditmeter.config import INTERVAL_UNITS
from creditmeter.exceptions import CreditMeterError, InvalidInput
from creditmeter.server import present
from creditmeter.server.chart import periods_between, pick_period, spend_chart
from creditmeter.server.errors import ApiError, from_library
from creditmeter.server.security import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_MAX_AGE,
    Session,
    same_secret,
)
from creditmeter.server.state import Actor, ServerState

__all__ = ["ConsoleRedirect", "render_error", "router", "templates"]

USERS_PAGE = 50
LEDGER_PAGE = 25
USAGE_ROWS_SHOWN = 500
CHART_DAYS = 30
MAX_USAGE_DAYS = 5 * 366
_NOTICES = {
    "granted": "Credits granted.",
    "set": "Balance set.",
    "refilled": "Refill applied.",
    "no-refill": "No refill was due: nothing changed.",
    "settings": "Refill settings saved.",
}
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _credits(value: str | None) -> str:
    """A decimal string with thousands separators, for people."""
    if value is None:
        return "-"
    whole, dot, fraction = value.partition(".")
    sign = "-" if whole.startswith("-") else ""
    digits = whole.lstrip("-")
    grouped = f"{int(digits):,}" if digits else "0"
    return f"{sign}{grouped}{dot}{fraction}"


def _moment(value: str | None) -> str:
    """An ISO time shown to the minute, in UTC."""
    if value is None:
        return "-"
    parsed = datetime.fromisoformat(value).astimezone(timezone.utc)
    return parsed.strftime("%Y-%m-%d %H:%M UTC")


templates.env.filters["credits"] = _credits
templates.env.filters["moment"] = _moment


class ConsoleRedirect(Exception):
    """Raised to send the browser elsewhere (to the login page, mostly)."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


def url(request: Request, path: str, **params: object) -> str:
    """``path`` under the app's mount point, with the non-empty ``params`` as a query string."""
    base = str(request.scope.get("root_path", "")).rstrip("/")
    query = {k: str(v) for k, v in params.items() if v is not None and v != ""}
    return f"{base}{path}" + (f"?{urlencode(query)}" if query else "")


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.creditmeter
    return state


def _session(request: Request) -> Session | None:
    return _state(request).sessions.read(request.cookies.get(SESSION_COOKIE))


def _require_session(request: Request) -> Session:
    session = _session(request)
    if session is None:
        raise ConsoleRedirect(url(request, "/login"))
    return session


def _cookie_path(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/") or "/"


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _page(
    request: Request,
    name: str,
    context: dict[str, Any],
    *,
    session: Session | None,
    status: int = 200,
) -> Response:
    def link(path: str, **params: object) -> str:
        return url(request, path, **params)

    return templates.TemplateResponse(
        request,
        name,
        {"url": link, "session": session, **context},
        status_code=status,
    )


def render_error(request: Request, status: int, message: str) -> Response:
    """An error page of the console (the API answers JSON instead)."""
    session = _session(request)
    return _page(
        request,
        "error.html",
        {"status": status, "message": message, "title": f"Error {status}"},
        session=session,
        status=status,
    )


async def _form(request: Request) -> FormData:
    try:
        return await request.form(max_files=0, max_fields=32, max_part_size=64 * 1024)
    except Exception as exc:  # multipart's own errors: a malformed form is bad input
        raise ApiError(400, "the form could not be read", "invalid_form") from exc


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def _refuse(status: int, message: str) -> NoReturn:
    raise ApiError(status, message, "forbidden")


async def _writable_form(request: Request) -> tuple[Session, FormData]:
    """The form of a write: a session that may write, and a CSRF token that matches it."""
    session = _session(request)
    if session is None:
        _refuse(403, "log in first")
    form = await _form(request)
    token = _field(form, "csrf_token")
    if token is None or not same_secret(token, session.csrf):
        _refuse(403, "the form's CSRF token is missing or wrong: reload the page and try again")
    if not session.can_write:
        _refuse(403, "this session is read-only")
    return session, form


router = APIRouter(include_in_schema=False)


@router.get("/")
async def home(request: Request) -> Response:
    """The users page, or the login page."""
    target = "/users" if _session(request) is not None else "/login"
    return RedirectResponse(url(request, target), status_code=303)


@router.get("/login")
async def login_page(request: Request) -> Response:
    """The login form."""
    return _login_form(request, error=None, status=200)


def _login_form(request: Request, *, error: str | None, status: int) -> Response:
    nonce, token = _state(request).sessions.login_nonce()
    response = _page(
        request,
        "login.html",
        {"title": "Log in", "login_token": token, "error": error},
        session=None,
        status=status,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=3600,
        path=_cookie_path(request),
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the token; on success, a session cookie and the users page."""
    state = _state(request)
    form = await _form(request)
    if not state.sessions.login_matches(
        request.cookies.get(LOGIN_COOKIE), _field(form, "login_token")
    ):
        return _login_form(request, error="The login form expired: try again.", status=403)
    address = request.client.host if request.client is not None else "unknown"
    token = form.get("token")
    role = state.tokens.role_of(token) if isinstance(token, str) and token else None
    if role is None:
        await state.throttle.failed(address)
        return _login_form(request, error="That token is not valid.", status=401)
    state.throttle.succeeded(address)
    _, cookie = state.sessions.issue(role)
    response = RedirectResponse(url(request, "/users"), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=SESSION_MAX_AGE,
        path=_cookie_path(request),
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(LOGIN_COOKIE, path=_cookie_path(request))
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the session (the form carries its CSRF token)."""
    session = _session(request)
    if session is not None:
        token = _field(await _form(request), "csrf_token")
        if token is None or not same_secret(token, session.csrf):
            _refuse(403, "the form's CSRF token is missing or wrong")
    response = RedirectResponse(url(request, "/login"), status_code=303)
    response.delete_cookie(
        SESSION_COOKIE,
        path=_cookie_path(request),
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    return response


@router.get("/users")
async def users(request: Request, prefix: str | None = None, after: str | None = None) -> Response:
    """Users in id order, a page at a time, maybe only those whose id starts with ``prefix``."""
    session = _require_session(request)
    prefix = prefix or None
    after = after or None
    accounts, cursor = await _state(request).users_page(
        prefix=prefix, after=after, limit=USERS_PAGE
    )
    return _page(
        request,
        "users.html",
        {
            "title": "Users",
            "rows": [present.summary_plain(account) for account in accounts],
            "prefix": prefix or "",
            "after": after,
            "next": cursor,
        },
        session=session,
    )


async def _user_page(
    request: Request,
    session: Session,
    user_id: str,
    *,
    older: int = 0,
    notice: str | None = None,
    error: str | None = None,
    status: int = 200,
) -> Response:
    state = _state(request)
    account = await state.stored(user_id)
    if account is None:
        raise ApiError(404, "No account for this user id.", "not_found")
    entries, more = await state.ledger_newest(user_id, skip=older, limit=LEDGER_PAGE)
    now = state.now()
    until = datetime.combine(now.date() + timedelta(days=1), time(), timezone.utc)
    since = until - timedelta(days=CHART_DAYS)
    rows = await state.meter.usage(
        user=user_id, since=since, until=until, by=("model", "period"), period="day"
    )
    chart = spend_chart(
        rows,
        periods_between(since, until, "day"),
        "day",
        title=f"Spend per day by model, last {CHART_DAYS} days",
        chart_id="user-spend",
    )
    return _page(
        request,
        "user.html",
        {
            "title": f"User {user_id}",
            "user": present.account_plain(account, state.meter.config, now),
            "entries": [present.entry_plain(entry) for entry in entries],
            "older": older,
            "newer": max(older - LEDGER_PAGE, 0) if older > 0 else None,
            "older_next": older + LEDGER_PAGE if more else None,
            "chart": chart,
            "notice": notice,
            "error": error,
            "request_id": secrets.token_urlsafe(16),
            "units": INTERVAL_UNITS,
        },
        session=session,
        status=status,
    )


@router.get("/user")
async def user(
    request: Request,
    user_id: Annotated[str | None, Query(alias="id")] = None,
    older: int = 0,
    done: str | None = None,
) -> Response:
    """One user: balance, holds, blocks, refill settings, ledger (newest first), spend chart."""
    session = _require_session(request)
    if not user_id:
        raise ApiError(422, "Give a user id.", "invalid_input")
    return await _user_page(request, session, user_id, older=older, notice=_NOTICES.get(done or ""))


async def _write(request: Request, action: str) -> Response:
    """Run one of the user page's forms; back to the user page with what happened."""
    session, form = await _writable_form(request)
    state = _state(request)
    user_id = _field(form, "user_id") or ""
    actor = Actor(role=session.role, via="console")
    reason = _field(form, "reason") or ""
    try:
        _validate.user_id(user_id)
        done = await _apply(state, actor, action, user_id=user_id, reason=reason, form=form)
    except CreditMeterError as exc:
        problem = from_library(exc)
        if problem.status >= 500:
            raise problem from exc
        if await state.stored(user_id) is None:
            raise problem from exc
        return await _user_page(
            request, session, user_id, error=problem.message, status=problem.status
        )
    return RedirectResponse(url(request, "/user", id=user_id, done=done), status_code=303)


async def _apply(
    state: ServerState, actor: Actor, action: str, *, user_id: str, reason: str, form: FormData
) -> str:
    amount = _field(form, "amount")
    request_id = _field(form, "request_id")
    if action == "grant":
        await state.grant(
            actor,
            user_id,
            amount or "",
            reason=reason,
            request_id=request_id,
            expires_at=_utc_time(_field(form, "expires_at")),
            priority=_int(_field(form, "priority"), "priority"),
        )
        return "granted"
    if action == "set":
        await state.set_balance(actor, user_id, amount or "", reason=reason, request_id=request_id)
        return "set"
    if action == "refill":
        entry = await state.refill(actor, user_id, reason=reason)
        return "refilled" if entry is not None else "no-refill"
    reset = _field(form, "reset") is not None
    unit = _field(form, "interval_unit")
    if unit is not None and unit not in INTERVAL_UNITS:
        raise InvalidInput(f"interval_unit must be one of {', '.join(INTERVAL_UNITS)}")
    await state.configure_refill(
        actor,
        user_id,
        reason=reason,
        reset=reset,
        enabled=None if reset else _field(form, "enabled") == "on",
        amount=None if reset else amount,
        interval_value=None if reset else _int(_field(form, "interval_value"), "interval_value"),
        interval_unit=None if reset else unit,  # type: ignore[arg-type]  # checked above
    )
    return "settings"


def _int(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 9:
        raise InvalidInput(f"{name} must be a whole number")
    return int(value)


def _utc_time(value: str | None) -> datetime | None:
    """A ``datetime-local`` field's value, read as UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput("expires_at must be a date and time (YYYY-MM-DDTHH:MM)") from None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed


@router.post("/user/grant")
async def grant(request: Request) -> Response:
    """The grant form."""
    return await _write(request, "grant")


@router.post("/user/set")
async def set_balance(request: Request) -> Response:
    """The set-balance form."""
    return await _write(request, "set")


@router.post("/user/refill")
async def refill(request: Request) -> Response:
    """The apply-a-refill form."""
    return await _write(request, "refill")


@router.post("/user/refill-settings")
async def refill_settings(request: Request) -> Response:
    """The refill-settings form."""
    return await _write(request, "refill-settings")


def _day(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError(422, f"{name} must be a date (YYYY-MM-DD)", "invalid_input") from None


def _usage_range(
    state: ServerState, since: str | None, until: str | None
) -> tuple[date, date, datetime, datetime]:
    """The chosen days ``[first, last]`` (default: the last 30 days) as UTC times."""
    today = state.now().date()
    last = _day(until, "until") or today
    first = _day(since, "since") or last - timedelta(days=CHART_DAYS - 1)
    if first > last:
        raise ApiError(422, "since must not be after until", "invalid_input")
    if (last - first).days > MAX_USAGE_DAYS:
        raise ApiError(422, "choose a range of at most five years", "invalid_input")
    start = datetime.combine(first, time(), timezone.utc)
    try:
        end = datetime.combine(last + timedelta(days=1), time(), timezone.utc)
    except OverflowError:
        raise ApiError(422, "until is too far in the future", "invalid_input") from None
    return first, last, start, end


@router.get("/usage")
async def usage(
    request: Request,
    since: str | None = None,
    until: str | None = None,
    user: str | None = None,
) -> Response:
    """Spend by user and model over a range of days, the chart, and a CSV link."""
    session = _require_session(request)
    state = _state(request)
    first, last, start, end = _usage_range(state, since, until)
    user_id = user or None
    rows = await state.meter.usage(user=user_id, since=start, until=end, by=("user", "model"))
    rows.sort(key=lambda row: (-row.cost, row.user_id or "", row.model or ""))
    period = pick_period(start, end)
    by_period = await state.meter.usage(
        user=user_id, since=start, until=end, by=("model", "period"), period=period
    )
    chart = spend_chart(
        by_period,
        periods_between(start, end, period),
        period,
        title=f"Spend per {period} by model, {first} to {last}",
        chart_id="usage-spend",
    )
    return _page(
        request,
        "usage.html",
        {
            "title": "Usage",
            "since": first.isoformat(),
            "until": last.isoformat(),
            "user": user_id or "",
            "rows": [present.usage_plain(row) for row in rows[:USAGE_ROWS_SHOWN]],
            "total_rows": len(rows),
            "shown": USAGE_ROWS_SHOWN,
            "chart": chart,
        },
        session=session,
    )


def _cell(value: str | None) -> str:
    """A CSV cell a spreadsheet will not run as a formula."""
    if value is None:
        return ""
    return f"'{value}" if value.startswith(_FORMULA_STARTS) else value


@router.get("/usage.csv")
async def usage_csv(
    request: Request,
    since: str | None = None,
    until: str | None = None,
    user: str | None = None,
) -> Response:
    """The usage page's table as CSV (every row)."""
    _require_session(request)
    state = _state(request)
    first, last, start, end = _usage_range(state, since, until)
    rows = await state.meter.usage(user=user or None, since=start, until=end, by=("user", "model"))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(
        [
            "user_id",
            "model",
            "calls",
            "input_tokens",
            "output_tokens",
            "cache_write_tokens",
            "cache_read_tokens",
            "cost",
            "charged",
        ]
    )
    for row in rows:
        writer.writerow(
            [
                _cell(row.user_id),
                _cell(row.model),
                row.calls,
                row.usage.input,
                row.usage.output,
                row.usage.cache_write,
                row.usage.cache_read,
                present.dec(row.cost),
                present.dec(row.charged),
            ]
        )
    name = f"creditmeter-usage-{first}-{last}.csv"
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
