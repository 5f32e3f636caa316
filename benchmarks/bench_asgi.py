"""What the ASGI middleware adds to a request, in process, against the same app without it.

Run: ``python benchmarks/bench_asgi.py [--quick] [--output benchmarks/RESULTS-asgi.md]``.

A FastAPI route answers ``POST /v1/chat/completions`` with an OpenAI-shaped
JSON body that carries usage. Requests are driven straight through the ASGI
callable (no sockets), so the difference between the wrapped and the bare
app is the middleware's own work: reading the body, the hold, the settle.
Batches of the two alternate; medians are reported (target: at most 100 µs
added per request with MemoryStore).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    AsyncSQLiteStore,
    BalanceConfig,
    __version__,
)
from creditmeter.integrations.asgi import CreditMeterMiddleware

BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello in five words, please."}],
        "max_tokens": 50,
    }
).encode()
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
}


def make_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> dict[str, Any]:
        return ANSWER

    return app


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
    "headers": [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"x-user-id", b"bench-user"),
        (b"content-length", str(len(BODY)).encode()),
    ],
    "client": ("127.0.0.1", 1),
    "server": ("bench", 80),
}


async def one_request(app: Any) -> int:
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(dict(SCOPE), receive, send)
    return status


async def batch(app: Any, ops: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(ops):
        status = await one_request(app)
        if status != 200:
            msg = f"status {status}"
            raise RuntimeError(msg)
    return (time.perf_counter_ns() - start) / ops / 1000


async def measure(store: Any, ops: int, repeats: int) -> tuple[float, float, int]:
    config = BalanceConfig(enabled=True, start_balance=10**12)
    async with AsyncBalanceManager(store, config) as meter:
        bare = make_app()
        wrapped = CreditMeterMiddleware(make_app(), meter)
        await batch(bare, 50)  # warm up both
        await batch(wrapped, 50)
        plain, metered, added = [], [], []
        for _ in range(repeats):
            a = await batch(bare, ops)
            b = await batch(wrapped, ops)
            plain.append(a)
            metered.append(b)
            added.append(b - a)
        charges = len([e for e in await meter.ledger("bench-user") if e.kind.value == "charge"])
    return statistics.median(plain), statistics.median(added), charges


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    ops, repeats = (200, 3) if args.quick else (1000, 7)
    output = args.output or (None if args.quick else Path(__file__).with_name("RESULTS-asgi.md"))
    lines = [
        "# ASGI middleware benchmark",
        "",
        (
            f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; creditmeter {__version__}; "
            f"Python {platform.python_version()} on {platform.machine()}"
        ),
        f"- Command: `python benchmarks/bench_asgi.py{' --quick' if args.quick else ''}`",
        f"- {repeats} alternating batches of {ops} requests; medians of the per-batch means.",
        "",
        (
            "| store | bare app µs/request | bare requests/s | middleware adds µs | "
            "metered requests/s | target ≤ 100 µs |"
        ),
        "|---|---:|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name, store in (
            ("AsyncMemoryStore", AsyncMemoryStore()),
            ("AsyncSQLiteStore (full)", AsyncSQLiteStore(Path(folder) / "a.db")),
        ):
            plain, added, charges = asyncio.run(measure(store, ops, repeats))
            verdict = "met" if added <= 100 else "not met"
            if name.startswith("AsyncSQLite"):
                verdict = "(no target)"
            lines.append(
                f"| {name} | {plain:.1f} | {1e6 / plain:,.0f} | {added:.1f} | "
                f"{1e6 / (plain + added):,.0f} | {verdict} |"
            )
            print(lines[-1], f"({charges} charges)", flush=True)
    report = "\n".join(lines) + "\n"
    if output is not None:
        output.write_text(report)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
