"""The ``creditmeter`` command against a temporary SQLite store.

Every command runs through ``creditmeter.cli.main`` (what the console script
calls) in this process, with its own environment, folder and captured
output; the installed console script runs once in a subprocess, and so does
the command without click. Each ``--json`` output is parsed back and checked
against what the Python API reads from the same file; every error path is
checked for its exit status and its one line on stderr. What needs a real
pipe (a reader gone, output that is not a terminal) is in
test_cli_operators.py.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    Pricing,
    RefillSettings,
    SQLiteStore,
    TokenUsage,
)
from creditmeter.cli import NO_CONFIG_WARNING, main
from creditmeter.cli.format import parse_every, write_ledgers
from creditmeter.exceptions import InvalidInput
from creditmeter.testing import FakeClock, make_entry

LIBRECHAT_YAML = """\
version: 1.2.1
cache: true
endpoints:
  custom: []
balance:
  enabled: true
  startBalance: 1000
  autoRefillEnabled: true
  refillIntervalValue: 7
  refillIntervalUnit: days
  refillAmount: 3000
"""


class Cli:
    """Runs the command in a temporary folder, against one SQLite file, with a clean environment."""

    def __init__(self, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dir = tmp_path
        self.db = tmp_path / "credits.db"
        self.store = f"sqlite:///{self.db}"  # an absolute path: sqlite:////tmp/...
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("CREDITMETER_") and key not in ("CHECK_BALANCE", "START_BALANCE")
        }
        self.env.update({"COLUMNS": "160", "PYTHONWARNINGS": "error", "NO_COLOR": "1"})

    def run(
        self,
        *args: str,
        code: int = 0,
        env: dict[str, str] | None = None,
        store: bool = True,
        command: list[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``creditmeter [--store URL] ARGS``: in ``main()``, or as ``command`` if given."""
        argv = ["--store", self.store] if store else []
        environment = {**self.env, **(env or {})}
        if command is not None:
            result = subprocess.run(  # noqa: PLW1510 - the exit status is checked below
                [*command, *argv, *args],
                capture_output=True,
                text=True,
                cwd=self.dir,
                env=environment,
                timeout=120,
            )
        else:
            result = self._main([*argv, *args], environment)
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
        if code == 0:
            # grant and set without a config say that balances are off (test_cli_operators).
            writes = "grant" in args or "set" in args
            allowed = ("", NO_CONFIG_WARNING + "\n") if writes else ("",)
            assert result.stderr in allowed, result.stderr
        return result

    def _main(self, argv: list[str], environment: dict[str, str]) -> Any:
        with self.monkeypatch.context() as patch:
            for key in os.environ:
                if key not in environment:
                    patch.delenv(key)
            for key, value in environment.items():
                patch.setenv(key, value)
            patch.chdir(self.dir)
            self.capsys.readouterr()
            try:
                main(argv)
            except SystemExit as exited:
                status = exited.code
            else:
                status = 0
            out, err = self.capsys.readouterr()
        if isinstance(status, str):  # sys.exit("message"): printed to stderr, status 1
            status, err = 1, err + status + "\n"
        return subprocess.CompletedProcess(argv, status or 0, out, err)

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.run("--json", *args, **kwargs).stdout)

    def error(self, *args: str, code: int = 1, **kwargs: Any) -> str:
        """Run a failing command; return its one-line message."""
        result = self.run(*args, code=code, **kwargs)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("creditmeter: error: "), result.stderr
        assert "Traceback" not in result.stderr
        return lines[0]

    def manager(self, config: BalanceConfig | None = None, **kwargs: Any) -> BalanceManager:
        return BalanceManager(SQLiteStore(self.db), config, **kwargs)


@pytest.fixture
def cli(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(tmp_path, capsys, monkeypatch)


def ledger_sum(manager: BalanceManager, user: str) -> Decimal:
    return sum((entry.amount for entry in manager.ledger(user)), Decimal(0))


# --- the entry points ---------------------------------------------------------


def test_installed_console_script_runs(cli):
    script = shutil.which("creditmeter", path=str(Path(sys.executable).parent))
    assert script is not None, "the console script is not installed next to this Python"
    assert "grant" in cli.run("--help", command=[script], store=False).stdout
    assert "creditmeter" in cli.run("--version", command=[script], store=False).stdout
    granted = json.loads(cli.run("--json", "grant", "alice", "7", command=[script]).stdout)
    assert granted["balance"] == "7"


def test_help_lists_every_command(cli):
    shown = cli.run("--help", store=False).stdout
    for command in (
        "balance",
        "list",
        "grant",
        "set",
        "refill",
        "refill-settings",
        "ledger",
        "export",
        "price",
        "demo",
    ):
        assert f"  {command} " in shown


def test_without_click_says_what_to_install(cli):
    code = "import sys; sys.modules['click'] = None; from creditmeter.cli import main; main()"
    result = cli.run(command=[sys.executable, "-c", code], store=False, code=1)
    assert result.stderr == (
        "creditmeter: the command needs click: pip install 'creditmeter[cli]'\n"
    )


# --- grant, set, balance ----------------------------------------------------------


def test_grant_then_balance_shows_the_sum(cli):
    first = cli.json("grant", "alice", "500", "--reason", "welcome")
    assert first["balance"] == "500"
    assert first["entry"]["kind"] == "grant"
    assert first["entry"]["metadata"] == {"reason": "welcome"}
    assert cli.json("grant", "alice", "250.25")["balance"] == "750.25"
    shown = cli.json("balance", "alice")
    assert shown["user"] == "alice"
    assert Decimal(shown["balance"]) == Decimal("750.25")
    assert shown["available"] == shown["balance"]
    assert shown["holds"] == []
    assert shown["balances_enabled"] is False  # no config, no CHECK_BALANCE
    with cli.manager() as manager:
        assert manager.balance("alice") == Decimal("750.25")


def test_json_flag_after_the_command_name(cli):
    cli.run("grant", "alice", "5")
    assert json.loads(cli.run("balance", "alice", "--json").stdout)["balance"] == "5"


def test_set_balance(cli):
    cli.run("grant", "bob", "100")
    result = cli.json("set", "bob", "12.5", "--reason", "correction")
    assert result["balance"] == "12.5"
    assert result["entry"]["kind"] == "adjust"
    assert Decimal(result["entry"]["amount"]) == Decimal("-87.5")
    assert Decimal(cli.json("set", "bob", "0")["balance"]) == 0
    with cli.manager() as manager:
        assert manager.balance("bob") == 0
        assert ledger_sum(manager, "bob") == 0


def test_grant_with_a_request_id_applies_once(cli):
    first = cli.json("grant", "carol", "40", "--request-id", "r-1")
    again = cli.json("grant", "carol", "40", "--request-id", "r-1")
    assert first["replayed"] is False
    assert again["replayed"] is True
    assert again["balance"] == "40"
    assert again["entry"]["id"] == first["entry"]["id"]
    message = cli.error("grant", "carol", "41", "--request-id", "r-1")
    assert "request id 'r-1'" in message
    assert "already used" in message


def test_human_output(cli):
    assert "Granted 1,500 credits to dave" in cli.run("grant", "dave", "1500").stdout
    shown = cli.run("balance", "dave").stdout
    assert "Account dave" in shown
    assert "1,500" in shown
    assert "the config's settings" in shown
    assert "never: balances are disabled in the config" in shown


def test_balance_shows_open_holds(cli):
    with cli.manager(BalanceConfig(enabled=True)) as manager:
        manager.grant("erin", 100)
        hold = manager.hold("erin", 30, ttl=timedelta(hours=1))
    shown = cli.json("balance", "erin", env={"CHECK_BALANCE": "true"})
    assert Decimal(shown["balance"]) == 20100
    assert Decimal(shown["held"]) == 30
    assert Decimal(shown["available"]) == 20070
    assert [item["id"] for item in shown["holds"]] == [hold.id]
    assert "30 held by 1 open hold" in cli.run("balance", "erin").stdout


def test_reading_never_opens_an_account(cli):
    cli.run("grant", "someone", "1")
    message = cli.error("balance", "nobody")
    assert "user 'nobody' has no account" in message
    cli.error("ledger", "nobody")
    cli.error("refill", "nobody")
    with cli.manager() as manager:
        assert manager.users() == ["someone"]


# --- list ---------------------------------------------------------------------------


def test_list_is_sorted_and_paged(cli):
    with cli.manager() as manager:
        for user, amount in [("dan", 4), ("amy", 1), ("eve", 5), ("cat", 3), ("bea", 2)]:
            manager.grant(user, amount)
    first = cli.json("list", "--limit", "2")
    assert [row["user"] for row in first["users"]] == ["amy", "bea"]
    assert [row["balance"] for row in first["users"]] == ["1", "2"]
    assert first["total"] == 5
    assert first["next_offset"] == 2
    assert first["next_page"] == f"creditmeter --store {cli.store} list --offset 2 --limit 2"
    second = cli.json("list", "--offset", "2", "--limit", "2")
    assert [row["user"] for row in second["users"]] == ["cat", "dan"]
    last = cli.json("list", "--page", "3", "--page-size", "2")
    assert [row["user"] for row in last["users"]] == ["eve"]
    assert last["next_offset"] is None
    assert last["next_page"] is None
    everyone = cli.json("list")
    assert [row["user"] for row in everyone["users"]] == ["amy", "bea", "cat", "dan", "eve"]
    shown = cli.run("list", "--page", "1", "--page-size", "2").stdout
    assert "Users 1-2 of 5." in shown
    assert "Next page: creditmeter --store" in shown
    assert "list --page 2 --page-size 2" in shown
    cli.error("list", "--page", "1", "--offset", "2", code=2)


# --- refills ------------------------------------------------------------------------


def test_refill_applies_a_due_refill(cli):
    # Written through the Python API at a time long past, so one second has gone by since.
    clock = FakeClock(datetime(2025, 1, 1, tzinfo=timezone.utc))
    with cli.manager(BalanceConfig(enabled=True), clock=clock) as manager:
        manager.configure_refill(
            "frank",
            RefillSettings(enabled=True, interval_value=1, interval_unit="seconds", amount=500),
        )
        manager.set_balance("frank", 0)  # LibreChat refills only a spent balance
    on = {"CHECK_BALANCE": "true"}
    before = cli.json("balance", "frank", env=on)
    assert before["next_refill"] == "now"
    assert before["refill"]["source"] == "account"
    refilled = cli.json("refill", "frank", env=on)
    assert refilled["refilled"] is True
    assert refilled["amount"] == "500"
    assert refilled["balance"] == "500"
    assert refilled["entry"]["kind"] == "refill"
    again = cli.json("refill", "frank", env=on)
    assert again["refilled"] is False
    assert again["balance"] == "500"
    assert again["reason"]  # not due yet, or due but the balance is not spent
    assert "No refill for frank" in cli.run("refill", "frank", env=on).stdout
    with cli.manager() as manager:
        assert manager.balance("frank") == 500
        assert ledger_sum(manager, "frank") == 500


def test_refill_says_why_not_when_balances_are_off(cli):
    cli.run("grant", "gina", "5")
    result = cli.json("refill", "gina")
    assert result["refilled"] is False
    assert "balances are disabled" in result["reason"]


def test_refill_settings(cli):
    config = cli.dir / "librechat.yaml"
    config.write_text(LIBRECHAT_YAML)
    with_config = ("--config", str(config))
    own = cli.json(
        *with_config, "refill-settings", "hal", "--every", "12h", "--amount", "300", "--enabled"
    )
    assert own["refill"] == {
        "source": "account",
        "enabled": True,
        "amount": "300",
        "interval_value": 12,
        "interval_unit": "hours",
        "every": "12 hours",
        "mode": "when_depleted",
    }
    off = cli.json(*with_config, "refill-settings", "hal", "--disabled")
    assert off["refill"]["enabled"] is False
    assert (off["refill"]["amount"], off["refill"]["interval_unit"]) == ("300", "hours")
    assert off["next_refill"] is None
    # Fields left out start from the config's settings for a user without their own.
    fresh = cli.json(*with_config, "refill-settings", "ida", "--every", "1month")
    assert fresh["refill"]["amount"] == "3000"
    assert (fresh["refill"]["interval_value"], fresh["refill"]["interval_unit"]) == (1, "months")
    reset = cli.json(*with_config, "refill-settings", "hal", "--reset")
    assert reset["refill"]["source"] == "config"
    assert reset["refill"]["interval_value"] == 7
    with cli.manager() as manager:
        assert manager.account("hal").refill is None
        assert manager.account("ida").refill is not None
        kinds = [entry.kind.value for entry in manager.ledger("hal")]
        assert kinds == ["open", "adjust", "adjust", "adjust"]  # each change audited
    assert "fortnight" in cli.error("refill-settings", "hal", "--every", "fortnight")
    assert "ambiguous" in cli.error("refill-settings", "hal", "--every", "5m")
    cli.error("refill-settings", "hal", code=2)
    cli.error("refill-settings", "hal", "--reset", "--amount", "5", code=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", (30, "days")),
        ("12h", (12, "hours")),
        ("1month", (1, "months")),
        ("2weeks", (2, "weeks")),
        ("90s", (90, "seconds")),
        ("15 min", (15, "minutes")),
        ("3MO", (3, "months")),
    ],
)
def test_every_accepts_a_count_and_a_unit(text, expected):
    assert parse_every(text) == expected


@pytest.mark.parametrize("text", ["fortnight", "30", "d", "0d", "5m", "2 fortnights", "99999999mo"])
def test_every_refuses_what_it_cannot_read(text):
    with pytest.raises(InvalidInput, match="--every"):
        parse_every(text)


def test_balance_reports_the_config_refill_settings_of_a_librechat_yaml(cli):
    config = cli.dir / "librechat.yaml"
    config.write_text(LIBRECHAT_YAML)
    cli.run("--config", str(config), "grant", "jo", "5")
    shown = cli.json("--config", str(config), "balance", "jo")
    assert shown["balances_enabled"] is True
    assert shown["balance"] == "1005"  # startBalance 1000, then the grant
    assert shown["refill"] == {
        "source": "config",
        "enabled": True,
        "amount": "3000",
        "interval_value": 7,
        "interval_unit": "days",
        "every": "7 days",
        "mode": "when_depleted",
    }
    last = datetime.fromisoformat(shown["last_refill"])
    assert datetime.fromisoformat(shown["next_refill"]) == last + timedelta(days=7)
    human = cli.run("--config", str(config), "balance", "jo").stdout
    assert "3,000 credits every 7 days, enabled (the config's settings" in human


def test_environment_variables(cli):
    config = cli.dir / "balance.yaml"
    config.write_text("enabled: true\nstartBalance: 200\n")  # a balance-only file
    env = {"CREDITMETER_STORE": cli.store, "CREDITMETER_CONFIG": str(config)}
    assert cli.json("grant", "kim", "1", env=env, store=False)["balance"] == "201"
    # CHECK_BALANCE and START_BALANCE count when no file says otherwise.
    legacy = {"CREDITMETER_STORE": cli.store, "CHECK_BALANCE": "true", "START_BALANCE": "700"}
    assert cli.json("grant", "lee", "1", env=legacy, store=False)["balance"] == "701"
    with cli.manager() as manager:
        assert manager.users() == ["kim", "lee"]
    # Without --store or CREDITMETER_STORE: ./creditmeter.db in the working directory.
    cli.run("grant", "max", "3", store=False)
    assert (cli.dir / "creditmeter.db").exists()


# --- ledger and export -----------------------------------------------------------------


def fill(cli: Cli) -> dict[str, int]:
    """Write a few users with priced charges through the Python API; return entries per user."""
    with cli.manager(BalanceConfig(enabled=True)) as manager:
        for n, user in enumerate(["nia", "oli", "pat"]):
            manager.grant(user, 100 + n, reason="start")
            for _ in range(n + 1):
                manager.charge(user, model="gpt-4o-mini", usage=TokenUsage(input=100, output=20))
        return {user: len(manager.ledger(user)) for user in manager.users()}


def test_ledger_formats(cli):
    fill(cli)
    entries = cli.json("ledger", "pat")
    with cli.manager() as manager:
        assert [entry["id"] for entry in entries] == [e.id for e in manager.ledger("pat")]
    assert [entry["kind"] for entry in entries] == ["open", "grant", "charge", "charge", "charge"]
    charge = entries[-1]
    assert charge["model"] == "gpt-4o-mini"
    assert charge["usage"] == {"input": 100, "output": 20}
    newest = json.loads(cli.run("ledger", "pat", "--limit", "2", "--format", "json").stdout)
    assert [entry["id"] for entry in newest] == [entry["id"] for entry in entries[-2:]]
    rows = list(csv.DictReader(io.StringIO(cli.run("ledger", "pat", "--format", "csv").stdout)))
    assert [row["id"] for row in rows] == [entry["id"] for entry in entries]
    assert rows[-1]["input_tokens"] == "100"
    assert rows[-1]["rate_prompt"] == "0.15"
    table = cli.run("ledger", "pat").stdout
    assert "Ledger of pat" in table
    assert "gpt-4o-mini; 100 in, 20 out" in table
    cli.error("--json", "ledger", "pat", "--format", "csv", code=2)


def test_export_jsonl_holds_every_entry_of_every_user(cli):
    counts = fill(cli)
    lines = cli.run("export").stdout.splitlines()
    assert len(lines) == sum(counts.values())
    entries = [json.loads(line) for line in lines]
    assert [entry["user_id"] for entry in entries] == [
        user for user in sorted(counts) for _ in range(counts[user])
    ]
    with cli.manager() as manager:
        for user in counts:
            amounts = [Decimal(entry["amount"]) for entry in entries if entry["user_id"] == user]
            assert sum(amounts, Decimal(0)) == manager.balance(user)


def test_export_csv_to_a_file(cli):
    counts = fill(cli)
    target = cli.dir / "out" / "ledger.csv"
    target.parent.mkdir()
    summary = cli.json("export", "--format", "csv", "--output", str(target))
    assert summary == {
        "output": str(target),
        "format": "csv",
        "users": 3,
        "entries": sum(counts.values()),
    }
    text = target.read_text()
    assert text.splitlines()[0].startswith("id,user_id,kind,amount,balance_after,at")
    assert len(list(csv.DictReader(io.StringIO(text)))) == sum(counts.values())
    assert [path.name for path in target.parent.iterdir()] == ["ledger.csv"]  # no partial left
    assert "Exported" in cli.run("export", "--output", str(cli.dir / "all.jsonl")).stdout
    missing = cli.dir / "no-such-folder" / "x.jsonl"
    assert "cannot write" in cli.error("export", "--output", str(missing))


# --- price --------------------------------------------------------------------------------


def test_price_matches_the_pricing_table(cli):
    model = "claude-3-5-sonnet-20241022"
    usage = TokenUsage(input=1000, output=300, cache_write=200, cache_read=4000)
    expected = Pricing.librechat().cost(model, usage)
    shown = cli.json(
        "price", model, "--input", "1000", "--output", "300", "--cache-write", "200",
        "--cache-read", "4000",
    )  # fmt: skip
    assert Decimal(shown["total"]) == expected.total
    assert Decimal(shown["prompt"]) == expected.prompt
    assert shown["key"] == expected.key == "claude-3-5-sonnet"
    assert shown["premium"] is False
    assert Decimal(shown["rates"]["cache_read"]) == expected.rates.cache_read
    assert Decimal(shown["usd"]) == expected.total / 1_000_000
    cut = cli.json("price", model, "--input", "10", "--output", "100", "--incomplete")
    assert Decimal(cut["total"]) == (
        Pricing.librechat().cost(model, TokenUsage(input=10, output=100), incomplete=True).total
    )
    table = cli.run("price", model, "--input", "1000", "--output", "300", "--cache-read", "4000")
    assert "8,700" in table.stdout  # the README's example
    assert "table key 'claude-3-5-sonnet'" in table.stdout


def test_price_needs_no_store(cli):
    cli.run("price", "gpt-4o", "--input", "1", "--output", "1")
    assert not cli.db.exists()


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["grant", "alice", "abc"], 1, "AMOUNT must be a number of credits, got 'abc'"),
        (["grant", "alice", "-5"], 1, "AMOUNT must be positive, got '-5'"),
        (["grant", "alice", "nan"], 1, "AMOUNT must be a finite number, got 'nan'"),
        (["grant", "alice", "1e99"], 1, "AMOUNT must be at most 10**15, got '1e99'"),
        (["set", "alice", "-5"], 1, "AMOUNT must be zero or more, got '-5'"),
        (["refill-settings", "alice", "--amount", "x"], 1, "--amount must be a number"),
        (["refill-settings", "alice", "--every", "fortnight"], 1, "got 'fortnight'"),
        (["balance", "a\x01b"], 1, "user_id must not contain control characters"),
        (["grant", "alice", "5", "--request-id", "hold:x"], 1, "reserved for holds"),
        (["grant", "alice"], 2, "Missing argument 'AMOUNT'"),
        (["frobnicate"], 2, "No such command 'frobnicate'"),
        (["list", "--limit", "0"], 2, "--limit"),
        (["price", "gpt-4o", "--input", "1"], 2, "Missing option '--output'"),
    ],
)
def test_bad_arguments(cli, args, code, message):
    assert message in cli.error(*args, code=code)


def test_unknown_store_scheme(cli):
    message = cli.error("--store", "mongodb://x", "list", store=False)
    assert "unknown store URL 'mongodb://x'; known schemes: " in message
    assert "sqlite://" in message


def test_a_password_in_the_store_url_is_not_printed(cli):
    message = cli.error("--store", "mongodb://admin:hunter2@db/credits", "list", store=False)
    assert "hunter2" not in message
    assert "mongodb://admin:***@db/credits" in message


def test_missing_config_file(cli):
    message = cli.error("--config", "missing.yaml", "list")
    assert "cannot read config file 'missing.yaml'" in message
    assert not cli.db.exists()  # the config is read before the store is created


def test_invalid_yaml(cli):
    (cli.dir / "bad.yaml").write_text("balance: [1, 2\n")
    assert "config file 'bad.yaml' is not valid YAML" in cli.error("--config", "bad.yaml", "list")


def test_invalid_config_value(cli):
    (cli.dir / "bad.yaml").write_text("balance:\n  enabled: maybe\n")
    message = cli.error("--config", "bad.yaml", "list")
    assert "balance config key 'enabled' must be true or false" in message
    message = cli.error("list", env={"START_BALANCE": "lots"})
    assert "START_BALANCE must be a whole number" in message


def test_corrupt_store(cli):
    cli.db.write_bytes(os.urandom(4096))
    message = cli.error("list")
    assert "cannot open SQLite store" in message
    assert "file is not a database" in message


# --- the demo --------------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("creditmeter.cli.demo") is None, reason="demo module not written yet"
)
def test_demo_balances_every_ledger(cli):
    store = f"sqlite:///{cli.dir / 'd.db'}"
    summary = cli.json("--store", store, "demo", "--users", "3", "--calls", "12", store=False)
    assert summary["ledger_balanced"] is True
    users = [row["user"] for row in summary["users"]]
    assert len(users) == 3
    with BalanceManager(SQLiteStore(cli.dir / "d.db")) as manager:
        assert sorted(manager.users()) == sorted(users)
        for row in summary["users"]:
            assert manager.balance(row["user"]) == ledger_sum(manager, row["user"])
            assert Decimal(str(row["balance"])) == manager.balance(row["user"])


def test_export_writes_each_user_before_reading_the_next():
    out = io.StringIO()
    asked: list[str] = []

    def ledger(user: str):
        # Everything read so far is already written: nothing is held back.
        assert out.getvalue().count("\n") == 2 * len(asked)
        asked.append(user)
        return [make_entry(user, balance_after=Decimal(n)) for n in (1, 2)]

    assert write_ledgers(iter(["u1", "u2", "u3"]), ledger, out, "jsonl") == (3, 6)
    assert asked == ["u1", "u2", "u3"]
    assert [json.loads(line)["user_id"] for line in out.getvalue().splitlines()] == [
        "u1", "u1", "u2", "u2", "u3", "u3",
    ]  # fmt: skip
