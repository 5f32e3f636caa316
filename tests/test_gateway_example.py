"""examples/gateway.py as a user runs it: a subprocess on 127.0.0.1, called with the openai SDK."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from creditmeter import EntryKind, Pricing, SQLiteStore, TokenUsage, usage_from_stream

GATEWAY = Path(__file__).parents[1] / "examples" / "gateway.py"
START = 500_000
MODEL = "gpt-4o-mini"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the gateway exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)  # a poll interval, bounded by the deadline
    pytest.fail(f"the gateway did not answer within 30 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gateway")
    config = tmp_path / "librechat.yaml"
    config.write_text(f"version: 1.2.1\nbalance:\n  enabled: true\n  startBalance: {START}\n")
    database = tmp_path / "credits.db"
    port = free_port()
    log = tmp_path / "gateway.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                str(GATEWAY),
                "--port",
                str(port),
                "--store",
                f"sqlite:///{database}",
                "--config",
                str(config),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        wait_until_up(process, f"http://127.0.0.1:{port}/healthz", log)
        yield port, database
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_gateway_meters_real_openai_client_calls(gateway):
    port, database = gateway
    pricing = Pricing.librechat()
    messages = [{"role": "user", "content": "Say hello in five words"}]
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="x",
        default_headers={"x-user-id": "alice"},
        max_retries=0,
    ) as client:
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=100)
        plain = TokenUsage.from_response(reply)
        with client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=100, stream=True
        ) as stream:
            chunks = list(stream)
        streamed = usage_from_stream(chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        # A user the gateway cannot identify is refused before anything runs.
        anonymous = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        with anonymous, pytest.raises(openai.AuthenticationError):
            anonymous.chat.completions.create(model=MODEL, messages=messages)

    assert reply.choices[0].message.content
    assert text == reply.choices[0].message.content
    assert plain is not None
    assert streamed is not None
    assert plain.output > 0
    assert streamed.output > 0
    spent = pricing.cost(MODEL, plain).total + pricing.cost(MODEL, streamed).total

    # The charges are committed before the client sees the end of each answer.
    with SQLiteStore(database) as store:
        account = store.load("alice")
        ledger = store.ledger("alice")
    assert account is not None
    assert account.balance == account.available == START - spent
    assert [e.kind for e in ledger] == [EntryKind.OPEN, EntryKind.CHARGE, EntryKind.CHARGE]
    assert [e.usage for e in ledger[1:]] == [plain, streamed]
    assert sum(e.amount for e in ledger) == account.balance


def test_gateway_refuses_a_user_who_cannot_pay(gateway):
    port, database = gateway
    with (
        openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="x",
            default_headers={"x-user-id": "bob"},
            max_retries=0,
        ) as client,
        pytest.raises(openai.APIStatusError) as refused,
    ):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6
        )
    assert refused.value.status_code == 402
    assert refused.value.body["type"] == "token_balance"
    assert refused.value.body["balance"] == START
    with SQLiteStore(database) as store:
        assert store.ledger("bob") == []
