"""Driving Debian's Chromium with Playwright: launching it, axe-core checks, screenshots.

The browser is the distribution's ``/usr/bin/chromium`` (``.ci/run`` installs
the ``chromium`` package), never one that ``playwright install`` downloads.
Without it, or without the ``playwright`` package, the browser tests skip
with a message saying what to install; with ``CREDITMETER_REQUIRE_SERVICES=1``
they fail instead, as the store tests do for a missing server.

Screenshots go to ``$CREDITMETER_ARTIFACTS/screenshots`` (CI keeps that
folder) or to pytest's temporary folder; with ``CREDITMETER_WRITE_SCREENSHOTS=1``
the ones the README shows are also written to ``docs/images/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("CREDITMETER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
README_SHOTS = {"users": "console-users.png", "user": "console-user.png"}
"""Screenshot name -> the file in docs/images it also becomes (CREDITMETER_WRITE_SCREENSHOTS=1)."""
README_HEIGHT = 1240
"""The README copies show the top of the page, down to the chart."""
BLOCKING_IMPACTS = frozenset({"serious", "critical"})


def _missing(message: str) -> None:
    if os.environ.get("CREDITMETER_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def need_browser() -> None:
    """Skip (or fail, under CREDITMETER_REQUIRE_SERVICES=1) without Playwright or Chromium."""
    try:
        import axe_playwright_python  # noqa: F401, PLC0415
        import playwright.sync_api  # noqa: F401, PLC0415 - only checked for here
    except ImportError as exc:
        _missing(
            f"the browser tests need {exc.name}: .venv/bin/pip install playwright "
            "axe-playwright-python (no `playwright install`: they drive Debian's chromium)"
        )
    if not os.access(CHROMIUM, os.X_OK):
        _missing(
            f"the browser tests need Chromium at {CHROMIUM}: apt-get install chromium "
            "(or set CREDITMETER_CHROMIUM to a Chromium binary)"
        )


@contextlib.contextmanager
def launch() -> Iterator[Any]:
    """Headless Chromium, closed after (skips or fails the test when it is not here)."""
    need_browser()
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - checked by need_browser

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


class Shots:
    """Where a module's screenshots go, and the axe-core findings of every page checked."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.findings: dict[str, list[dict[str, Any]]] = {}

    def take(self, page: Any, name: str, *, full_page: bool = True) -> Path:
        """Save ``name.png`` (and its README copy when asked for); return its path."""
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        if name in README_SHOTS and os.environ.get("CREDITMETER_WRITE_SCREENSHOTS") == "1":
            DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
            width = page.viewport_size["width"]
            page.screenshot(
                path=str(DOCS_IMAGES / README_SHOTS[name]),
                full_page=True,
                clip={"x": 0, "y": 0, "width": width, "height": README_HEIGHT},
            )
        return path

    def axe(self, page: Any, name: str) -> list[dict[str, Any]]:
        """Run axe-core in ``page``; record every violation; return the serious and critical."""
        from axe_playwright_python.sync_playwright import Axe  # noqa: PLC0415

        violations = Axe().run(page).response["violations"]
        found = [
            {
                "id": v["id"],
                "impact": v["impact"],
                "help": v["help"],
                "targets": [node["target"] for node in v["nodes"]],
            }
            for v in violations
        ]
        self.findings[name] = found
        (self.folder / "axe.json").write_text(json.dumps(self.findings, indent=2) + "\n")
        return [v for v in found if v["impact"] in BLOCKING_IMPACTS]


def screenshot_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$CREDITMETER_ARTIFACTS/screenshots``, or one in pytest's temporary folder."""
    root = os.environ.get("CREDITMETER_ARTIFACTS")
    folder = Path(root) / "screenshots" if root else tmp_path_factory.getbasetemp() / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shown_credits(text: str) -> Decimal:
    """A number as the console shows it (``"1,234.5"``) as a ``Decimal``."""
    return Decimal(re.sub(r"[,\s]", "", text))
