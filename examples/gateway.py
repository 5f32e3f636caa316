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
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from creditmeter import AsyncBalanceManager, BalanceConfig, load_config, open_async_store
from creditmeter.integrations.asgi import CreditMeterMiddleware

DEFAULT_STORE = "sqlite:///creditmeter.db"
FAKE_UPSTREAM = "http://fake-upstream/v1"
FAKE_REPLY = "Hello! This answer comes from the fake upstream built into the creditmeter gateway."


# --- the built-in fake upstream -------------------------------------------------------


def fake_upstream() -> FastAPI:
    """A tiny OpenAI look-alike: one prompt token per word, one completion token per word."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await request.json()
        model = body.get("model") or "gpt-4o-mini"
        prompt = sum(len(_text(m.get("content")).split()) for m in body.get("messages", []))
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
        body = await request.json()
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("CREDITMETER_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("CREDITMETER_PORT", "8080")))
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
    app = create_app(
        store=args.store,
        config=balance_config(args.config),
        upstream=args.upstream,
        api_key=os.environ.get("UPSTREAM_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        user_header=args.user_header,
    )
    upstream = args.upstream or "the built-in fake upstream"
    print(f"creditmeter gateway: store {args.store}, forwarding to {upstream}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
