"""What the ASGI middleware adds to a request, in process, against the same app without it.

A FastAPI route answers ``POST /v1/chat/completions`` with an OpenAI-shaped
body that carries usage. Requests go straight through the ASGI callable (no
sockets), so the difference between the two apps is the middleware's own
work: reading the body, the hold, the settle.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from harness import Rounds, Section, ainterleave
from harness.report import fmt, yes
from harness.stores import Places

from creditmeter import AsyncBalanceManager, BalanceConfig, EntryKind, open_async_store

TITLE = "ASGI middleware: what it adds to a request"
TARGET_US = 100.0
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi."}]})
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
}
HEADERS = [(b"content-type", b"application/json"), (b"x-user-id", b"bench-user")]
SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/v1/chat/completions",
    "raw_path": b"/v1/chat/completions",
    "query_string": b"",
    "root_path": "",
    "headers": [*HEADERS, (b"host", b"bench"), (b"content-length", b"%d" % len(BODY))],
    "client": ("127.0.0.1", 1),
    "server": ("bench", 80),
}


def make_app() -> Any:
    """The FastAPI app: one route answering a chat completion."""
    from fastapi import FastAPI  # noqa: PLC0415 - only this scenario needs it

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> dict[str, Any]:  # async: FastAPI runs a sync route in a thread
        return ANSWER

    return app


async def request(app: Any) -> None:
    """One request through the ASGI callable; raises unless it answers 200."""
    messages = [{"type": "http.request", "body": BODY.encode(), "more_body": False}]
    started: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.append(message)

    await app(dict(SCOPE), receive, send)
    if started[0]["status"] != 200:
        raise RuntimeError(f"status {started[0]['status']}")


async def measure(url: str, ops: int, repeats: int) -> tuple[Rounds, bool]:
    """The bare and the wrapped app in interleaved rounds; every request charged once."""
    from creditmeter.integrations.asgi import CreditMeterMiddleware  # noqa: PLC0415

    config = BalanceConfig(enabled=True, start_balance=10**12)
    async with AsyncBalanceManager(open_async_store(url), config) as meter:
        bare, wrapped = make_app(), CreditMeterMiddleware(make_app(), meter)
        calls = {"bare app": lambda: request(bare), "with the middleware": lambda: request(wrapped)}
        rounds = await ainterleave(calls, ops=ops, repeats=repeats)
        ledger = await meter.ledger("bench-user")
    charges = sum(1 for entry in ledger if entry.kind is EntryKind.CHARGE)
    return rounds, charges == rounds["with the middleware"].calls


def run(*, quick: bool, workdir: Path) -> Section:
    """Both stores; the section and its targets."""
    ops, repeats = (50, 3) if quick else (1_000, 7)
    section, rows = Section(TITLE), []
    with Places(workdir) as places:
        for name, kind in (
            ("AsyncMemoryStore", "memory"),
            ("AsyncSQLiteStore (full)", "sqlite-full"),
        ):
            rounds, once = asyncio.run(measure(places.url(kind, "asgi"), ops, repeats))
            bare, added = (
                rounds["bare app"].median,
                rounds.difference("with the middleware", "bare app"),
            )
            rows.append(
                [
                    name,
                    fmt(bare),
                    fmt(1e6 / bare, 0),
                    fmt(added),
                    fmt(1e6 / (bare + added), 0),
                    yes(once),
                ]
            )
            memory = kind == "memory"
            section.difference(
                f"{name}: the middleware adds ≤ {TARGET_US:g} µs per request"
                + ("" if memory else " (figure)"),
                rounds,
                "with the middleware",
                "bare app",
                at_most=TARGET_US if memory else None,
            )
    section.text(
        f"""{repeats} interleaved rounds of {ops:,} requests per app, awaited in one event loop;
        µs/request is the median over the batches, *adds* the median over the rounds of the
        wrapped batch minus the bare one."""
    )
    header = ["store", "bare app µs/request", "bare requests/s", "middleware adds µs"]
    section.table([*header, "metered requests/s", "charged once"], rows)
    return section
