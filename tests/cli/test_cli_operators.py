"""What a new operator met with the ``creditmeter`` command (issue 12, items 16 and 17).

The demo must never touch the operator's store; ``grant``/``set`` without a
config say that balances are off; a reader that goes away early (``| head``)
is not an error; piped output is not padded or wrapped; credits print one
way everywhere; and every bad store URL or config is one line, no traceback.

Most commands run in this process through ``creditmeter.cli.main`` (as the
console script calls it) against real SQLite files; what depends on a real
pipe (a reader gone, output that is not a terminal) runs in a subprocess.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from creditmeter import BalanceConfig, BalanceManager, SQLiteStore, TokenUsage
from creditmeter.cli import main
from creditmeter.cli.format import parse_every
from creditmeter.exceptions import InvalidInput
from creditmeter.stores import _OPENERS

TIMEOUT = 60  # seconds, for any one subprocess
DEMO = ("demo", "--users", "3", "--calls", "12")  # enough for a refusal and a refill
# A credit amount as every output writes it: no exponent, no trailing zeros, no "-0".
CANONICAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")
WARNING = "creditmeter: warning: balances are disabled"
SONNET = "claude-3-5-sonnet-20241022"
# Keys whose values are names or ids, never amounts (an id may be all digits by chance).
NAMES = {"id", "request_id", "user", "user_id", "model", "key", "store"}


@dataclass
class Ran:
    code: int
    out: str
    err: str


@pytest.fixture
def run(capsys, monkeypatch, tmp_path):
    """Run the command in this process, in ``tmp_path``, with no creditmeter variables set."""
    for name in ("CREDITMETER_STORE", "CREDITMETER_CONFIG", "CHECK_BALANCE", "START_BALANCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()

    def invoke(*argv: str, code: int | None = 0) -> Ran:
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        out, err = capsys.readouterr()
        ran = Ran(exited.value.code or 0, out, err)
        assert "Traceback" not in err
        if code is not None:
            assert ran.code == code, ran
        return ran

    return invoke


def error_line(ran: Ran) -> str:
    lines = ran.err.splitlines()
    assert len(lines) == 1, ran.err
    assert lines[0].startswith("creditmeter: error: "), ran.err
    return lines[0]


def url(path: Path) -> str:
    return f"sqlite:///{path}"


def rows(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every account and ledger row of an SQLite store, read without writing to it."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        accounts = db.execute("SELECT * FROM creditmeter_accounts ORDER BY user_id").fetchall()
        ledger = db.execute("SELECT * FROM creditmeter_ledger ORDER BY seq").fetchall()
    db.close()
    return accounts, ledger


def files(folder: Path) -> dict[str, str]:
    """Each file in ``folder`` and a hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def real_store(path: Path) -> None:
    """An operator's store: one real user with a grant and a charge."""
    with BalanceManager(SQLiteStore(path), BalanceConfig(enabled=True)) as manager:
        manager.grant("alice", 500, reason="support ticket")
        manager.charge("alice", model="gpt-4o", usage=TokenUsage(input=1200, output=350))


# --- 1. the demo never writes into the operator's store -------------------------------------


def test_demo_ignores_the_store_and_config_in_the_environment(run, tmp_path, monkeypatch):
    # Tried: CREDITMETER_STORE exported (as the gateway section of the README says) at a
    # store holding a real user, and CREDITMETER_CONFIG at a file that does not exist.
    # Before the fix the demo wrote its users, adjusts and month-ahead entries into it.
    live = tmp_path / "live"
    live.mkdir()
    real_store(live / "credits.db")
    before = rows(live / "credits.db")
    on_disk = files(live)
    monkeypatch.setenv("CREDITMETER_STORE", url(live / "credits.db"))
    monkeypatch.setenv("CREDITMETER_CONFIG", str(tmp_path / "missing.yaml"))
    summary = json.loads(run("--json", *DEMO).out)
    assert summary["store"] == "temporary sqlite"
    assert summary["ledger_balanced"] is True
    assert files(live) == on_disk  # not even opened: same bytes, no -wal or -shm file
    assert rows(live / "credits.db") == before


def test_demo_refuses_a_store_that_holds_other_users(run, tmp_path):
    path = tmp_path / "credits.db"
    real_store(path)
    before = rows(path)
    message = error_line(run("--store", url(path), *DEMO, code=1))
    assert "needs an empty store" in message
    assert "'alice'" in message
    assert "temporary" in message  # says how to run it anyway
    assert rows(path) == before


def test_demo_on_an_empty_store_writes_nothing_dated_after_now(run, tmp_path):
    path = tmp_path / "empty.db"
    path.touch()  # an empty file, as `touch demo.db` leaves it
    summary = json.loads(run("--json", "--store", url(path), *DEMO).out)
    now = datetime.now(timezone.utc)
    assert summary["ledger_balanced"] is True
    assert summary["refilled"]  # the month still passed: a user ran dry and was refilled
    with SQLiteStore(path) as store:
        users = store.users()
        assert users == sorted(row["user"] for row in summary["users"])
        for user in users:
            account = store.load(user)
            assert account is not None
            assert max(account.created_at, account.updated_at, account.last_refill) <= now
            assert not account.holds
            entries = store.ledger(user)
            assert entries
            assert all(entry.at <= now for entry in entries), [e.at for e in entries]
            # The demo's month is the month before the run: nothing older than that either.
            assert all(entry.at >= now - timedelta(days=40) for entry in entries)

    # A second run on the same store is refused too: it already holds a demo run, and a
    # second month dated before the first one's refills would jumble the ledgers.
    before = rows(path)
    message = error_line(run("--store", url(path), *DEMO, code=1))
    assert "already holds a demo run" in message
    assert rows(path) == before


# --- 2. grant and set without a config ----------------------------------------------------------


def test_grant_and_set_without_a_config_warn_that_balances_are_off(run, tmp_path):
    store = ("--store", url(tmp_path / "c.db"))
    for argv in (("grant", "amy", "5"), ("set", "amy", "3"), ("--json", "grant", "bea", "1")):
        ran = run(*store, *argv)
        assert ran.err.startswith(WARNING), ran.err
        assert ran.err.count("\n") == 1  # one line
        assert "--config" in ran.err
        assert "CHECK_BALANCE" in ran.err
    config = tmp_path / "librechat.yaml"
    config.write_text("balance:\n  enabled: false\n")
    assert run(*store, "--config", str(config), "grant", "amy", "1").err == ""  # chosen: off
    assert run(*store, "balance", "amy").err == ""  # reading opens nothing: no warning


def test_an_explicit_check_balance_needs_no_warning(run, tmp_path, monkeypatch):
    monkeypatch.setenv("CHECK_BALANCE", "false")
    assert run("--store", url(tmp_path / "c.db"), "grant", "amy", "5").err == ""
    monkeypatch.setenv("CHECK_BALANCE", "true")
    ran = run("--json", "--store", url(tmp_path / "c.db"), "grant", "bob", "5")
    assert (ran.err, json.loads(ran.out)["balance"]) == ("", "20005")


# --- 2. a reader that goes away: exit 0, nothing on stderr ---------------------------------------


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CREDITMETER_")
        and key not in ("CHECK_BALANCE", "START_BALANCE", "COLUMNS", "LINES")
    }
    return {**env, "PYTHONWARNINGS": "error", **extra}


CLOSED_PIPE_COMMANDS = [
    ("balance", "alice"),
    ("--json", "balance", "alice"),
    ("list",),
    ("grant", "alice", "1"),
    ("set", "alice", "700"),
    ("refill", "alice"),
    ("refill-settings", "alice", "--every", "30d"),
    ("ledger", "alice"),
    ("ledger", "alice", "--format", "csv"),
    ("export",),
    ("export", "--format", "csv"),
    ("price", "gpt-4o", "--input", "1", "--output", "1"),
    ("demo", "--users", "1", "--calls", "2"),
    ("--help",),
    ("--version",),
]


# Runs each command in a child forked from one process that has imported the command
# (one Python start-up instead of fifteen): the child's stdout is a pipe whose reader is
# already gone, and it exits as the console script does, flushing stdout at the end.
CLOSED_PIPE_DRIVER = r"""
import json, os, sys, tempfile, time
from creditmeter.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    read, write = os.pipe()
    os.close(read)
    err = tempfile.TemporaryFile()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(write, 1)
        os.dup2(err.fileno(), 2)
        os.close(write)
        err.close()
        main(argv)  # raises SystemExit: the child ends like a process, flushing stdout
    os.close(write)
    deadline = time.monotonic() + float(sys.argv[2])
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            done = os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    err.seek(0)
    results.append([argv, os.waitstatus_to_exitcode(done[1]), err.read().decode()])
    err.close()
print(json.dumps(results))
"""


def test_a_closed_pipe_ends_every_command_quietly_with_status_0(tmp_path):
    # The reader is gone before the command writes a byte, so its first write fails with
    # EPIPE. Before the fix click turned that into exit status 1 for every command.
    path = tmp_path / "credits.db"
    real_store(path)
    driver = subprocess.run(
        [sys.executable, "-c", CLOSED_PIPE_DRIVER, json.dumps(CLOSED_PIPE_COMMANDS), "30"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_subprocess_env(CREDITMETER_STORE=url(path), CHECK_BALANCE="true"),
        timeout=TIMEOUT,
        check=True,
    )
    results = json.loads(driver.stdout)
    assert [argv for argv, _, _ in results] == [list(argv) for argv in CLOSED_PIPE_COMMANDS]
    assert [(argv, code, err) for argv, code, err in results if (code, err) != (0, "")] == []


EXPORT_CSV = ("export", "--format", "csv")


def test_export_csv_into_head_exits_0(tmp_path):
    # `creditmeter export --format csv | head -1`, with more than a pipe buffer of output.
    path = tmp_path / "credits.db"
    with BalanceManager(SQLiteStore(path, durability="normal")) as manager:
        for n in range(200):
            manager.grant(f"user{n:03d}", 1 + n, reason="x" * 300)
    with (tmp_path / "stderr").open("w+") as err:
        export = subprocess.Popen(
            [sys.executable, "-m", "creditmeter.cli", "--store", url(path), *EXPORT_CSV],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=tmp_path,
            env=_subprocess_env(),
        )
        assert export.stdout is not None
        head = subprocess.run(
            ["head", "-1"],
            stdin=export.stdout,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        )
        export.stdout.close()  # head has gone: the pipe has no reader left
        try:
            code = export.wait(timeout=TIMEOUT)
        finally:
            export.kill()
        err.seek(0)
        assert head.stdout.startswith("id,user_id,kind,amount")
        assert (code, err.read()) == (0, "")


# --- 2. piped output is neither padded nor wrapped -----------------------------------------------


def test_piped_output_has_no_padding_and_no_wrapping(tmp_path):
    path = tmp_path / "credits.db"
    reason = "a reason long enough that an 80-column table would wrap it " * 2
    with BalanceManager(SQLiteStore(path), BalanceConfig(enabled=True)) as manager:
        manager.grant("alice", 5000, reason=reason.strip())
    env = _subprocess_env(CREDITMETER_STORE=url(path), CHECK_BALANCE="true")
    # Tried: the account view (padded to 80 columns and wrapped before) and the ledger
    # (a long detail wrapped). list and price go through the same console.
    for argv in (("balance", "alice"), ("ledger", "alice")):
        shown = subprocess.run(
            [sys.executable, "-m", "creditmeter.cli", *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=TIMEOUT,
            check=True,
        ).stdout
        padded = [line for line in shown.splitlines() if line != line.rstrip()]
        assert padded == [], (argv, padded)
        if argv[0] == "ledger":
            assert reason.strip() in shown  # on one line, not wrapped at 80 columns
        if argv[0] == "balance":  # before: wrapped onto a second line
            assert "never: refills are disabled in the config (balance.autoRefillEnabled)" in shown


def test_an_explicit_columns_still_sets_the_width(run, tmp_path, monkeypatch):
    with BalanceManager(SQLiteStore(tmp_path / "c.db")) as manager:
        manager.grant("alice", 5, reason="word " * 40)
    monkeypatch.setenv("COLUMNS", "60")
    shown = run("--store", url(tmp_path / "c.db"), "ledger", "alice").out
    assert max(map(len, shown.splitlines())) <= 60
    assert all(line == line.rstrip() for line in shown.splitlines())


# --- 2. one way to print credits -------------------------------------------------------------


def decimal_strings(value: Any) -> list[str]:
    """Every string in a JSON document that reads as a decimal number; fails on a float."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in NAMES:
                found += decimal_strings(item)
    elif isinstance(value, list):
        for item in value:
            found += decimal_strings(item)
    elif isinstance(value, float):
        pytest.fail(f"a float in JSON output: {value!r}")
    elif isinstance(value, str) and re.fullmatch(
        r"[-+]?[0-9.]+(E[-+]?[0-9]+)?", value, re.IGNORECASE
    ):
        found.append(value)
    return found


@pytest.fixture
def priced(tmp_path) -> tuple[str, ...]:
    """A store whose stored decimals have trailing zeros: 19982.90, 6500.0, 30.50, 500.0."""
    path = tmp_path / "credits.db"
    long_ago = datetime.now(timezone.utc) - timedelta(days=60)
    config = BalanceConfig(enabled=True, auto_refill_enabled=True, refill_amount=Decimal("500.0"))
    with BalanceManager(SQLiteStore(path), config, clock=lambda: long_ago) as manager:
        manager.set_balance("alice", Decimal("19982.90"), reason="import")  # an adjust of -17.10
        manager.charge("alice", model="gpt-4o", usage=TokenUsage(input=1200, output=350))
        manager.charge("alice", model=SONNET, usage=TokenUsage(input=1000, output=200))
        manager.grant("alice", Decimal("100.00"))
        manager.hold("alice", Decimal("30.50"), ttl=timedelta(days=365))
        manager.set_balance("bob", Decimal("0.000"))
    config_file = tmp_path / "balance.yaml"
    config_file.write_text("enabled: true\nautoRefillEnabled: true\nrefillAmount: 500.0\n")
    return ("--store", url(path), "--config", str(config_file))


def test_json_and_csv_write_credits_one_way(run, priced):
    documents = {
        "balance": json.loads(run(*priced, "--json", "balance", "alice").out),
        "list": json.loads(run(*priced, "--json", "list").out),
        "grant": json.loads(run(*priced, "--json", "grant", "alice", "1.50").out),
        "set": json.loads(run(*priced, "--json", "set", "carol", "7.0").out),
        "refill": json.loads(run(*priced, "--json", "refill", "bob").out),
        "settings": json.loads(
            run(*priced, "--json", "refill-settings", "bob", "--amount", "250.0").out
        ),
        "ledger": json.loads(run(*priced, "--json", "ledger", "alice").out),
        "export": [json.loads(line) for line in run(*priced, "export").out.splitlines()],
        "price": json.loads(
            run(*priced, "--json", "price", "gpt-4o-mini", "--input", "10", "--output", "5").out
        ),
        "demo": json.loads(run("--json", *DEMO).out),
    }
    for name, document in documents.items():
        numbers = decimal_strings(document)
        assert numbers, name
        odd = [text for text in numbers if not CANONICAL.fullmatch(text)]
        assert odd == [], (name, odd)
    assert documents["balance"]["balance"] == "7582.9"  # 19982.90 - 6500.0 - 6000 + 100.00
    assert documents["balance"]["held"] == "30.5"
    assert documents["balance"]["available"] == "7552.4"
    assert documents["grant"]["entry"]["amount"] == "1.5"
    assert documents["refill"]["amount"] == "500"
    amounts = [entry["amount"] for entry in documents["ledger"]]
    assert amounts[:6] == ["20000", "-17.1", "-6500", "-6000", "100", "1.5"]
    assert documents["price"]["total"] == "4.5"  # 10 x 0.15 + 5 x 0.6
    rates = [f"rate_{side}" for side in ("prompt", "completion", "cache_write", "cache_read")]
    for argv in (("ledger", "alice", "--format", "csv"), ("export", "--format", "csv")):
        table = list(csv.DictReader(io.StringIO(run(*priced, *argv).out)))
        for row in table:
            for column in ("amount", "balance_after", "cost", *rates):
                assert row[column] == "" or CANONICAL.fullmatch(row[column]), (column, row)
        charges = [row for row in table if row["kind"] == "charge"]
        assert [row["amount"] for row in charges] == ["-6500", "-6000"]
        assert [row["rate_prompt"] for row in charges] == ["2.5", "3"]


def test_tables_and_sentences_write_credits_one_way(run, priced):
    trailing_zero = re.compile(r"[0-9]\.[0-9]*0(?![0-9])")
    shown = {
        "balance": run(*priced, "balance", "alice").out,
        "list": run(*priced, "list").out,
        "ledger": run(*priced, "ledger", "alice").out,
        "grant": run(*priced, "grant", "alice", "1.50").out,
        "price": run(*priced, "price", "gpt-4o-mini", "--input", "10", "--output", "5").out,
        "demo": run(*DEMO).out,
    }
    for name, text in shown.items():
        numbers = text.replace("gemini-2.0-flash", "")  # a model name, not an amount
        assert trailing_zero.findall(numbers) == [], (name, text)
    assert "7,582.9" in shown["balance"]
    assert "7,552.4 (30.5 held" in shown["balance"]
    assert "-6,500" in shown["ledger"]
    assert "Balance: 7,584.4" in shown["grant"]
    assert "4.5" in shown["price"]


def test_one_credit_and_one_entry_are_singular(run, tmp_path):
    store = ("--store", url(tmp_path / "c.db"), "--config", str(tmp_path / "b.yaml"))
    (tmp_path / "b.yaml").write_text("enabled: false\n")
    assert "Granted 1 credit to amy." in run(*store, "grant", "amy", "1").out
    assert "Granted 2 credits to amy." in run(*store, "grant", "amy", "2").out
    assert "Granted 0.5 credits to bo." in run(*store, "grant", "bo", "0.5").out
    settings = run(*store, "refill-settings", "amy", "--amount", "1", "--every", "1d").out
    assert "1 credit every 1 day" in settings
    with BalanceManager(SQLiteStore(tmp_path / "one.db")) as manager:
        manager.account("cy")  # opened: its one entry
    solo = ("--store", url(tmp_path / "one.db"))
    exported = run(*solo, "export", "--output", str(tmp_path / "out.jsonl")).out
    assert "Exported 1 entry of 1 user to" in exported


# --- 2. intervals too large --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "unit"),
    [("99999999999d", "days"), ("99999999mo", "months"), ("9" * 40 + "s", "seconds")],
)
def test_an_interval_too_large_says_so_with_the_limit(text, unit):
    # Before the fix 11 digits or more were "must be a whole number and a unit".
    with pytest.raises(InvalidInput) as refused:
        parse_every(text)
    message = str(refused.value)
    assert "too large" in message
    limit = int(re.search(r"at most ([0-9,]+) ", message)[1].replace(",", ""))
    assert f"at most {limit:,} {unit}" in message
    assert parse_every(f"{limit}{unit}") == (limit, unit)  # the limit itself is accepted
    with pytest.raises(InvalidInput, match="too large"):
        parse_every(f"{limit + 1}{unit}")


def test_the_command_reports_a_too_large_interval(run, tmp_path):
    store = ("--store", url(tmp_path / "c.db"))
    message = error_line(run(*store, "refill-settings", "a", "--every", "99999999999d", code=1))
    assert "--every '99999999999d' is too large: at most" in message
    assert not (tmp_path / "c.db").exists()  # refused while reading the arguments


# --- 2. --store help, bad store URLs and configs -------------------------------------------


def test_store_help_lists_every_scheme(run):
    shown = " ".join(run("--help").out.split())
    for example in ("memory://", "sqlite:///", "redis://", "rediss://", "postgresql://"):
        assert example in shown
    for scheme in _OPENERS:  # every scheme open_store knows
        assert f"{scheme}://" in shown, scheme


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        # Unparsable: each was a ValueError traceback before the fix (the stores may say it
        # in their own words; the command says "bad store URL ...").
        ("redis://[bad", "Invalid IPv6 URL"),
        ("rediss://admin:hunter2@[x/0", "Invalid IPv6 URL"),
        ("postgresql://[bad/db", "Invalid IPv6 URL"),
        ("mongodb://admin:hunter2@db/x", "unknown store URL 'mongodb://admin:***@db/x'"),
        # A password in a URL too malformed to parse was printed before the fix.
        ("mongodb://admin:hunter2@[x", "unknown store URL 'mongodb://admin:***@[x'"),
        ("sqlite://", "an SQLite URL is sqlite:///relative/path.db"),
        ("memory://x", "takes nothing after 'memory://'"),
        ("sqlite:///no/such/folder/c.db", "cannot open SQLite store"),
        ("redis://127.0.0.1:1/0", "Redis"),  # nothing listens on port 1
        ("postgresql://nobody@127.0.0.1:1/x", "PostgreSQL"),
    ],
)
def test_a_bad_store_url_is_one_line(run, store, expected):
    message = error_line(run("--store", store, "list", code=1))
    assert expected in message
    assert "hunter2" not in message


def test_a_corrupt_store_is_one_line(run, tmp_path):
    path = tmp_path / "c.db"
    real_store(path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE creditmeter_accounts SET data = '{garbage'")
    db.close()
    for argv in (("balance", "alice"), ("list",), ("grant", "alice", "1"), ("refill", "alice")):
        assert "corrupt" in error_line(run("--store", url(path), *argv, code=1))
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text)")
    db.close()
    assert "not a creditmeter store" in error_line(run("--store", url(other), "list", code=1))


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        ("balance: [1, 2\n", "is not valid YAML"),
        ("balance:\n  startBalance: lots\n", "key 'startBalance' must be a number"),
        ("balance:\n  refillIntervalUnit: fortnights\n", "'refillIntervalUnit' must be one of"),
        ("balance:\n  nonsense: 1\n", "unknown balance config key 'nonsense'"),
        ("- just\n- a list\n", "must hold a mapping"),
        (b"\xff\xfe\x00binary", "config file"),
    ],
)
def test_a_bad_config_is_one_line(run, tmp_path, yaml, expected):
    config = tmp_path / "bad.yaml"
    if isinstance(yaml, bytes):
        config.write_bytes(yaml)
    else:
        config.write_text(yaml)
    message = error_line(
        run("--store", url(tmp_path / "c.db"), "--config", str(config), "grant", "a", "1", code=1)
    )
    assert expected in message
    assert not (tmp_path / "c.db").exists()
