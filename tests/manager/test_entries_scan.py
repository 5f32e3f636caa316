"""``entries()`` and ``iter_users()`` on every backend, and on the generic fallback.

Every test runs on every backend and on the fallback (``ForwardOnly``
hides the store's ``scan_entries`` and ``users_page``; over MemoryStore, sync
and async, and SQLiteStore). A store with ``scan_entries`` pages in the order
of commits; the fallback by user id, then ledger order.

Inputs tried: paging a workload of every entry kind over four users (the
clock also moving backwards, so commit order is not time order) with limits
1, 2, 3, 7, the exact count and 10,000; filters by user, since/until, kinds
(names, members, one name alone) and all of them at once; the cursor kept by
a second manager on the same place, with another limit, with ``since`` given
in another offset, and given to another query (refused); an empty store; a
page that ends exactly at the last entry; entries committed after the end
was reached (read from the last cursor); paging while four writer threads
(tasks on an async backend) charge and grant, resuming from the last cursor
after they stop. ``iter_users``: code-point order with ids that sort apart in
other collations, ``after=`` an id that exists, one that does not, the last
one; page sizes 1, 2, the exact count and 10,000; ids added while iterating.
"""

from __future__ import annotations

import inspect
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from fallback import open_meter, variants

from creditmeter import EntryKind, EntryPage, InvalidInput, TokenUsage

UTC = timezone.utc


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


VARIANTS = variants()
pytestmark = pytest.mark.parametrize(("backend", "variant"), VARIANTS, indirect=["backend"])


@pytest.fixture
def meter(backend, variant, clock):
    return open_meter(backend, variant, clock)


def scans_natively(meter) -> bool:
    """Whether the manager's store has its own ``scan_entries`` (commit order)."""
    return getattr(meter.manager.store, "scan_entries", None) is not None


# --- driving iter_users through the bridge ---------------------------------------------------


async def _step(iterator):
    try:
        return True, await iterator.__anext__()
    except StopAsyncIteration:
        return False, None


def user_ids(meter, **options):
    """``meter.iter_users(**options)`` as a plain generator, whichever the manager.

    The bridge (``backends.Meter``) hands back the async manager's async
    generator as it is; each step of it runs on the portal here.
    """
    made = meter.manager.iter_users(**options)
    if not meter.is_async:
        assert inspect.isgenerator(made)
        yield from made
        return
    assert inspect.isasyncgen(made)
    while True:
        more, user = meter.portal.call(_step(made))
        if not more:
            return
        yield user


# --- a workload whose commit order is known --------------------------------------------------


class Recorder:
    """Runs writes and notes the entries each one committed, in commit order."""

    def __init__(self, meter) -> None:
        self.meter = meter
        self.order: list[Any] = []
        self.seen: dict[str, int] = {}

    def __call__(self, user: str, write) -> None:
        write()
        ledger = self.meter.ledger(user)
        self.order.extend(ledger[self.seen.get(user, 0) :])
        self.seen[user] = len(ledger)


def workload(meter, clock):
    """Every kind of entry over four users; returns the entries in commit order."""
    record = Recorder(meter)
    clock.set(at(2024, 2, 28, 12))
    record("bob", lambda: meter.charge("bob", 5))  # OPEN and CHARGE in one commit
    record("alice", lambda: meter.grant("alice", 10, reason="hello"))
    clock.set(at(2024, 2, 29))
    record("Zed", lambda: meter.charge("Zed", model="gpt-4o", usage=TokenUsage(input=40)))
    held = meter.hold("bob", 50)
    clock.set(at(2024, 2, 29, 6))
    record("bob", lambda: meter.settle(held, 70))
    clock.set(at(2024, 2, 27))  # backwards: commit order is not time order
    record("émile", lambda: meter.charge("émile", Decimal("0.25"), model="house"))
    released = meter.hold("alice", 50)
    record("alice", lambda: meter.release(released))
    clock.set(at(2024, 3, 1))
    record("bob", lambda: meter.set_balance("bob", 3))
    record("alice", lambda: meter.charge("alice", 10**6))  # clamped
    record("Zed", lambda: meter.grant("Zed", 1))
    clock.set(at(2024, 3, 4))
    record("émile", lambda: meter.charge("émile", 1))
    record("bob", lambda: meter.charge("bob", 1, request_id="r-1"))
    return record.order


def scan_order(meter, order):
    """The order ``entries()`` gives: commit order, or (fallback) by user, then ledger order."""
    if scans_natively(meter):
        return order
    return sorted(order, key=lambda entry: entry.user_id)  # a stable sort keeps ledger order


def page_all(meter, limit, **filters):
    """Every page of one query, from the start to ``next is None``."""
    pages: list[EntryPage] = []
    after = None
    for _ in range(10_000):
        page = meter.entries(after=after, limit=limit, **filters)
        assert isinstance(page, EntryPage)
        assert len(page.entries) <= limit
        pages.append(page)
        if page.next is None:
            return pages
        assert isinstance(page.next, str)
        after = page.next
    raise AssertionError("paging did not end")


def read_all(meter, limit, **filters):
    return [entry for page in page_all(meter, limit, **filters) for entry in page.entries]


def ids(entries):
    return [entry.id for entry in entries]


# --- entries() -------------------------------------------------------------------------------


def test_pages_give_every_entry_once_in_order(meter, clock):
    order = workload(meter, clock)
    expected = scan_order(meter, order)
    assert len(order) == 15
    assert sorted(ids(order)) == sorted(e.id for u in meter.users() for e in meter.ledger(u))
    for limit in (1, 2, 3, 7, len(order), 10_000):
        found = read_all(meter, limit)
        assert ids(found) == ids(expected), limit
        assert found == expected, limit  # every field, as committed


def test_filters_keep_their_entries_in_order(meter, clock):
    expected = scan_order(meter, workload(meter, clock))
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"user": "bob"}, lambda e: e.user_id == "bob"),
        ({"user": "émile"}, lambda e: e.user_id == "émile"),
        ({"user": "nobody"}, lambda e: False),
        ({"since": at(2024, 2, 29)}, lambda e: e.at >= at(2024, 2, 29)),
        ({"until": at(2024, 2, 29)}, lambda e: e.at < at(2024, 2, 29)),
        (
            {"since": at(2024, 2, 29), "until": at(2024, 3, 1)},
            lambda e: at(2024, 2, 29) <= e.at < at(2024, 3, 1),
        ),
        ({"kinds": ["charge"]}, lambda e: e.kind is EntryKind.CHARGE),
        ({"kinds": "grant"}, lambda e: e.kind is EntryKind.GRANT),
        (
            {"kinds": {EntryKind.OPEN, "release", EntryKind.ADJUST}},
            lambda e: e.kind in {EntryKind.OPEN, EntryKind.RELEASE, EntryKind.ADJUST},
        ),
        ({"kinds": ["refill"]}, lambda e: False),
        (
            {
                "user": "bob",
                "kinds": ("charge", "adjust"),
                "since": at(2024, 2, 28, 12),
                "until": at(2024, 3, 4, 0, 0, 0, 1),
            },
            lambda e: e.user_id == "bob" and e.kind in {EntryKind.CHARGE, EntryKind.ADJUST},
        ),
    ]
    for filters, keep in cases:
        wanted = [entry for entry in expected if keep(entry)]
        for limit in (2, 1000):
            assert ids(read_all(meter, limit, **filters)) == ids(wanted), (filters, limit)
    for user in ("alice", "bob", "Zed", "émile"):  # one user's entries: their ledger
        assert read_all(meter, 3, user=user) == meter.ledger(user)


def test_an_empty_store_has_one_empty_page(meter):
    assert meter.entries() == EntryPage(entries=[], next=None)
    assert meter.entries(user="nobody", kinds=["charge"], limit=1) == EntryPage(
        entries=[], next=None
    )


def test_the_last_page_ends_with_no_cursor(meter, clock):
    expected = scan_order(meter, workload(meter, clock))
    assert len(expected) == 15
    for limit, full in ((5, 3), (15, 1)):
        pages = page_all(meter, limit)
        assert [entry for page in pages[:full] for entry in page.entries] == expected
        assert all(len(page.entries) == limit for page in pages[:full])
        assert pages[-1].next is None
        if len(pages) > full:  # a store may only find out on the next read that it was the end
            assert pages[full:] == [EntryPage(entries=[], next=None)], limit


def test_cursors_are_kept_by_the_query_not_the_page_or_the_manager(backend, variant, meter, clock):
    expected = scan_order(meter, workload(meter, clock))
    first = meter.entries(limit=4)
    assert first.entries == expected[:4]
    other = open_meter(backend, variant, clock)  # a second manager on the same place
    second = other.entries(after=first.next, limit=3)  # another limit: the same query
    assert second.entries == expected[4:7]
    rest = meter.entries(after=second.next, limit=10_000)
    assert rest.entries == expected[7:]
    assert rest.next is None
    # since written in another offset is the same instant, so the same query
    since = at(2024, 2, 28)
    page = meter.entries(since=since, limit=2)
    local = since.astimezone(timezone(timedelta(hours=-5)))
    assert (
        meter.entries(since=local, after=page.next, limit=2).entries
        == [e for e in expected if e.at >= since][2:4]
    )
    # a cursor of one query is refused by another, and reads nothing
    bob = meter.entries(user="bob", limit=1)
    for filters in ({}, {"user": "alice"}, {"user": "bob", "kinds": ["charge"]}):
        with pytest.raises(InvalidInput):
            meter.entries(after=bob.next, **filters)
    with pytest.raises(InvalidInput):
        meter.entries(after=page.next, since=since + timedelta(microseconds=1))
    with pytest.raises(InvalidInput):
        meter.entries(after=page.next, since=since, until=at(2030, 1, 1))


def test_entries_committed_after_the_end_come_from_the_last_cursor(meter, clock):
    expected = scan_order(meter, workload(meter, clock))
    pages = page_all(meter, 3)
    last = next(page.next for page in reversed(pages) if page.next is not None)
    read = sum(len(page.entries) for page in pages if page.next is not None)
    clock.set(at(2024, 3, 5))
    late = meter.charge("žofia", 2)  # OPEN and CHARGE; "ž" sorts after every other user
    grant = meter.grant("bob", 4)
    page = meter.entries(after=last, limit=10_000)
    assert page.next is None
    found = ids(page.entries)
    assert late.id in found
    if scans_natively(meter):
        opened = meter.ledger("žofia")[0]
        assert found == ids(expected[read:]) + ids([opened, late, grant])
    else:  # by user: the position has passed bob, so bob's new grant is not seen
        assert found[: len(expected) - read] == ids(expected[read:])
        assert found[len(expected) - read :] == ids(meter.ledger("žofia"))


WRITERS, WRITES = 4, 30


def test_paging_while_writers_commit_misses_and_repeats_nothing(meter, clock):
    """Pages read between every two writes; the last cursor is read again once they stop."""
    for user in ("w0", "w1", "shared"):
        meter.grant(user, 1)
    before = {e.id for u in meter.users() for e in meter.ledger(u)}
    stop = threading.Event()
    writers_done = threading.Event()
    errors: list[BaseException] = []
    turn = threading.Condition()
    reads, writes = [0], [0]
    waiting, live = [0], [WRITERS]  # writers waiting for a read; writers still writing

    def write(number: int) -> None:
        try:
            for i in range(WRITES):
                with turn:  # let the reader read at least once between two writes of a thread
                    mark = reads[0]
                    waiting[0] += 1
                    turn.notify_all()
                    turn.wait_for(lambda mark=mark: reads[0] > mark or stop.is_set(), 30)
                    waiting[0] -= 1
                if stop.is_set():
                    return
                user = ("w0", "w1", "shared", f"new-{number}-{i % 3}")[i % 4]
                if i % 2:
                    meter.charge(user, Decimal("0.5"), model="m")
                else:
                    meter.grant(user, 1)
                with turn:
                    writes[0] += 1
                    turn.notify_all()
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            with turn:
                live[0] -= 1
                turn.notify_all()

    def run_writers() -> None:
        threads = [threading.Thread(target=write, args=(n,), daemon=True) for n in range(WRITERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with turn:
            writers_done.set()
            turn.notify_all()

    runner = threading.Thread(target=run_writers, daemon=True)
    runner.start()
    kept: list[Any] = []  # entries read before the last cursor: final
    tail: list[Any] = []  # entries read after it: read again until the writers are done
    cursor = None
    try:
        while True:
            finished = writers_done.is_set()  # before the read: the last read sees every write
            seen = writes[0]
            page = meter.entries(after=cursor, limit=3)
            with turn:
                reads[0] += 1
                turn.notify_all()
                if page.next is None and not finished:
                    # At the end: wait for a write (or for every writer to wait for a read),
                    # so the reads cannot starve the writers.
                    turn.wait_for(lambda seen=seen: writes[0] > seen or waiting[0] >= live[0], 30)
            assert reads[0] < 100_000, "paging did not end"
            if page.next is not None:
                kept.extend(page.entries)
                cursor = page.next
                continue
            tail = page.entries
            if finished:
                break
    finally:
        stop.set()
        with turn:
            turn.notify_all()
        runner.join(60)
    assert not errors, errors
    assert reads[0] > WRITES  # the reads really went on between the writes
    found = kept + tail
    assert len(ids(found)) == len(set(ids(found))), "an entry was read twice"
    ledgers = {user: meter.ledger(user) for user in meter.users()}
    everything = {e.id for ledger in ledgers.values() for e in ledger}
    assert len(everything) == len(before) + WRITERS * WRITES + WRITERS * 3  # + 3 OPENs a writer
    assert set(ids(found)) <= everything
    assert before <= set(ids(found))
    for user, ledger in ledgers.items():  # each user's entries in ledger order
        mine = [e.id for e in found if e.user_id == user]
        assert mine == [e.id for e in ledger if e.id in set(mine)], user
    if scans_natively(meter):
        assert set(ids(found)) == everything, "a store's own scan skipped an entry"
        for user, ledger in ledgers.items():
            assert [e.id for e in found if e.user_id == user] == ids(ledger), user


# --- iter_users() ----------------------------------------------------------------------------

USERS = [
    "alice",
    "Bob",
    "bob",
    "a:b",
    "{x}",
    "émile",
    "e\u0301mile",
    "Zoë",
    "zoe",
    "_",
    "%",
    "10",
    "9",
]


def test_iter_users_yields_every_user_in_code_point_order(meter):
    assert list(user_ids(meter)) == []
    for user in USERS:
        meter.grant(user, 1)
    ordered = sorted(USERS)
    for size in (1, 2, len(USERS), 10_000):
        assert list(user_ids(meter, page_size=size)) == ordered, size
    assert list(user_ids(meter, after="alice")) == [u for u in ordered if u > "alice"]
    assert list(user_ids(meter, after="b", page_size=1)) == [u for u in ordered if u > "b"]
    assert list(user_ids(meter, after=ordered[-1])) == []
    assert list(user_ids(meter, after=ordered[-2], page_size=1)) == ordered[-1:]
    assert meter.users() == ordered


def test_iter_users_resumes_after_the_last_id_it_gave(meter):
    for user in ("b", "d", "f", "h"):
        meter.grant(user, 1)
    first = list(user_ids(meter, page_size=2))[:3]
    assert first == ["b", "d", "f"]
    assert list(user_ids(meter, after=first[-1], page_size=2)) == ["h"]


def test_iter_users_sees_users_added_after_its_position(meter):
    for user in ("b", "d", "f", "h"):
        meter.grant(user, 1)
    walk = user_ids(meter, page_size=2)
    taken = [next(walk), next(walk), next(walk)]  # has read ["b", "d"] and ["f", "h"]
    assert taken == ["b", "d", "f"]
    for user in ("a", "c", "z", "i"):
        meter.grant(user, 1)
    assert taken + list(walk) == ["b", "d", "f", "h", "i", "z"]
    # one id a read: the ids after the last one yielded
    walk = user_ids(meter, page_size=1)
    taken = [next(walk), next(walk)]
    assert taken == ["a", "b"]
    meter.grant("bb", 1)
    meter.grant("aa", 1)
    assert taken + list(walk) == ["a", "b", "bb", "c", "d", "f", "h", "i", "z"]
