"""Every ```python block of every docs page runs, against a local fake OpenAI server.

A page's blocks run in order in one namespace (a page reads top to bottom), in a
fresh folder holding a ``librechat.yaml``. The values a page's comments promise are
checked below, page by page. The blocks other tests run are named in ``RUN_ELSEWHERE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from decimal import Decimal
from pathlib import Path

import pytest
from fake_provider import FakeProvider

import creditmeter
from creditmeter import AsyncBalanceManager, BalanceManager

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))

# Blocks that need more than a fake provider, and the tests that run them.
RUN_ELSEWHERE = {
    "proxy_handler_instance": "tests/integrations/test_litellm.py",  # the LiteLLM proxy module
    "litellm.callbacks": "tests/integrations/test_litellm.py",  # LiteLLM's callback lists
    "127.0.0.1:8080": "tests/integrations/test_gateway_example.py",  # the example gateway
    "class TestMyStore": "",  # a pytest module for a store of your own, not a script
}

# What each page prints, in order of its print() calls (a check per promised value).
EXPECTED: dict[str, list[str]] = {
    "concepts/balances.md": [
        "20000",
        "0 25000",
        "[('open', Decimal('20000')), ('charge', Decimal('-20000'))]",
    ],
    "concepts/batches.md": ["[True, True, False] InsufficientBalance", "23800"],
    "concepts/credit-blocks.md": [
        "True",
        "3000 ['charge', 'expire']",
        "1000 [(Decimal('2000'), Decimal('2000'))]",
    ],
    "concepts/events.md": [
        "[LowBalance(user_id='erin', balance=Decimal('500'), threshold=Decimal('1000'))]"
    ],
    "concepts/holds.md": ["True"],
    "concepts/idempotency.md": ["True 19880", "IdempotencyConflict"],
    "concepts/refills.md": ["None", "10000 10000"],
    "guides/metering.md": ["11", "[5, 1]"],
    "guides/console.md": [
        "200 20500 {'actor': 'admin', 'via': 'api', 'reason': 'welcome credits'}"
    ],
}


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)


def runnable(page: str) -> list[str]:
    return [b for b in python_blocks(page) if not any(marker in b for marker in RUN_ELSEWHERE)]


def close_all(namespace: dict) -> None:
    meters = [v for v in namespace.values() if isinstance(v, (BalanceManager, AsyncBalanceManager))]
    for meter in meters:
        if isinstance(meter, BalanceManager):
            meter.close()

    async def aclose() -> None:
        for meter in meters:
            if isinstance(meter, AsyncBalanceManager):
                await meter.aclose()

    asyncio.run(aclose())
    client = namespace.get("client")
    if client is not None:
        client.close()


def run_page(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_url: str) -> str:
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "librechat.yaml").write_text("version: 1.2.1\nbalance:\n  enabled: true\n")
    namespace: dict = {}
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            for block in runnable(page):
                exec(compile(block, str(DOCS / page), "exec"), namespace)
        for name in ("app", "open_app"):  # Starlette builds middleware lazily: build it now
            if name in namespace:
                namespace[name].build_middleware_stack()
    finally:
        close_all(namespace)
    return output.getvalue()


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p) and p != "guides/litellm.md"])
def test_page_examples_run(page, tmp_path, monkeypatch):
    with FakeProvider() as provider:
        printed = run_page(page, tmp_path, monkeypatch, provider.base_url).splitlines()
    assert printed[: len(EXPECTED.get(page, []))] == EXPECTED.get(page, [])


def test_getting_started_charges_the_reported_usage(tmp_path, monkeypatch):
    with FakeProvider() as provider:
        printed = run_page("getting-started.md", tmp_path, monkeypatch, provider.base_url)
    # alice paid for 5 prompt words and 5 reply words at gpt-4o-mini's rates.
    assert Decimal(printed.splitlines()[1]) == 20000 - (5 * Decimal("0.15") + 5 * Decimal("0.6"))
    assert len(provider.requests) == 1


def test_metering_page_calls_the_provider_as_it_says(tmp_path, monkeypatch):
    with FakeProvider() as provider:
        run_page("guides/metering.md", tmp_path, monkeypatch, provider.base_url)
    # Eleven async calls (a retried call runs; it is not charged twice), two streams.
    assert len(provider.requests) == 11 + 2


def test_pricing_page_figures(tmp_path, monkeypatch):
    printed = run_page("concepts/pricing.md", tmp_path, monkeypatch, "http://127.0.0.1:9")
    assert printed.splitlines()[0].startswith("8700.0 ")
    assert printed.splitlines()[1] == "70.0"


def test_asgi_page_builds_both_apps(tmp_path, monkeypatch):
    assert len(runnable("guides/asgi.md")) >= 2
    namespace_names = set()
    for block in runnable("guides/asgi.md"):
        namespace_names |= set(re.findall(r"^(\w+) = ", block, flags=re.MULTILINE))
    assert {"app", "open_app", "gateway_meter", "open_meter"} <= namespace_names
    run_page("guides/asgi.md", tmp_path, monkeypatch, "http://127.0.0.1:9")


def test_every_python_block_is_run_somewhere():
    for page in PAGES:
        for block in python_blocks(page):
            if block in runnable(page) and page != "guides/litellm.md":
                continue
            elsewhere = [test for marker, test in RUN_ELSEWHERE.items() if marker in block]
            if page == "guides/litellm.md":
                elsewhere.append("tests/integrations/test_litellm.py")
            assert elsewhere, (page, block[:60])
            for test in filter(None, elsewhere):
                assert (
                    page in (ROOT / test).read_text()
                    or page.split("/")[-1] in (ROOT / test).read_text()
                ), (page, test)


def test_the_reference_names_every_public_name():
    documented = set()
    for path in (DOCS / "reference").glob("*.md"):
        documented |= set(
            re.findall(r"^::: creditmeter\.(?:[\w.]+\.)?(\w+)\s*$", path.read_text(), re.MULTILINE)
        )
    assert set(creditmeter.__all__) - documented == set()


def test_every_test_path_the_docs_name_exists():
    named = set()
    for page in PAGES:
        named |= set(re.findall(r"\btests/[\w/.-]*\w/?", (DOCS / page).read_text()))
    assert named
    assert sorted(path for path in named if not (ROOT / path).exists()) == []
