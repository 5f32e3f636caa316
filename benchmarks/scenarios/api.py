"""The JSON API's ``charge`` over HTTP, against the in-process ``AsyncBalanceManager.charge``.

A gateway in another language meters through ``POST /api/charge``. Here
uvicorn serves ``create_app`` from a child process on a loopback port, and
this process is the load generator: a bare asyncio HTTP/1.1 client keeping
``CONNECTIONS`` connections busy, each request a model call's usage priced by
creditmeter under its own ``request_id``, spread over 64 users. Beside it:

- *in process*: the same charges awaited one after another on an
  ``AsyncBalanceManager`` in this process (no HTTP at all);
- *HTTP floor*: the same server stack (uvicorn, FastAPI, the same JSON body)
  with a route that only answers, so the difference is creditmeter's own work
  (validation, the store, the ledger) and what the floor is costs HTTP.

Each server runs in its own process (two cores: the server on one, the
generator on the other); rounds alternate between the targets. Every charge
is checked afterwards: the balance read back through the API equals the start
minus the price of each request sent, exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from harness import Section, percentile
from harness.report import fmt, yes
from harness.stores import Places

from creditmeter import AsyncBalanceManager, BalanceConfig, Pricing, TokenUsage, open_async_store

TITLE = "JSON API: charge requests per second over HTTP"
TOKEN = "bench-admin-token-5f0e1d2c3b4a"
USERS = 64
MODEL = "gpt-4o-mini"
USAGE = {"input": 1200, "output": 300}
CONFIG = BalanceConfig(enabled=True, start_balance=10**12)
CONNECTIONS = 16
BENCHMARKS = str(Path(__file__).resolve().parents[1])
KINDS = {"memory": "AsyncMemoryStore", "sqlite-full": "AsyncSQLiteStore (full)"}


def body(index: int, tag: str) -> dict[str, Any]:
    """The JSON body of charge number ``index`` (a new request id for every request)."""
    return {
        "user_id": f"api-user-{index % USERS}",
        "request_id": f"{tag}-{index}",
        "model": MODEL,
        "usage": USAGE,
    }


# --- the server, in a child process ---------------------------------------------------


def floor_app() -> Any:
    """FastAPI answering ``POST /api/charge`` without doing anything: the HTTP floor."""
    from fastapi import FastAPI  # noqa: PLC0415 - only the server process needs it

    app = FastAPI()

    @app.post("/api/charge")
    async def charge(payload: dict[str, Any]) -> dict[str, Any]:
        return {"entry": {"request_id": payload.get("request_id")}}

    return app


async def serve(fd: int, store_url: str | None) -> None:
    """Serve the app (``store_url``) or the floor (``None``) on the listening socket ``fd``."""
    import uvicorn  # noqa: PLC0415

    from creditmeter.server import create_app  # noqa: PLC0415

    sock = socket.socket(fileno=fd)
    meter = None if store_url is None else AsyncBalanceManager(open_async_store(store_url), CONFIG)
    app = floor_app() if meter is None else create_app(meter, admin_token=TOKEN)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
        timeout_keep_alive=3600,  # connections idle while another server is measured
    )
    try:
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        if meter is not None:
            await meter.aclose()


@contextlib.contextmanager
def server(store_url: str | None) -> Iterator[str]:
    """A child process serving on a free loopback port; its base URL. Stopped after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    command = [sys.executable, "-m", "scenarios.api", "serve", "--fd", str(sock.fileno())]
    if store_url is not None:
        command += ["--store", store_url]
    paths = [BENCHMARKS, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    child = subprocess.Popen(command, pass_fds=[sock.fileno()], env=env)
    sock.close()  # the child holds it now
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# --- the load generator ---------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection, as plain as a load generator can be.

    httpx tops out near the server's own rate on a small machine, so it would
    measure itself; this writes the request bytes and reads the answer by its
    Content-Length (what uvicorn sends for a JSON answer), nothing else.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base: str) -> Connection:
        """Connect to ``http://host:port``."""
        host, _, port = base.removeprefix("http://").partition(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def request(self, method: str, path: str, payload: bytes = b"") -> tuple[int, bytes]:
        """Send one request; its status and body."""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self.writer.write(head.encode() + payload)
        answer = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in answer.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding":
                raise RuntimeError("a chunked answer: this client reads Content-Length only")
        return int(answer[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        """Close the connection."""
        self.writer.close()


async def load(connections: list[Connection], start: int, count: int, tag: str) -> list[float]:
    """Send charges ``start .. start+count-1`` over the connections; ms per request."""
    times: list[float] = []
    queue = iter(range(start, start + count))

    async def worker(connection: Connection) -> None:
        for index in queue:
            payload = json.dumps(body(index, tag)).encode()
            began = time.perf_counter()
            status, answer = await connection.request("POST", "/api/charge", payload)
            times.append((time.perf_counter() - began) * 1000)
            if status != 200:
                raise RuntimeError(f"charge {index}: HTTP {status} {answer[:200]!r}")

    await asyncio.gather(*(worker(connection) for connection in connections))
    return times


async def in_process(url: str, ops: int, repeats: int) -> tuple[list[float], bool]:
    """Charges awaited one by one on a manager in this process: ops/s per round, and the check."""
    rates = []
    async with AsyncBalanceManager(open_async_store(url), CONFIG) as meter:
        usage = TokenUsage(**USAGE)
        sent = 0
        for _ in range(repeats + 1):  # the first round warms up
            began = time.perf_counter()
            for index in range(sent, sent + ops):
                await meter.charge(
                    f"api-user-{index % USERS}", model=MODEL, usage=usage, request_id=f"p-{index}"
                )
            rates.append(ops / (time.perf_counter() - began))
            sent += ops
        ok = await charged_once(meter, sent)
    return rates[1:], ok


async def charged_once(meter: AsyncBalanceManager, sent: int) -> bool:
    """Whether the users' balances add up to the start minus ``sent`` priced charges."""
    price = Pricing.librechat().cost(MODEL, TokenUsage(**USAGE)).total
    total = sum([await meter.balance(f"api-user-{user}") for user in range(USERS)], Decimal(0))
    return total == USERS * CONFIG.start_balance - sent * price


async def over_http(bases: dict[str, str], ops: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Rounds of ``ops`` requests to every server, alternating; req/s and latency per server."""
    results: dict[str, dict[str, Any]] = {name: {"rates": [], "ms": []} for name in bases}
    pools = {
        name: [await Connection.open(base) for _ in range(CONNECTIONS)]
        for name, base in bases.items()
    }
    sent = dict.fromkeys(bases, 0)
    try:
        names = list(bases)
        for number in range(repeats + 1):  # round 0 warms up (and waits for the servers)
            for name in names[number % len(names) :] + names[: number % len(names)]:
                began = time.perf_counter()
                times = await load(pools[name], sent[name], ops, "h")
                rate = ops / (time.perf_counter() - began)
                sent[name] += ops
                if number > 0:
                    results[name]["rates"].append(rate)
                    results[name]["ms"] += times
        for name in bases:
            if name != "floor":
                results[name]["once"] = await balances_add_up(pools[name][0], sent[name])
    finally:
        for pool in pools.values():
            for connection in pool:
                connection.close()
    return results


async def balances_add_up(connection: Connection, sent: int) -> bool:
    """Read every user back through the API: start minus ``sent`` priced charges in total."""
    price = Pricing.librechat().cost(MODEL, TokenUsage(**USAGE)).total
    total = Decimal(0)
    for user in range(USERS):
        status, answer = await connection.request("GET", f"/api/users/api-user-{user}")
        if status != 200:
            raise RuntimeError(f"reading api-user-{user}: HTTP {status}")
        total += Decimal(json.loads(answer)["balance"])
    return total == USERS * CONFIG.start_balance - sent * price


def run(*, quick: bool, workdir: Path) -> Section:
    """The in-process call, the HTTP floor and the API per store; the section."""
    ops, repeats = (200, 2) if quick else (2_000, 5)
    kinds = ["memory"] if quick else list(KINDS)
    section, rows = Section(TITLE), []
    with Places(workdir) as places, contextlib.ExitStack() as stack:
        urls = {kind: places.url(kind, "api") for kind in kinds}
        bases = {"floor": stack.enter_context(server(None))}
        for kind, url in urls.items():
            bases[kind] = stack.enter_context(server(url))
        http = asyncio.run(over_http(bases, ops, repeats))
        floor = http["floor"]
        floor_rate = statistics.median(floor["rates"])
        rows.append(
            [
                "HTTP floor (route that only answers)",
                str(CONNECTIONS),
                fmt(floor_rate, 0),
                fmt(percentile(floor["ms"], 50), 2),
                fmt(percentile(floor["ms"], 99), 2),
                "-",
            ]
        )
        for kind in kinds:
            local, local_ok = asyncio.run(in_process(places.url(kind, "inproc"), ops, repeats))
            api = http[kind]
            api_rate, local_rate = statistics.median(api["rates"]), statistics.median(local)
            rows.append(
                [
                    f"in-process charge, {KINDS[kind]}",
                    "-",
                    fmt(local_rate, 0),
                    fmt(1000 / local_rate, 3),
                    "-",
                    yes(local_ok),
                ]
            )
            rows.append(
                [
                    f"API charge, {KINDS[kind]}",
                    str(CONNECTIONS),
                    fmt(api_rate, 0),
                    fmt(percentile(api["ms"], 50), 2),
                    fmt(percentile(api["ms"], 99), 2),
                    yes(api["once"]),
                ]
            )
            section.check(
                f"{KINDS[kind]}: API charge requests/s (in-process charges/s)",
                None,
                f"{fmt(api_rate, 0)} req/s vs {fmt(local_rate, 0)} calls/s "
                f"({local_rate / api_rate:.1f}x); HTTP floor {fmt(floor_rate, 0)} req/s",
            )
            section.check(
                f"{KINDS[kind]}: every API charge applied once", api["once"] and local_ok, "yes"
            )
    section.text(
        f"""uvicorn (h11, one worker) serves each app from its own process on 127.0.0.1;
        this process sends {ops:,} charges per round over {CONNECTIONS} keep-alive
        connections (a bare asyncio HTTP/1.1 client), {repeats} measured rounds after a
        warm-up round, alternating between the servers. Each charge is {MODEL} usage
        ({USAGE["input"]:,} input and {USAGE["output"]:,} output tokens) priced by
        creditmeter, with its own request id, over {USERS} users. req/s is the median
        over the rounds; latency percentiles are over every measured request. The
        in-process rows await the same charges one at a time (their ms column is the mean
        per call). The machine has {os.cpu_count()} CPUs: the load generator shares them
        with the server, so the floor row says how much of the gap is HTTP and the
        generator rather than creditmeter."""
    )
    section.table(["what", "connections", "requests/s", "p50 ms", "p99 ms", "charged once"], rows)
    return section


def main() -> None:
    """``api.py serve --fd N [--store URL]``: the child process of ``server()``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--store")
    args = parser.parse_args()
    asyncio.run(serve(args.fd, args.store))


if __name__ == "__main__":
    main()
