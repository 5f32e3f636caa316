"""The console in a real browser: headless Chromium, driven by Playwright, over a real server.

uvicorn serves the app on a loopback port over an SQLite file seeded with six
users and three weeks of charges (``live``). Every page is checked with
axe-core (no serious or critical violation) and saved as a screenshot
(``browser``). The flows: an admin logs in, finds a user by id prefix,
grants credits with a reason and sees the balance and the ledger change, and
the chart after a charge through the API; a read-only login sees no form
that writes and is refused when it posts one anyway; a form without its
CSRF token is refused; logging out ends the session in the browser.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from browser import DESKTOP, PHONE, Shots, launch, screenshot_folder, shown_credits
from live import ADMIN_TOKEN, READ_TOKEN, USERS, LiveServer, reader, seed

from creditmeter import EntryKind


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium for this module's tests."""
    with launch() as launched:
        yield launched


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded SQLite file the server serves."""
    path = tmp_path_factory.mktemp("browser") / "console.db"
    seed(path)
    return path


@pytest.fixture(scope="module")
def live(browser: Any, store_path: Path) -> Iterator[LiveServer]:
    """The app, served by uvicorn on a free loopback port (after the browser: skips first)."""
    del browser
    with LiveServer(store_path) as server:
        yield server


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Shots:
    """The screenshot folder and the axe-core findings of this module."""
    return Shots(screenshot_folder(tmp_path_factory))


@pytest.fixture
def page(browser: Any, live: LiveServer, record_property: Any, shots: Shots) -> Iterator[Any]:
    """A fresh desktop-size page (its own cookies) on the live server."""
    record_property("screenshots", str(shots.folder))
    context = browser.new_context(base_url=live.url, viewport=DESKTOP)
    try:
        yield context.new_page()
    finally:
        context.close()


def expect(target: Any) -> Any:
    """Playwright's retrying assertions (imported late: the module skips without Playwright)."""
    from playwright.sync_api import expect as playwright_expect  # noqa: PLC0415

    return playwright_expect(target)


def log_in(page: Any, token: str) -> None:
    """Log in through the login form; end on the users page."""
    page.goto("/login")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Users")


def accessible(page: Any, shots: Shots, name: str) -> None:
    """Assert axe-core finds no serious or critical violation on the page, and save it."""
    shots.take(page, name)
    blocking = shots.axe(page, name)
    assert not blocking, f"axe-core on the {name} page: {blocking}"


def balance_on_page(page: Any) -> Decimal:
    """The balance the user page shows."""
    return shown_credits(page.locator("#balance").inner_text())


def chart_segments(page: Any) -> list[str]:
    """The titles of the chart's bar segments: "model, day: N credits"."""
    return [text.strip() for text in page.locator("svg.chart rect > title").all_text_contents()]


def submit_form(page: Any, action: str, fields: dict[str, str]) -> Any:
    """Post a form the page did not offer, from the page (its cookies); the response shown."""
    # The navigation to the answer, loaded: the next step cannot interrupt it.
    with page.expect_navigation(url=f"**{action}") as navigation:
        page.evaluate(
            """([action, fields]) => {
                const form = document.createElement("form");
                form.method = "post";
                form.action = action;
                for (const [name, value] of Object.entries(fields)) {
                    const input = document.createElement("input");
                    input.type = "hidden";
                    input.name = name;
                    input.value = value;
                    form.appendChild(input);
                }
                document.body.appendChild(form);
                form.submit();
            }""",
            [action, fields],
        )
    return navigation.value


def test_an_admin_finds_a_user_grants_credits_and_sees_the_page_change(
    page: Any, live: LiveServer, shots: Shots, store_path: Path
) -> None:
    # Anything the CSP blocks (a style, a script) shows up as a console error. The
    # browser's own request for /favicon.ico (404: the app has none) is not the page's.
    problems: list[str] = []

    def console(message: Any) -> None:
        if message.type == "error" and not message.location["url"].endswith("/favicon.ico"):
            problems.append(f"{message.text} at {message.location['url']}")

    page.on("console", console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto("/users")
    expect(page).to_have_url(f"{live.url}/login")
    accessible(page, shots, "login")
    log_in(page, ADMIN_TOKEN)
    session = next(c for c in page.context.cookies() if c["name"] == "creditmeter_session")
    assert session["httpOnly"]
    assert session["sameSite"] == "Strict"
    expect(page.locator("#users-table tbody tr")).to_have_count(len(USERS))
    accessible(page, shots, "users")

    page.get_by_label("User id starts with").fill("team-alpha")
    page.get_by_role("button", name="Search").click()
    rows = page.locator("#users-table tbody tr")
    expect(rows).to_have_count(3)
    assert all(name.startswith("team-alpha-") for name in rows.locator("th").all_inner_texts())

    page.get_by_role("link", name="team-alpha-bruno").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("User team-alpha-bruno")
    before = balance_on_page(page)
    before_top = page.locator("#ledger-table tbody tr").first.inner_text()
    segments = chart_segments(page)
    assert segments, "the seeded charges should draw bars"

    grant = page.locator("#grant-form")
    grant.get_by_label("Credits").fill("2500")
    grant.get_by_label("Reason").fill("Support ticket 4711: refund of a failed run")
    grant.get_by_role("button", name="Grant").click()
    expect(page.locator("#notice")).to_have_text("Credits granted.")
    assert balance_on_page(page) == before + 2500
    top = page.locator("#ledger-table tbody tr").first.locator("td")
    assert top.all_inner_texts()[1:4] == ["grant", "2,500", f"{before + 2500:,}"]
    assert "Support ticket 4711" in top.nth(5).inner_text()
    assert page.locator("#ledger-table tbody tr").first.inner_text() != before_top
    accessible(page, shots, "user")

    # A charge through the JSON API (a model this user never used) adds a bar segment.
    answer = page.request.post(
        "/api/charge",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        data={
            "user_id": "team-alpha-bruno",
            "request_id": "browser-chart-1",
            "model": "claude-sonnet-4",
            "usage": {"input": 2000, "output": 500},
        },
    )
    assert answer.status == 200, answer.text()
    cost = Decimal(answer.json()["entry"]["amount"])
    page.reload()
    assert balance_on_page(page) == before + 2500 + cost
    new = [s for s in chart_segments(page) if s not in segments]
    assert len(new) == 1
    assert new[0].startswith("claude-sonnet-4, ")
    expect(page.locator(".legend")).to_contain_text("claude-sonnet-4")

    page.get_by_role("link", name="Usage").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Usage")
    expect(page.locator("#usage-table")).to_contain_text("team-alpha-bruno")
    accessible(page, shots, "usage")
    assert problems == []

    with reader(store_path) as meter:
        entry = next(
            e for e in reversed(meter.ledger("team-alpha-bruno")) if e.kind is EntryKind.GRANT
        )
    assert entry.amount == 2500
    assert entry.metadata["reason"] == "Support ticket 4711: refund of a failed run"
    assert entry.metadata["actor"] == "admin"


def test_the_user_page_fits_a_phone(browser: Any, live: LiveServer, shots: Shots) -> None:
    context = browser.new_context(
        base_url=live.url, viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    try:
        page = context.new_page()
        log_in(page, ADMIN_TOKEN)
        page.goto("/user?id=team-beta-dana")
        expect(page.get_by_role("heading", level=1)).to_have_text("User team-beta-dana")
        # Nothing wider than the screen: wide tables scroll inside their own box.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        expect(page.locator("#grant-form")).to_be_visible()
        accessible(page, shots, "user-phone-full")
        shots.take(page, "user-phone", full_page=False)  # what the phone's screen shows
    finally:
        context.close()


def test_a_read_only_login_sees_no_write_form_and_cannot_post_one(
    page: Any, live: LiveServer, shots: Shots, store_path: Path
) -> None:
    del live
    user = "team-beta-emeka"
    log_in(page, READ_TOKEN)
    expect(page.locator(".role")).to_have_text("Read-only")
    page.goto(f"/user?id={user}")
    expect(page.get_by_role("heading", level=1)).to_have_text(f"User {user}")
    # The one form that posts is "Log out".
    assert page.locator("form[method=post]").count() == 1
    expect(page.locator("form.logout")).to_have_count(1)
    expect(page.locator("#change")).to_have_count(0)
    expect(page.get_by_role("button", name="Grant")).to_have_count(0)
    before = balance_on_page(page)
    accessible(page, shots, "user-read-only")

    csrf = page.locator("form.logout input[name=csrf_token]").get_attribute("value")
    response = submit_form(
        page,
        "/user/grant",
        {"csrf_token": csrf, "user_id": user, "amount": "1000", "reason": "should not happen"},
    )
    assert response.status == 403
    expect(page.locator(".error")).to_contain_text("read-only")
    accessible(page, shots, "refused")
    page.goto(f"/user?id={user}")
    assert balance_on_page(page) == before
    with reader(store_path) as meter:
        assert all(
            e.kind is not EntryKind.GRANT or e.metadata.get("reason") != "should not happen"
            for e in meter.ledger(user)
        )


def test_a_form_without_its_csrf_token_is_refused(page: Any, live: LiveServer) -> None:
    del live
    user = "ops-fatima"
    log_in(page, ADMIN_TOKEN)
    page.goto(f"/user?id={user}")
    before = balance_on_page(page)
    page.locator("#grant-form input[name=csrf_token]").evaluate("input => input.remove()")
    grant = page.locator("#grant-form")
    grant.get_by_label("Credits").fill("999")
    grant.get_by_label("Reason").fill("no CSRF token")
    with page.expect_response(lambda r: r.url.endswith("/user/grant")) as info:
        grant.get_by_role("button", name="Grant").click()
    assert info.value.status == 403
    expect(page.locator(".error")).to_contain_text("CSRF")

    # A token from another session is refused as well.
    other = page.context.browser.new_context(base_url=page.url.split("/user")[0])
    try:
        other_page = other.new_page()
        log_in(other_page, ADMIN_TOKEN)
        foreign = other_page.locator("form.logout input[name=csrf_token]").get_attribute("value")
    finally:
        other.close()
    response = submit_form(
        page,
        "/user/grant",
        {"csrf_token": foreign, "user_id": user, "amount": "999", "reason": "foreign token"},
    )
    assert response.status == 403
    page.goto(f"/user?id={user}")
    assert balance_on_page(page) == before


def test_logging_out_ends_the_session(page: Any, live: LiveServer) -> None:
    log_in(page, ADMIN_TOKEN)
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(f"{live.url}/login")
    assert "creditmeter_session" not in {c["name"] for c in page.context.cookies()}
    page.goto("/users")
    expect(page).to_have_url(f"{live.url}/login")
    page.goto("/user?id=team-alpha-ana")
    expect(page).to_have_url(f"{live.url}/login")
