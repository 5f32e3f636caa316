"""The HTML console: login, sessions, CSRF, read-only sessions, forms, pages, headers.

Tried here: logging in with the admin token, the read token, a wrong token
(slowed, 401) and a stale login form (403); the session cookie's flags
(HttpOnly, SameSite=Strict, Path, Secure only over https); a forged or
foreign cookie; logging out; every write form with and without its CSRF
token, from an admin and a read-only session; what a read-only session sees;
the users page's search and paging; the user page's ledger paging and chart;
the usage page and its CSV; the security headers on every kind of response;
and that no page or error shows a token.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from server_helpers import ADMIN, READ, Server

from creditmeter import AsyncBalanceManager, AsyncMemoryStore, EntryKind, TokenUsage
from creditmeter.server import create_app
from creditmeter.server.security import LoginThrottle

FORMS = ["grant", "set", "refill", "refill-settings"]


def login_token(client: TestClient) -> str:
    page = client.get("/login")
    return re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]


def log_in(client: TestClient, token: str) -> Any:
    return client.post(
        "/login", data={"token": token, "login_token": login_token(client)}, follow_redirects=False
    )


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]


def form_data(form: str, csrf: str | None) -> dict[str, str]:
    data = {"user_id": "alice", "reason": "support ticket 7"}
    if form in {"grant", "set"}:
        data["amount"] = "250"
    if form == "refill-settings":
        data.update(enabled="on", amount="100", interval_value="7", interval_unit="days")
    if csrf is not None:
        data["csrf_token"] = csrf
    return data


@pytest.fixture
def alice(server: Server) -> Server:
    server.call(server.meter.grant, "alice", 1)
    return server


def test_login_sets_a_strict_httponly_cookie_and_logout_clears_it(alice):
    client = alice.client
    assert client.get("/users", follow_redirects=False).headers["location"] == "/login"
    done = log_in(client, ADMIN)
    assert done.status_code == 303
    assert done.headers["location"] == "/users"
    cookie = next(c for c in done.headers.get_list("set-cookie") if "creditmeter_session=" in c)
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert "Path=/" in cookie
    assert "Secure" not in cookie  # plain http here; see the https test
    assert ADMIN not in cookie
    page = client.get("/users")
    assert page.status_code == 200
    assert 'id="users-table"' in page.text
    out = client.post("/logout", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert out.status_code == 303
    assert client.get("/users", follow_redirects=False).status_code == 303


def test_cookie_is_secure_over_https(memory_server):
    with TestClient(memory_server.client.app, base_url="https://console.example") as client:
        done = log_in(client, READ)
        cookie = next(c for c in done.headers.get_list("set-cookie") if "session=" in c)
        assert "Secure" in cookie


def test_a_wrong_token_is_refused_and_slowed(alice):
    state = alice.client.app.state.creditmeter  # type: ignore[attr-defined]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    state.throttle = LoginThrottle(sleep=sleep)
    refused = log_in(alice.client, "not-the-token-at-all")
    assert refused.status_code == 401
    assert "That token is not valid." in refused.text
    assert "not-the-token-at-all" not in refused.text
    assert "creditmeter_session=" not in refused.headers.get("set-cookie", "")
    assert len(state.throttle) == 1
    assert log_in(alice.client, "not-the-token-either").status_code == 401
    assert slept == [0.25]  # the second failure waited
    assert log_in(alice.client, ADMIN).status_code == 303
    assert len(state.throttle) == 0


def test_login_throttle_grows_is_capped_and_bounded():
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    throttle = LoginThrottle(base=0.25, cap=2.0, capacity=3, clock=lambda: now[0], sleep=sleep)

    async def fail(address: str, times: int) -> None:
        for _ in range(times):
            await throttle.failed(address)

    asyncio.run(fail("a", 6))
    assert slept == [0.25, 0.5, 1.0, 2.0, 2.0]  # none for the first; doubling; capped
    throttle.succeeded("a")
    asyncio.run(fail("a", 2))
    assert slept[-1] == 0.25  # forgotten after a success
    now[0] += 10_000
    assert throttle.delay_for("a") == 0.0  # the window passed
    for address in "bcdef":
        asyncio.run(throttle.failed(address))
    assert len(throttle) == 3  # the oldest addresses are dropped


def test_a_stale_login_form_is_refused(alice):
    response = alice.client.post("/login", data={"token": ADMIN, "login_token": "forged"})
    assert response.status_code == 403
    alice.client.cookies.clear()
    token = login_token(alice.client)
    alice.client.cookies.clear()  # the nonce cookie is gone: the form is not this browser's
    response = alice.client.post("/login", data={"token": ADMIN, "login_token": token})
    assert response.status_code == 403


def test_forged_and_foreign_session_cookies_are_ignored(alice):
    client = alice.client
    client.cookies.set("creditmeter_session", "eyJyIjoiYWRtaW4ifQ.forged.sig")
    assert client.get("/users", follow_redirects=False).status_code == 303
    other = create_app(
        AsyncBalanceManager(AsyncMemoryStore()), admin_token="another-admin-token-xyz"
    )
    with TestClient(other) as elsewhere:
        cookie = log_in(elsewhere, "another-admin-token-xyz").cookies["creditmeter_session"]
    client.cookies.set("creditmeter_session", cookie)
    assert client.get("/users", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("form", FORMS)
def test_each_form_writes_with_actor_and_reason(alice, form):
    log_in(alice.client, ADMIN)
    page = alice.client.get("/user", params={"id": "alice"})
    assert f'id="{form}-form"' in page.text
    before = len(alice.ledger("alice"))
    done = alice.client.post(
        f"/user/{form}", data=form_data(form, csrf_of(page.text)), follow_redirects=False
    )
    assert done.status_code == 303, done.text
    assert done.headers["location"].startswith("/user?id=alice&done=")
    shown = alice.client.get(done.headers["location"])
    assert 'id="notice"' in shown.text
    entries = alice.ledger("alice")
    recorded = {"actor": "admin", "via": "console", "reason": "support ticket 7"}
    if form == "grant":
        assert entries[-1].kind is EntryKind.GRANT
        assert entries[-1].metadata == recorded
        assert "support ticket 7" in shown.text
    elif form == "set":
        assert entries[-1].balance_after == 250
        assert entries[-1].metadata == recorded
    elif form == "refill":
        assert len(entries) == before  # no refill was due
        assert "No refill was due" in shown.text
    else:
        account = alice.call(alice.meter.account, "alice")
        assert account.refill is not None
        assert account.refill.amount == 100
        assert account.refill.interval_value == 7
        assert entries[-1].metadata == {**recorded, "refill": "enabled, 100 every 7 days"}


@pytest.mark.parametrize("form", FORMS)
def test_forms_without_csrf_are_refused(alice, form):
    log_in(alice.client, ADMIN)
    page = alice.client.get("/user", params={"id": "alice"})
    before = len(alice.ledger("alice"))
    for csrf in (None, "", "wrong", csrf_of(page.text) + "x"):
        refused = alice.client.post(f"/user/{form}", data=form_data(form, csrf))
        assert refused.status_code == 403
        assert "CSRF" in refused.text
    assert len(alice.ledger("alice")) == before


@pytest.mark.parametrize("form", FORMS)
def test_read_only_sessions_see_no_forms_and_cannot_post(alice, form):
    assert log_in(alice.client, READ).status_code == 303
    page = alice.client.get("/user", params={"id": "alice"})
    assert page.status_code == 200
    assert "<form" in page.text  # the logout form only
    assert f'id="{form}-form"' not in page.text
    assert 'id="change"' not in page.text
    assert "Read-only" in page.text
    before = len(alice.ledger("alice"))
    refused = alice.client.post(f"/user/{form}", data=form_data(form, csrf_of(page.text)))
    assert refused.status_code == 403
    assert "read-only" in refused.text
    assert len(alice.ledger("alice")) == before


def test_posting_without_a_session_is_refused(alice):
    for form in FORMS:
        assert alice.client.post(f"/user/{form}", data=form_data(form, "x")).status_code == 403
    assert len(alice.ledger("alice")) == 2  # open + grant


def test_a_bad_form_shows_the_error_and_writes_nothing(alice):
    log_in(alice.client, ADMIN)
    csrf = csrf_of(alice.client.get("/user", params={"id": "alice"}).text)
    before = len(alice.ledger("alice"))
    for amount in ("abc", "-1", "NaN", "1e400", "", "9999999999999999"):
        data = {**form_data("grant", csrf), "amount": amount}
        shown = alice.client.post("/user/grant", data=data)
        assert shown.status_code == 422
        assert 'id="form-error"' in shown.text
    no_reason = {**form_data("grant", csrf), "reason": ""}
    assert alice.client.post("/user/grant", data=no_reason).status_code == 422
    long_reason = {**form_data("grant", csrf), "reason": "r" * 1001}
    assert alice.client.post("/user/grant", data=long_reason).status_code == 422
    ghost = {**form_data("grant", csrf), "user_id": ""}
    assert alice.client.post("/user/grant", data=ghost).status_code == 422
    assert len(alice.ledger("alice")) == before


def test_users_page_searches_and_pages(server):
    for n in range(60):
        server.call(server.meter.grant, f"user-{n:03d}", 1)
    server.call(server.meter.grant, "other", 1)
    log_in(server.client, READ)
    first = server.client.get("/users")
    assert first.text.count('href="/user?id=') == 50
    following = re.search(r'href="([^"]+)" rel="next"', first.text).group(1)  # type: ignore[union-attr]
    second = server.client.get(following.replace("&amp;", "&"))
    assert second.text.count('href="/user?id=') == 11
    assert 'rel="next"' not in second.text
    found = server.client.get("/users", params={"prefix": "user-05"})
    assert found.text.count('href="/user?id=') == 10
    assert "other" not in found.text.split("<main", 1)[1]


def test_user_page_pages_the_ledger_newest_first_and_draws_the_chart(alice):
    for n in range(30):
        alice.call(alice.meter.charge, "alice", model="gpt-4o", usage=TokenUsage(input=n + 1))
    log_in(alice.client, READ)
    page = alice.client.get("/user", params={"id": "alice"})
    rows = page.text.split('id="ledger-table"')[1].split("</table>")[0].count("<tr>")
    assert rows == 1 + 25  # header + one page
    assert 'id="older-entries"' in page.text
    older = alice.client.get("/user", params={"id": "alice", "older": 25})
    assert older.text.split('id="ledger-table"')[1].count("<tr>") == 1 + 7  # 32 entries
    assert "<svg" in page.text
    assert "gpt-4o, 01-01" in page.text
    assert 'role="img"' in page.text
    assert alice.client.get("/user", params={"id": "nobody"}).status_code == 404
    assert alice.client.get("/user", params={"id": "alice", "older": "-1"}).status_code == 422


def test_usage_page_and_csv(alice):
    alice.call(alice.meter.charge, "alice", model="=cmd|' /C calc'!A0", usage=TokenUsage(input=5))
    alice.call(alice.meter.charge, "alice", model="gpt-4o", usage=TokenUsage(input=100))
    log_in(alice.client, READ)
    page = alice.client.get("/usage", params={"since": "2024-12-01", "until": "2025-01-31"})
    assert page.status_code == 200
    assert 'id="usage-table"' in page.text
    assert "<svg" in page.text
    download = alice.client.get("/usage.csv", params={"since": "2024-12-01", "until": "2025-01-31"})
    assert download.headers["content-type"].startswith("text/csv")
    assert "attachment" in download.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(download.text)))
    assert {row["model"] for row in rows} == {"gpt-4o", "'=cmd|' /C calc'!A0"}
    assert all(row["user_id"] == "alice" for row in rows)
    for bad in ({"since": "yesterday"}, {"since": "2025-02-01", "until": "2025-01-01"}):
        assert alice.client.get("/usage", params=bad).status_code == 422
    assert alice.client.get("/usage", params={"since": "1990-01-01"}).status_code == 422


def test_security_headers_on_every_response(alice):
    log_in(alice.client, READ)
    for path in (
        "/login",
        "/users",
        "/user?id=alice",
        "/usage",
        "/usage.csv",
        "/static/console.css",
        "/nowhere",
        "/api/openapi.json",
        "/api/users",
    ):
        response = alice.client.get(path)
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert ADMIN not in response.text
        assert READ not in response.text
        if path.startswith("/user"):
            assert response.headers["cache-control"] == "no-store"
            assert "<script" not in response.text
            assert " style=" not in response.text


def test_pages_are_accessible_by_structure(alice):
    """The parts the browser's axe check relies on: lang, landmarks, one h1, labels."""
    log_in(alice.client, ADMIN)
    for path in ("/users", "/user?id=alice", "/usage"):
        html = alice.client.get(path).text
        assert '<html lang="en">' in html
        assert html.count("<h1") == 1
        for landmark in ("<header", "<main", "<nav", "<footer"):
            assert landmark in html
        for field in re.findall(r'<input (?![^>]*type="hidden")[^>]*id="([^"]+)"', html):
            assert f'for="{field}"' in html, field
        for select in re.findall(r'<select [^>]*id="([^"]+)"', html):
            assert f'for="{select}"' in html
    login = alice.client.get("/login").text
    assert 'for="token"' in login


def test_user_ids_models_and_reasons_are_shown_escaped(alice):
    """Tried: a user id, a model and a grant reason holding markup and quotes."""
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    alice.call(alice.meter.grant, evil, 5, reason=evil)
    alice.call(alice.meter.charge, evil, model=evil, usage=TokenUsage(input=10, output=5))
    log_in(alice.client, ADMIN)
    for path, params in (
        ("/users", {}),
        ("/users", {"prefix": "<script"}),
        ("/user", {"id": evil}),
        ("/usage", {"since": "2024-12-01", "until": "2025-01-31"}),
    ):
        page = alice.client.get(path, params=params)
        assert page.status_code == 200, (path, page.text[:300])
        assert "<script>alert" not in page.text
        assert "<img src=x" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
