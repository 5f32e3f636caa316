"""examples/gateway.py as a user runs it: a subprocess on 127.0.0.1, called with the openai SDK."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import re
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from creditmeter import EntryKind, Pricing, SQLiteStore, TokenUsage, usage_from_stream

GATEWAY = Path(__file__).parents[2] / "examples" / "gateway.py"
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


@contextlib.contextmanager
def running_gateway(tmp_path: Path, start: int):
    """examples/gateway.py on a free port over an SQLite file: (port, database)."""
    config = tmp_path / "librechat.yaml"
    config.write_text(f"version: 1.2.1\nbalance:\n  enabled: true\n  startBalance: {start}\n")
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


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with running_gateway(tmp_path_factory.mktemp("gateway"), START) as running:
        yield running


def test_the_asgi_pages_client_and_the_numbers_it_shows(tmp_path):
    """docs/guides/asgi.md: its client block runs against the example gateway as the page
    starts it (startBalance 20000), and the balance, ledger and 402 body it shows are what
    the gateway gives."""
    page = (Path(__file__).parents[2] / "docs" / "guides" / "asgi.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", page, re.DOTALL) if ":8080" in b]
    [curl] = re.findall(r"```sh\n(curl -s localhost:8080.*?)```", page, re.DOTALL)
    shown_402 = json.loads(
        "".join(line.removeprefix("#").strip() for line in curl.splitlines() if line[:1] == "#")
    )
    with running_gateway(tmp_path, 20_000) as (port, database):
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(block.replace(":8080", f":{port}"), "asgi.md", "exec"), {})
        printed = output.getvalue()
        body = json.loads(re.search(r"-d '(.*?)'", curl, re.DOTALL).group(1))
        refused = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json=body,
            headers={"X-User-Id": "bob"},
            timeout=10,
        )
    assert "prompt_tokens=5" in printed
    assert "completion_tokens=13" in printed
    with SQLiteStore(database) as store:
        ledger = store.ledger("alice")
        assert [(e.kind, e.amount) for e in ledger] == [
            (EntryKind.OPEN, 20_000),
            (EntryKind.CHARGE, Decimal("-8.55")),
            (EntryKind.CHARGE, Decimal("-8.55")),
        ]
        assert store.load("alice").balance == Decimal("19982.9")  # the page's 19,982.9
        assert store.ledger("bob") == []
    assert refused.status_code == 402
    assert refused.json() == shown_402


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
    # The SDK names the reason (before: "Error code: 402" and nothing more) ...
    assert "Error code: 402 - user 'bob' cannot pay cost" in str(refused.value)
    assert f"available {START}" in str(refused.value)
    assert refused.value.code == "token_balance"
    # ... and LibreChat's fields are still at the top of the body.
    payload = refused.value.response.json()
    assert payload["type"] == "token_balance"
    assert payload["balance"] == START
    with SQLiteStore(database) as store:
        assert store.ledger("bob") == []


# --- bad input: one-line errors at start, 400 for bad bodies -----------------------------


def load_example():
    spec = importlib.util.spec_from_file_location("gateway_example", GATEWAY)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
BAD_BODIES = {
    "not JSON": b"{nope",
    "a JSON array": b"[]",
    "messages a string": {"model": MODEL, "messages": "x"},
    "messages empty": {"model": MODEL, "messages": []},
    "messages missing": {"model": MODEL},
    "model missing": {"messages": GOOD["messages"]},
    "model a number": {**GOOD, "model": 5},
    "model empty": {**GOOD, "model": " "},
    "a message a number": {"model": MODEL, "messages": [5]},
    "a message without a role": {"model": MODEL, "messages": [{"content": "hi"}]},
    "a message of an unknown role": {"model": MODEL, "messages": [{"role": "x", "content": ""}]},
    "content a number": {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
    "content an object": {"model": MODEL, "messages": [{"role": "user", "content": {}}]},
    "content parts not objects": {"model": MODEL, "messages": [{"role": "user", "content": [1]}]},
    "stream a string": {**GOOD, "stream": "yes"},
    "stream_options a list": {**GOOD, "stream": True, "stream_options": [1]},
    "max_tokens huge": {**GOOD, "max_tokens": 10**12},
    "max_tokens a string": {**GOOD, "max_tokens": "5"},
    "max_tokens a float": {**GOOD, "max_tokens": 1e9},
    "max_tokens zero": {**GOOD, "max_tokens": 0},
    "max_completion_tokens negative": {**GOOD, "max_completion_tokens": -1},
    "n too many": {**GOOD, "n": 1000},
}


def test_bad_request_bodies_get_an_openai_shaped_400_and_cost_nothing(tmp_path):
    # Before the fix, of these 22: 3 crashed the app (500: "messages a string", "a message
    # a number", "stream_options a list"), 12 were forwarded and charged (200: "model
    # missing", "content a number", ...), 7 were refused (400) by the middleware.
    app = example.create_app(store=f"sqlite:///{tmp_path / 'credits.db'}")

    async def main():
        answers = {}
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                for name, body in BAD_BODIES.items():
                    content = body if isinstance(body, bytes) else json.dumps(body).encode()
                    answers[name] = await client.post(
                        "/v1/chat/completions",
                        content=content,
                        headers={"x-user-id": "carol", "content-type": "application/json"},
                    )
                good = await client.post(
                    "/v1/chat/completions", json=GOOD, headers={"x-user-id": "carol"}
                )
            ledger = await app.state.meter.ledger("carol")
        return answers, good, ledger

    answers, good, ledger = asyncio.run(main())
    wrong = {name: (a.status_code, a.text) for name, a in answers.items() if a.status_code != 400}
    assert wrong == {}
    for name, answer in answers.items():
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error", name
        assert error["message"], name
        assert "code" in error, name
        assert "param" in error, name
    assert good.status_code == 200  # the gateway still serves
    # Bad bodies the middleware let through were held and released, never charged.
    assert [e.kind for e in ledger if e.kind is not EntryKind.RELEASE] == [
        EntryKind.OPEN,
        EntryKind.CHARGE,
    ]
    assert all(e.amount == 0 for e in ledger if e.kind is EntryKind.RELEASE)


def test_the_fake_upstream_answers_bad_bodies_with_400_not_a_crash():
    upstream = example.fake_upstream()

    async def main():
        transport = httpx.ASGITransport(app=upstream)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json={"messages": "x"})

    answer = asyncio.run(main())
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (["--config", "missing.yaml"], 2, "cannot read config file 'missing.yaml'"),
        (["--config", "broken.yaml"], 2, "is not valid YAML"),
        (["--config", "wrong.yaml"], 2, "'enabled' must be true or false"),
        (["--store", "bogus://x"], 2, "unknown store URL 'bogus://x'"),
        (["--store", "sqlite:///corrupt.db"], 1, "file is not a database"),
        (["--store", "sqlite:///no/such/dir/x.db"], 1, "cannot open SQLite store"),
        (["--port", "99999"], 2, "a port is a number in 0..65535"),
    ],
    ids=[
        "config missing",
        "config bad YAML",
        "config bad value",
        "store scheme",
        "store corrupt",
        "store directory missing",
        "port",
    ],
)
def test_bad_arguments_stop_the_gateway_with_one_line(
    tmp_path, monkeypatch, capsys, argv, status, says
):
    # Before the fix: a traceback (15 to 38 lines) and status 1 for each.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(GATEWAY)])  # argparse names the program after it
    (tmp_path / "broken.yaml").write_text("balance: [1\n")
    (tmp_path / "wrong.yaml").write_text("balance:\n  enabled: maybe\n")
    (tmp_path / "corrupt.db").write_bytes(b"garbage!" * 512)
    with pytest.raises(SystemExit) as stopped:
        example.main(argv)
    assert stopped.value.code == status
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("gateway.py: error: ")
    assert says in last
    assert "Traceback" not in err
