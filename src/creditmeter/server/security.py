"""Who may do what: bearer tokens, console sessions, CSRF tokens, login slowdown, headers.

- ``Tokens`` compares a presented token with the admin and read tokens in
  constant time (``hmac.compare_digest`` over both, whatever matches).
- ``Sessions`` signs the console's session cookie (itsdangerous, a key
  derived from the admin token): the role, a CSRF token, and a fingerprint of
  the token that logged in, so a session ends when its token is changed.
- ``LoginThrottle`` delays failed logins per client address with an
  ``asyncio.sleep`` that doubles per failure (capped), in a bounded LRU
  table, so a guesser slows down and no other request waits.
- ``SecurityHeaders`` is a pure ASGI middleware that adds the security
  headers to every response the app sends (errors and static files too).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.exceptions import HTTPException

from creditmeter.exceptions import ConfigError

__all__ = [
    "CSP",
    "MAX_BODY_BYTES",
    "SESSION_COOKIE",
    "BodyLimit",
    "LoginThrottle",
    "Role",
    "SecurityHeaders",
    "Session",
    "Sessions",
    "Tokens",
    "same_secret",
]

SESSION_COOKIE = "creditmeter_session"
LOGIN_COOKIE = "creditmeter_login"
SESSION_MAX_AGE = 12 * 3600
"""Seconds a console session lasts after login."""
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 1024

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]


class Role(str, enum.Enum):
    """What a token may do: ``ADMIN`` reads and writes, ``READ`` only reads."""

    ADMIN = "admin"
    READ = "read"


def same_secret(given: str, expected: str) -> bool:
    """Compare two secrets in time that depends only on their lengths."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def _check_token(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not MIN_TOKEN_LENGTH <= len(value) <= MAX_TOKEN_LENGTH:
        raise ConfigError(
            f"{name} must have {MIN_TOKEN_LENGTH} to {MAX_TOKEN_LENGTH} characters "
            f"(got {len(value)}): make one with 'python -c \"import secrets; "
            "print(secrets.token_urlsafe(32))\"'"
        )
    if not value.isprintable() or value != value.strip():
        raise ConfigError(f"{name} must be printable, without spaces at either end")
    return value


class Tokens:
    """The admin token and the optional read token, checked at construction."""

    def __init__(self, admin_token: object, read_token: object = None) -> None:
        self.admin = _check_token(admin_token, "admin_token")
        self.read = None if read_token is None else _check_token(read_token, "read_token")
        if self.read is not None and same_secret(self.read, self.admin):
            raise ConfigError("read_token must differ from admin_token")

    def role_of(self, presented: str) -> Role | None:
        """The role the presented token grants, or ``None``; both are always compared."""
        is_admin = same_secret(presented, self.admin)
        is_read = self.read is not None and same_secret(presented, self.read)
        if is_admin:
            return Role.ADMIN
        return Role.READ if is_read else None

    def token_of(self, role: Role) -> str | None:
        """The token that grants ``role`` (``None``: no read token was given)."""
        return self.admin if role is Role.ADMIN else self.read


@attrs.frozen(kw_only=True)
class Session:
    """A logged-in console session: its role and the CSRF token its forms carry."""

    role: Role
    csrf: str

    @property
    def can_write(self) -> bool:
        """Whether the session may change balances."""
        return self.role is Role.ADMIN


class Sessions:
    """Signs and reads the console's session cookie and the login form's token."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens
        key = hmac.new(tokens.admin.encode(), b"creditmeter console session", "sha256").digest()
        self._key = key
        self._signer = URLSafeTimedSerializer(key, salt="creditmeter.session")
        self._login = URLSafeTimedSerializer(key, salt="creditmeter.login")

    def _fingerprint(self, role: Role) -> str:
        token = self.tokens.token_of(role) or ""
        return hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self, role: Role) -> tuple[Session, str]:
        """A new session for ``role`` and the cookie value that carries it."""
        session = Session(role=role, csrf=secrets.token_urlsafe(32))
        payload = {"r": role.value, "c": session.csrf, "f": self._fingerprint(role)}
        return session, self._signer.dumps(payload)

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, or ``None`` (absent, forged, expired or revoked)."""
        if not cookie or len(cookie) > 4096:
            return None
        try:
            payload = self._signer.loads(cookie, max_age=SESSION_MAX_AGE)
        except BadSignature:
            return None
        if not isinstance(payload, dict) or payload.get("r") not in {"admin", "read"}:
            return None
        role = Role(payload["r"])
        csrf, fingerprint = payload.get("c"), payload.get("f")
        if not isinstance(csrf, str) or not isinstance(fingerprint, str):
            return None
        if self.tokens.token_of(role) is None or not same_secret(
            fingerprint, self._fingerprint(role)
        ):
            return None
        return Session(role=role, csrf=csrf)

    def login_nonce(self) -> tuple[str, str]:
        """A nonce for the login cookie and the signed form token that must match it."""
        nonce = secrets.token_urlsafe(24)
        return nonce, self._login.dumps(nonce)

    def login_matches(self, cookie: str | None, form_token: str | None) -> bool:
        """Whether the login form's token was made for the nonce in the browser's cookie."""
        if not cookie or not form_token or len(form_token) > 1024:
            return False
        try:
            nonce = self._login.loads(form_token, max_age=3600)
        except BadSignature:
            return False
        return isinstance(nonce, str) and same_secret(cookie, nonce)


class LoginThrottle:
    """Slows failed logins per client address; remembers at most ``capacity`` addresses.

    After ``n`` failures within ``window`` seconds, the next failed attempt
    from that address waits ``base * 2 ** (n - 1)`` seconds (at most
    ``cap``) before it is answered. The wait is an ``asyncio.sleep``: other
    requests go on. A success forgets the address.
    """

    def __init__(
        self,
        *,
        base: float = 0.25,
        cap: float = 5.0,
        window: float = 900.0,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base, self.cap, self.window, self.capacity = base, cap, window, capacity
        self._clock = clock
        self._sleep = sleep
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def delay_for(self, address: str) -> float:
        """How long the next failure from ``address`` waits."""
        found = self._failures.get(address)
        if found is None or self._clock() - found[1] > self.window:
            return 0.0
        return min(self.base * 2.0 ** (found[0] - 1), self.cap)

    async def failed(self, address: str) -> None:
        """Record a failure from ``address`` and wait before it is answered."""
        delay = self.delay_for(address)
        found = self._failures.pop(address, None)
        now = self._clock()
        count = 1 if found is None or now - found[1] > self.window else found[0] + 1
        self._failures[address] = (min(count, 64), now)
        while len(self._failures) > self.capacity:
            self._failures.popitem(last=False)
        if delay > 0:
            await self._sleep(delay)

    def succeeded(self, address: str) -> None:
        """Forget the failures of ``address``."""
        self._failures.pop(address, None)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SecurityHeaders:
    """Adds CSP, no framing, nosniff, no referrer and no caching (but for static files)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the headers to the response's start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        static = "/static/" in path

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(item for item in _HEADERS if item[0] not in present)
                if b"cache-control" not in present:
                    cache = b"public, max-age=3600" if static else b"no-store"
                    headers.append((b"cache-control", cache))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


MAX_BODY_BYTES = 1 << 20
"""The largest request body the app reads (1 MiB); a larger one is answered 413."""

_TOO_LARGE = (
    b'{"error":{"message":"the request body is larger than 1 MiB","type":'
    b'"invalid_request_error","param":null,"code":"body_too_large"}}'
)


class BodyLimit:
    """Refuses request bodies above ``MAX_BODY_BYTES`` (by Content-Length, or as they arrive)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, counting its body."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _refuse_large(send)
                return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, "the request body is larger than 1 MiB")
            return message

        await self.app(scope, counting_receive, send)


async def _refuse_large(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_TOO_LARGE)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _TOO_LARGE, "more_body": False})
