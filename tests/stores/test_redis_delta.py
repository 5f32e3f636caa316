"""Charges of a hot user as deltas on Redis: one script run each, none lost to another.

A manager whose compare-and-set lost, or whose user is hot, sends a plain
charge as ``commit_delta``: ``delta.lua`` adds the cost to the balance Redis
holds, as decimal text, guarded by the rules' preconditions. Tried here on the
real server:

- the script's decimal arithmetic against Python's ``Decimal`` (hypothesis,
  and the edge cases by name: carries, signs, zeros, exponents), and stored
  balances it will not read (NaN, an exponent past 100, junk): a conflict,
  nothing written;
- the commands a stale manager's charge sends (the lost commit, then one
  delta), a delta whose guard fails (refill settings changed under it), which
  falls back to a compare-and-set, and charges that are no delta (clamped,
  strict);
- a delta held off by a writer in ``exclusive()``: sent again once that writer
  is done, on what it wrote; one sent under the sender's own lock passes the
  lock on; an async one cancelled while held off writes nothing;
- the same delta sent twice (a client that re-sends after a lost reply): one
  entry, and the second answer is the first's;
- four processes (two sync, two async managers) charging one user with
  request ids, then every request sent again: each charge lands once.

Elsewhere: the contract's ``commit_delta`` tests on Redis and Redis Cluster
(test_contract.py, test_redis_cluster.py), deltas across a slot migration
(test_redis_cluster_exclusive.py), and a connection killed or a reply lost at
the delta's ``EVALSHA`` (tests/reliability/test_faults.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import threading
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

if os.environ.get("CREDITMETER_REQUIRE_SERVICES") != "1":
    pytest.importorskip("redis", reason="the redis package is not installed: pip install redis")

import redis
from services import REDIS_URL, need, reach_redis, unique

from creditmeter import (
    AsyncBalanceManager,
    BalanceConfig,
    BalanceManager,
    ConflictRetried,
    EntryKind,
    RefillSettings,
    StoreError,
    VersionConflict,
    rules,
)
from creditmeter._exact import EXACT
from creditmeter._ids import new_id
from creditmeter.stores.redis import COMMIT_SCRIPT, DELTA_SCRIPT, AsyncRedisStore, RedisStore
from creditmeter.stores.redis.scripts import _included

START = 10**6
CONFIG = BalanceConfig(enabled=True, start_balance=START)
NAMES = {
    hashlib.sha1(text.encode()).hexdigest(): name
    for name, text in (("commit", COMMIT_SCRIPT), ("delta", DELTA_SCRIPT))
}


@pytest.fixture
def prefix():
    need("redis", reach_redis)
    chosen = unique("cmdelta:")
    yield chosen
    with redis.Redis.from_url(REDIS_URL) as client:
        keys = list(client.scan_iter(match=chosen.replace("*", r"\*") + "*", count=1000))
        if keys:
            client.delete(*keys)


def chained(entries: list[Any]) -> bool:
    total = Decimal(0)
    for entry in entries:
        total += entry.amount
        if entry.balance_after != total:
            return False
    return True


def sent_by(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the scripts the store's writes run (``commit``, ``delta``), in order."""
    sent: list[str] = []
    evalsha = store.client.evalsha

    def counting(sha: str, *args: Any) -> Any:
        sent.append(NAMES.get(sha, "other"))
        return evalsha(sha, *args)

    monkeypatch.setattr(store.client, "evalsha", counting)
    return sent


# --- the script's arithmetic ----------------------------------------------------------

_ARITHMETIC = (
    _included("decimal.lua")
    + """
local x, y = parse_decimal(ARGV[1]), parse_decimal(ARGV[2])
if not x or not y then
  return {'', ''}
end
return {decimal_text(add_decimal(x, y)), at_least(x, y) and '1' or '0'}
"""
)


def lua_add(client: redis.Redis, a: str, b: str) -> tuple[str, bool] | None:
    """``a + b`` and ``a >= b`` as the delta script computes them; ``None`` if it reads neither."""
    total, at_least = client.eval(_ARITHMETIC, 0, a, b)
    return None if total == b"" else (total.decode(), at_least == b"1")


def decimals() -> st.SearchStrategy[Decimal]:
    """Decimals as balances and amounts come: up to 10**15 and 30 places, any notation."""
    return st.builds(
        lambda sign, digits, exponent: Decimal((sign, tuple(int(d) for d in digits), exponent)),
        st.integers(0, 1),
        st.text("0123456789", min_size=1, max_size=45),
        st.integers(-30, 15),
    ).filter(lambda value: abs(value) <= 10**15 or value.adjusted() <= 16)


@pytest.fixture(scope="module")
def client():
    need("redis", reach_redis)
    with redis.Redis.from_url(REDIS_URL) as opened:
        yield opened


@settings(max_examples=400, deadline=None)
@given(a=decimals(), b=decimals())
@example(a=Decimal("-0"), b=Decimal("-0"))  # found by hypothesis: the zero's sign was lost
def test_the_script_adds_and_compares_as_decimal_does(client, a, b):
    reached = lua_add(client, str(a), str(b))
    assert reached is not None
    total, at_least = reached
    expected = EXACT.add(a, b)
    assert Decimal(total) == expected
    assert "E" not in total
    assert "e" not in total
    if "E" not in str(expected):  # the same text as Python's, where Python writes it plainly
        assert total == str(expected)
    assert at_least == (a >= b)


@pytest.mark.parametrize(
    ("a", "b", "total"),
    [
        ("0", "0", "0"),
        ("-0", "0", "0"),
        ("-0", "-0", "-0"),  # a zero keeps its sign as Python's does
        ("-0.00", "-0", "-0.00"),
        ("-0", "0.00", "0.00"),
        ("7.25", "-7.25", "0.00"),
        ("-7.25", "7.25", "0.00"),
        ("100", "-7.25", "92.75"),
        ("5", "-7.25", "-2.25"),
        ("-5", "-0.5", "-5.5"),
        ("999999999999999.999", "0.001", "1000000000000000.000"),
        ("1000000000000000", "-0.000000000000000000000000000001",
         "999999999999999.999999999999999999999999999999"),
        ("1E+3", "-1", "999"),
        ("1E+3", "1E+3", "2000"),
        ("1E-7", "0", "1E-7"),
        ("0E-8", "-1", "-1.00000000"),
        ("1e2", "0.5", "100.5"),
        (".5", "5.", "5.5"),
    ],
)  # fmt: skip
def test_the_script_adds_the_edge_cases(client, a, b, total):
    reached = lua_add(client, a, b)
    assert reached is not None
    assert Decimal(reached[0]) == Decimal(total)
    if "E" not in total:
        assert reached[0] == total


@pytest.mark.parametrize(
    "bad", ["", ".", "-", "NaN", "Infinity", "-inf", "1.2.3", "--1", "1E", "1E+101", "1E-200",
            "1" * 121, "12 ", " 12", "0x10", "1,5"]
)  # fmt: skip
def test_the_script_reads_no_junk(client, bad):
    assert lua_add(client, bad, "1") is None
    assert lua_add(client, "1", bad) is None


@pytest.mark.parametrize(
    ("stored", "error"),
    [("1E+101", VersionConflict), ("NaN", StoreError), ("12abc", StoreError)],
)
def test_a_stored_balance_the_script_will_not_read_writes_nothing(prefix, stored, error):
    """Not a decimal it can add exactly: a conflict, or ``StoreError`` (corrupt); no write."""
    with RedisStore(REDIS_URL, prefix=prefix) as store, redis.Redis.from_url(REDIS_URL) as raw:
        BalanceManager(store, CONFIG).charge("u", 1)
        seen = store.load("u")
        key = store._layout.keys("u").account
        text = raw.hget(key, "d").decode()
        raw.hset(key, "d", text.replace(f'"balance":"{seen.balance}"', f'"balance":"{stored}"'))
        before = raw.hgetall(key)
        planned = rules.charge_delta(
            seen, "u", Decimal(1), config=CONFIG, now=seen.updated_at, new_id=new_id
        )
        with pytest.raises(error):  # NaN and junk: the account the conflict reports is corrupt
            store.commit_delta(planned.change.account, planned.change.entry, floor=planned.floor)
        assert raw.hgetall(key) == before
        assert len(store.ledger("u")) == 2


# --- what a manager sends ----------------------------------------------------------------


def test_a_stale_managers_charge_is_one_lost_commit_then_one_delta(prefix, monkeypatch):
    with (
        RedisStore(REDIS_URL, prefix=prefix) as one,
        RedisStore(REDIS_URL, prefix=prefix) as two,
    ):
        heard: list[Any] = []
        stale = BalanceManager(one, CONFIG, on_event=heard.append)
        other = BalanceManager(two, CONFIG)
        stale.charge("u", 1)
        other.charge("u", Decimal("2.5"))  # what `stale` saw is old now
        sent = sent_by(one, monkeypatch)
        entry = stale.charge("u", Decimal("0.25"), request_id="r-1", metadata={"n": 1})
        assert sent == ["commit", "delta"]
        assert entry.balance_after == START - Decimal("3.75")
        assert entry.amount == Decimal("-0.25")
        assert ConflictRetried(user_id="u") in heard
        assert one.ledger("u")[-1] == entry
        # Hot now: the next charge goes as a delta at once, from the account it returned.
        sent.clear()
        assert stale.charge("u", 1).balance_after == START - Decimal("4.75")
        assert sent == ["delta"]
        assert stale.account("u") == two.load("u")
        # A repeat of the request is answered with its entry, charging nothing.
        assert stale.charge("u", Decimal("0.25"), request_id="r-1", metadata={"n": 1}) == entry
        assert other.balance("u") == START - Decimal("4.75")
        assert chained(two.ledger("u"))
        assert two.find_request("u", "r-1") == entry
        # The log that reports of every user read has every entry, the deltas' too.
        logged = other.entries().entries  # the prefix is the test's own: "u" is its one user
        assert logged == two.ledger("u")


def test_a_delta_refused_by_its_guard_falls_back_to_a_compare_and_set(prefix, monkeypatch):
    """Settings changed after the loss it retries: the delta loses, a fresh commit serves."""
    with (
        RedisStore(REDIS_URL, prefix=prefix) as one,
        RedisStore(REDIS_URL, prefix=prefix) as two,
    ):
        heard: list[Any] = []
        stale = BalanceManager(one, CONFIG, on_event=heard.append)
        other = BalanceManager(two, CONFIG)
        stale.charge("u", 1)
        other.charge("u", 1)
        settings_ = RefillSettings(enabled=True, interval_value=1, interval_unit="days", amount=5)
        commit = one.commit

        def commit_then_configure(*args: Any, **kwargs: Any) -> None:
            try:
                commit(*args, **kwargs)
            finally:  # lost: what it reported is stale by the time the delta goes
                monkeypatch.setattr(one, "commit", commit)
                other.configure_refill("u", settings_)

        monkeypatch.setattr(one, "commit", commit_then_configure)
        sent = sent_by(one, monkeypatch)
        entry = stale.charge("u", 1)
        # The delta reported what it met; the retry from that account wins.
        assert sent == ["commit", "delta", "commit"]
        assert heard.count(ConflictRetried(user_id="u")) == 2  # two losses, two retries
        assert entry.balance_after == START - 3
        stored = two.load("u")
        assert stored.refill == settings_  # the delta did not write the stale settings back
        assert stored.balance == START - 3
        assert chained(two.ledger("u"))


def test_charges_the_stored_balance_would_clamp_or_strict_are_no_delta(prefix, monkeypatch):
    with (
        RedisStore(REDIS_URL, prefix=prefix) as one,
        RedisStore(REDIS_URL, prefix=prefix) as two,
    ):
        stale = BalanceManager(one, CONFIG)
        stale.charge("u", START - 5)
        BalanceManager(two, CONFIG).charge("u", 1)  # 4 left
        sent = sent_by(one, monkeypatch)
        entry = stale.charge("u", 50)  # clamped: planned again from what the loss reported
        assert "delta" not in sent
        assert (entry.amount, entry.cost, entry.balance_after) == (-4, 50, 0)
        stale.charge("v", 1)
        BalanceManager(two, CONFIG).charge("v", 1)
        sent.clear()
        assert stale.charge("v", 1, strict=True).balance_after == START - 3
        assert "delta" not in sent


# --- the user's lock ------------------------------------------------------------------


def _planned(store: Any, cost: int = 3) -> rules.Delta:
    seen = store.load("u") if isinstance(store, RedisStore) else store
    planned = rules.charge_delta(
        seen, "u", Decimal(cost), config=CONFIG, now=seen.updated_at, new_id=new_id
    )
    assert planned is not None
    return planned


def test_a_delta_held_off_by_a_writer_in_exclusive_applies_on_what_it_wrote(prefix):
    with (
        RedisStore(REDIS_URL, prefix=prefix) as one,
        RedisStore(REDIS_URL, prefix=prefix) as two,
    ):
        BalanceManager(one, CONFIG).charge("u", 1)
        planned = _planned(one)
        holder = BalanceManager(two, CONFIG)
        outcome: list[Any] = []
        inside, sent = threading.Event(), threading.Event()

        def send() -> None:
            inside.wait(30)
            sent.set()
            outcome.append(
                one.commit_delta(planned.change.account, planned.change.entry, floor=planned.floor)
            )

        thread = threading.Thread(target=send)
        thread.start()
        try:
            with two.exclusive("u"):
                inside.set()
                sent.wait(30)
                thread.join(0.2)  # held off: it naps and sends again while the lock is held
                assert not outcome
                holder.grant("u", 10)
        finally:
            thread.join(30)
        balance, version, _ = outcome[0]
        assert balance == START - 1 + 10 - 3
        assert one.load("u").version == version
        assert [e.kind for e in one.ledger("u")][-2:] == [EntryKind.GRANT, EntryKind.CHARGE]
        assert chained(one.ledger("u"))


def test_a_delta_under_the_senders_own_lock_passes_the_lock_on(prefix):
    with RedisStore(REDIS_URL, prefix=prefix) as store, redis.Redis.from_url(REDIS_URL) as raw:
        BalanceManager(store, CONFIG).charge("u", 1)
        with store.exclusive("u"):
            planned = _planned(store)
            reached = store.commit_delta(
                planned.change.account, planned.change.entry, floor=planned.floor
            )
            assert raw.exists(store._layout.keys("u").lock) == 0  # handed on: none queued
        assert reached[0] == START - 4
        assert store.load("u").balance == START - 4


def test_an_async_delta_cancelled_while_held_off_writes_nothing(prefix):
    async def main() -> None:
        async with AsyncRedisStore(REDIS_URL, prefix=prefix) as store:
            await AsyncBalanceManager(store, CONFIG).charge("u", 1)
            seen = await store.load("u")
            planned = _planned(seen)
            with RedisStore(REDIS_URL, prefix=prefix) as other, other.exclusive("u"):
                task = asyncio.ensure_future(
                    store.commit_delta(
                        planned.change.account, planned.change.entry, floor=planned.floor
                    )
                )
                done, _ = await asyncio.wait([task], timeout=0.3)
                assert not done  # held off by the lock
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert await store.load("u") == seen
            assert len(await store.ledger("u")) == 2  # opening and the first charge
            reached = await store.commit_delta(
                planned.change.account, planned.change.entry, floor=planned.floor
            )
            assert reached[:2] == (START - 4, seen.version + 1)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_same_delta_sent_twice_applies_once(prefix):
    """What a client that re-sends after a lost reply does: the second run finds its token."""
    with RedisStore(REDIS_URL, prefix=prefix) as store:
        BalanceManager(store, CONFIG).charge("u", 1)
        planned = _planned(store)
        keys, args = store._layout.delta_call(planned.change.account, planned.change.entry, None)
        first = store._delta_script(keys, args)
        assert store._delta_script(keys, args) == first
        assert first[0] == 0
        assert Decimal(first[1].decode()) == START - 4
        assert len(store.ledger("u")) == 3
        # Another delta since: the re-send is no longer its own last write, and applies anew
        # only with another token (the manager sends a new one each time).
        store.commit_delta(planned.change.account, planned.change.entry, floor=None)
        assert store.load("u").balance == START - 7


# --- processes -------------------------------------------------------------------------

PER_WRITER = 150


def _writer(prefix: str, index: int, barrier: Any) -> None:
    user = "hot"
    if index % 2 == 0:
        with RedisStore(REDIS_URL, prefix=prefix) as store:
            manager = BalanceManager(store, CONFIG)
            manager.balance(user)
            barrier.wait(60)
            for n in range(PER_WRITER):
                manager.charge(user, Decimal("0.5"), request_id=f"w{index}-{n}")
        return

    async def run() -> None:
        async with AsyncRedisStore(REDIS_URL, prefix=prefix) as store:
            manager = AsyncBalanceManager(store, CONFIG)
            await manager.balance(user)
            barrier.wait(60)
            for n in range(PER_WRITER):
                await manager.charge(user, Decimal("0.5"), request_id=f"w{index}-{n}")

    asyncio.run(run())


def test_four_processes_on_one_user_land_each_charge_once(prefix):
    with RedisStore(REDIS_URL, prefix=prefix) as store:
        BalanceManager(store, CONFIG).balance("hot")
    context = multiprocessing.get_context("spawn")
    for _ in range(2):  # the second round sends every request again
        barrier = context.Barrier(4)
        writers = [
            context.Process(target=_writer, args=(prefix, index, barrier)) for index in range(4)
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(120)
            assert writer.exitcode == 0
    with RedisStore(REDIS_URL, prefix=prefix) as store:
        entries = store.ledger("hot")
        charges = [e for e in entries if e.kind is EntryKind.CHARGE]
        assert len(charges) == 4 * PER_WRITER
        assert len({e.request_id for e in charges}) == 4 * PER_WRITER
        assert store.load("hot").balance == START - Decimal("0.5") * 4 * PER_WRITER
        assert chained(entries)
