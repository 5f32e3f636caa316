"""``CreditMeterMiddleware``: meter the OpenAI-compatible routes of an ASGI app.

A pure ASGI middleware (no framework import), for Starlette, FastAPI or any
ASGI server::

    app.add_middleware(CreditMeterMiddleware, meter=meter)   # FastAPI / Starlette
    app = CreditMeterMiddleware(app, meter)                    # any ASGI app

For each ``POST`` to one of ``paths`` it:

1. finds the user: the ``user_header`` (``X-User-Id``), or ``user(scope,
   headers)``; no user is a ``401``;
2. reads the JSON body and holds the prompt estimate plus ``max_tokens``
   (or ``max_completion_tokens``, ``max_output_tokens``; times ``n``) at the
   model's rates, before the app runs; a user who cannot pay gets ``402``
   with LibreChat's ``token_balance`` payload inside OpenAI's error shape
   (``InsufficientBalance.to_error_body``) and the app never runs;
3. replays the body to the app and watches what it sends: a JSON response
   is settled with its ``usage``; a ``text/event-stream`` response is passed
   on chunk by chunk while its ``data:`` events are parsed as they go by (only
   the current line is kept) and settled with the final usage event; an
   error status (``>= 400``) releases the hold;
4. settles a stream the client left early as incomplete (LibreChat's cancel
   rate on the usage seen, else on the estimate plus one output token per
   content chunk), and releases the hold of an app that raised without
   producing anything.

Each hold is resolved once, and before the response's end is passed on: a
client that has read the whole answer is already charged.

When the store fails (``StoreError``) before the app runs, ``on_store_error``
decides: ``"closed"`` (the default) answers ``503`` with a ``Retry-After``
header and an OpenAI-shaped error, and logs one line; ``"open"`` serves the
request unchecked (one warning) and charges it after. A charge the store
cannot take after the app ran is logged (one line) and reported to the
manager's ``on_event`` as an ``Unmetered`` event.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any, Literal

from creditmeter import _validate, rules
from creditmeter.aio import AsyncBalanceManager
from creditmeter.events import Unmetered
from creditmeter.exceptions import ConfigError, InsufficientBalance, InvalidInput, StoreError
from creditmeter.metering import OnStoreError, check_store_policy, report_unmetered
from creditmeter.models import Hold
from creditmeter.usage import MAX_TOKENS, StreamUsage, TokenUsage

__all__ = [
    "DEFAULT_PATHS",
    "ASGIApp",
    "CreditMeterMiddleware",
    "Estimator",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "UserResolver",
    "estimate_prompt_tokens",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UserResolver = Callable[[Scope, Mapping[str, str]], "str | Awaitable[str | None] | None"]
"""``user(scope, headers)``: the user id of a request (or ``None``); may be a coroutine."""

Estimator = Callable[[dict[str, Any]], int]
"""``estimate(body)``: the prompt's input tokens, from the parsed JSON request body."""

DEFAULT_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/messages")

MAX_EVENT_BYTES = 1 << 20
"""An SSE line or event longer than this is skipped rather than buffered (1 MiB)."""

MAX_JSON_BYTES = 16 << 20
"""A JSON response longer than this is passed on but not parsed for usage (16 MiB)."""

logger = logging.getLogger("creditmeter.asgi")

_LIMIT_NAMES = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_PROMPT_KEYS = ("messages", "input", "system", "instructions", "prompt")
# Parts of a request that are not text a tokenizer sees as such: roles, ids, media.
_SKIPPED_KEYS = frozenset(
    {
        "type",
        "role",
        "id",
        "tool_call_id",
        "call_id",
        "image_url",
        "source",
        "url",
        "data",
        "file_data",
        "file_id",
        "input_audio",
        "cache_control",
        "detail",
        "media_type",
    }
)
_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4

_PENDING: set[asyncio.Task[None]] = set()  # resolutions still running for a cancelled request


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """The default prompt estimate: about 4 characters per token, plus 4 per message.

    Counts the characters of every string in ``messages``, ``input``,
    ``system``, ``instructions`` and ``prompt`` (message text, content parts,
    tool-call arguments and results; not roles, ids, image or audio data),
    plus the JSON of ``tools``; divides by 4, rounding up, and adds 4 tokens
    per message or input item. At least 1. It sizes the hold, and is charged
    only when a response reports no usage.
    """
    chars = 0
    items = 0
    for key in _PROMPT_KEYS:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            items += len(value)
        chars += _text_length(value)
    tools = body.get("tools")
    if tools:
        chars += len(json.dumps(tools, separators=(",", ":"), default=str))
    return max(1, -(-chars // _CHARS_PER_TOKEN) + _TOKENS_PER_MESSAGE * items)


def _text_length(value: object) -> int:
    """The characters of the strings in a JSON value (iterative: any depth is safe)."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k not in _SKIPPED_KEYS)
    return total


class _Refusal(Exception):
    """A request answered by the middleware itself (400, 401, 402, 503)."""

    def __init__(
        self, status: int, payload: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(status)
        self.status = status
        self.payload = payload
        self.headers = list(headers)


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error") -> _Refusal:
    """An OpenAI-shaped error response."""
    return _Refusal(
        status, {"error": {"message": message, "type": kind, "param": None, "code": code}}
    )


class CreditMeterMiddleware:
    """Hold before, settle after: credits for every OpenAI-compatible call an ASGI app serves.

    ``meter`` is the ``AsyncBalanceManager`` to charge (its ``pricing`` prices
    the model named in the request body). ``paths`` are the metered routes
    (``POST`` only; other methods and paths pass through untouched).
    The user comes from the ``user_header`` request header, or from
    ``user(scope, headers)`` (headers lowercased; it may be async) when given;
    return ``None`` for "no user" (``401``). ``estimate(body)`` returns the
    prompt's input tokens (default: ``estimate_prompt_tokens``).
    ``on_store_error`` is what to do when the store fails before the app runs:
    answer ``503`` with ``Retry-After: retry_after`` (``"closed"``), or serve
    the request unchecked and charge it after (``"open"``).

    Put it inside any compression middleware: a compressed response body
    cannot be read for usage (it is then charged the estimate, with a warning).
    """

    def __init__(
        self,
        app: ASGIApp,
        meter: AsyncBalanceManager,
        *,
        paths: Iterable[str] = DEFAULT_PATHS,
        user_header: str = "x-user-id",
        user: UserResolver | None = None,
        estimate: Estimator | None = None,
        on_store_error: OnStoreError = "closed",
        retry_after: int = 5,
    ) -> None:
        if not isinstance(meter, AsyncBalanceManager):
            raise TypeError(
                f"CreditMeterMiddleware needs an AsyncBalanceManager, got {type(meter).__name__}"
            )
        if user is not None and not callable(user):
            raise TypeError(f"user= must be a callable (scope, headers) -> str | None: {user!r}")
        if estimate is not None and not callable(estimate):
            raise TypeError(f"estimate= must be a callable (body) -> int: {estimate!r}")
        if type(retry_after) is not int or retry_after < 0:
            raise ConfigError(f"retry_after must be a whole number of seconds, got {retry_after!r}")
        self.on_store_error = check_store_policy(on_store_error)
        self.retry_after = retry_after
        self.app = app
        self.meter = meter
        self.paths = frozenset([paths] if isinstance(paths, str) else paths)
        self.user_header = user_header.lower().encode("latin-1")
        self.user = user
        self.estimate = estimate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection: metered if it is a ``POST`` to one of ``paths``."""
        if scope["type"] != "http" or scope.get("method") != "POST" or not self._metered(scope):
            await self.app(scope, receive, send)
            return
        await _Exchange(self, scope, receive, send).run()

    def _metered(self, scope: Scope) -> bool:
        path: str = scope.get("path", "")
        if path in self.paths:
            return True
        root: str = scope.get("root_path", "")
        return bool(root) and path.startswith(root) and path[len(root) :] in self.paths

    async def _user_of(self, scope: Scope) -> str | None:
        raw: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
        if self.user is None:
            for name, value in raw:
                if name.lower() == self.user_header:
                    return value.decode("latin-1").strip() or None
            return None
        headers: dict[str, str] = {}
        for name, value in raw:
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        found = self.user(scope, headers)
        if inspect.isawaitable(found):
            found = await found
        return found

    def _prompt_tokens(self, body: dict[str, Any]) -> int:
        if self.estimate is None:
            return estimate_prompt_tokens(body)
        found = self.estimate(body)
        if type(found) is not int or not 0 <= found <= MAX_TOKENS:
            raise TypeError(f"estimate= must return a whole number of tokens, got {found!r}")
        return found


Mode = Literal["json", "sse", "error", "opaque"]


class _Exchange:
    """One metered request: its hold, and what the app's response tells about its cost."""

    def __init__(
        self, middleware: CreditMeterMiddleware, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.middleware = middleware
        self.meter = middleware.meter
        self.scope = scope
        self._receive = receive
        self._send = send
        self.body: bytes | None = None  # the request body, until replayed to the app
        self.user = ""
        self.unchecked = False  # the store failed before the app: no hold, charge after
        self.model: str | None = None
        self.prompt = 0
        self.hold: Hold | None = None
        self.status: int | None = None
        self.mode: Mode = "opaque"
        self.stream_requested = False
        self.json_body: bytearray | None = None
        self.sse: _SSEParser | None = None
        self.seen = StreamUsage()
        self.done = False  # an SSE ``[DONE]`` was seen
        self.complete = False  # the response's last body message was sent
        self.disconnected = False  # the client went away before the response ended
        self.resolved = False
        self.outcome: tuple[TokenUsage | None, bool] | None = None  # decided, maybe not committed

    # --- before the app ---------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._begin()
        except _Refusal as refusal:
            await _reply(self._send, refusal.status, refusal.payload, refusal.headers)
            return
        if self.hold is None and not self.unchecked:  # the client left while sending its request
            return
        try:
            await self.middleware.app(self.scope, self.receive, self.send)
        except BaseException:
            await self._end(failed=True)
            raise
        await self._end(failed=False)

    async def _begin(self) -> None:
        user = await self.middleware._user_of(self.scope)  # noqa: SLF001 - its own helper
        if user is None:
            header = self.middleware.user_header.decode()
            hint = "" if self.middleware.user is not None else f": send the {header} header"
            raise _error(401, f"no user{hint}", "missing_user", "authentication_error")
        try:
            user = self.user = _validate.user_id(user)
        except InvalidInput as exc:
            raise _error(400, str(exc), "invalid_user") from None
        raw = await self._read_body()
        if raw is None:
            return
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            raise _error(400, "the request body must be a JSON object", "invalid_json")
        self.body = raw
        self.stream_requested = body.get("stream") is True
        self.model, completion = _sizing(body)
        self.prompt = self.middleware._prompt_tokens(body)  # noqa: SLF001 - its own helper
        try:
            amount = rules.hold_size(
                self.meter.pricing,
                self.model,
                prompt=TokenUsage(input=self.prompt),
                max_output=completion,
            )
            self.hold = await self.meter.hold(user, amount)
        except InsufficientBalance as refused:
            payload = InsufficientBalance(
                refused.user_id,
                balance=refused.balance,
                available=refused.available,
                cost=refused.cost,
                prompt_tokens=self.prompt,
            ).to_error_body()
            raise _Refusal(402, payload) from None
        except InvalidInput as exc:
            raise _error(400, str(exc), "invalid_request") from None
        except StoreError as exc:
            self._store_failed(exc)

    def _store_failed(self, exc: StoreError) -> None:
        """The store failed before the app: refuse with 503, or serve unchecked (the policy)."""
        middleware = self.middleware
        if middleware.on_store_error == "open":
            logger.warning(
                "the store failed before a request of user %r (%s); serving it unchecked "
                "(on_store_error='open')",
                self.user,
                exc,
            )
            self.unchecked = True
            return
        logger.error(
            "the store failed before a request of user %r (%s); answered 503", self.user, exc
        )
        refusal = _error(
            503,
            "the credit store is unavailable: try again later",
            "store_unavailable",
            "service_unavailable",
        )
        refusal.headers.append((b"retry-after", str(middleware.retry_after).encode()))
        raise refusal from None

    async def _read_body(self) -> bytes | None:
        chunks: list[bytes] = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return None
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return b"".join(chunks)

    # --- while the app runs -------------------------------------------------------

    async def receive(self) -> Message:
        """The app's ``receive``: the buffered body once, then the client's messages."""
        body = self.body
        if body is not None:
            self.body = None
            return {"type": "http.request", "body": body, "more_body": False}
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.complete:
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        """The app's ``send``: every message passed on as it comes, after a look at it."""
        kind = message["type"]
        delivered = self.seen.content_chunks
        if kind == "http.response.start":
            self._start(message)
        elif kind == "http.response.body" and not self.complete:
            self.complete = not message.get("more_body", False)
            if not self.resolved:
                self._observe(message.get("body", b""))
                if self.complete or (self.mode == "sse" and (self.done or self.seen.finished)):
                    await self._resolve(self._outcome_of_complete())
        try:
            await self._send(message)
        except Exception:
            # The client is gone: what this message carried never reached it.
            self.disconnected = True
            self.seen.content_chunks = delivered
            raise

    def _start(self, message: Message) -> None:
        status: int = message["status"]
        self.status = status
        content_type = b""
        encoding = b""
        for name, value in message.get("headers", ()):
            lowered = name.lower()
            if lowered == b"content-type":
                content_type = value.lower()
            elif lowered == b"content-encoding":
                encoding = value.strip().lower()
        if status >= 400:
            self.mode = "error"
        elif encoding not in (b"", b"identity"):
            self.mode = "opaque"
        elif content_type.startswith(b"text/event-stream") or (
            not content_type and self.stream_requested
        ):
            self.mode = "sse"
            self.sse = _SSEParser()
        elif b"json" in content_type.partition(b";")[0]:
            self.mode = "json"
            self.json_body = bytearray()
        else:
            self.mode = "opaque"

    def _observe(self, chunk: bytes) -> None:
        if self.mode == "sse":
            assert self.sse is not None
            events = self.sse.feed(chunk)
            if self.complete:
                events.extend(self.sse.close())
            for data in events:
                self._event(data)
        elif self.mode == "json" and self.json_body is not None:
            if len(self.json_body) + len(chunk) > MAX_JSON_BYTES:
                self.json_body = None
            else:
                self.json_body += chunk

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return  # not JSON: a comment-like event, nothing to count
        if not isinstance(event, dict):
            return
        try:
            self.seen.add(event)
        except InvalidInput as exc:
            logger.warning("unreadable usage in a stream event of %s: %s", self.model, exc)

    # --- what to charge -------------------------------------------------------------

    def _estimate(self, content_chunks: int = 0) -> TokenUsage:
        return TokenUsage(input=self.prompt, output=content_chunks)

    def _missing(self, problem: str, fallback: TokenUsage) -> tuple[TokenUsage, bool]:
        logger.warning(
            "%s for user %r, model %r; charging the estimate (%d input, %d output tokens)",
            problem,
            self.user,
            self.model,
            fallback.prompt_total,
            fallback.output,
        )
        return fallback, False

    def _json_usage(self) -> TokenUsage | None:
        if not self.json_body:
            return None
        try:
            return TokenUsage.from_response(json.loads(self.json_body))
        except (ValueError, RecursionError) as exc:  # InvalidInput is a ValueError
            logger.warning("unreadable usage in a response of %s: %s", self.model, exc)
            return None

    def _outcome_of_complete(self) -> tuple[TokenUsage | None, bool]:
        """What a response that ended (or finished its stream) costs: (usage, incomplete)."""
        if self.mode == "error":
            return None, False
        if self.mode == "sse":
            return self._stream_outcome(complete=True)
        if self.mode == "json":
            found = self._json_usage()
            if found is not None:
                return found, False
            return self._missing("no usage in the JSON response", self._estimate())
        return self._missing("a response that is neither JSON nor a stream", self._estimate())

    def _stream_outcome(self, *, complete: bool) -> tuple[TokenUsage | None, bool]:
        """As the ``metered`` decorator settles a stream (``metering._Meter.settle_stream``)."""
        seen = self.seen
        complete = complete or seen.finished
        guess = self._estimate(seen.content_chunks)
        reported = seen.usage
        if reported is None:
            if complete:
                return self._missing("no usage reported by the stream", guess)
            return guess, True
        if not complete and reported.output < seen.content_chunks:
            reported = TokenUsage(
                input=reported.input,
                output=seen.content_chunks,
                cache_write=reported.cache_write,
                cache_read=reported.cache_read,
            )
        return reported, not complete

    def _outcome_of_cut(self, *, failed: bool) -> tuple[TokenUsage | None, bool]:
        """What a response that never ended costs.

        A client that left is charged for what was produced (a model was
        called); an app that failed is charged only for what it sent.
        """
        if self.status is None or self.mode == "error":
            return None, False
        gone = self.disconnected or not failed
        if self.mode == "sse":
            if not gone and self.seen.usage is None and self.seen.content_chunks == 0:
                return None, False
            return self._stream_outcome(complete=False)
        found = self._json_usage() if self.mode == "json" else None
        if found is not None:
            return found, False
        return (self._estimate(), True) if gone else (None, False)

    async def _resolve(self, outcome: tuple[TokenUsage | None, bool]) -> None:
        """Settle or release the hold (or charge, unchecked), once; a failure is logged."""
        self.outcome = outcome
        hold = self.hold
        spent, incomplete = outcome
        try:
            if hold is None:  # served unchecked
                if spent is not None:
                    await self.meter.charge(
                        self.user, model=self.model, usage=spent, incomplete=incomplete
                    )
            elif spent is None:
                await self.meter.release(hold)
            else:
                await self.meter.settle(hold, model=self.model, usage=spent, incomplete=incomplete)
        except StoreError as exc:
            self._unresolved(exc, hold, spent, incomplete=incomplete)
        except Exception:
            logger.exception("resolving the request of user %r failed", self.user)
        self.resolved = True

    def _unresolved(
        self, exc: StoreError, hold: Hold | None, spent: TokenUsage | None, *, incomplete: bool
    ) -> None:
        """The store failed after the app: report the lost charge, or the hold left to lapse."""
        if spent is not None:
            event = Unmetered(
                user_id=self.user,
                operation="charge" if hold is None else "settle",
                error=str(exc),
                model=self.model,
                usage=spent,
                incomplete=incomplete,
            )
            report_unmetered(self.meter, event, what="a request", log=logger)
        elif hold is not None:
            logger.warning(
                "the store failed to release the hold %s of user %r (%s); it lapses at %s",
                hold.id,
                self.user,
                exc,
                hold.expires_at.isoformat(),
            )

    async def _end(self, *, failed: bool) -> None:
        """After the app: resolve the hold if the response did not (shielded from cancellation)."""
        if self.resolved:
            return
        # A resolution interrupted midway is run again as decided: resolving is idempotent.
        outcome = self.outcome if self.outcome is not None else self._outcome_of_cut(failed=failed)
        task = asyncio.ensure_future(self._resolve(outcome))
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)
        await asyncio.shield(task)


def _sizing(body: Mapping[str, Any]) -> tuple[str | None, int]:
    """The request's model and the most completion tokens it may produce (0: no limit given)."""
    model = body.get("model")
    if model is not None:
        try:
            model = _validate.optional_text(model, name="model")
        except InvalidInput as exc:
            raise _error(400, str(exc), "invalid_model") from None
    completion = 0
    for name in _LIMIT_NAMES:
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or not 0 <= value <= MAX_TOKENS:
            raise _error(400, f"{name} must be a whole number in 0..10**10", "invalid_value")
        completion = value
        break
    choices = body.get("n")
    if type(choices) is int and choices > 1:
        completion = min(completion * choices, MAX_TOKENS)
    return model, completion


class _SSEParser:
    """Server-sent events, fed chunk by chunk: keeps one partial line and one event's data."""

    __slots__ = ("_data", "_partial", "_skipping")

    def __init__(self) -> None:
        self._partial = b""
        self._data: bytes | None = None
        self._skipping = False  # inside a line too long to keep

    def feed(self, chunk: bytes) -> list[bytes]:
        """Take a chunk; return the data of the events it completed."""
        if not chunk:
            return []
        lines = (self._partial + chunk if self._partial else chunk).split(b"\n")
        self._partial = lines.pop()
        events: list[bytes] = []
        for line in lines:
            if self._skipping:
                self._skipping = False  # the rest of an oversized line
                continue
            self._line(line[:-1] if line.endswith(b"\r") else line, events)
        if len(self._partial) > MAX_EVENT_BYTES:
            self._partial = b""
            self._skipping = True
        return events

    def close(self) -> list[bytes]:
        """The stream ended: the data of an event left without its closing blank line."""
        events: list[bytes] = []
        if self._partial and not self._skipping:
            self._line(self._partial.rstrip(b"\r"), events)
        self._partial = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data is not None:
                events.append(self._data)
                self._data = None
            return
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            if self._data is None:
                self._data = value
            elif len(self._data) + len(value) <= MAX_EVENT_BYTES:
                self._data += b"\n" + value
        # Other fields (event:, id:, retry:) and comments tell nothing about usage.


async def _reply(
    send: Send, status: int, payload: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
