"""Credit blocks from the shell (issue 16): ``grant --expires/--priority``, ``balance``,
``ledger``, ``export`` and ``expire``.

The command runs through ``creditmeter.cli.main`` in this process against
real SQLite files (and ``memory://``), with balances on (CHECK_BALANCE).
Blocks that have already expired are written through the Python API by a
manager on a fake clock set in the past, on the same file, so the command
(on the real clock) finds them due without any waiting. What it prints is
parsed back and checked against the account and the ledger the API reads
from the same file, exactly (Decimal, no float). Every bad argument is one
line on stderr, a non-zero exit, and nothing written: no store file, no
new entry.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from creditmeter import BalanceConfig, BalanceManager, EntryKind, SQLiteStore
from creditmeter.cli import main
from creditmeter.cli.format import drawn_text, parse_expiry
from creditmeter.exceptions import InvalidInput
from creditmeter.testing import FakeClock, make_entry

UTC = timezone.utc
PAST = datetime(2025, 1, 1, tzinfo=UTC)  # when the fake-clock manager writes
ON = BalanceConfig(enabled=True, start_balance=0)
ODD = Decimal("12345.123456789012345678901234567891")  # 35 significant digits


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def error(self) -> str:
        """The one line on stderr of a failed command."""
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("creditmeter: error: "), self.err
        assert self.out == ""
        return lines[0]


class Shell:
    """``creditmeter --store sqlite:///<tmp>/credits.db ...`` in this process, balances on."""

    def __init__(self, tmp_path: Path, capsys: Any) -> None:
        self.db = tmp_path / "credits.db"
        self.store = f"sqlite:///{self.db}"
        self.capsys = capsys

    def __call__(self, *argv: str, code: int = 0, store: str | None = None) -> Ran:
        self.capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(["--store", store or self.store, *argv])
        out, err = self.capsys.readouterr()
        ran = Ran(exited.value.code or 0, out, err)
        assert "Traceback" not in err
        assert ran.code == code, ran
        if code == 0:
            assert err == "", err
        return ran

    def json(self, *argv: str, store: str | None = None) -> Any:
        return self("--json", *argv, store=store).json()

    def manager(self, clock: FakeClock | None = None) -> BalanceManager:
        return BalanceManager(SQLiteStore(self.db), ON, clock=clock)


@pytest.fixture
def shell(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> Shell:
    for name in ("CREDITMETER_STORE", "CREDITMETER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHECK_BALANCE", "true")
    monkeypatch.setenv("START_BALANCE", "0")
    monkeypatch.setenv("COLUMNS", "200")  # wide enough that no table cell wraps
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.chdir(tmp_path)
    return Shell(tmp_path, capsys)


def now() -> datetime:
    return datetime.now(UTC)


def ledger_sum(manager: BalanceManager, user: str) -> Decimal:
    return sum((entry.amount for entry in manager.ledger(user)), Decimal(0))


# --- grant --expires / --priority, and balance ------------------------------------


def test_grant_makes_blocks_that_balance_lists_in_draw_order(shell):
    plain = shell.json("grant", "ann", "100")
    assert "block" not in plain  # a plain grant's output is as it was
    before = now()
    month = shell.json("grant", "ann", "40", "--expires", "30d", "--priority", "10")
    after = now()
    dated = shell.json("grant", "ann", "25.5", "--expires", "2090-01-01T12:00+02:00")
    ranked = shell.json("grant", "ann", "10", "--priority", "90")
    assert [item["balance"] for item in (plain, month, dated, ranked)] == [
        "100", "140", "165.5", "175.5",
    ]  # fmt: skip
    block = month["block"]
    assert block["id"] == month["entry"]["id"]  # a block is named by its grant entry
    assert (block["amount"], block["granted"], block["priority"]) == ("40", "40", 10)
    expires = datetime.fromisoformat(block["expires_at"])
    assert before + timedelta(days=30) <= expires <= after + timedelta(days=30)
    assert dated["block"]["priority"] == 50  # an expiring grant given none
    assert dated["block"]["expires_at"] == "2090-01-01T10:00:00+00:00"  # converted to UTC
    assert ranked["block"]["expires_at"] is None  # never expires
    assert ranked["block"]["priority"] == 90

    shown = shell.json("balance", "ann")
    with shell.manager() as manager:
        account = manager.account("ann")
    ids = [month["block"]["id"], dated["block"]["id"], ranked["block"]["id"]]
    assert [b.id for b in account.blocks] == ids
    assert [b["id"] for b in shown["blocks"]] == ids  # the order charges draw them
    assert [b["amount"] for b in shown["blocks"]] == ["40", "25.5", "10"]
    assert shown["balance"] == "175.5"
    assert shown["unrestricted"] == "100"
    assert Decimal(shown["unrestricted"]) == account.unrestricted
    assert shown["blocks"][0] == month["block"]

    table = shell("balance", "ann").out
    assert "In blocks       75.5 in 3 open credit blocks (drawn first)" in table
    assert "Plain balance   100 (drawn last)" in table
    assert "Credit blocks of ann, in the order charges draw them" in table
    lines = [line for line in table.splitlines() if any(i in line for i in ids)]
    assert [next(i for i in ids if i in line) for line in lines] == ids
    assert "2090-01-01 10:00:00 UTC (in " in lines[1]
    assert lines[2].split()[-1] == "never"
    assert "(in 29 days, 23 hours)" in lines[0] or "(in 30 days" in lines[0]
    text = shell("grant", "ann", "1", "--expires", "2090-06-01").out
    assert "as credit block " in text
    assert "(priority 50; expires 2090-06-01 00:00:00 UTC). Balance: 176.5" in text


def test_an_account_without_blocks_shows_as_before(shell):
    shell("grant", "bo", "5")
    shown = shell.json("balance", "bo")
    assert (shown["blocks"], shown["unrestricted"], shown["balance"]) == ([], "5", "5")
    table = shell("balance", "bo").out
    assert "Credit blocks" not in table
    assert "Plain balance" not in table
    assert "Drawn" not in shell("ledger", "bo").out


def test_a_repeated_block_grant_changes_nothing(shell):
    first = shell.json("grant", "cy", "30", "--expires", "7d", "--request-id", "promo-1")
    again = shell.json("grant", "cy", "30", "--expires", "7d", "--request-id", "promo-1")
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert again["entry"]["id"] == first["entry"]["id"]
    assert again["block"] == first["block"]
    assert again["block"]["request_id"] == "promo-1"
    with shell.manager() as manager:
        assert manager.balance("cy") == 30
        assert len(manager.account("cy").blocks) == 1


# --- what charges drew: ledger and export ------------------------------------------


def test_ledger_and_export_show_what_each_charge_drew(shell):
    with shell.manager() as manager:
        manager.grant("dee", 100)
        late = manager.grant("dee", 10, priority=90)
        soon = manager.grant("dee", 40, expires_at=now() + timedelta(days=3), priority=10)
        first = manager.charge("dee", 30)  # 30 of the 40
        second = manager.charge("dee", 25)  # the 10 left of it, the 10 block, 5 plain
        manager.charge("dee", 1)  # the plain balance only
    assert first.drawn == ((soon.id, 30),)
    assert second.drawn == ((soon.id, 10), (late.id, 10))

    table = shell("ledger", "dee").out
    assert "Drawn" in table
    rows = {line.split()[3]: line for line in table.splitlines() if " charge " in line}
    assert "blocks: 30" in rows["-30"]
    assert "blocks: 10 + 10, plain: 5" in rows["-25"]
    assert "blocks" not in rows["-1"]

    entries = shell.json("ledger", "dee")
    charges = [entry for entry in entries if entry["kind"] == "charge"]
    assert [entry.get("drawn") for entry in charges] == [
        [[soon.id, "30"]],
        [[soon.id, "10"], [late.id, "10"]],
        None,  # drew no block: the key is left out, as the stored form leaves it
    ]
    rows_csv = list(csv.DictReader(io.StringIO(shell("ledger", "dee", "--format", "csv").out)))
    assert [json.loads(row["drawn"]) if row["drawn"] else None for row in rows_csv] == [
        entry.get("drawn") for entry in entries
    ]

    lines = shell("export").out.splitlines()
    assert [json.loads(line).get("drawn") for line in lines] == [
        entry.get("drawn") for entry in entries
    ]
    exported = list(csv.DictReader(io.StringIO(shell("export", "--format", "csv").out)))
    assert list(exported[0])[-1] == "drawn"
    assert [row["drawn"] for row in exported] == [row["drawn"] for row in rows_csv]
    with shell.manager() as manager:
        assert manager.balance("dee") == 100 + 10 + 40 - 56
        assert ledger_sum(manager, "dee") == manager.balance("dee")


def test_drawn_amounts_are_exact(shell, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # room for 35-digit amounts on one line
    with shell.manager() as manager:
        block = manager.grant("eli", ODD, priority=0)
        manager.grant("eli", 5)
        manager.charge("eli", Decimal("12346.123456789012345678901234567891"))
    [charge] = [entry for entry in shell.json("ledger", "eli") if entry["kind"] == "charge"]
    assert charge["drawn"] == [[block.id, str(ODD)]]
    assert charge["amount"] == "-12346.123456789012345678901234567891"
    assert charge["balance_after"] == "4"
    [line] = [line for line in shell("ledger", "eli").out.splitlines() if " charge " in line]
    assert "blocks: 12,345.123456789012345678901234567891, plain: 1" in line
    assert "cost" not in line  # the cost is what was charged, to the last digit


def entry(kind: EntryKind, amount: int, *drawn: tuple[str, int]) -> Any:
    pairs = tuple((block, Decimal(value)) for block, value in drawn)
    return make_entry("u", kind=kind, amount=Decimal(amount), balance_after=Decimal(0), drawn=pairs)


def test_drawn_text():
    charge = EntryKind.CHARGE
    assert drawn_text(entry(charge, -45, ("b1", 30), ("b2", 10))) == "blocks: 30 + 10, plain: 5"
    assert drawn_text(entry(charge, -1500, ("b1", 1500))) == "blocks: 1,500"
    assert drawn_text(entry(EntryKind.EXPIRE, -7, ("b9", 7))) == "block b9"
    assert drawn_text(entry(charge, -3)) == ""


# --- expiry -------------------------------------------------------------------------


def expired_blocks(shell: Shell) -> tuple[str, str]:
    """Two blocks written a day before their expiry, long past: 18 of 30 left, and 7.25."""
    clock = FakeClock(PAST)
    with shell.manager(clock) as manager:
        manager.grant("fay", 50)
        spent = manager.grant("fay", 30, expires_at=PAST + timedelta(days=1), priority=0)
        whole = manager.grant("fay", Decimal("7.25"), expires_at=PAST + timedelta(days=2))
        manager.charge("fay", 12)  # from the first block
        manager.grant("fay", 3, priority=5)  # never expires
    return spent.id, whole.id


def test_expire_writes_off_what_is_left_once(shell):
    spent, whole = expired_blocks(shell)
    with shell.manager() as manager:
        entries_before = len(manager.ledger("fay"))
    # Reading sees the account as of now, and writes nothing.
    shown = shell.json("balance", "fay")
    assert shown["balance"] == "53"  # 50 + 3: the expired blocks no longer count
    assert [block["amount"] for block in shown["blocks"]] == ["3"]
    assert "expire" not in [entry["kind"] for entry in shell.json("ledger", "fay")]
    with shell.manager() as manager:
        assert len(manager.ledger("fay")) == entries_before

    done = shell.json("expire", "fay")
    assert (done["expired"], done["amount"], done["balance"]) == (2, "-25.25", "53")
    assert done["next_expiry"] is None  # the block left never expires
    assert [entry["kind"] for entry in done["entries"]] == ["expire", "expire"]
    assert sorted(entry["drawn"][0][0] for entry in done["entries"]) == sorted([spent, whole])
    by_block = {entry["drawn"][0][0]: entry for entry in done["entries"]}
    assert (by_block[spent]["amount"], by_block[spent]["drawn"]) == ("-18", [[spent, "18"]])
    assert (by_block[whole]["amount"], by_block[whole]["drawn"]) == ("-7.25", [[whole, "7.25"]])

    again = shell.json("expire", "fay")
    assert (again["expired"], again["amount"], again["entries"]) == (0, "0", [])
    assert "Nothing to expire for fay" in shell("expire", "fay").out

    ledger = shell("ledger", "fay").out
    assert f"block {spent}" in ledger
    assert f"block {whole}" in ledger
    expires = [line for line in ledger.splitlines() if " expire " in line]
    assert sorted(line.split()[3] for line in expires) == ["-18", "-7.25"]
    with shell.manager() as manager:
        kinds = [entry.kind for entry in manager.ledger("fay")]
        assert kinds.count(EntryKind.EXPIRE) == 2
        assert manager.balance("fay") == 53
        assert ledger_sum(manager, "fay") == 53


def test_expire_says_what_it_wrote_off(shell):
    expired_blocks(shell)
    with shell.manager() as manager:
        manager.grant("fay", 2, expires_at=datetime(2090, 3, 1, tzinfo=UTC))
    # The grant above wrote the expiries already: a second user keeps them due.
    clock = FakeClock(PAST)
    with shell.manager(clock) as manager:
        manager.grant("gus", Decimal("1.5"), expires_at=PAST + timedelta(hours=1))
    text = shell("expire", "gus").out
    assert text == "Expired 1 credit block of gus: 1.5 credits written off. Balance: 0.\n"
    text = shell("expire", "fay").out
    assert text == (
        "Nothing to expire for fay: no credit block has reached its expiry. Balance: 55. "
        "Next expiry 2090-03-01 00:00:00 UTC.\n"
    )


def test_expire_needs_an_account(shell):
    shell("grant", "someone", "1")
    assert "user 'nobody' has no account" in shell("expire", "nobody", code=1).error()
    with shell.manager() as manager:
        assert manager.users() == ["someone"]


def test_help(shell):
    assert "  expire " in shell("--help").out
    shown = shell("grant", "--help").out
    assert "--expires TIME" in shown
    assert "span from now (30d" in shown
    assert "--priority N" in shown


# --- memory:// ----------------------------------------------------------------------


def test_memory_store(shell):
    granted = shell.json(
        "grant", "hal", "5", "--expires", "1h", "--priority", "3", store="memory://"
    )
    assert granted["balance"] == "5"
    assert (granted["block"]["amount"], granted["block"]["priority"]) == ("5", 3)
    expires = datetime.fromisoformat(granted["block"]["expires_at"])
    assert timedelta(minutes=59) < expires - now() <= timedelta(hours=1)
    # Each command opens a new memory store: the account is gone.
    assert "no account" in shell("expire", "hal", code=1, store="memory://").error()
    shell("grant", "hal", "5", "--expires", "yesterday", code=2, store="memory://")
    assert not shell.db.exists()


# --- bad input writes nothing --------------------------------------------------------


BAD = [
    (["--expires", "2020-01-01"], 2, "2020-01-01 00:00:00 UTC is not in the future"),
    (["--expires", "2001-02-03T04:05:06+02:00"], 2, "2001-02-03 02:05:06 UTC is not in the"),
    (["--expires", "soon"], 2, "expected a span from now (30d, 12h, 2w, 1mo)"),
    (["--expires", "0d"], 2, "a span from now must be at least 1 day, got '0d'"),
    (["--expires", "5m"], 2, "'m' is ambiguous"),
    (["--expires", "2027-13-01"], 2, "got '2027-13-01'"),
    (["--expires", "99999999mo"], 2, "too large"),
    (["--expires", ""], 2, "got ''"),
    (["--priority", "101"], 2, "101 is not in the range 0<=x<=100"),
    (["--priority", "-1"], 2, "-1 is not in the range 0<=x<=100"),
    (["--priority", "high"], 2, "'high' is not a valid integer"),
    (["--priority", "2.5"], 2, "'2.5' is not a valid integer"),
]


@pytest.mark.parametrize(("extra", "code", "message"), BAD)
def test_bad_input_creates_no_store(shell, extra, code, message):
    ran = shell("grant", "ivy", "10", *extra, code=code)
    line = ran.error()
    assert message in line
    if "--expires" in extra:
        assert "'--expires'" in line
    assert not shell.db.exists()


@pytest.mark.parametrize(("extra", "code", "message"), BAD)
def test_bad_input_writes_nothing_to_a_store(shell, extra, code, message):
    shell("grant", "ivy", "10", "--expires", "1d")
    with shell.manager() as manager:
        before = (manager.account("ivy"), manager.ledger("ivy"))
    assert message in shell("grant", "ivy", "10", *extra, code=code).error()
    with shell.manager() as manager:
        assert (manager.account("ivy"), manager.ledger("ivy")) == before


def test_a_bad_user_with_an_expiry_creates_no_store(shell):
    line = shell("grant", "a\x01b", "1", "--expires", "1d", code=1).error()
    assert "user_id must not contain control characters" in line
    assert not shell.db.exists()


# --- parse_expiry ---------------------------------------------------------------------

NOW = datetime(2026, 1, 31, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", NOW + timedelta(days=30)),
        ("12h", NOW + timedelta(hours=12)),
        ("90 min", NOW + timedelta(minutes=90)),
        ("2w", NOW + timedelta(weeks=2)),
        ("1mo", datetime(2026, 2, 28, 10, 0, tzinfo=UTC)),  # calendar months, clamped
        ("2026-02-01", datetime(2026, 2, 1, tzinfo=UTC)),
        ("2026-01-31T10:00:01", NOW + timedelta(seconds=1)),  # no offset: UTC
        ("2026-01-31T12:30+02:00", datetime(2026, 1, 31, 10, 30, tzinfo=UTC)),
        (" 2026-01-31T10:30Z ", datetime(2026, 1, 31, 10, 30, tzinfo=UTC)),
    ],
)
def test_parse_expiry_counts_forward(text, expected):
    assert parse_expiry(text, now=NOW) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-01-31T10:00", "is not in the future"),  # now itself has expired
        ("2026-01-31", "is not in the future"),
        ("2026-01-31T12:00+05:00", "is not in the future"),
        ("tomorrow", "expected a span from now"),
        ("0h", "at least 1 hour"),
        ("30", "expected a span from now"),
    ],
)
def test_parse_expiry_refuses(text, message):
    with pytest.raises(InvalidInput, match=message):
        parse_expiry(text, now=NOW)
