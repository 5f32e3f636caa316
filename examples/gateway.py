"""An OpenAI-compatible gateway that meters every call with creditmeter.

FastAPI + uvicorn, with ``CreditMeterMiddleware`` in front of
``/v1/chat/completions`` (plain and streamed), balances in an SQLite file, and
the ``balance:`` section of a LibreChat ``librechat.yaml``. Calls are forwarded
to an upstream OpenAI-compatible API; without ``--upstream`` they go to a fake
one built in (in process, no network), so the example runs as it is::

    python examples/gateway.py --port 8080 [--store sqlite:///credits.db]
        [--config librechat.yaml] [--upstream https://api.openai.com/v1]

Requests name their user in the ``X-User-Id`` header. The gateway trusts that
header: put it behind something that sets it (LibreChat's custom endpoints
can send ``X-User-Id: "{{LIBRECHAT_USER_ID}}"``), or pass ``user=`` to the
middleware to derive the user from your own authentication.

Needs ``pip install creditmeter[gateway]`` (fastapi, uvicorn, httpx) and, for
``--config``, PyYAML.

A request body that is not a chat completion request (not JSON, no
``model``, ``messages`` that is not a list of message objects, ...) gets a
``400`` in OpenAI's error shape and is never forwarded. A bad ``--config`` or
``--store`` stops the gateway at start with one line on stderr (exit status
2; 1 when the store cannot be opened). With the store down, requests get
``503`` and ``Retry-After`` (the middleware's ``on_store_error="closed"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from creditmeter import (
    AsyncBalanceManager,
    BalanceConfig,
    ConfigError,
    StoreError,
    load_config,
    open_async_store,
)
from creditmeter.integrations.asgi import CreditMeterMiddleware

DEFAULT_STORE = "sqlite:///creditmeter.db"
FAKE_UPSTREAM = "http://fake-upstream/v1"
FAKE_REPLY = "Hello! This answer comes from the fake upstream built into the creditmeter gateway."
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
LIMITS = ("max_tokens", "max_completion_tokens")


# --- what a chat completion request must look like ----------------------------------------


def invalid_request(message: str, param: str | None, code: str) -> JSONResponse:
    """A 400 answer in OpenAI's error shape."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=400)


def request_problem(body: Any) -> tuple[str, str | None, str] | None:
    """What is wrong with a chat completion request body: (message, param, code), or None."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object", None, "invalid_json"
    return _model_problem(body) or _messages_problem(body) or _options_problem(body)


def _model_problem(body: dict[str, Any]) -> tuple[str, str, str] | None:
    model = body.get("model")
    if model is None:
        return "you must provide a model parameter", "model", "missing_required_parameter"
    if not isinstance(model, str) or not model.strip():
        return "model must be a non-empty string", "model", "invalid_type"
    return None


def _messages_problem(body: dict[str, Any]) -> tuple[str, str, str] | None:
    messages = body.get("messages")
    if messages is None:
        return "you must provide a messages parameter", "messages", "missing_required_parameter"
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty array of messages", "messages", "invalid_type"
    for n, message in enumerate(messages):
        problem = _message_problem(message, f"messages[{n}]")
        if problem is not None:
            return problem
    return None


def _options_problem(body: dict[str, Any]) -> tuple[str, str, str] | None:
    for name in ("stream", "logprobs"):
        if name in body and not isinstance(body[name], bool):
            return f"{name} must be true or false", name, "invalid_type"
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return "stream_options must be an object", "stream_options", "invalid_type"
    for name, most in ((LIMITS[0], None), (LIMITS[1], None), ("n", 128)):
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or value < 1 or (most is not None and value > most):
            bound = "" if most is None else f" and at most {most}"
            return f"{name} must be a whole number of at least 1{bound}", name, "invalid_value"
    return None


def _message_problem(message: Any, where: str) -> tuple[str, str, str] | None:
    if not isinstance(message, dict):
        return f"{where} must be an object", where, "invalid_type"
    role = message.get("role")
    if role not in ROLES:
        return (
            f"{where}.role must be one of {', '.join(sorted(ROLES))}",
            f"{where}.role",
            "invalid_value",
        )
    content = message.get("content")
    if content is None or isinstance(content, str):
        return None
    if not isinstance(content, list):
        return (
            f"{where}.content must be a string or an array of parts",
            f"{where}.content",
            "invalid_type",
        )
    for n, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            return (
                f"{where}.content[{n}] must be an object with a type",
                f"{where}.content[{n}]",
                "invalid_type",
            )
    return None


async def read_request(request: Request) -> dict[str, Any] | JSONResponse:
    """The request's JSON body, or the 400 answer saying what is wrong with it."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        return invalid_request("the request body must be JSON", None, "invalid_json")
    problem = request_problem(body)
    if problem is not None:
        return invalid_request(*problem)
    return body


# --- the built-in fake upstream -------------------------------------------------------


def fake_upstream() -> FastAPI:
    """A tiny OpenAI look-alike: one prompt token per word, one completion token per word."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_request(request)
        if isinstance(body, Response):
            return body
        model = body["model"]
        prompt = sum(len(_text(m.get("content")).split()) for m in body["messages"])
        words = FAKE_REPLY.split()
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and limit < len(words):
            words = words[:limit]
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(words),
            "total_tokens": prompt + len(words),
        }
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": model}
        finish = "stop" if len(words) == len(FAKE_REPLY.split()) else "length"
        if not body.get("stream"):
            message = {"role": "assistant", "content": " ".join(words)}
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return JSONResponse(
                {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            _fake_stream(base, words, finish, usage if include_usage else None),
            media_type="text/event-stream",
        )

    return app


async def _fake_stream(
    base: dict[str, Any], words: list[str], finish: str, usage: dict[str, int] | None
) -> AsyncIterator[bytes]:
    chunk = {**base, "object": "chat.completion.chunk"}
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    yield _event({**chunk, "choices": [first]})
    for n, word in enumerate(words):
        delta = {"content": word if n == 0 else " " + word}
        yield _event({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    yield _event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage is not None:
        yield _event({**chunk, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


# --- the gateway ------------------------------------------------------------------------


def balance_config(path: str | None) -> BalanceConfig:
    """LibreChat's config: the yaml's ``balance:`` over ``CHECK_BALANCE``/``START_BALANCE``.

    Without a file, balances are on (LibreChat's default is off, which would
    make this example record charges without moving any credits).
    """
    if path is not None:
        return load_config(path)
    return load_config(env={"CHECK_BALANCE": "true", **os.environ})


def create_app(
    *,
    store: str = DEFAULT_STORE,
    config: BalanceConfig | None = None,
    upstream: str | None = None,
    api_key: str | None = None,
    user_header: str = "x-user-id",
) -> FastAPI:
    """The gateway app: forward ``/v1/chat/completions`` to ``upstream``, metered."""
    meter = AsyncBalanceManager(open_async_store(store), config or BalanceConfig(enabled=True))
    if upstream is None:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=fake_upstream()), base_url=FAKE_UPSTREAM
        )
    else:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        client = httpx.AsyncClient(base_url=upstream, headers=headers, timeout=600)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.aclose()
            await meter.aclose()

    app = FastAPI(title="creditmeter gateway", lifespan=lifespan)
    app.state.meter = meter
    app.add_middleware(CreditMeterMiddleware, meter=meter, user_header=user_header)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_request(request)
        if isinstance(body, Response):
            return body  # the middleware releases the hold of an error answer
        if body.get("stream"):
            # Ask for the closing usage chunk, so that the stream is charged exactly.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        try:
            answer = await client.send(
                client.build_request("POST", "chat/completions", json=body), stream=True
            )
        except httpx.HTTPError as exc:
            error = {"message": f"upstream unreachable: {exc}", "type": "upstream_error"}
            return JSONResponse({"error": error}, status_code=502)
        media_type = answer.headers.get("content-type", "application/json")
        if media_type.startswith("text/event-stream"):
            return StreamingResponse(
                _relay(answer),
                status_code=answer.status_code,
                media_type=media_type,
                headers={"cache-control": "no-cache"},
                background=BackgroundTask(answer.aclose),
            )
        try:
            content = await answer.aread()
        finally:
            await answer.aclose()
        return Response(content, status_code=answer.status_code, media_type=media_type)

    return app


async def _relay(answer: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in answer.aiter_bytes():
            yield chunk
    finally:
        await answer.aclose()


def port_number(text: str) -> int:
    """An argparse type: a TCP port."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number in 0..65535, got {text!r}")
    return port


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("CREDITMETER_HOST", "127.0.0.1"))
    parser.add_argument(
        "--port", type=port_number, default=os.environ.get("CREDITMETER_PORT", "8080")
    )
    parser.add_argument(
        "--store",
        default=os.environ.get("CREDITMETER_STORE", DEFAULT_STORE),
        help=f"store URL (default {DEFAULT_STORE}; env CREDITMETER_STORE)",
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("CREDITMETER_CONFIG"),
        help="a librechat.yaml whose balance: section configures balances (env CREDITMETER_CONFIG)",
    )
    parser.add_argument(
        "--upstream",
        default=os.environ.get("CREDITMETER_UPSTREAM"),
        help="OpenAI-compatible base URL to forward to, e.g. https://api.openai.com/v1 "
        "(default: the built-in fake; env CREDITMETER_UPSTREAM); its key is read from "
        "UPSTREAM_API_KEY or OPENAI_API_KEY",
    )
    parser.add_argument("--user-header", default="x-user-id", help="header naming the user")
    args = parser.parse_args(argv)
    try:
        app = create_app(
            store=args.store,
            config=balance_config(args.config),
            upstream=args.upstream,
            api_key=os.environ.get("UPSTREAM_API_KEY") or os.environ.get("OPENAI_API_KEY"),
            user_header=args.user_header,
        )
    except ConfigError as exc:  # a bad --config or --store: the usage error status
        parser.exit(2, f"{parser.prog}: error: {one_line(exc)}\n")
    except StoreError as exc:  # the store is there but cannot be used (corrupt, unreadable)
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    upstream = args.upstream or "the built-in fake upstream"
    print(f"creditmeter gateway: store {args.store}, forwarding to {upstream}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
