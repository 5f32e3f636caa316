"""The README's example runs as written, against a local fake OpenAI server.

The README keeps one example; the others moved to the documentation site, where
tests/docs/test_docs_examples.py runs them and checks the values they print.
"""

from __future__ import annotations

import contextlib
import io
import re
from decimal import Decimal
from pathlib import Path

import pytest
from fake_provider import FakeProvider

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
MAX_LINES = 200


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_is_short():
    assert README.read_text().count("\n") <= MAX_LINES


def test_readme_example_runs(tmp_path, monkeypatch):
    [block] = python_blocks()
    namespace: dict = {}
    output = io.StringIO()
    with FakeProvider() as provider:
        monkeypatch.setenv("OPENAI_BASE_URL", provider.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        monkeypatch.chdir(tmp_path)
        try:
            with contextlib.redirect_stdout(output):
                exec(compile(block, str(README), "exec"), namespace)
        finally:
            for name in ("meter", "client"):
                if name in namespace:
                    namespace[name].close()
    printed = output.getvalue().splitlines()
    # alice paid for 5 prompt words and 5 reply words at gpt-4o-mini's rates.
    assert Decimal(printed[1]) == 20000 - (5 * Decimal("0.15") + 5 * Decimal("0.6"))
    assert len(provider.requests) == 1


@pytest.mark.parametrize("command", ["python3 -m venv .venv"])
def test_readme_commands_are_the_ci_commands(command):
    text = README.read_text()
    assert command in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' && .venv/bin/pytest" in text
    assert "pip install -e '.[cli]' && .venv/bin/creditmeter demo" in text
    assert ".venv/bin/pytest" in ci


def test_every_test_path_the_readme_names_exists():
    """The quick subset command and the pointers into tests/ follow the files when they move."""
    named = set(re.findall(r"\btests/[\w/.-]*\w/?", README.read_text()))
    assert named
    assert sorted(path for path in named if not (ROOT / path).exists()) == []


def test_every_relative_link_of_the_readme_exists():
    """The links into docs/ work on GitHub as well as on the site."""
    links = re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", README.read_text())
    assert any(link.startswith("docs/") for link in links)
    assert sorted(link for link in links if not (ROOT / link).exists()) == []
