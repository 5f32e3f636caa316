"""One error shape for the JSON API, and which HTTP status each creditmeter error gets.

Every error the API answers is OpenAI's error object, as the ASGI middleware
answers too::

    {"error": {"message": "...", "type": "...", "param": null | "field", "code": "..."}}

An ``InsufficientBalance`` is ``402`` with ``InsufficientBalance.to_error_body()``:
that object plus LibreChat's ``token_balance`` payload (``type``,
``balance``, ``tokenCost``, ``promptTokens``). A store that fails is ``503``
with ``Retry-After`` and a message that names no backend detail (the details
are logged). Bad input (``InvalidInput``, ``ConfigError``, or a request that
does not match the schema) is ``422``; a malformed JSON body ``400``.

| error | status | code |
| --- | --- | --- |
| request body or parameter fails the schema | 422 | ``invalid_request`` |
| ``InvalidInput`` / ``ConfigError`` | 422 | ``invalid_input`` |
| body is not JSON | 400 | ``invalid_json`` |
| no or bad token | 401 | ``unauthorized`` |
| read token on a write | 403 | ``forbidden`` |
| no such account / route | 404 | ``not_found`` |
| ``InsufficientBalance`` | 402 | ``token_balance`` |
| ``IdempotencyConflict`` | 409 | ``idempotency_conflict`` |
| ``StoreError`` / retries exhausted | 503 | ``store_unavailable`` / ``contention`` |
"""

from __future__ import annotations

import logging
from typing import Any

from creditmeter.exceptions import (
    ConfigError,
    CreditMeterError,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
    StoreError,
    VersionConflict,
)

__all__ = ["RETRY_AFTER", "ApiError", "body_of", "from_library", "validation_message"]

logger = logging.getLogger("creditmeter.server")

RETRY_AFTER = 1
"""Seconds a client is told to wait (``Retry-After``) after a ``503``."""

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An HTTP error answered in the one JSON shape (see the module)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        *,
        param: str | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.body = body
        self.headers = dict(headers or {})

    def payload(self) -> dict[str, Any]:
        """The JSON body of this error."""
        if self.body is not None:
            return self.body
        return body_of(self.status, self.message, self.code, self.param)


def body_of(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The one error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_library(exc: CreditMeterError) -> ApiError:
    """The HTTP answer to an error the manager raised."""
    if isinstance(exc, InsufficientBalance):
        return ApiError(402, str(exc), "token_balance", body=exc.to_error_body())
    if isinstance(exc, (InvalidInput, ConfigError)):
        return ApiError(422, str(exc), "invalid_input")
    if isinstance(exc, IdempotencyConflict):
        return ApiError(409, str(exc), "idempotency_conflict", param="request_id")
    if isinstance(exc, VersionConflict):
        logger.warning("a write gave up after its retries: %s", exc)
        return ApiError(
            503,
            "the account is too busy right now: try again",
            "contention",
            headers={"Retry-After": str(RETRY_AFTER)},
        )
    if isinstance(exc, StoreError):
        logger.error("the store failed: %s", exc)
    else:  # DuplicateRequest never leaves a manager; anything new is treated as an outage
        logger.error("unexpected creditmeter error: %r", exc)
    return ApiError(
        503,
        "the credit store is unavailable: try again later",
        "store_unavailable",
        headers={"Retry-After": str(RETRY_AFTER)},
    )


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """A short message and the offending field from FastAPI's validation errors.

    The submitted values are never repeated (they might hold a secret pasted
    into the wrong field).
    """
    if not errors:
        return "the request is not valid", None
    first = errors[0] if isinstance(errors[0], dict) else {}
    where = [str(part) for part in first.get("loc", ()) if part not in {"body", "query", "path"}]
    field = ".".join(where) or None
    problem = str(first.get("msg", "is not valid"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if field is None:
        return f"the request is not valid: {problem}{more}", None
    return f"{field}: {problem}{more}", field
