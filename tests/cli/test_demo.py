"""`creditmeter demo` (creditmeter.demo.run_demo): the whole job end to end, and it balances."""

from __future__ import annotations

import io
import json
import tempfile
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from rich.console import Console

from creditmeter import (
    BalanceManager,
    ConfigError,
    EntryKind,
    InvalidInput,
    Pricing,
    SQLiteStore,
    TokenUsage,
)
from creditmeter.cli.demo import run_demo

SMALL = {"users": 3, "calls": 12}  # enough for a refusal, a refill and a cut stream


def check_summary(result: dict) -> None:
    """What every run must show, whatever the store."""
    assert json.loads(json.dumps(result)) == result  # JSON-able as it is
    assert result["ledger_balanced"] is True
    users = {row["user"]: row for row in result["users"]}
    assert len(users) == SMALL["users"]
    assert sum(row["refused"] for row in users.values()) >= 1
    assert result["refilled"]
    for user in result["refilled"]:
        assert users[user]["refused"] >= 1  # only a user who ran dry is refilled
        assert users[user]["calls"] >= 1  # and its call went through afterwards
    assert result["streams"]["cut_short"] >= 1
    assert result["streams"]["complete"] >= 1
    by_users = sum(Decimal(row["spent"]) for row in users.values())
    by_models = sum(Decimal(row["spent"]) for row in result["models"])
    assert by_users == by_models > 0
    assert sum(row["calls"] for row in result["models"]) == sum(
        row["calls"] for row in users.values()
    )
    for row in users.values():
        assert Decimal(row["balance"]) >= 0


def test_demo_on_a_sqlite_url_leaves_a_balanced_store(tmp_path):
    path = tmp_path / "demo.db"
    url = f"sqlite:///{path}"
    result = run_demo(store_url=url, console=None, **SMALL)
    now = datetime.now(timezone.utc)
    check_summary(result)
    assert result["store"] == url

    pricing = Pricing.librechat()
    with SQLiteStore(path) as store:
        assert store.users() == sorted(row["user"] for row in result["users"])
        cut_short = []
        for row in result["users"]:
            account = store.load(row["user"])
            assert account is not None
            entries = store.ledger(row["user"])
            assert sum(entry.amount for entry in entries) == account.balance
            assert account.balance == Decimal(row["balance"])
            assert not account.holds  # every hold was settled or released
            for entry in entries:
                if entry.kind is EntryKind.CHARGE and entry.usage is not None:
                    assert entry.model is not None
                    assert entry.rates is not None
                    full = pricing.cost(entry.model, TokenUsage(output=1)).rates.completion
                    if entry.rates.completion > full:  # priced at the cancel rate
                        cut_short.append(entry)
        assert cut_short
        assert all(entry.usage is not None and entry.usage.output == 2 for entry in cut_short)
        for user in result["refilled"]:
            kinds = [entry.kind for entry in store.ledger(user)]
            refill = kinds.index(EntryKind.REFILL)
            assert EntryKind.CHARGE in kinds[refill:]  # charged again after the refill
        # The simulated month is the one before the run: nothing is dated in the future
        # (before the fix the refill and everything after it were dated 31 days ahead).
        for user in store.users():
            entries = store.ledger(user)
            assert max(entry.at for entry in entries) <= now
            account = store.load(user)
            assert account is not None
            assert max(account.updated_at, account.last_refill) <= now


def _snapshot(path: Path) -> dict[str, list]:
    with SQLiteStore(path) as store:
        return {user: [store.load(user), *store.ledger(user)] for user in store.users()}


@pytest.mark.parametrize("other", ["alice", "demo-bob-the-real-one", "x" * 256])
def test_demo_refuses_a_store_that_holds_other_users(tmp_path, other):
    # Tried: a real user, one whose id only starts like the demo's, a long id.
    path = tmp_path / "live.db"
    with BalanceManager(SQLiteStore(path)) as manager:
        manager.grant(other, 5)
    before = _snapshot(path)
    with pytest.raises(InvalidInput, match="the demo needs an empty store") as refused:
        run_demo(store_url=f"sqlite:///{path}", console=None, **SMALL)
    message = str(refused.value)
    assert f"'{other[:30]}" in message
    assert len(message) < 300  # a long id is cut short
    assert _snapshot(path) == before


def test_a_second_demo_run_on_the_same_store_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    run_demo(store_url=url, console=None, **SMALL)
    before = _snapshot(tmp_path / "demo.db")
    with pytest.raises(InvalidInput, match="already holds a demo run"):
        run_demo(store_url=url, console=None, **SMALL)
    assert _snapshot(tmp_path / "demo.db") == before


def test_demo_reports_a_malformed_store_url_as_a_config_error():
    with pytest.raises(ConfigError, match="not a valid Redis URL") as caught:
        run_demo(store_url="redis://u:hunter2@[x/0", console=None, **SMALL)
    assert "hunter2" not in str(caught.value)


def test_demo_on_the_default_store_removes_its_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    created: list[Path] = []
    real = tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        folder = real(*args, **kwargs)
        created.append(Path(folder.name))
        return folder

    monkeypatch.setattr(tempfile, "TemporaryDirectory", recording)
    result = run_demo(console=None, **SMALL)
    check_summary(result)
    assert result["store"] == "temporary sqlite"
    assert len(created) == 1
    assert created[0].parent == tmp_path
    assert not created[0].exists()
    assert list(tmp_path.iterdir()) == []


def test_demo_is_deterministic_and_prints_nothing_without_a_console(capsys):
    first = run_demo(console=None, **SMALL)
    second = run_demo(store_url="memory://", console=None, **SMALL)
    assert capsys.readouterr() == ("", "")
    for key in ("users", "models", "refilled", "streams"):
        assert first[key] == second[key]


def test_demo_prints_progress_and_summary_tables_on_a_console():
    output = io.StringIO()
    result = run_demo(console=Console(file=output, width=120), **SMALL)
    text = output.getvalue()
    assert "creditmeter demo: balances and spend per user" in text
    assert "spend per model" in text
    assert "model calls" in text  # the progress bar's last frame
    assert "refused" in text
    assert "refilled" in text
    for row in result["users"]:
        assert row["user"] in text


def test_demo_with_more_users_than_names():
    result = run_demo(store_url="memory://", users=10, calls=10, console=None)
    assert [row["user"] for row in result["users"]][-2:] == ["demo-user9", "demo-user10"]
    assert result["ledger_balanced"] is True
    assert result["refilled"] == ["demo-user10"]  # the trial user's one call was refused


@pytest.mark.parametrize(("users", "calls"), [(0, 5), (2, 0), (-1, 3), (True, 3), (2.0, 3)])
def test_demo_refuses_bad_sizes(users, calls):
    with pytest.raises(InvalidInput, match="users and calls"):
        run_demo(users=users, calls=calls, console=None)
