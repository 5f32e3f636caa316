"""``create_app``: the console and the JSON API as one FastAPI application."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from creditmeter._version import __version__
from creditmeter.aio import AsyncBalanceManager
from creditmeter.exceptions import CreditMeterError
from creditmeter.server import api, console
from creditmeter.server.errors import ApiError, body_of, from_library, validation_message
from creditmeter.server.security import (
    BodyLimit,
    LoginThrottle,
    SecurityHeaders,
    Sessions,
    Tokens,
)
from creditmeter.server.state import ServerState

__all__ = ["create_app"]

logger = logging.getLogger("creditmeter.server")

_STATIC = Path(__file__).parent / "static"
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}
_DESCRIPTION = """\
Balances, the ledger and usage of creditmeter, and metering for gateways in any language.

Send `Authorization: Bearer <token>`: the read token reads; the admin token reads and
writes. Amounts are decimal strings (`"1500"`, `"0.25"`). Every error is
`{"error": {"message", "type", "param", "code"}}`; `402` (insufficient balance) adds
LibreChat's `type: "token_balance"`, `balance`, `tokenCost` and `promptTokens`.
"""


def create_app(
    meter: AsyncBalanceManager,
    *,
    admin_token: str,
    read_token: str | None = None,
) -> FastAPI:
    """The console and the JSON API over ``meter``, as an ASGI app to serve or mount.

    ``admin_token`` reads and writes; ``read_token`` (optional) only reads.
    Tokens must have 16 to 1024 printable characters, and differ
    (``ConfigError`` otherwise). The app does not close ``meter``: its owner
    does. Mount it anywhere (``gateway.mount("/admin", app)``): its links
    follow the mount path.

    Raises ``TypeError`` unless ``meter`` is an ``AsyncBalanceManager`` (for a
    store used by a ``BalanceManager``, open the same URL with
    ``open_async_store`` and give an ``AsyncBalanceManager`` over it).
    """
    if not isinstance(meter, AsyncBalanceManager):
        raise TypeError(
            "create_app needs an AsyncBalanceManager (the server is async), got "
            f"{type(meter).__name__}: open the store with open_async_store() and wrap it in "
            "AsyncBalanceManager"
        )
    tokens = Tokens(admin_token, read_token)
    app = FastAPI(
        title="creditmeter",
        version=__version__,
        description=_DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.creditmeter = ServerState(
        meter=meter, tokens=tokens, sessions=Sessions(tokens), throttle=LoginThrottle()
    )
    app.include_router(api.router)
    app.include_router(console.router)
    app.mount("/static", StaticFiles(directory=_STATIC), name="static")
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)
    _handle_errors(app)
    return app


def _route_path(request: Request) -> str:
    path = str(request.scope.get("path", ""))
    root = str(request.scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


def _is_api(request: Request) -> bool:
    path = _route_path(request)
    return path == "/api" or path.startswith("/api/")


def _answer(request: Request, error: ApiError) -> Response:
    if _is_api(request):
        return JSONResponse(error.payload(), status_code=error.status, headers=error.headers)
    response = console.render_error(request, error.status, error.message)
    response.headers.update(error.headers)
    return response


def _handle_errors(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _answer(request, exc)

    async def library_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CreditMeterError)
        return _answer(request, from_library(exc))

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        if errors and isinstance(errors[0], dict) and errors[0].get("type") == "json_invalid":
            return _answer(request, ApiError(400, "the body is not valid JSON", "invalid_json"))
        message, field = validation_message(errors)
        return _answer(request, ApiError(422, message, "invalid_request", param=field))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = _CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "the request failed"
        headers = dict(exc.headers or {})
        return _answer(request, ApiError(exc.status_code, message, code, headers=headers))

    async def redirect(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, console.ConsoleRedirect)
        return RedirectResponse(exc.location, status_code=303)

    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.error("unexpected error serving %s", _route_path(request), exc_info=exc)
        if _is_api(request):
            return JSONResponse(body_of(500, "internal error", "internal_error"), status_code=500)
        return console.render_error(request, 500, "Internal error.")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(CreditMeterError, library_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(console.ConsoleRedirect, redirect)
    app.add_exception_handler(Exception, unexpected)
