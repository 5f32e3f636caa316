"""Bad arguments to usage(), entries() and iter_users(): InvalidInput, and nothing changed.

Run on every backend and on the generic fallback (``ForwardOnly``: only
``BalanceStore``'s methods, over MemoryStore sync and async). After every
refused call the store's users, each account and each ledger are compared
with a snapshot taken before. ``iter_users`` is a generator: its arguments
are checked when the first id is asked for, so each bad call here iterates.

Inputs tried:

- times (``since``/``until`` of usage and entries): naive datetimes, a
  ``date``, the strings "2024-01-01" and "2024-01-01T00:00:00Z", a float
  timestamp, an int, ``since == until`` and ``since > until`` (also written
  in two different offsets).
- ``by``: "users", "Model", "", None, 5, {"model"} (a set), ["model", 5],
  ("model", "model"), ("user", "period", "user"); "period" in ``by`` without
  ``period``; ``period`` "day" without "period" in ``by``; ``period`` "year",
  "Day", "", 1 with "period" in ``by``.
- ``user``: "", 5, b"alice", "a\\x00b", "x" * 257; ``iter_users(after=)``
  likewise.
- ``limit`` of entries and ``page_size`` of iter_users: 0, -1, 10,001,
  True, False, 1.5, "10", None, Decimal(10).
- ``kinds``: ["nope"], "nope", "CHARGE", ["charge", "Charge"], [], set(),
  (), [5], 5, b"charge", [None].
- cursors (``after`` of entries): "garbage", "", "cm1", "cm1.", "cm1.!!!!",
  "cm2." + a real cursor's body, a real cursor with one character added,
  cursors cut to half, one and four characters short, 5000 characters,
  base64 of text that is not JSON, of a JSON object, of a list of two, of a
  list holding a number; a real cursor re-encoded with the position "",
  "garbage", "\\x00", "1.5.7", "-1", "9" * 40 (the store must refuse them itself);
  a cursor of another user, of no user, of other kinds, since or until; a
  cursor of another kind of store (a SQLite one on memory, a memory one
  elsewhere) and of the fallback given to a store's own scan (and the other
  way round); wrong types: 5, 1.5, bytes, a list, an object.
"""

from __future__ import annotations

import base64
import json
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from fallback import ForwardOnly, open_meter, variants

from creditmeter import BalanceManager, InvalidInput, MemoryStore, SQLiteStore, TokenUsage

UTC = timezone.utc
AT = datetime(2024, 2, 29, 12, tzinfo=UTC)


VARIANTS = variants(("memory", "async-memory"))
pytestmark = pytest.mark.parametrize(("backend", "variant"), VARIANTS, indirect=["backend"])


@pytest.fixture
def seeded(backend, variant, clock):
    """A manager with two users, charges of two models, a grant and a release."""
    meter = open_meter(backend, variant, clock)
    clock.set(AT)
    meter.charge("alice", model="gpt-4o", usage=TokenUsage(input=10))
    meter.charge("alice", 3)
    meter.grant("bob", 5)
    meter.release(meter.hold("bob", 1))
    return meter


def snapshot(meter):
    users = meter.users()
    return users, [(meter.account(u), meter.ledger(u)) for u in users]


def first_user(meter, **options):
    """Ask ``iter_users(**options)`` for its first id (the arguments are checked then)."""
    made = meter.manager.iter_users(**options)
    if not meter.is_async:
        return next(made, None)

    async def first():
        async for user in made:
            return user
        return None

    return meter.portal.call(first())


def refuse(meter, calls):
    """Each call raises InvalidInput, and the store is left exactly as it was.

    A failure names the call by its number and the values it captured.
    """
    before = snapshot(meter)
    for number, call in enumerate(calls):
        label = f"call {number} with {call.__defaults__!r:.300}"
        try:
            call()
        except InvalidInput:
            pass
        except Exception as exc:
            raise AssertionError(f"{label}: {type(exc).__name__}, not InvalidInput") from exc
        else:
            pytest.fail(f"{label}: accepted, not refused with InvalidInput")
        assert snapshot(meter) == before, label


def both_reports(meter, **arguments):
    """A call of ``usage`` and one of ``entries`` with the same filters."""
    return [
        lambda name=name, arguments=arguments: getattr(meter, name)(**arguments)
        for name in ("usage", "entries")
    ]


def test_bad_times(seeded):
    naive = datetime(2024, 1, 1)  # noqa: DTZ001 - the point
    other = timezone(timedelta(hours=5))
    values: list[Any] = [
        naive,
        date(2024, 1, 1),
        "2024-01-01",
        "2024-01-01T00:00:00Z",
        1704067200.0,
        1704067200,
    ]
    calls = []
    for value in values:
        calls += both_reports(seeded, since=value)
        calls += both_reports(seeded, until=value)
    calls += both_reports(seeded, since=AT, until=AT)
    calls += both_reports(seeded, since=AT, until=AT - timedelta(microseconds=1))
    calls += both_reports(seeded, since=AT.astimezone(other), until=AT)  # the same instant
    calls += both_reports(seeded, since=AT + timedelta(hours=1), until=AT.astimezone(other))
    calls += both_reports(seeded, since=AT, until=naive)
    refuse(seeded, calls)


def test_bad_groups_and_periods(seeded):
    bys: list[Any] = [
        "users",
        "Model",
        "",
        None,
        5,
        {"model"},
        ["model", 5],
        ("model", "model"),
        ("user", "period", "user"),
    ]
    calls = [lambda by=by: seeded.usage(by=by) for by in bys]
    calls += [
        lambda by=by, period=period: seeded.usage(by=by, period=period)
        for by, period in [
            ("period", None),
            (("user", "period"), None),
            (("model",), "day"),
            ((), "month"),
            ("period", "year"),
            ("period", "Day"),
            ("period", ""),
            ("period", 1),
        ]
    ]
    calls.append(lambda: seeded.usage(period="day"))
    refuse(seeded, calls)


BAD_USERS: list[Any] = ["", 5, b"alice", "a\x00b", "x" * 257]


def test_bad_users(seeded):
    calls = []
    for user in BAD_USERS:
        calls += both_reports(seeded, user=user)
        calls.append(lambda user=user: first_user(seeded, after=user))
    refuse(seeded, calls)


BAD_SIZES: list[Any] = [0, -1, 10_001, True, False, 1.5, "10", None, Decimal(10)]


def test_bad_limits_and_page_sizes(seeded):
    calls = []
    for size in BAD_SIZES:
        calls.append(lambda size=size: seeded.entries(limit=size))
        calls.append(lambda size=size: first_user(seeded, page_size=size))
    refuse(seeded, calls)
    assert len(seeded.entries(limit=10_000).entries) == 6  # the boundaries are fine
    assert len(seeded.entries(limit=1).entries) == 1
    assert first_user(seeded, page_size=10_000) == "alice"
    assert first_user(seeded, page_size=1) == "alice"


def test_bad_kinds(seeded):
    kinds: list[Any] = [
        ["nope"],
        "nope",
        "CHARGE",
        ["charge", "Charge"],
        [],
        set(),
        (),
        [5],
        5,
        b"charge",
        [None],
    ]
    refuse(seeded, [lambda kinds=kinds: seeded.entries(kinds=kinds) for kinds in kinds])


# --- cursors ---------------------------------------------------------------------------------


def decode(cursor: str) -> list[Any]:
    body = cursor.removeprefix("cm1.")
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def encode(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return "cm1." + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def foreign_cursor(backend, variant, tmp_path) -> list[str]:
    """Cursors of the same query from other kinds of store (sync managers of their own)."""
    side_stores: list[Any] = []
    if variant == "fallback" or backend.kind != "memory":
        side_stores.append(MemoryStore())
    if backend.kind != "sqlite":
        side_stores.append(SQLiteStore(tmp_path / "other.db"))
    if variant == "native":
        side_stores.append(ForwardOnly(MemoryStore()))  # the fallback's cursor
    cursors = []
    for store in side_stores:
        with BalanceManager(store) as side:
            side.grant("alice", 1)
            side.grant("bob", 1)
            page = side.entries(limit=1)
            assert page.next is not None
            cursors.append(page.next)
    return cursors


def test_bad_cursors(seeded, backend, variant, tmp_path):
    real = seeded.entries(limit=1).next
    assert real is not None
    assert len(seeded.entries(after=real, limit=10_000).entries) == 5  # a good one works
    origin, digest, position = decode(real)
    body = real.removeprefix("cm1.")
    garbage: list[Any] = [
        "garbage",
        "",
        "cm1",
        "cm1.",
        "cm1.!!!!",
        "cm2." + body,
        real + "A",
        real[: len(real) // 2],
        real[:-1],
        real[:-4],
        "cm1." + "A" * 5000,
        encode("not json at all"),
        encode({"origin": origin, "position": position}),
        encode([origin, digest]),
        encode([origin, digest, 5]),
        encode([origin, digest, position, "extra"]),
    ]
    wrong_types: list[Any] = [5, 1.5, real.encode(), [real], object()]
    foreign = [c for c in foreign_cursor(backend, variant, tmp_path) if decode(c)[0] != origin]
    assert foreign  # a store with its own scan and the fallback differ, at least
    calls = [lambda after=after: seeded.entries(after=after) for after in garbage + wrong_types]
    calls += [lambda after=after: seeded.entries(after=after) for after in foreign]
    refuse(seeded, calls)


def test_malformed_positions_are_refused_by_the_store(seeded):
    """A cursor of the right store and query whose position the store never made."""
    origin, digest, _ = decode(seeded.entries(limit=1).next)
    positions = ["", "garbage", "\x00", "1.5.7", "-1", "9" * 40]  # ("1.5" is PostgreSQL's form)
    refuse(
        seeded,
        [
            lambda position=position: seeded.entries(after=encode([origin, digest, position]))
            for position in positions
        ],
    )


def test_cursor_of_another_query(seeded):
    of_alice = seeded.entries(user="alice", limit=1).next
    of_all = seeded.entries(limit=1).next
    of_charges = seeded.entries(kinds=["charge"], limit=1).next
    ranged = seeded.entries(since=AT, until=AT + timedelta(days=1), limit=1).next
    assert None not in (of_alice, of_all, of_charges, ranged)
    later = AT + timedelta(days=1)
    mismatched: list[tuple[str, dict[str, Any]]] = [
        (of_alice, {}),
        (of_alice, {"user": "bob"}),
        (of_alice, {"user": "alice", "kinds": ["charge"]}),
        (of_all, {"user": "alice"}),
        (of_all, {"kinds": ["open"]}),
        (of_charges, {}),
        (of_charges, {"kinds": ["charge", "grant"]}),
        (ranged, {}),
        (ranged, {"since": AT}),
        (ranged, {"since": AT, "until": later + timedelta(days=1)}),
        (ranged, {"until": later}),
    ]
    refuse(
        seeded,
        [
            lambda after=after, filters=filters: seeded.entries(after=after, **filters)
            for after, filters in mismatched
        ],
    )
    # the same filters written another way are the same query
    assert len(seeded.entries(after=of_charges, kinds="charge").entries) == 1
    assert len(seeded.entries(after=of_charges, kinds={"charge"}).entries) == 1
