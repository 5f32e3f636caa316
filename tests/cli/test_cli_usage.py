"""``creditmeter usage`` and the time ranges of ``ledger`` and ``export`` (issue 15).

The command runs through ``creditmeter.cli.main`` in this process against
real SQLite files (and ``memory://``), filled through the Python API with a
fake clock. What it prints is parsed back and checked against
``manager.usage()`` / ``manager.entries()`` on the same file, and against
sums worked out here from the ledger itself, exactly (Decimal, no float).
Plots are real PNGs, read back with matplotlib; what they draw is checked
against the report's rows. Every bad argument is one line on stderr, a
non-zero exit, and nothing written: no store file, no PNG.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from creditmeter import BalanceConfig, BalanceManager, SQLiteStore, TokenUsage
from creditmeter._exact import EXACT
from creditmeter.cli import main
from creditmeter.cli import plot as plotting
from creditmeter.cli.format import parse_by, parse_moment, usage_plain
from creditmeter.exceptions import InvalidInput
from creditmeter.models import EntryKind, LedgerEntry
from creditmeter.queries import UsageRow
from creditmeter.rules import period_start, usage_sum
from creditmeter.testing import FakeClock

UTC = timezone.utc
START = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)  # a Monday
TINY = Decimal("0.000000000000000000000000000003")  # 30 decimal places
ODD = Decimal("12345.123456789012345678901234567891")
PNG = b"\x89PNG\r\n\x1a\n"
SONNET = "claude-3-5-sonnet-20241022"


@dataclass
class Ran:
    code: int
    out: str
    err: str


@pytest.fixture
def run(capsys, monkeypatch, tmp_path):
    """Run ``creditmeter ARGS`` in this process, in ``tmp_path``, with no creditmeter variables."""
    for name in ("CREDITMETER_STORE", "CREDITMETER_CONFIG", "CHECK_BALANCE", "START_BALANCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()

    def invoke(*argv: str, code: int = 0) -> Ran:
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        out, err = capsys.readouterr()
        ran = Ran(exited.value.code or 0, out, err)
        assert "Traceback" not in err
        assert ran.code == code, ran
        if code == 0:
            assert err == "", err
        return ran

    return invoke


def error_line(ran: Ran) -> str:
    lines = ran.err.splitlines()
    assert len(lines) == 1, ran.err
    assert lines[0].startswith("creditmeter: error: "), ran.err
    assert ran.out == ""
    return lines[0]


@pytest.fixture
def db(tmp_path) -> Path:
    """A store with charges over a week: models, no model, a clamped charge, a settled hold.

    Day 0 (Mon 2026-11-02): ann gpt-4o-mini, bob sonnet with cache, ann a tiny charge
    without a model. Day 1: cy charged more than her balance (clamped), bob a settled
    hold, a grant and a refill-like grant (not usage). Days 2-3: nothing. Day 4 (Fri):
    ann an odd amount without a model, bob gpt-4o-mini. Day 8 (next Tue): ann again.
    """
    path = tmp_path / "usage.db"
    clock = FakeClock(START)
    with BalanceManager(SQLiteStore(path), BalanceConfig(enabled=True), clock=clock) as manager:
        manager.grant("ann", 10**6)
        manager.grant("bob", 10**6)
        manager.grant("cy", 1)
        manager.charge("ann", model="gpt-4o-mini", usage=TokenUsage(input=1000, output=200))
        manager.charge("bob", model=SONNET, usage=TokenUsage(input=500, output=100, cache_read=300))
        manager.charge("ann", TINY)
        clock.advance(timedelta(days=1, hours=2))
        manager.charge("cy", model="gpt-4o", usage=TokenUsage(input=5000, output=1000))
        hold = manager.hold("bob", model="gpt-4o-mini", usage=TokenUsage(input=50, output=50))
        manager.settle(hold, model="gpt-4o-mini", usage=TokenUsage(input=40, output=10))
        manager.grant("ann", 5, reason="goodwill")
        clock.advance(timedelta(days=3))
        manager.charge("ann", ODD)
        manager.charge("bob", model="gpt-4o-mini", usage=TokenUsage(input=7, output=3))
        clock.advance(timedelta(days=4))
        manager.charge("ann", model="gpt-4o-mini", usage=TokenUsage(input=10, output=10))
    return path


def url(path: Path) -> str:
    return f"sqlite:///{path}"


def manager_of(path: Path) -> BalanceManager:
    return BalanceManager(SQLiteStore(path))


def all_entries(path: Path) -> list[LedgerEntry]:
    with manager_of(path) as manager:
        return [entry for user in manager.users() for entry in manager.ledger(user)]


def charged_by(path: Path, key, since=None, until=None) -> dict[object, Decimal]:
    """Credits charged per ``key(entry)``, summed here from the ledgers, exactly."""
    sums: dict[object, Decimal] = defaultdict(Decimal)
    for entry in all_entries(path):
        if entry.kind is not EntryKind.CHARGE:
            continue
        if (since is not None and entry.at < since) or (until is not None and entry.at >= until):
            continue
        sums[key(entry)] = EXACT.add(sums[key(entry)], entry.amount.copy_negate())
    return dict(sums)


# --- usage: what it reports ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "by", "period"),
    [
        ([], ("model",), None),
        (["--by", "user"], ("user",), None),
        (["--by", " Model , user "], ("user", "model"), None),
        (["--by", "user,model,period", "--period", "week"], ("user", "model", "period"), "week"),
        (["--period", "day"], ("model", "period"), "day"),  # --period adds period to --by
        (["--by", "period"], ("period",), "day"),  # period alone: per day
        (["--by", "user", "--period", "month"], ("user", "period"), "month"),
    ],
)
def test_usage_json_is_what_the_python_api_reports(run, db, args, by, period):
    shown = json.loads(run("--store", url(db), "usage", "--format", "json", *args).out)
    with manager_of(db) as manager:
        rows = manager.usage(by=by, period=period)
    assert shown == usage_plain(rows, by)
    keys = {"user", "model", "period"} & set(by)
    for record in shown:
        assert set(record) == keys | {
            "calls", "input", "output", "cache_write", "cache_read", "cost", "charged",
        }  # fmt: skip
        assert isinstance(record["charged"], str)
        assert isinstance(record["cost"], str)
    # The --json flag gives the same.
    assert json.loads(run("--store", url(db), "--json", "usage", *args).out) == shown


def test_usage_sums_are_exact_and_count_only_charges(run, db):
    shown = json.loads(run("--store", url(db), "usage", "--by", "user", "--format", "json").out)
    expected = charged_by(db, lambda entry: entry.user_id)
    assert {row["user"]: Decimal(row["charged"]) for row in shown} == expected
    ann = next(row for row in shown if row["user"] == "ann")
    assert ann["calls"] == 4  # two model calls, TINY and ODD; the grants do not count
    assert Decimal(ann["charged"]).as_tuple().exponent == -30  # TINY's last digit is kept
    bob = next(row for row in shown if row["user"] == "bob")
    assert bob["calls"] == 3  # the settled hold counts as a charge
    assert bob["input"] == 500 + 40 + 7
    assert bob["cache_read"] == 300
    cy = next(row for row in shown if row["user"] == "cy")
    assert Decimal(cy["cost"]) > Decimal(cy["charged"])  # the full priced cost is kept...
    with manager_of(db) as manager:
        assert manager.balance("cy") == 0  # ...while the charge was clamped at her balance


def test_usage_csv_has_a_header_and_one_row_per_group(run, db):
    out = run("--store", url(db), "usage", "--by", "model,period", "--format", "csv").out
    assert out.splitlines()[0] == (
        "model,period,calls,input,output,cache_write,cache_read,cost,charged"
    )
    records = list(csv.DictReader(io.StringIO(out)))
    with manager_of(db) as manager:
        rows = manager.usage(by=("model", "period"), period="day")
    assert len(records) == len(rows)
    for record, row in zip(records, rows, strict=True):
        assert record["model"] == (row.model or "")
        assert datetime.fromisoformat(record["period"]) == row.period_start
        assert Decimal(record["charged"]) == row.charged
        assert Decimal(record["cost"]) == row.cost
        assert int(record["input"]) == row.usage.input
    expected = charged_by(db, lambda entry: (entry.model, period_start(entry.at, "day")))
    assert {
        (record["model"] or None, datetime.fromisoformat(record["period"])): Decimal(
            record["charged"]
        )
        for record in records
    } == expected


def test_usage_table_shows_only_the_grouped_keys_exact_numbers_and_a_total(run, db):
    out = run("--store", url(db), "usage").out
    header = next(line for line in out.splitlines() if "Calls" in line)
    assert header.split() == [
        "Model", "Calls", "Input", "Output", "Cache", "write", "Cache", "read", "Cost", "Charged",
    ]  # fmt: skip
    assert "(no model)" in out
    (total,) = charged_by(db, lambda entry: None).values()
    total_line = next(line for line in out.splitlines() if line.strip().startswith("total"))
    assert total_line.split()[-1] == f"{total:,f}".rstrip("0").rstrip(".")
    assert "12,345.123456789012345678901234567894" in out  # ODD + TINY, nothing rounded away
    assert "Usage of all users by model" in out
    by_user = run("--store", url(db), "usage", "--by", "user", "--user", "bob").out
    header = next(line for line in by_user.splitlines() if "Calls" in line)
    assert header.split()[0] == "User"
    assert "Model" not in header
    assert "Usage of bob by user" in by_user


def test_usage_periods_follow_the_utc_calendar(run, db):
    args = ["--by", "period", "--period", "week", "--format", "json"]
    weeks = json.loads(run("--store", url(db), "usage", *args).out)
    assert [row["period"] for row in weeks] == [
        "2026-11-02T00:00:00+00:00",  # Monday
        "2026-11-09T00:00:00+00:00",
    ]
    table = run("--store", url(db), "usage", "--period", "week").out
    assert "week of 2026-11-02" in table
    months = run("--store", url(db), "usage", "--period", "month").out
    assert "2026-11 " in months


@pytest.mark.parametrize(
    ("since", "until"),
    [
        ("2026-11-03", "2026-11-06T12:00"),  # a date, a datetime without an offset: UTC
        ("2026-11-03T00:00:00Z", "2026-11-06T14:00+02:00"),  # the same, with offsets
        ("2026-11-02T19:00-05:00", "2026-11-06T12:00:00.000000+00:00"),
    ],
)
def test_since_and_until_read_dates_and_times_as_utc(run, db, since, until):
    args = ["--by", "user", "--since", since, "--until", until, "--format", "json"]
    shown = json.loads(run("--store", url(db), "usage", *args).out)
    low, high = datetime(2026, 11, 3, tzinfo=UTC), datetime(2026, 11, 6, 12, tzinfo=UTC)
    expected = charged_by(db, lambda entry: entry.user_id, low, high)
    assert {row["user"]: Decimal(row["charged"]) for row in shown} == expected
    assert set(expected) == {"ann", "bob", "cy"}  # day 1 and day 4, not days 0 and 8
    with manager_of(db) as manager:
        rows = manager.usage(by="user", since=low, until=high)
    assert shown == usage_plain(rows, ("user",))


def test_a_span_counts_back_from_now(run, tmp_path):
    path = tmp_path / "recent.db"
    now = datetime.now(UTC)
    clock = FakeClock(now - timedelta(days=3))
    with BalanceManager(SQLiteStore(path), BalanceConfig(enabled=True), clock=clock) as manager:
        manager.grant("ann", 1000)
        manager.charge("ann", 7)  # three days ago
        clock.set(now - timedelta(hours=1))
        manager.charge("ann", 5)  # an hour ago
    recent = run("--store", url(path), "--json", "usage", "--since", "2d").out
    assert [Decimal(row["charged"]) for row in json.loads(recent)] == [5]
    older = run("--store", url(path), "--json", "usage", "--until", "1d").out
    assert [Decimal(row["charged"]) for row in json.loads(older)] == [7]
    both = run("--store", url(path), "--json", "usage", "--since", "1w", "--until", "30min").out
    assert [Decimal(row["charged"]) for row in json.loads(both)] == [12]


def test_parse_moment_forms():
    now = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)
    assert parse_moment("2026-11-01", now=now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_moment(" 2026-11-01T13:30 ", now=now) == datetime(2026, 11, 1, 13, 30, tzinfo=UTC)
    assert parse_moment("2026-11-01 13:30z", now=now) == datetime(2026, 11, 1, 13, 30, tzinfo=UTC)
    assert parse_moment("2026-11-01T13:30+02:00", now=now) == datetime(
        2026, 11, 1, 11, 30, tzinfo=UTC
    )
    assert parse_moment("30d", now=now) == now - timedelta(days=30)
    assert parse_moment("12h", now=now) == now - timedelta(hours=12)
    assert parse_moment("2w", now=now) == now - timedelta(weeks=2)
    assert parse_moment("90min", now=now) == now - timedelta(minutes=90)
    assert parse_moment("1mo", now=now) == datetime(2026, 2, 28, 12, tzinfo=UTC)  # clamped
    for bad in ("", "yesterday", "-3d", "3m", "0d", "2026-02-30", "30 parsecs", "99999999d"):
        with pytest.raises(InvalidInput):
            parse_moment(bad, now=now)


def test_parse_by():
    assert parse_by("model,user") == ("user", "model")
    assert parse_by("PERIOD") == ("period",)
    for bad in ("", ",", "user,", "user,user", "users", "user;model"):
        with pytest.raises(InvalidInput):
            parse_by(bad)


def test_an_empty_report(run, db, tmp_path):
    late = run("--store", url(db), "usage", "--since", "2027-01-01").out
    assert late.startswith("No charges in this report (Usage of all users by model, ")
    assert run("--store", url(db), "--json", "usage", "--user", "nobody").out == "[]\n"
    assert run("--store", "memory://", "--json", "usage", "--by", "user,model").out == "[]\n"
    assert run("--store", "memory://", "usage", "--format", "csv").out == (
        "model,calls,input,output,cache_write,cache_read,cost,charged\n"
    )


# --- usage: bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--since", "yesterday"], 2, "Invalid value for '--since': expected an ISO date"),
        (["--until", "2026-13-01"], 2, "Invalid value for '--until': expected an ISO date"),
        (["--since", "3x"], 2, "Invalid value for '--since': a span back from now has an unknown"),
        (["--since", "3m"], 2, "'m' is ambiguous"),
        (["--since", "0d"], 2, "must be at least 1 day"),
        (["--since", "2026-11-05", "--until", "2026-11-05"], 2, "--since (2026-11-05T00:00:00"),
        (["--by", "user,team"], 2, "Invalid value for '--by': unknown key 'team'"),
        (["--by", ""], 2, "Invalid value for '--by': give a comma list"),
        (["--by", "model,model"], 2, "'model' is given twice"),
        (["--period", "fortnight"], 2, "Invalid value for '--period': 'fortnight' is not one of"),
        (["--format", "xml"], 2, "Invalid value for '--format': 'xml' is not one of"),
        (["--format", "csv", "--json"], 2, "--json and --format csv contradict each other"),
        (["--plot", "spend.svg"], 2, "--plot writes a PNG"),
        (["--user", "a\x01b"], 1, "user_id must not contain control characters"),
    ],
)
@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, store, args, code, message):
    path = tmp_path / "never.db"
    target = url(path) if store == "sqlite" else "memory://"
    line = error_line(run("--store", target, "usage", *args, code=code))
    assert message in line
    assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- usage --plot -----------------------------------------------------------------------------


def test_plot_writes_a_real_png_of_the_charged_column(run, db, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    target = tmp_path / "spend.png"
    out = run("--store", url(db), "usage", "--plot", str(target)).out
    assert f"Saved the plot of credits charged per day to {target}." in out
    assert "Period (UTC)" in out  # a plot needs a period: per day unless told
    data = target.read_bytes()
    assert data.startswith(PNG)
    assert len(data) > 1000
    pixels = image.imread(target)
    assert pixels.shape[0] > 100
    assert pixels.shape[1] > 100
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    # JSON output stays JSON: the saying goes to tables only.
    rows = json.loads(run("--store", url(db), "--json", "usage", "--plot", str(target)).out)
    assert {row["period"] for row in rows} >= {"2026-11-02T00:00:00+00:00"}


def test_the_series_drawn_are_the_reports_rows(db):
    with manager_of(db) as manager:
        rows = manager.usage(by=("user", "model", "period"), period="day")
    series = plotting.spend_series(rows, ("user", "model", "period"), "day")
    assert series.stacked_by == "model"
    # Every day from the first charge to the last, the empty ones too.
    first = datetime(2026, 11, 2, tzinfo=UTC)
    assert series.periods == [first + timedelta(days=n) for n in range(9)]
    expected = charged_by(db, lambda entry: (entry.model, period_start(entry.at, "day")))
    drawn = {
        (None if label == "(no model)" else label, start): value
        for label, values in series.stacks
        for start, value in zip(series.periods, values, strict=True)
        if value
    }
    assert drawn == expected
    per_day = charged_by(db, lambda entry: period_start(entry.at, "day"))
    assert series.totals() == [per_day.get(start, Decimal(0)) for start in series.periods]
    assert series.totals()[2:4] == [0, 0]  # the quiet days
    # The largest stack comes first (drawn at the bottom).
    sums = [sum(values, Decimal(0)) for _, values in series.stacks]
    assert sums == sorted(sums, reverse=True)


def test_the_plot_stacks_users_when_grouped_by_user_and_not_model(db):
    with manager_of(db) as manager:
        rows = manager.usage(by=("user", "period"), period="week")
    series = plotting.spend_series(rows, ("user", "period"), "week")
    assert series.stacked_by == "user"
    assert {label for label, _ in series.stacks} == {"ann", "bob", "cy"}
    expected = charged_by(db, lambda entry: (entry.user_id, period_start(entry.at, "week")))
    for label, values in series.stacks:
        for start, value in zip(series.periods, values, strict=True):
            assert value == expected.get((label, start), Decimal(0))
    with manager_of(db) as manager:
        alone = plotting.spend_series(
            manager.usage(by="period", period="week"), ("period",), "week"
        )
    assert alone.stacked_by is None
    assert alone.totals() == series.totals()


def test_the_figure_draws_the_series(db):
    pytest.importorskip("matplotlib")
    with manager_of(db) as manager:
        rows = manager.usage(by=("model", "period"), period="day")
    series = plotting.spend_series(rows, ("model", "period"), "day")
    drawing = plotting.figure(series, title="t")
    axes = drawing.axes[0]
    heights: dict[int, float] = defaultdict(float)
    for bar in axes.patches:
        heights[round(bar.get_x() + bar.get_width() / 2)] += bar.get_height()
    totals = series.totals()
    assert len(heights) == len(totals)
    for place, total in enumerate(totals):
        assert heights[place] == pytest.approx(float(total))
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        label for label, _ in reversed(series.stacks)
    ]
    assert "credits charged" in axes.get_ylabel()


def test_many_stacks_merge_the_smallest_exactly():
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def row(model: str, charged: str) -> UsageRow:
        amount = Decimal(charged)
        return UsageRow(
            user_id=None, model=model, period_start=start, calls=1,
            usage=usage_sum(0, 0, 0, 0), cost=amount, charged=amount,
        )  # fmt: skip

    rows = [row(f"m{n:02}", f"{n}.{'1' * 30}") for n in range(1, 15)]
    series = plotting.spend_series(rows, ("model", "period"), "month", max_stacks=4)
    assert [label for label, _ in series.stacks] == ["m14", "m13", "m12", "(11 others)"]
    merged = Decimal(0)
    for n in range(1, 12):
        merged = EXACT.add(merged, Decimal(f"{n}.{'1' * 30}"))
    assert series.stacks[-1][1] == [merged]
    assert series.periods == [start]


def test_too_many_bars_is_refused(run, tmp_path):
    path = tmp_path / "long.db"
    clock = FakeClock(datetime(2020, 1, 1, tzinfo=UTC))
    with BalanceManager(SQLiteStore(path), BalanceConfig(enabled=True), clock=clock) as manager:
        manager.grant("ann", 100)
        manager.charge("ann", 1)
        clock.set(datetime(2026, 1, 1, tzinfo=UTC))
        manager.charge("ann", 1)
    target = tmp_path / "x.png"
    line = error_line(run("--store", url(path), "usage", "--plot", str(target), code=1))
    assert "the plot would have 2,193 bars (at most 2,000)" in line
    assert not target.exists()
    run("--store", url(path), "usage", "--plot", str(target), "--period", "month")
    assert target.read_bytes().startswith(PNG)


def test_the_plot_without_matplotlib_says_what_to_install(run, db, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    target = tmp_path / "spend.png"
    line = error_line(run("--store", url(db), "usage", "--plot", str(target), code=1))
    assert line == (
        "creditmeter: error: the plot needs matplotlib: pip install 'creditmeter[plot]'"
    )
    assert not target.exists()
    fresh = tmp_path / "fresh.db"
    error_line(run("--store", url(fresh), "usage", "--plot", str(target), code=1))
    assert not fresh.exists()  # checked before the store is opened
    run("--store", url(db), "usage")  # the report alone needs no matplotlib


def test_a_plot_that_cannot_be_written(run, db, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "missing" / "spend.png"
    assert "cannot write" in error_line(
        run("--store", url(db), "usage", "--plot", str(target), code=1)
    )
    assert not (tmp_path / "missing").exists()


# --- ledger and export with a time range ---------------------------------------------------


def test_ledger_keeps_the_entries_of_the_range(run, db):
    low, high = datetime(2026, 11, 3, tzinfo=UTC), datetime(2026, 11, 7, tzinfo=UTC)
    args = ["--since", "2026-11-03", "--until", "2026-11-07", "--format", "json"]
    shown = json.loads(run("--store", url(db), "ledger", "ann", *args).out)
    with manager_of(db) as manager:
        expected = [e for e in manager.ledger("ann") if low <= e.at < high]
    assert [row["id"] for row in shown] == [entry.id for entry in expected]
    assert [row["kind"] for row in shown] == ["grant", "charge"]
    assert Decimal(shown[-1]["amount"]) == ODD.copy_negate()  # no "-": it rounds
    args = ["--since", "2026-11-02", "--limit", "2"]
    newest = json.loads(run("--store", url(db), "--json", "ledger", "ann", *args).out)
    with manager_of(db) as manager:
        assert [row["id"] for row in newest] == [e.id for e in manager.ledger("ann")[-2:]]
    out = run("--store", url(db), "ledger", "ann", "--until", "2026-11-03", "--format", "csv").out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["kind"] for row in rows] == ["open", "grant", "charge", "charge"]
    table = run("--store", url(db), "ledger", "ann", "--since", "2026-11-03").out
    assert "Ledger of ann, 2026-11-03 00:00:00 UTC to now" in table
    line = error_line(run("--store", url(db), "ledger", "ann", "--since", "soon", code=2))
    assert "Invalid value for '--since'" in line


def test_export_of_a_range_is_the_entries_of_the_range_in_commit_order(run, db, tmp_path):
    low, high = datetime(2026, 11, 3, tzinfo=UTC), datetime(2026, 11, 7, tzinfo=UTC)
    lines = run(
        "--store", url(db), "export", "--since", "2026-11-03", "--until", "2026-11-07"
    ).out.splitlines()
    with manager_of(db) as manager:
        expected = manager.entries(since=low, until=high).entries
    assert [json.loads(line)["id"] for line in lines] == [entry.id for entry in expected]
    assert {json.loads(line)["user_id"] for line in lines} == {"ann", "bob", "cy"}
    assert all(low <= datetime.fromisoformat(json.loads(line)["at"]) < high for line in lines)
    target = tmp_path / "range.csv"
    args = ["--format", "csv", "--output", str(target), "--since", "2026-11-06"]
    summary = json.loads(run("--store", url(db), "--json", "export", *args).out)
    later = [entry for entry in all_entries(db) if entry.at >= datetime(2026, 11, 6, tzinfo=UTC)]
    assert summary == {"output": str(target), "format": "csv", "users": 2, "entries": len(later)}
    records = list(csv.DictReader(io.StringIO(target.read_text())))
    assert sorted(record["id"] for record in records) == sorted(entry.id for entry in later)
    everything = run("--store", url(db), "export").out.splitlines()
    assert len(everything) == len(all_entries(db))  # no range: every ledger, as before


def test_export_pages_through_more_than_one_scan_page(run, tmp_path):
    path = tmp_path / "many.db"
    clock = FakeClock(START)
    with BalanceManager(SQLiteStore(path), BalanceConfig(enabled=True), clock=clock) as manager:
        manager.grant("ann", 10**6)
        for _ in range(1100):
            manager.charge("ann", 1)
    lines = run("--store", url(path), "export", "--since", "2026-01-01").out.splitlines()
    assert len(lines) == 1 + 1 + 1100  # open, grant, charges
    assert len({json.loads(line)["id"] for line in lines}) == len(lines)


def test_export_bad_range_writes_nothing(run, tmp_path):
    path, target = tmp_path / "never.db", tmp_path / "out.jsonl"
    args = ["--output", str(target), "--since", "1d", "--until", "2d"]
    line = error_line(run("--store", url(path), "export", *args, code=2))
    assert "--since (" in line
    assert "must be before --until" in line
    assert not path.exists()
    assert not target.exists()


def test_a_plot_of_no_charges_is_still_a_png(run, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "empty.png"
    out = run("--store", "memory://", "usage", "--plot", str(target)).out
    assert out.startswith("No charges in this report (Usage of all users by model, per day).")
    assert target.read_bytes().startswith(PNG)
    assert plotting.spend_series([], ("model", "period"), "day").periods == []
