"""The JSON API over a real store (memory and SQLite): who may call what, and what it writes.

Tried here: the auth matrix over every route (no token, a bad token, a
non-bearer scheme, the read token on writes, the admin token); idempotent
retries of charge, hold, settle and release by request or hold id; the 402
answer (OpenAI's error plus LibreChat's ``token_balance`` payload); a store
outage (an SQLite file overwritten with garbage) answered 503 in the one
error shape; bad input at every write route answered in the one error shape
with nothing written; amounts as decimal strings in and out; the actor and
reason kept in the entry's metadata; paging users by prefix and cursor, and
the ledger by cursor; and the app mounted under ``/admin``.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from broken import BrokenSQLite
from fastapi import FastAPI
from fastapi.testclient import TestClient
from server_helpers import ADMIN, READ, START, Server, open_meter

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceManager,
    ConfigError,
    EntryKind,
    MemoryStore,
    TokenUsage,
)
from creditmeter.server import create_app
from creditmeter.server.security import LoginThrottle

ALICE = "alice"

WRITES: list[tuple[str, dict[str, Any]]] = [
    ("/api/grant", {"user_id": ALICE, "amount": "5", "reason": "test"}),
    ("/api/set", {"user_id": ALICE, "amount": "5", "reason": "test"}),
    ("/api/refill", {"user_id": ALICE, "reason": "test"}),
    ("/api/refill-settings", {"user_id": ALICE, "reason": "test", "enabled": True}),
    ("/api/check", {"user_id": ALICE, "cost": "5"}),
    ("/api/charge", {"user_id": ALICE, "amount": "5", "request_id": "r1"}),
    ("/api/hold", {"user_id": ALICE, "amount": "5", "request_id": "h1"}),
    ("/api/settle", {"user_id": ALICE, "hold_id": "req:h1", "amount": "5"}),
    ("/api/release", {"user_id": ALICE, "hold_id": "req:h1"}),
]
READS = ["/api/users", "/api/users/alice", "/api/ledger", "/api/usage"]


def entry_count(server: Server) -> int:
    return len(server.call(server.meter.entries, limit=10_000).entries)


def assert_error_shape(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert ADMIN not in response.text
    assert READ not in response.text
    return body


@pytest.fixture
def alice(server: Server) -> Server:
    server.call(server.meter.grant, ALICE, 1)  # opens the account (START + 1)
    return server


def hold_for(server: Server, path: str) -> None:
    """Make the hold ``req:h1`` that the settle and release bodies of ``WRITES`` name."""
    if path in ("/api/settle", "/api/release"):
        server.call(server.meter.hold, ALICE, 5, request_id="h1")


# --- who may call what ------------------------------------------------------------


@pytest.mark.parametrize("path", READS)
def test_reads_need_a_token(alice, path):
    for token, headers in ((None, {}), ("wrong-token-0123456789", {})):
        response = alice.api("GET", path, token=token, headers=headers)
        assert_error_shape(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    basic = alice.api("GET", path, token=None, headers={"Authorization": f"Basic {ADMIN}"})
    assert_error_shape(basic, 401)
    assert alice.api("GET", path, token=READ).status_code == 200
    assert alice.api("GET", path, token=ADMIN).status_code == 200


@pytest.mark.parametrize(("path", "body"), WRITES)
def test_writes_need_the_admin_token(alice, path, body):
    hold_for(alice, path)
    before = entry_count(alice)
    assert_error_shape(alice.api("POST", path, token=None, json=body), 401, "unauthorized")
    assert_error_shape(alice.api("POST", path, token=ADMIN + "x", json=body), 401)
    assert_error_shape(alice.api("POST", path, token=READ, json=body), 403, "forbidden")
    # Refused before the body is read: a bad body from a read token is still 403.
    assert_error_shape(alice.api("POST", path, token=READ, json={"x": 1}), 403)
    assert entry_count(alice) == before
    response = alice.api("POST", path, json=body)
    assert response.status_code == 200, response.text


def test_openapi_lists_every_route_with_bearer_auth(memory_server):
    schema = memory_server.client.get("/api/openapi.json").json()
    paths = set(schema["paths"])
    assert paths == {
        "/api/users",
        "/api/users/{user_id}",
        "/api/ledger",
        "/api/usage",
        *(path for path, _ in WRITES),
    }
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_create_app_refuses_a_sync_manager_and_weak_tokens():
    with BalanceManager(MemoryStore()) as sync, pytest.raises(TypeError, match="Async"):
        create_app(sync, admin_token=ADMIN)  # type: ignore[arg-type]
    meter = AsyncBalanceManager(AsyncMemoryStore())
    with pytest.raises(ConfigError, match="16 to 1024"):
        create_app(meter, admin_token="short")
    with pytest.raises(ConfigError, match="differ"):
        create_app(meter, admin_token=ADMIN, read_token=ADMIN)
    with pytest.raises(TypeError):
        create_app(meter, admin_token=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="printable"):
        create_app(meter, admin_token=" " + ADMIN)


# --- what writes record -------------------------------------------------------------


def test_grant_records_actor_and_reason_and_answers_decimal_strings(server):
    response = server.api(
        "POST", "/api/grant", json={"user_id": "bob", "amount": "0.25", "reason": "welcome"}
    )
    entry = response.json()["entry"]
    assert entry["amount"] == "0.25"
    assert entry["balance_after"] == "1000.25"
    assert entry["metadata"] == {"actor": "admin", "via": "api", "reason": "welcome"}
    stored = server.ledger("bob")[-1]
    assert stored.amount == Decimal("0.25")
    assert stored.metadata == {"actor": "admin", "via": "api", "reason": "welcome"}
    user = server.api("GET", "/api/users/bob", token=READ).json()
    assert user["balance"] == "1000.25"
    assert user["available"] == "1000.25"


def test_set_refill_and_refill_settings_record_actor_and_reason(server, clock):
    who = {"actor": "admin", "via": "api"}
    response = server.api(
        "POST", "/api/set", json={"user_id": "bob", "amount": "0", "reason": "trial over"}
    )
    assert response.status_code == 200, response.text
    assert server.ledger("bob")[-1].metadata == {**who, "reason": "trial over"}
    settings = {"enabled": True, "amount": "7", "interval_value": 1, "interval_unit": "hours"}
    response = server.api(
        "POST",
        "/api/refill-settings",
        json={"user_id": "bob", "reason": "hourly plan", **settings},
    )
    assert response.status_code == 200, response.text
    assert server.ledger("bob")[-1].metadata == {
        **who,
        "reason": "hourly plan",
        "refill": "enabled, 7 every 1 hours",
    }
    clock.advance(timedelta(hours=1))
    response = server.api("POST", "/api/refill", json={"user_id": "bob", "reason": "top up"})
    assert response.status_code == 200, response.text
    entry = server.ledger("bob")[-1]
    assert (entry.kind, entry.amount) == (EntryKind.REFILL, 7)
    assert entry.metadata == {**who, "reason": "top up"}


def test_grant_with_expiry_makes_a_credit_block(server):
    response = server.api(
        "POST",
        "/api/grant",
        json={
            "user_id": "bob",
            "amount": "50",
            "reason": "promo",
            "expires_at": "2025-02-01T00:00:00Z",
            "priority": 10,
        },
    )
    assert response.status_code == 200, response.text
    blocks = server.api("GET", "/api/users/bob").json()["blocks"]
    assert [(b["amount"], b["priority"], b["expired"]) for b in blocks] == [("50", 10, False)]


def test_set_refill_and_refill_settings(server, clock):
    assert (
        server.api(
            "POST", "/api/set", json={"user_id": ALICE, "amount": "0", "reason": "reset"}
        ).json()["entry"]["balance_after"]
        == "0"
    )
    settings = server.api(
        "POST",
        "/api/refill-settings",
        json={
            "user_id": ALICE,
            "reason": "monthly plan",
            "enabled": True,
            "amount": "300",
            "interval_value": 1,
            "interval_unit": "days",
        },
    ).json()["account"]["refill"]
    assert settings["source"] == "account"
    assert settings["amount"] == "300"
    assert settings["next_refill_at"] is not None
    early = server.api("POST", "/api/refill", json={"user_id": ALICE, "reason": "try"}).json()
    assert early["refilled"] is False
    clock.advance(timedelta(days=2))
    due = server.api("POST", "/api/refill", json={"user_id": ALICE, "reason": "try"}).json()
    assert due["refilled"] is True
    assert due["entry"]["amount"] == "300"
    assert due["account"]["balance"] == "300"
    reset = server.api(
        "POST", "/api/refill-settings", json={"user_id": ALICE, "reason": "back", "reset": True}
    ).json()
    assert reset["account"]["refill"]["source"] == "config"


# --- gateways: check, charge, hold, settle, release ----------------------------------


def test_charge_is_idempotent_by_request_id(alice):
    body = {"user_id": ALICE, "amount": "10", "request_id": "call-1", "metadata": {"k": "v"}}
    first = alice.api("POST", "/api/charge", json=body).json()["entry"]
    again = alice.api("POST", "/api/charge", json=body).json()["entry"]
    assert first["id"] == again["id"]
    assert first["metadata"] == {"k": "v", "actor": "admin", "via": "api"}
    assert alice.call(alice.meter.balance, ALICE) == START + 1 - 10
    other = alice.api("POST", "/api/charge", json={**body, "amount": "11"})
    assert_error_shape(other, 409, "idempotency_conflict")
    assert alice.call(alice.meter.balance, ALICE) == START + 1 - 10


def test_charge_prices_model_usage(alice):
    body = {
        "user_id": ALICE,
        "request_id": "priced",
        "model": "gpt-4o",
        "usage": {"input": 100, "output": 50},
    }
    entry = alice.api("POST", "/api/charge", json=body).json()["entry"]
    expected = alice.meter.pricing.price("gpt-4o", _usage(100, 50), incomplete=False)[0]
    assert Decimal(entry["cost"]) == expected
    assert entry["usage"] == {"input": 100, "output": 50, "cache_write": 0, "cache_read": 0}


def _usage(input_tokens: int, output_tokens: int) -> Any:
    return TokenUsage(input=input_tokens, output=output_tokens)


def test_hold_settle_release_are_idempotent(alice):
    hold_body = {"user_id": ALICE, "amount": "100", "request_id": "call-2"}
    held = alice.api("POST", "/api/hold", json=hold_body).json()["hold"]
    again = alice.api("POST", "/api/hold", json=hold_body).json()["hold"]
    assert held["id"] == again["id"]
    user = alice.api("GET", "/api/users/alice").json()
    assert user["held"] == "100"
    assert [h["id"] for h in user["hold_list"]] == [held["id"]]
    settle = {"user_id": ALICE, "hold_id": held["id"], "amount": "40"}
    first = alice.api("POST", "/api/settle", json=settle).json()["entry"]
    retry = alice.api("POST", "/api/settle", json=settle).json()["entry"]
    assert first["id"] == retry["id"]
    assert alice.call(alice.meter.balance, ALICE) == START + 1 - 40
    user = alice.api("GET", "/api/users/alice").json()
    assert user["held"] == "0"
    # A second hold, released twice: one RELEASE entry, nothing charged.
    second = alice.api(
        "POST", "/api/hold", json={"user_id": ALICE, "amount": "5", "request_id": "call-3"}
    ).json()["hold"]
    release = {"user_id": ALICE, "hold_id": second["id"]}
    one = alice.api("POST", "/api/release", json=release).json()["entry"]
    two = alice.api("POST", "/api/release", json=release).json()["entry"]
    assert one["id"] == two["id"]
    assert one["kind"] == "release"
    kinds = [e.kind for e in alice.ledger(ALICE)]
    assert kinds.count(EntryKind.RELEASE) == 1
    assert kinds.count(EntryKind.CHARGE) == 1
    assert alice.call(alice.meter.balance, ALICE) == START + 1 - 40


def test_settling_or_releasing_an_unknown_hold_is_404_and_charges_nothing(alice):
    """Tried: an id never made, and a well-formed id of another user's hold."""
    bobs = alice.api(
        "POST", "/api/hold", json={"user_id": "bob", "amount": "5", "request_id": "b-1"}
    ).json()["hold"]
    before = entry_count(alice)
    for path, body in (
        ("/api/settle", {"user_id": ALICE, "hold_id": "no-such-hold", "amount": "40"}),
        ("/api/release", {"user_id": ALICE, "hold_id": "no-such-hold"}),
    ):
        assert_error_shape(alice.api("POST", path, json=body), 404, "hold_not_found")
    settle = {"user_id": ALICE, "hold_id": bobs["id"], "amount": "5"}
    assert_error_shape(alice.api("POST", "/api/settle", json=settle), 404, "hold_not_found")
    assert entry_count(alice) == before


def test_insufficient_balance_is_402_with_librechats_payload(alice):
    before = entry_count(alice)
    body = {"user_id": ALICE, "amount": "5000", "request_id": "big", "strict": True}
    refused = assert_error_shape(alice.api("POST", "/api/charge", json=body), 402, "token_balance")
    assert refused["type"] == "token_balance"
    assert refused["balance"] == START + 1
    assert refused["tokenCost"] == 5000
    assert refused["error"]["type"] == "insufficient_quota"
    held = alice.api(
        "POST", "/api/hold", json={"user_id": ALICE, "amount": "5000", "request_id": "h"}
    )
    assert assert_error_shape(held, 402)["tokenCost"] == 5000
    assert entry_count(alice) == before
    check = alice.api("POST", "/api/check", json={"user_id": ALICE, "cost": "5000"}).json()
    assert check == {"allowed": False, "balance": "1001", "available": "1001", "cost": "5000"}
    priced = alice.api(
        "POST", "/api/check", json={"user_id": ALICE, "model": "gpt-4o", "input_tokens": 10}
    ).json()
    assert priced["allowed"] is True


# --- bad input ----------------------------------------------------------------------

BAD_AMOUNTS: list[Any] = [
    "abc", "-1", "NaN", "nan", "Infinity", "1e400", "1e3", "0x10", " 1", "1,000", "1.2.3", "",
    "\uff19", "99999999999999999", 1.5, 100, True, None, [], {},
]  # fmt: skip


@pytest.mark.parametrize(("path", "good"), [w for w in WRITES if "amount" in w[1]])
def test_bad_amounts_write_nothing(alice, path, good):
    """Amounts tried: BAD_AMOUNTS (words, signs, NaN, infinities, exponents, separators,
    full-width digits, over 10**15 and 16 digits, JSON numbers, booleans, null, lists)."""
    hold_for(alice, path)
    before = entry_count(alice)
    for amount in BAD_AMOUNTS:
        response = alice.api("POST", path, json={**good, "amount": amount})
        assert_error_shape(response, 422)
    assert entry_count(alice) == before
    huge = alice.api("POST", path, json={**good, "amount": "9999999999999999"})
    assert_error_shape(huge, 422, "invalid_input")
    assert entry_count(alice) == before


@pytest.mark.parametrize(("path", "good"), WRITES)
def test_bad_bodies_write_nothing(alice, path, good):
    """Bodies tried: each field missing, an unknown field, user ids empty, too long, with
    a control character, or a number; a reason over 1000 characters, blank, or a number;
    a request id reserved for holds; not JSON; a JSON list; an empty body."""
    before = entry_count(alice)
    tried: list[Any] = [{k: v for k, v in good.items() if k != key} for key in good]
    tried = [t for t in tried if t != good and _required_missing(path, t, good)]
    tried += [
        {**good, "surprise": 1},
        {**good, "user_id": ""},
        {**good, "user_id": "u" * 257},
        {**good, "user_id": "bad\x00id"},
        {**good, "user_id": 42},
        [good],
    ]
    if "reason" in good:
        tried += [{**good, "reason": "r" * 1001}, {**good, "reason": "   "}, {**good, "reason": 1}]
    if "request_id" in good:
        tried += [{**good, "request_id": "hold:x"}, {**good, "request_id": "r" * 257}]
    for body in tried:
        assert_error_shape(alice.api("POST", path, json=body), 422)
    assert_error_shape(alice.api("POST", path, content=b"{not json", headers=_JSON), 400)
    assert_error_shape(alice.api("POST", path, content=b"", headers=_JSON), 422)
    assert entry_count(alice) == before


_JSON = {"Content-Type": "application/json"}


def _required_missing(path: str, body: dict[str, Any], good: dict[str, Any]) -> bool:
    """Whether a body with one key left out lacks a required field of the route."""
    optional = {
        "/api/check": {"cost"},
        "/api/settle": {"amount"},
        "/api/refill-settings": {"enabled"},
    }.get(path, set())
    missing = set(good) - set(body)
    return not missing <= optional


@pytest.mark.parametrize("path", ["/api/charge", "/api/settle"])
def test_oversize_metadata_and_bodies_are_refused(alice, path):
    hold_for(alice, path)
    good = dict(next(b for p, b in WRITES if p == path))
    before = entry_count(alice)
    many = {f"k{i}": i for i in range(300)}
    assert_error_shape(alice.api("POST", path, json={**good, "metadata": many}), 422)
    big = {"blob": "x" * 70_000}
    assert_error_shape(alice.api("POST", path, json={**good, "metadata": big}), 422)
    huge = {"blob": "x" * (2 << 20)}
    assert_error_shape(alice.api("POST", path, json={**good, "metadata": huge}), 413)
    assert entry_count(alice) == before


def test_bad_queries(alice):
    """Queries tried: limits out of range, a forged cursor, naive and inverted times,
    unknown kinds and groupings, a period without a period grouping."""
    for path in (
        "/api/users?limit=0",
        "/api/users?limit=100000",
        "/api/users?after=",
        "/api/ledger?after=cm1.forged",
        "/api/ledger?since=2025-01-01T00:00:00",
        "/api/ledger?since=2025-02-01T00:00:00Z&until=2025-01-01T00:00:00Z",
        "/api/ledger?kind=nope",
        "/api/ledger?limit=abc",
        "/api/usage?by=color",
        "/api/usage?period=decade",
        "/api/users/bad%00id",
    ):
        assert_error_shape(alice.api("GET", path, token=READ), 422)
    assert_error_shape(alice.api("GET", "/api/users/nobody", token=READ), 404, "not_found")
    assert_error_shape(alice.api("GET", "/api/nothing-here", token=READ), 404)
    assert_error_shape(alice.api("DELETE", "/api/grant", token=ADMIN), 405)


# --- reading ---------------------------------------------------------------------------


def test_users_page_by_prefix_and_cursor(server):
    for name in ["team-a/1", "team-a/2", "team-a/3", "team-b/1", "team", "zed"]:
        server.call(server.meter.grant, name, 1)
    page = server.api("GET", "/api/users?prefix=team-a/&limit=2", token=READ).json()
    assert [u["user_id"] for u in page["users"]] == ["team-a/1", "team-a/2"]
    rest = server.api(
        "GET", "/api/users", token=READ, params={"prefix": "team-a/", "after": page["next"]}
    ).json()
    assert [u["user_id"] for u in rest["users"]] == ["team-a/3"]
    assert rest["next"] is None
    exact = server.api("GET", "/api/users?prefix=team&limit=10", token=READ).json()
    assert [u["user_id"] for u in exact["users"]] == [
        "team", "team-a/1", "team-a/2", "team-a/3", "team-b/1",
    ]  # fmt: skip
    slash = server.api("GET", "/api/users/team-a/2", token=READ).json()
    assert slash["user_id"] == "team-a/2"


def test_reading_opens_no_account(server):
    assert server.api("GET", "/api/users/ghost", token=ADMIN).status_code == 404
    assert server.api("GET", "/api/ledger?user_id=ghost", token=ADMIN).json()["entries"] == []
    assert server.call(server.meter.users) == []


def test_ledger_pages_by_cursor(alice):
    for n in range(5):
        alice.call(alice.meter.charge, ALICE, 1, request_id=f"c{n}")
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"user_id": ALICE, "limit": 2}
        if after:
            params["after"] = after
        page = alice.api("GET", "/api/ledger", token=READ, params=params).json()
        seen += [e["id"] for e in page["entries"]]
        after = page["next"]
        if after is None:
            break
    assert seen == [e.id for e in alice.ledger(ALICE)]
    charges = alice.api(
        "GET", "/api/ledger", token=READ, params={"user_id": ALICE, "kind": ["charge"]}
    ).json()
    assert len(charges["entries"]) == 5


def test_usage_by_user_and_model(alice):
    alice.call(alice.meter.charge, ALICE, model="gpt-4o", usage=_usage(10, 10))
    rows = alice.api("GET", "/api/usage?by=user&by=model", token=READ).json()["rows"]
    assert [(r["user_id"], r["model"], r["calls"]) for r in rows] == [(ALICE, "gpt-4o", 1)]
    daily = alice.api("GET", "/api/usage?by=period&period=day", token=READ).json()["rows"]
    assert daily[0]["period_start"] == "2025-01-01T00:00:00+00:00"


# --- outages -------------------------------------------------------------------------------


@pytest.mark.parametrize("server_kind", ["sqlite"])
def test_a_store_outage_is_503_in_the_error_shape(alice):
    outage = BrokenSQLite(alice.path)
    outage.break_()
    try:
        for method, path, body in (
            ("GET", "/api/users/alice", None),
            ("GET", "/api/users", None),
            ("GET", "/api/ledger", None),
            ("POST", "/api/grant", {"user_id": ALICE, "amount": "5", "reason": "x"}),
            ("POST", "/api/charge", {"user_id": "carol", "amount": "5", "request_id": "o1"}),
        ):
            response = alice.api(method, path, json=body)
            assert_error_shape(response, 503, "store_unavailable")
            assert response.headers["retry-after"] == "1"
            assert "garbage" not in response.text
            assert str(alice.path) not in response.text
    finally:
        outage.repair()
    assert alice.api("GET", "/api/users/alice").status_code == 200


# --- mounting ----------------------------------------------------------------------------


def test_mounted_under_a_prefix(memory_server):
    gateway = FastAPI()
    gateway.mount("/admin", memory_server.client.app)
    with TestClient(gateway) as client:
        assert client.get("/admin/api/openapi.json").status_code == 200
        users = client.get("/admin/api/users", headers={"Authorization": f"Bearer {READ}"})
        assert users.status_code == 200
        login = client.get("/admin/login")
        assert 'href="/admin/static/console.css"' in login.text
        assert 'action="/admin/login"' in login.text
        assert client.get("/admin/static/console.css").status_code == 200
        assert client.get("/admin/", follow_redirects=False).headers["location"] == "/admin/login"
        token = login.text.split('name="login_token" value="')[1].split('"')[0]
        done = client.post(
            "/admin/login", data={"token": ADMIN, "login_token": token}, follow_redirects=False
        )
        assert done.status_code == 303
        assert done.headers["location"] == "/admin/users"
        assert "Path=/admin" in done.headers["set-cookie"]
        page = client.get("/admin/users")
        assert 'href="/admin/usage"' in page.text
        missing = client.get("/admin/api/nothing", headers={"Authorization": f"Bearer {READ}"})
        assert missing.json()["error"]["code"] == "not_found"


def test_bad_api_tokens_are_slowed_per_address(alice):
    """A wrong bearer token waits longer each time; no token, or a good one, waits nothing."""
    state = alice.client.app.state.creditmeter  # type: ignore[attr-defined]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    state.throttle = LoginThrottle(sleep=sleep)
    for _ in range(3):
        assert_error_shape(alice.api("GET", "/api/users", token="guess-0123456789abcdef"), 401)
    assert slept == [0.25, 0.5]  # the first failure is answered at once
    assert_error_shape(alice.api("GET", "/api/users", token=None), 401)
    assert alice.api("GET", "/api/users", token=READ).status_code == 200
    assert slept == [0.25, 0.5]


def test_a_slowed_guess_holds_up_no_other_request(tmp_path, clock):
    """While a wrong token waits out its delay, a good request is answered."""

    async def main() -> list[int]:
        meter, _ = open_meter("memory", tmp_path, clock)
        app = create_app(meter, admin_token=ADMIN, read_token=READ)
        waiting, release = asyncio.Event(), asyncio.Event()

        async def sleep(seconds: float) -> None:
            waiting.set()
            await release.wait()

        app.state.creditmeter.throttle = LoginThrottle(sleep=sleep)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            guess = {"Authorization": "Bearer guess-0123456789abcdef"}
            first = await client.get("/api/users", headers=guess)  # answered at once
            slowed = asyncio.create_task(client.get("/api/users", headers=guess))
            await asyncio.wait_for(waiting.wait(), 10)
            good = await asyncio.wait_for(
                client.get("/api/users", headers={"Authorization": f"Bearer {READ}"}), 10
            )
            assert not slowed.done()
            release.set()
            answered = await asyncio.wait_for(slowed, 10)
        await meter.aclose()
        return [first.status_code, good.status_code, answered.status_code]

    assert asyncio.run(main()) == [401, 200, 401]
