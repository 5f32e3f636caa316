"""The README's Python examples run as written, against a local fake OpenAI server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from decimal import Decimal
from pathlib import Path

import pytest
from fake_provider import FakeProvider

from creditmeter import AsyncBalanceManager

README = Path(__file__).parents[2] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(python_blocks()) >= 4


def test_readme_examples_run(tmp_path, monkeypatch):
    namespace: dict = {}
    output = io.StringIO()
    with FakeProvider() as provider:
        monkeypatch.setenv("OPENAI_BASE_URL", provider.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        monkeypatch.chdir(tmp_path)
        (tmp_path / "librechat.yaml").write_text("version: 1.2.1\nbalance:\n  enabled: true\n")
        try:
            with contextlib.redirect_stdout(output):
                for block in python_blocks():
                    if "class TestMyStore" in block:
                        continue  # a pytest module for a store of your own
                    if "CreditMeterMiddleware" in block or "127.0.0.1:8080" in block:
                        continue  # the gateway's: integrations/test_gateway_example.py runs them
                    exec(compile(block, str(README), "exec"), namespace)
        finally:
            for name in ("meter", "client"):  # async_client belonged to a finished loop
                if name in namespace:
                    namespace[name].close()
    printed = output.getvalue().splitlines()
    # In one example: alice paid for 5 prompt words and 5 reply words at gpt-4o-mini's rates.
    assert Decimal(printed[1]) == 20000 - (5 * Decimal("0.15") + 5 * Decimal("0.6"))
    assert "11" in printed  # the async example's ledger length
    assert "[5, 1]" in printed  # the streaming example
    assert any(line.startswith("8700.0 ") for line in printed)  # the pricing example
    assert "70.0" in printed
    assert any("LowBalance(user_id='erin'" in line for line in printed)  # the events example
    assert "True" in printed  # the holds example: nothing left held
    assert "[True, True, False] InsufficientBalance" in printed  # the batches example
    assert "23800" in printed  # ...and its replay charged nothing twice
    assert "3000 ['charge', 'expire']" in printed  # the credit blocks example
    assert "1000 [(Decimal('2000'), Decimal('2000'))]" in printed
    # One plain call, eleven async ones (a retried call runs; it is not charged twice),
    # two streams and the reserved call.
    assert len(provider.requests) == 1 + 11 + 2 + 1


@pytest.mark.parametrize("command", ["python3 -m venv .venv"])
def test_readme_commands_are_the_ci_commands(command):
    text = README.read_text()
    assert command in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' && .venv/bin/pytest" in text
    assert ".venv/bin/pytest" in ci


def test_every_test_path_the_readme_names_exists():
    """The quick subset command and the pointers into tests/ follow the files when they move."""
    named = set(re.findall(r"\btests/[\w/.-]*\w/?", README.read_text()))
    assert named
    assert sorted(path for path in named if not (README.parent / path).exists()) == []


def test_readme_gateway_examples_build_apps(tmp_path, monkeypatch):
    """The middleware blocks (those that need no running gateway) build working apps."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "librechat.yaml").write_text("version: 1.2.1\nbalance:\n  enabled: true\n")
    blocks = [
        block
        for block in python_blocks()
        if "CreditMeterMiddleware" in block and "127.0.0.1:8080" not in block
    ]
    assert len(blocks) >= 2
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        meters = [value for value in namespace.values() if isinstance(value, AsyncBalanceManager)]

        async def close_all() -> None:
            for meter in meters:
                await meter.aclose()

        asyncio.run(close_all())
    assert {"app", "open_app"} <= set(namespace)
    assert len(meters) == 2
    for name in ("app", "open_app"):  # Starlette builds middleware lazily: build it now
        namespace[name].build_middleware_stack()
