"""Helpers for testing code that uses creditmeter, and for testing a new store.

``FakeClock`` is a clock you move by hand. ``StoreContract`` is the test
suite every store passes; a third-party store runs it by subclassing it in a
pytest module and providing a ``store`` fixture that yields a fresh, empty
store::

    import pytest
    from creditmeter.testing import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self):
            with MyStore(...) as store:
                yield store

An async store runs the same suite through ``Blocking``, which drives its
coroutines on a private event loop::

    class TestMyAsyncStore(StoreContract):
        @pytest.fixture
        def store(self):
            store = Blocking(MyAsyncStore(...))
            yield store
            store.close()

The reports (``ReportStore``: ``scan_entries``, ``sum_usage``,
``users_page``) are optional: their tests skip for a store without them.

The suite needs pytest, which creditmeter itself does not depend on.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from creditmeter import _validate, rules
from creditmeter._exact import EXACT
from creditmeter.config import BalanceConfig, RefillSettings
from creditmeter.exceptions import DuplicateRequest, InvalidInput, VersionConflict
from creditmeter.models import Account, CreditBlock, EntryKind, Hold, LedgerEntry
from creditmeter.queries import EntryQuery, GroupKey, Period, Scan, UsageQuery, UsageRow
from creditmeter.stores.base import Write
from creditmeter.usage import TokenUsage

if TYPE_CHECKING:
    from creditmeter.stores.base import BalanceStore

__all__ = ["Blocking", "FakeClock", "StoreContract", "make_account", "make_entry"]

_EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)


class FakeClock:
    """A clock that stands still until moved: ``advance(timedelta)`` or ``set(datetime)``.

    Safe to share between threads. Call it to read the time, like any clock.
    """

    def __init__(self, start: datetime = _EPOCH) -> None:
        self._now = _validate.aware(start, name="start")
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        """Return the current fake time."""
        return self._now

    def advance(self, delta: timedelta) -> datetime:
        """Move the clock by ``delta`` (which may be negative) and return the new time."""
        with self._lock:
            self._now += delta
            return self._now

    def set(self, moment: datetime) -> datetime:
        """Move the clock to ``moment`` (an aware datetime) and return it."""
        with self._lock:
            self._now = _validate.aware(moment, name="moment")
            return self._now

    def __repr__(self) -> str:
        return f"FakeClock({self._now.isoformat()})"


class Blocking:
    """A blocking view of an async object: each coroutine method runs to completion when called.

    Made for tests: it lets one suite drive ``AsyncMemoryStore`` and friends
    (or an ``AsyncBalanceManager``) exactly as it drives their sync twins.
    ``close()`` awaits the target's ``aclose()`` and closes the loop if it
    made it. Pass ``loop`` to share one loop between several views.
    """

    def __init__(self, target: Any, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.target = target
        self._owns_loop = loop is None
        self.loop = loop if loop is not None else asyncio.new_event_loop()

    def run(self, awaitable: Any) -> Any:
        """Run one awaitable on the private loop and return its result."""
        return self.loop.run_until_complete(awaitable)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.target, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.run(attribute(*args, **kwargs))

        return call

    def close(self) -> None:
        """Close the target (``aclose``) and the loop."""
        try:
            closer: Callable[[], Any] | None = getattr(self.target, "aclose", None)
            if closer is not None:
                self.run(closer())
        finally:
            if self._owns_loop:
                self.loop.close()


def make_account(user_id: str = "alice", *, version: int = 1, **fields: Any) -> Account:
    """Build an account for store tests, with every field filled in."""
    values: dict[str, Any] = {
        "user_id": user_id,
        "balance": Decimal(100),
        "version": version,
        "created_at": _EPOCH,
        "updated_at": _EPOCH,
        "last_refill": _EPOCH,
    }
    values.update(fields)
    return Account(**values)


def make_entry(user_id: str = "alice", *, balance_after: Decimal, **fields: Any) -> LedgerEntry:
    """Build a ledger entry for store tests."""
    values: dict[str, Any] = {
        "id": f"entry-{next(_entry_numbers)}",
        "user_id": user_id,
        "kind": EntryKind.GRANT,
        "amount": Decimal(1),
        "balance_after": balance_after,
        "at": _EPOCH,
    }
    values.update(fields)
    return LedgerEntry(**values)


_entry_numbers = iter(range(1, 1 << 62))


def _raises(exc: type[BaseException]) -> Any:
    import pytest  # noqa: PLC0415 - the suite needs pytest; creditmeter does not

    return pytest.raises(exc)


def _commit_many(store: BalanceStore, writes: list[Write]) -> list[Any]:
    """Run ``commit_many`` (skip the test for a store that does not offer it)."""
    commit_many: Callable[[list[Write]], list[Any]] | None = getattr(store, "commit_many", None)
    if commit_many is None:
        import pytest  # noqa: PLC0415 - the suite needs pytest; creditmeter does not

        pytest.skip("the store has no commit_many (an optional capability)")
    return commit_many(writes)


def _report(store: BalanceStore, name: str) -> Callable[..., Any]:
    """The store's report method ``name`` (skip the test for a store without it)."""
    method: Callable[..., Any] | None = getattr(store, name, None)
    if method is None:
        import pytest  # noqa: PLC0415 - the suite needs pytest; creditmeter does not

        pytest.skip(f"the store has no {name} (an optional capability)")
    return method


def _scan_all(
    scan: Callable[..., Scan], query: EntryQuery, limit: int
) -> tuple[list[LedgerEntry], str | None, list[LedgerEntry]]:
    """Scan from the start until the position is None.

    Returns every entry, the last position that was not None, and the
    entries read after that position.
    """
    found: list[LedgerEntry] = []
    last: str | None = None
    tail: list[LedgerEntry] = []
    position: str | None = None
    for _ in range(100_000):
        page = scan(query, after=position, limit=limit)
        assert len(page.entries) <= limit
        found.extend(page.entries)
        tail.extend(page.entries)
        if page.position is None:
            return found, last, tail
        assert isinstance(page.position, str)
        position = last = page.position
        tail = []
    raise AssertionError("the scan did not end")


_ALL = EntryQuery(None, None, None, None)


def _commit(
    store: BalanceStore,
    account: Account,
    entries: Sequence[LedgerEntry] = (),
    expected: int | None = None,
) -> None:
    store.commit(account, entries, expected_version=expected)


class StoreContract:
    """What every ``BalanceStore`` must do. Subclass it and provide a ``store`` fixture."""

    def test_load_of_unknown_user_is_none(self, store: BalanceStore) -> None:
        """A user without an account loads as None."""
        assert store.load("nobody") is None

    def test_commit_new_account_then_load_round_trips_every_field(
        self, store: BalanceStore
    ) -> None:
        """Everything committed comes back equal, including refill settings and holds."""
        later = _EPOCH + timedelta(days=3, microseconds=123456)
        hold = Hold(
            id="h1",
            user_id="alice",
            amount=Decimal("12.5"),
            created_at=_EPOCH,
            expires_at=later,
            request_id="req-h",
        )
        refill = RefillSettings(
            enabled=True, interval_value=2, interval_unit="months", amount=Decimal("0.001")
        )
        account = make_account(
            balance=Decimal("123456789012345.678901"),
            updated_at=later,
            last_refill=later,
            refill=refill,
            holds=(hold,),
        )
        entry = make_entry(
            balance_after=account.balance,
            kind=EntryKind.CHARGE,
            amount=Decimal("-0.000001"),
            request_id="r-1",
            model="gpt-4o",
            usage=TokenUsage(input=1, output=2, cache_write=3, cache_read=4),
            cost=Decimal("7.25"),
            metadata={"reason": "ünïcode ✓", "n": 3, "ok": True, "none": None},
        )
        _commit(store, account, [entry])
        assert store.load("alice") == account
        assert store.ledger("alice") == [entry]
        assert store.find_request("alice", "r-1") == entry

    def test_credit_blocks_and_what_entries_drew_round_trip_exactly(
        self, store: BalanceStore
    ) -> None:
        """Blocks, an entry's ``drawn`` and an ``EXPIRE`` entry come back equal, to the digit."""
        tiny = Decimal("0.000000000000000000000000000001")
        later = _EPOCH + timedelta(days=400, microseconds=7)
        blocks = (
            CreditBlock(
                id="g1",
                amount=tiny,
                granted=Decimal(10**15),
                priority=0,
                expires_at=later,
                granted_at=_EPOCH,
                request_id="grant-1",
            ),
            CreditBlock(
                id="g2",
                amount=Decimal("999999999999999.999999999999999999999999999999"),
                granted=Decimal("999999999999999.999999999999999999999999999999"),
                priority=100,
                expires_at=None,
                granted_at=later,
            ),
        )
        account = make_account(balance=Decimal(10**15) + 5, blocks=blocks)
        charge = make_entry(
            balance_after=account.balance,
            kind=EntryKind.CHARGE,
            amount=Decimal(-3) - tiny,
            cost=Decimal(3) + tiny,
            request_id="c-1",
            drawn=(("g1", Decimal(2)), ("g0", Decimal(1) + tiny)),
        )
        expired = make_entry(
            balance_after=account.balance,
            kind=EntryKind.EXPIRE,
            amount=Decimal("-7.5"),
            drawn=(("g0", Decimal("7.5")),),
        )
        _commit(store, account, [charge, expired])
        assert store.load("alice") == account
        assert store.ledger("alice") == [charge, expired]
        assert store.find_request("alice", "c-1") == charge
        emptied = make_account(version=2, balance=Decimal(5))  # the blocks gone again
        _commit(store, emptied, [], expected=1)
        loaded = store.load("alice")
        assert loaded == emptied
        assert loaded is not None
        assert loaded.blocks == ()

    def test_commit_with_expected_version(self, store: BalanceStore) -> None:
        """A commit applies when the stored version is the expected one."""
        _commit(store, make_account(version=1))
        updated = make_account(version=2, balance=Decimal(50))
        _commit(store, updated, expected=1)
        assert store.load("alice") == updated

    def test_stale_version_conflicts_and_reports_current(self, store: BalanceStore) -> None:
        """A lost compare-and-set raises VersionConflict and writes nothing."""
        first = make_account(version=1)
        _commit(store, first, [make_entry(balance_after=first.balance)])
        with _raises(VersionConflict) as caught:
            _commit(
                store,
                make_account(version=6, balance=Decimal(0)),
                [make_entry(balance_after=Decimal(0))],
                expected=5,
            )
        conflict = caught.value
        assert conflict.current in (None, first)
        assert store.load("alice") == first
        assert len(store.ledger("alice")) == 1

    def test_creating_an_existing_account_conflicts(self, store: BalanceStore) -> None:
        """expected_version=None means "must not exist yet"."""
        first = make_account(version=1)
        _commit(store, first)
        with _raises(VersionConflict) as caught:
            _commit(store, make_account(version=1, balance=Decimal(1)))
        assert caught.value.current in (None, first)
        assert store.load("alice") == first

    def test_expecting_a_version_of_a_missing_account_conflicts(self, store: BalanceStore) -> None:
        """An update of an account that does not exist is a conflict."""
        with _raises(VersionConflict):
            _commit(store, make_account(version=2), expected=1)
        assert store.load("alice") is None

    def test_duplicate_request_id_reports_first_entry(self, store: BalanceStore) -> None:
        """A request id recorded once for a user cannot be recorded again."""
        first_entry = make_entry(balance_after=Decimal(100), request_id="same")
        _commit(store, make_account(version=1), [first_entry])
        with _raises(DuplicateRequest) as caught:
            _commit(
                store,
                make_account(version=2, balance=Decimal(101)),
                [make_entry(balance_after=Decimal(101), request_id="same")],
                expected=1,
            )
        assert caught.value.entry == first_entry
        assert caught.value.request_id == "same"
        assert store.load("alice") == make_account(version=1)
        assert store.ledger("alice") == [first_entry]

    def test_a_request_id_twice_in_one_commit_is_a_duplicate(self, store: BalanceStore) -> None:
        """One commit repeating a request id among its entries writes nothing."""
        first = make_account(version=1)
        _commit(store, first)
        twice = [
            make_entry(balance_after=Decimal(101), request_id="r"),
            make_entry(balance_after=Decimal(102), request_id="r"),
        ]
        with _raises(DuplicateRequest) as caught:
            _commit(store, make_account(version=2, balance=Decimal(102)), twice, expected=1)
        assert caught.value.request_id == "r"
        assert store.load("alice") == first
        assert store.ledger("alice") == []
        assert store.find_request("alice", "r") is None

    def test_a_commit_without_entries_changes_only_the_account(self, store: BalanceStore) -> None:
        """A write of the account alone (a hold, say) keeps the ledger and its request ids."""
        entry = make_entry(balance_after=Decimal(100), request_id="r")
        _commit(store, make_account(version=1), [entry])
        held = make_account(version=2, balance=Decimal(90))
        _commit(store, held, expected=1)
        with _raises(VersionConflict):  # stale: the version moved on
            _commit(store, make_account(version=2, balance=Decimal(7)), expected=1)
        assert store.load("alice") == held
        assert store.ledger("alice") == [entry]
        assert store.find_request("alice", "r") == entry

    def test_request_ids_are_per_user(self, store: BalanceStore) -> None:
        """Two users may use the same request id."""
        _commit(
            store, make_account("a"), [make_entry("a", balance_after=Decimal(100), request_id="r")]
        )
        _commit(
            store, make_account("b"), [make_entry("b", balance_after=Decimal(100), request_id="r")]
        )
        assert store.find_request("a", "r") is not None
        assert store.find_request("b", "r") is not None
        assert store.find_request("c", "r") is None

    def test_ledger_order_and_limit(self, store: BalanceStore) -> None:
        """The ledger is oldest first; a limit keeps the newest entries, still oldest first."""
        entries = [make_entry(balance_after=Decimal(i)) for i in range(5)]
        _commit(store, make_account(version=1), entries[:2])
        _commit(store, make_account(version=2), entries[2:], expected=1)
        assert store.ledger("alice") == entries
        assert store.ledger("alice", limit=2) == entries[3:]
        assert store.ledger("alice", limit=50) == entries
        assert store.ledger("nobody") == []

    def test_users_sorted(self, store: BalanceStore) -> None:
        """users() lists every account holder, sorted."""
        for name in ("carol", "alice", "bob"):
            _commit(store, make_account(name))
        assert store.users() == ["alice", "bob", "carol"]

    def test_hostile_user_ids_stay_apart(self, store: BalanceStore) -> None:
        """Ids that look like keys, SQL or other ids are distinct users."""
        ids = ["a:b", "a", "b", "{x}", "a}b", "'; DROP TABLE x; --", "%", "_", "é", "e\u0301"]
        for number, user in enumerate(ids):
            _commit(store, make_account(user, balance=Decimal(number)))
        for number, user in enumerate(ids):
            loaded = store.load(user)
            assert loaded is not None
            assert loaded.balance == Decimal(number)
        assert store.users() == sorted(ids)

    def test_many_entries_in_one_commit(self, store: BalanceStore) -> None:
        """All entries of one commit are appended, in order."""
        entries = [
            make_entry(balance_after=Decimal(i), request_id=f"r{i}" if i % 2 else None)
            for i in range(10)
        ]
        _commit(store, make_account(), entries)
        assert store.ledger("alice") == entries

    # --- commit_many: an optional capability (BatchStore); skipped without it ---------

    def test_commit_many_applies_every_write(self, store: BalanceStore) -> None:
        """Writes of new and existing accounts all apply, each with its entries in order."""
        _commit(store, make_account("b", version=1))
        new_entries = [
            make_entry("a", balance_after=Decimal(i), request_id=f"a{i}") for i in (1, 2)
        ]
        old_entry = make_entry("b", balance_after=Decimal(7), request_id="b1")
        outcomes = _commit_many(
            store,
            [
                Write(make_account("a", version=1), new_entries, None),
                Write(make_account("b", version=2, balance=Decimal(7)), [old_entry], 1),
            ],
        )
        assert outcomes == [None, None]
        assert store.load("a") == make_account("a", version=1)
        assert store.load("b") == make_account("b", version=2, balance=Decimal(7))
        assert store.ledger("a") == new_entries
        assert store.ledger("b") == [old_entry]
        assert store.find_request("a", "a2") == new_entries[1]

    def test_commit_many_conflict_leaves_that_write_out(self, store: BalanceStore) -> None:
        """A stale write reports VersionConflict and leaves nothing; the others apply."""
        first = make_account("a", version=1)
        _commit(store, first)
        lost = Write(make_account("a", version=6), [make_entry("a", balance_after=Decimal(0))], 5)
        won = Write(
            make_account("b", version=1), [make_entry("b", balance_after=Decimal(100))], None
        )
        outcomes = _commit_many(store, [lost, won])
        assert isinstance(outcomes[0], VersionConflict)
        assert outcomes[0].current in (None, first)
        assert outcomes[1] is None
        assert store.load("a") == first
        assert store.ledger("a") == []
        assert store.ledger("b") == list(won.entries)

    def test_commit_many_duplicate_leaves_that_write_out(self, store: BalanceStore) -> None:
        """A write repeating a stored request id reports DuplicateRequest and leaves nothing."""
        stored = make_entry("a", balance_after=Decimal(100), request_id="same")
        _commit(store, make_account("a", version=1), [stored])
        repeat = Write(
            make_account("a", version=2, balance=Decimal(5)),
            [
                make_entry("a", balance_after=Decimal(3), request_id="new"),
                make_entry("a", balance_after=Decimal(5), request_id="same"),
            ],
            1,
        )
        other = Write(
            make_account("b", version=1), [make_entry("b", balance_after=Decimal(1))], None
        )
        outcomes = _commit_many(store, [repeat, other])
        assert isinstance(outcomes[0], DuplicateRequest)
        assert outcomes[0].request_id == "same"
        assert outcomes[0].entry == stored
        assert outcomes[1] is None
        assert store.load("a") == make_account("a", version=1)
        assert store.ledger("a") == [stored]
        assert store.find_request("a", "new") is None
        assert store.ledger("b") == list(other.entries)

    def test_commit_many_of_nothing(self, store: BalanceStore) -> None:
        """An empty list of writes is an empty list of outcomes, and writes nothing."""
        assert _commit_many(store, []) == []
        assert store.users() == []

    # --- reports: an optional capability (ReportStore); skipped without it ------------

    def test_users_page_pages_ids_in_code_point_order(self, store: BalanceStore) -> None:
        """Ids greater than ``after``, sorted as Python sorts str, ``limit`` at a time."""
        users_page = _report(store, "users_page")
        assert users_page(after=None, limit=5) == []
        ids = ["a:b", "a", "b", "B", "{x}", "a}b", "'; DROP TABLE x; --", "%", "_", "10", "9"]
        ids += ["\u00e9", "e\u0301", "\u03a9", "\uff5e", "\U0001f600"]  # accents, wide, astral
        for user in ids:
            _commit(store, make_account(user))
        ordered = sorted(ids)
        assert users_page(after=None, limit=10_000) == ordered
        walked: list[str] = []
        after: str | None = None
        while True:
            page = users_page(after=after, limit=3)
            assert page == sorted(page)
            walked.extend(page)
            if len(page) < 3:
                break
            after = page[-1]
        assert walked == ordered
        assert users_page(after="a", limit=2) == [user for user in ordered if user > "a"][:2]
        assert users_page(after="b0", limit=100) == [user for user in ordered if user > "b0"]
        assert users_page(after=ordered[-1], limit=100) == []

    def _scan_workload(self, store: BalanceStore) -> list[LedgerEntry]:
        """Entries over three users, committed in an order unlike their users' or times'."""
        hour = timedelta(hours=1)
        kinds = [EntryKind.OPEN, EntryKind.CHARGE, EntryKind.GRANT, EntryKind.RELEASE]
        order: list[LedgerEntry] = []
        versions: dict[str, int] = {}
        plan = [("b", 2), ("a", 1), ("c", 2), ("b", 1), ("a", 3), ("c", 1), ("b", 1)]
        for number, (user, count) in enumerate(plan):
            entries = [
                make_entry(
                    user,
                    balance_after=Decimal(number),
                    kind=kinds[(number + i) % len(kinds)],
                    at=_EPOCH + (5 - number) * hour,  # later commits, earlier times
                )
                for i in range(count)
            ]
            version = versions.get(user)
            versions[user] = (version or 0) + 1
            _commit(store, make_account(user, version=versions[user]), entries, version)
            order.extend(entries)
        return order

    def test_scan_entries_pages_in_commit_order(self, store: BalanceStore) -> None:
        """Every entry once, in the order of commits, at most ``limit`` a page."""
        scan = _report(store, "scan_entries")
        assert scan(_ALL, after=None, limit=10) == Scan([], None)
        order = self._scan_workload(store)
        for limit in (1, 2, 3, len(order), 10_000):
            assert _scan_all(scan, _ALL, limit)[0] == order, limit
        for user in ("a", "b", "c", "nobody"):
            query = EntryQuery(user, None, None, None)
            assert _scan_all(scan, query, 2)[0] == store.ledger(user), user

    def test_scan_entries_filters(self, store: BalanceStore) -> None:
        """Only entries of the query's user and kinds, with ``since <= at < until``."""
        scan = _report(store, "scan_entries")
        order = self._scan_workload(store)
        since, until = _EPOCH + timedelta(hours=1), _EPOCH + timedelta(hours=4)
        charges = frozenset({EntryKind.CHARGE, EntryKind.RELEASE})
        queries = [
            EntryQuery(None, since, None, None),
            EntryQuery(None, None, until, None),
            EntryQuery(None, since, until, None),
            EntryQuery(None, None, None, charges),
            EntryQuery("b", since, until, charges),
            EntryQuery(None, None, None, frozenset({EntryKind.REFILL})),
        ]
        for query in queries:
            wanted = [
                entry
                for entry in order
                if (query.user_id is None or entry.user_id == query.user_id)
                and rules.in_range(entry.at, query.since, query.until)
                and (query.kinds is None or entry.kind in query.kinds)
            ]
            for limit in (1, 3, 100):
                assert _scan_all(scan, query, limit)[0] == wanted, (query, limit)

    def test_scan_entries_resumes_after_later_commits(self, store: BalanceStore) -> None:
        """From the last position of a finished scan: what followed it, then later commits."""
        scan = _report(store, "scan_entries")
        order = self._scan_workload(store)
        found, last, tail = _scan_all(scan, _ALL, 2)
        assert found == order
        assert last is not None
        later = [
            make_entry("a", balance_after=Decimal(1)),
            make_entry("d", balance_after=Decimal(2)),
        ]
        _commit(store, make_account("a", version=3), later[:1], 2)
        _commit(store, make_account("d"), later[1:])
        assert _scan_resume(scan, _ALL, last) == tail + later

    def test_scan_entries_refuses_a_malformed_position(self, store: BalanceStore) -> None:
        """A position the store never returned, and could not have, is InvalidInput."""
        scan = _report(store, "scan_entries")
        self._scan_workload(store)
        for position in ("not a position", "\x00"):
            with _raises(InvalidInput):
                scan(_ALL, after=position, limit=10)

    def test_sum_usage_sums_as_the_rules_do(self, store: BalanceStore) -> None:
        """Charges only, grouped and summed exactly as ``rules.Tally`` sums them."""
        sum_usage = _report(store, "sum_usage")
        assert sum_usage(UsageQuery(None, None, None, ("model",), None)) == []
        entries = _usage_workload(store)
        tally = rules.Tally(UsageQuery(None, None, None, ("model",), None))
        for entry in entries:
            tally.add(entry)
        rows = rules.sort_usage(sum_usage(UsageQuery(None, None, None, ("model",), None)))
        assert rows == tally.rows()
        assert [(row.model, row.calls, row.cost, row.charged) for row in rows] == [
            (None, 1, _TINY, _TINY),
            ("Zeta", 1, Decimal(3), Decimal(0)),
            ("gpt-4o", 2, Decimal(14), Decimal(7)),
            ("house", 2, Decimal(10**15 + 1), _BIG + 1),
        ]
        assert rows[3].usage.input == 2 * 10**10  # more than one call may count
        keys: list[tuple[GroupKey, ...]] = [(), ("user",), ("user", "model")]
        periods: list[Period] = ["hour", "day", "week", "month"]
        shapes: list[tuple[tuple[GroupKey, ...], Period | None]] = [(by, None) for by in keys]
        shapes += [(("period",), period) for period in periods]
        shapes += [(("user", "model", "period"), "month")]
        ranges = [(None, None), (_EPOCH, None), (None, _EPOCH), (_EPOCH, _EPOCH + timedelta(31))]
        for by, period in shapes:
            for user in (None, "alice", "nobody"):
                for since, until in ranges:
                    query = UsageQuery(user, since, until, by, period)
                    expected = rules.Tally(query)
                    for entry in entries:
                        expected.add(entry)
                    assert rules.sort_usage(sum_usage(query)) == expected.rows(), query
                    assert all(isinstance(row, UsageRow) for row in sum_usage(query))

    # --- commit_delta (DeltaStore, optional) ---------------------------------

    def test_commit_delta_adds_the_amount_to_whatever_balance_is_stored(
        self, store: BalanceStore
    ) -> None:
        """Planned on version 1, it applies to version 2: the balance found, less the cost."""
        commit_delta = _report(store, "commit_delta")
        seen = make_account(balance=Decimal(100))
        _commit(store, seen)
        _commit(store, make_account(balance=Decimal("90.5"), version=2), [], 1)
        later = _EPOCH + timedelta(minutes=1)
        planned = rules.charge_delta(
            seen,
            "alice",
            Decimal("7.25"),
            config=_ENABLED,
            now=later,
            new_id=_ids(),
            request_id="r-1",
            model="gpt-4o",
            usage=TokenUsage(input=10, output=2),
            metadata={"note": ',"balance":"1'},
        )
        assert planned is not None
        reached = commit_delta(planned.change.account, planned.change.entry, floor=planned.floor)
        assert reached == (Decimal("83.25"), 3, later)
        change = rules.rebase(planned, *reached)
        assert store.load("alice") == change.account
        assert store.ledger("alice") == [change.entry]
        assert change.entry.balance_after == Decimal("83.25")
        assert store.find_request("alice", "r-1") == change.entry

    def test_commit_delta_refuses_when_more_than_the_counters_moved(
        self, store: BalanceStore
    ) -> None:
        """A refill, new refill settings or a hold since the plan: ``VersionConflict``, no write."""
        commit_delta = _report(store, "commit_delta")
        seen = make_account()
        _commit(store, seen)
        moves: list[dict[str, Any]] = [
            {"last_refill": _EPOCH + timedelta(hours=1)},
            {
                "refill": RefillSettings(
                    enabled=True, interval_value=1, interval_unit="days", amount=Decimal(5)
                )
            },
            {
                "holds": (
                    Hold(
                        id="h",
                        user_id="alice",
                        amount=Decimal(1),
                        created_at=_EPOCH,
                        expires_at=_EPOCH + timedelta(hours=1),
                    ),
                )
            },
            {"created_at": _EPOCH - timedelta(days=1)},
        ]
        version = 1
        for fields in moves:
            stored = make_account(version=version + 1, **fields)
            _commit(store, stored, [], version)
            version += 1
            planned = rules.charge_delta(
                seen, "alice", Decimal(1), config=_ENABLED, now=_EPOCH, new_id=_ids()
            )
            assert planned is not None
            with _raises(VersionConflict) as lost:
                commit_delta(planned.change.account, planned.change.entry, floor=planned.floor)
            assert lost.value.current == stored, fields
            assert store.load("alice") == stored
            assert store.ledger("alice") == []
            seen = stored if not stored.holds else make_account(version=version)

    def test_commit_delta_below_the_floor_or_without_an_account_writes_nothing(
        self, store: BalanceStore
    ) -> None:
        """``VersionConflict`` (with what is stored, if anything) and no write."""
        commit_delta = _report(store, "commit_delta")
        seen = make_account(balance=Decimal(10))
        planned = rules.charge_delta(
            seen, "alice", Decimal(10), config=_ENABLED, now=_EPOCH, new_id=_ids()
        )
        assert planned is not None
        assert planned.floor == 10
        with _raises(VersionConflict) as lost:
            commit_delta(planned.change.account, planned.change.entry, floor=planned.floor)
        assert lost.value.current is None
        assert store.load("alice") is None
        assert store.ledger("alice") == []
        _commit(store, seen)
        stored = make_account(balance=Decimal("9.999999"), version=2)
        _commit(store, stored, [], 1)
        with _raises(VersionConflict) as lost:
            commit_delta(planned.change.account, planned.change.entry, floor=planned.floor)
        assert lost.value.current == stored
        assert store.load("alice") == stored
        assert store.ledger("alice") == []
        # The same amount with no floor (a negative balance allowed) takes it below zero.
        reached = commit_delta(planned.change.account, planned.change.entry, floor=None)
        assert reached[:2] == (Decimal("-0.000001"), 3)

    def test_commit_delta_of_a_request_applied_before_is_a_duplicate(
        self, store: BalanceStore
    ) -> None:
        """``DuplicateRequest`` with the entry applied first, and no write."""
        commit_delta = _report(store, "commit_delta")
        seen = make_account()
        first = make_entry(
            balance_after=Decimal(99),
            kind=EntryKind.CHARGE,
            amount=Decimal(-1),
            cost=Decimal(1),
            request_id="r-1",
        )
        _commit(store, make_account(balance=Decimal(99), version=2))
        store.commit(make_account(balance=Decimal(98), version=3), [first], expected_version=2)
        planned = rules.charge_delta(
            seen, "alice", Decimal(1), config=_ENABLED, now=_EPOCH, new_id=_ids(), request_id="r-1"
        )
        assert planned is not None
        with _raises(DuplicateRequest) as duplicate:
            commit_delta(planned.change.account, planned.change.entry, floor=planned.floor)
        assert duplicate.value.entry == first
        assert store.load("alice") == make_account(balance=Decimal(98), version=3)
        assert store.ledger("alice") == [first]

    def test_commit_delta_keeps_the_later_updated_at(self, store: BalanceStore) -> None:
        """A writer whose clock is behind does not move ``updated_at`` back."""
        commit_delta = _report(store, "commit_delta")
        ahead = _EPOCH + timedelta(hours=2, microseconds=7)
        _commit(store, make_account(updated_at=ahead))
        behind = _EPOCH + timedelta(hours=1)
        planned = rules.charge_delta(
            make_account(), "alice", Decimal(1), config=_ENABLED, now=behind, new_id=_ids()
        )
        assert planned is not None
        reached = commit_delta(planned.change.account, planned.change.entry, floor=planned.floor)
        assert reached == (Decimal(99), 2, ahead)
        assert store.load("alice") == make_account(balance=Decimal(99), version=2, updated_at=ahead)

    def test_commit_delta_is_exact_to_the_digit(self, store: BalanceStore) -> None:
        """Thirty decimal places beside fifteen integer digits, in the balance and the entry."""
        commit_delta = _report(store, "commit_delta")
        seen = make_account(balance=_BIG)
        _commit(store, seen)
        balance = _BIG
        for cost in (_TINY, Decimal("0.5"), Decimal(10**14), _TINY * 7):
            planned = rules.charge_delta(
                seen, "alice", cost, config=_ENABLED, now=_EPOCH, new_id=_ids()
            )
            assert planned is not None
            reached = commit_delta(
                planned.change.account, planned.change.entry, floor=planned.floor
            )
            balance = EXACT.subtract(balance, cost)
            assert reached[0] == balance
        loaded = store.load("alice")
        assert loaded is not None
        assert (
            loaded.balance == balance == Decimal("899999999999999.499999999999999999999999999991")
        )
        entries = store.ledger("alice")
        assert [e.balance_after for e in entries][-1] == balance
        spent = functools.reduce(EXACT.add, (e.amount for e in entries))
        assert EXACT.add(_BIG, spent) == balance


_TINY = Decimal("0.000000000000000000000000000001")
_ENABLED = BalanceConfig(enabled=True)


def _ids() -> Callable[[], str]:
    numbers = iter(range(1, 1 << 62))
    return lambda: f"delta-{next(numbers)}-{next(_entry_numbers)}"


_BIG = Decimal("999999999999999.999999999999999999999999999999")


def _scan_resume(scan: Callable[..., Scan], query: EntryQuery, after: str) -> list[LedgerEntry]:
    found: list[LedgerEntry] = []
    position: str | None = after
    for _ in range(100_000):
        page = scan(query, after=position, limit=3)
        found.extend(page.entries)
        if page.position is None:
            return found
        position = page.position
    raise AssertionError("the scan did not end")


def _usage_workload(store: BalanceStore) -> list[LedgerEntry]:
    """Charges (clamped, priced, unpriced, tiny, huge) and entries that are not usage."""
    usage = TokenUsage(input=10**10)
    charge = EntryKind.CHARGE
    planned: dict[str, list[LedgerEntry]] = {
        "alice": [
            make_entry(
                "alice",
                balance_after=Decimal(5),
                kind=charge,
                amount=Decimal(-5),
                cost=Decimal(5),
                model="gpt-4o",
                usage=TokenUsage(input=10, output=20),
                at=_EPOCH - timedelta(microseconds=1),
            ),
            make_entry(
                "alice",
                balance_after=Decimal(0),
                kind=charge,
                amount=Decimal(-2),
                cost=Decimal(9),  # clamped: cost more than was taken
                model="gpt-4o",
                usage=TokenUsage(input=1, output=1, cache_write=1, cache_read=1),
                at=_EPOCH,
            ),
            make_entry(
                "alice",
                balance_after=Decimal(0),
                kind=charge,
                amount=-_TINY,
                at=_EPOCH + timedelta(days=5),
            ),
        ],
        "bob": [
            make_entry("bob", balance_after=_BIG + 2, kind=EntryKind.GRANT, amount=_BIG + 2),
            make_entry(
                "bob",
                balance_after=Decimal(1),
                kind=charge,
                amount=-_BIG,
                cost=Decimal(10**15),
                model="house",
                usage=usage,
                at=_EPOCH + timedelta(days=31),
            ),
            make_entry("bob", balance_after=Decimal(1), kind=EntryKind.RELEASE, amount=Decimal(0)),
            make_entry(
                "bob",
                balance_after=Decimal(0),
                kind=charge,
                amount=Decimal(-1),
                cost=Decimal(1),
                model="house",
                usage=usage,
                at=_EPOCH + timedelta(days=31, hours=1),
            ),
            make_entry("bob", balance_after=Decimal(7), kind=EntryKind.ADJUST, amount=Decimal(7)),
        ],
        "carol": [
            make_entry(
                "carol",
                balance_after=Decimal(0),
                kind=charge,
                amount=Decimal("-0.000"),
                cost=Decimal(3),
                model="Zeta",
                at=_EPOCH,
            )
        ],
    }
    entries: list[LedgerEntry] = []
    for user, mine in planned.items():
        _commit(store, make_account(user), mine)
        entries.extend(mine)
    return entries
