"""Workers of the reliability suite, and the ledger checks its tests share.

Run as ``python tests/reliability/worker.py COMMAND ...``:

``crash PATH USER TAG RETRY PAUSE_MS``
    charge and hold-then-settle forever on an SQLite file (durability
    "full"), printing each acknowledged step; the parent SIGKILLs it.
``soak URL NAME SEED SECONDS OTHERS GO JOURNAL``
    mixed grant/charge/hold/settle/release/refill/replay for SECONDS once the
    file GO exists; writes every acknowledged operation to JOURNAL.
``race URL USER REQUEST_ID AMOUNT FD``
    open the store, print "ready", block until FD reaches end of file (the
    parent closes its end: every worker wakes at once), then charge.

Each worker opens its own store (``open_store(URL)``), so nothing crosses a
process boundary but the store, and reports on stdout one flushed line per
event. The soak loop also runs on threads, in the test's process, over a
MemoryStore.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    ConflictRetried,
    CreditMeterError,
    EntryKind,
    SQLiteStore,
    VersionConflict,
    open_store,
)
from creditmeter._ids import new_id
from creditmeter.rules import HOLD_PREFIX, open_holds
from creditmeter.stores.base import BalanceStore

START = 10**9

# --- checks shared by the tests ---------------------------------------------------------


def snapshot(store: BalanceStore) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Everything a caller can see in a store: its users, their accounts and ledgers."""
    users = store.users()
    return users, {u: store.load(u) for u in users}, {u: store.ledger(u) for u in users}


def check_invariants(store: BalanceStore, *, now: datetime | None = None) -> dict[str, int]:
    """Assert the invariants of every account; return how many users and entries were checked.

    Per user: the ledger opens with an OPEN entry, each ``balance_after`` is
    the previous one plus the entry's amount (the chain), the ledger sums to
    the balance, no request id appears twice, and neither the stored account
    nor its view at ``now`` (expired holds left out) has a negative balance
    or available balance.
    """
    users = entries_seen = 0
    with localcontext() as exact:
        exact.prec = 100
        for user in store.users():
            account = store.load(user)
            assert account is not None, user
            entries = store.ledger(user)
            assert entries, f"{user}: an account without a ledger"
            assert entries[0].kind is EntryKind.OPEN, f"{user}: first entry {entries[0]}"
            running = Decimal(0)
            for entry in entries:
                running += entry.amount
                assert entry.user_id == user
                assert entry.balance_after == running, f"{user}: chain broken at {entry}"
            assert running == account.balance, f"{user}: ledger sum {running} != {account.balance}"
            requests = Counter(e.request_id for e in entries if e.request_id is not None)
            doubled = [rid for rid, count in requests.items() if count > 1]
            assert not doubled, f"{user}: request ids recorded twice: {doubled[:5]}"
            ids = Counter(e.id for e in entries)
            assert max(ids.values()) == 1, f"{user}: an entry id recorded twice"
            assert account.balance >= 0, f"{user}: negative balance {account.balance}"
            assert account.available >= 0, f"{user}: negative available {account.available}"
            if now is not None:
                assert open_holds(account, now).available >= 0
            users += 1
            entries_seen += len(entries)
    return {"users": users, "entries": entries_seen}


def say(line: str) -> None:
    print(line, flush=True)


# --- crash: killed at random points ----------------------------------------------------------

CRASH_CONFIG = BalanceConfig(enabled=True, start_balance=START)
CRASH_TTL = timedelta(seconds=30)
CRASH_HOLD = 5
CRASH_SETTLE = 3


def crash(path: str, user: str, tag: str, retry: str, pause_ms: str) -> None:
    """Even steps charge 1 credit; odd steps hold 5 and settle 3. Runs until killed.

    Prints ``c N RID`` after a charge returns, ``h N HOLD`` after a hold and
    ``s N HOLD`` after its settle. ``RETRY`` (or ``-``) is a charge request id
    whose acknowledgment the previous worker never printed: it is sent again
    first, as a client retries, and reported as ``r RID ENTRY replayed`` when
    the killed worker had applied it, else ``r RID ENTRY applied``.
    """
    pause = int(pause_ms) / 1000
    mine = new_id().rsplit("-", 1)[0]  # this process's id prefix
    with BalanceManager(SQLiteStore(path, durability="full"), CRASH_CONFIG) as manager:
        say("ready")
        if retry != "-":
            entry = manager.charge(user, 1, request_id=retry)
            how = "applied" if entry.id.rsplit("-", 1)[0] == mine else "replayed"
            say(f"r {retry} {entry.id} {how}")
        for number in itertools.count():
            if number % 2 == 0:
                request_id = f"{tag}-{number}"
                manager.charge(user, 1, request_id=request_id)
                say(f"c {number} {request_id}")
            else:
                held = manager.hold(user, CRASH_HOLD, ttl=CRASH_TTL)
                say(f"h {number} {held.id}")
                if pause:
                    time.sleep(pause)  # the model call the hold pays for
                manager.settle(held, CRASH_SETTLE)
                say(f"s {number} {held.id}")


# --- soak: many writers for a while --------------------------------------------------------

REFILL_AMOUNT = Decimal(5)
REFILL_EVERY = timedelta(seconds=1)
SOAK_CONFIG = BalanceConfig(
    enabled=True,
    start_balance=START,
    auto_refill_enabled=True,
    refill_interval_value=1,
    refill_interval_unit="seconds",
    refill_amount=REFILL_AMOUNT,
    refill_mode="on_interval",
)
HOT = "hot"


def soak_users(others: int) -> list[str]:
    return [f"user-{number:04d}" for number in range(others)]


def soak_loop(
    manager: BalanceManager, *, name: str, users: list[str], seconds: float, seed: int
) -> dict[str, Any]:
    """Run mixed operations for ``seconds``; return the journal of acknowledged operations.

    Half the operations go to the hot user, the rest to a random other one.
    Journal rows are ``[op, user, request id, entry id, amount]`` for every
    entry an operation returned, and ``["hold", user, hold id, None, amount]``
    for every hold granted (each is settled or released before the end). A
    replay re-sends an earlier grant or charge with its request id and
    parameters: it must return the first entry (else it counts as doubled).
    An operation that raises ``VersionConflict`` (the manager's retry policy
    ran out: the caller is told, nothing was applied) is counted as "gave
    up" and left out of the journal; if it had been applied after all, its
    entry would show as a phantom.
    """
    rng = random.Random(seed)
    journal: list[list[Any]] = []
    counts: Counter[str] = Counter()
    open_holds_: list[Any] = []
    sent: list[tuple[str, str, str, Decimal, str]] = []  # op, user, request id, amount, entry id
    doubled = 0
    serial = itertools.count()

    def record(op: str, entry: Any, request_id: str | None) -> None:
        journal.append([op, entry.user_id, request_id, entry.id, str(entry.amount)])
        counts[op] += 1

    def resolve(held: Any) -> None:
        if rng.random() < 0.8:
            cost = Decimal(rng.randint(0, 6000)) / 100  # may be more or less than held
            record("settle", manager.settle(held, cost), HOLD_PREFIX + held.id)
        else:
            record("release", manager.release(held), HOLD_PREFIX + held.id)

    def step() -> None:
        nonlocal doubled
        user = HOT if rng.random() < 0.5 else rng.choice(users)
        roll = rng.random()
        if roll < 0.35:
            request_id = f"{name}-{next(serial)}"
            cost = Decimal(rng.randint(1, 10000)) / 100
            entry = manager.charge(user, cost, request_id=request_id)
            assert entry.amount == -cost, entry  # balances are far from zero: never clamped
            record("charge", entry, request_id)
            sent.append(("charge", user, request_id, cost, entry.id))
        elif roll < 0.5:
            request_id = f"{name}-{next(serial)}"
            amount = Decimal(rng.randint(1, 1000))
            entry = manager.grant(user, amount, request_id=request_id)
            record("grant", entry, request_id)
            sent.append(("grant", user, request_id, amount, entry.id))
        elif roll < 0.65 and len(open_holds_) < 4:
            amount = Decimal(rng.randint(1, 50))
            held = manager.hold(user, amount, ttl=timedelta(hours=1))
            journal.append(["hold", user, held.id, None, str(amount)])
            counts["hold"] += 1
            open_holds_.append(held)
        elif roll < 0.8 and open_holds_:
            held = open_holds_.pop(rng.randrange(len(open_holds_)))
            try:
                resolve(held)
            except VersionConflict:
                open_holds_.append(held)  # still open: resolved later
                raise
        elif roll < 0.9:
            entry = manager.maybe_refill(user)
            counts["refill-checked"] += 1
            if entry is not None:
                record("refill", entry, None)
        elif sent:
            op, who, request_id, amount, first = rng.choice(sent[-1000:])
            again = (manager.charge if op == "charge" else manager.grant)(
                who, amount, request_id=request_id
            )
            counts["replay"] += 1
            doubled += again.id != first

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            step()
        except VersionConflict:  # noqa: PERF203 - the retry policy ran out: refused, not applied
            counts["gave up"] += 1
    for _ in range(100):
        if not open_holds_:
            break
        try:
            resolve(open_holds_[-1])
        except VersionConflict:
            counts["gave up"] += 1
        else:
            open_holds_.pop()
    return {"name": name, "journal": journal, "counts": dict(counts), "doubled": doubled}


def soak(
    url: str,
    name: str,
    seed: str,
    seconds: str,
    others: str,
    go: str,
    journal: str,
) -> None:
    """The soak loop in a process of its own; prints ``ready``, then a JSON summary."""
    retries = Counter[str]()

    def on_event(event: object) -> None:
        if isinstance(event, ConflictRetried):
            retries["conflict"] += 1

    with BalanceManager(open_store(url), SOAK_CONFIG, on_event=on_event) as manager:
        say("ready")
        deadline = time.monotonic() + 60
        while not Path(go).exists():
            if time.monotonic() > deadline:
                raise SystemExit("the start signal never came")
            time.sleep(0.001)
        started = time.monotonic()
        result = soak_loop(
            manager,
            name=name,
            users=soak_users(int(others)),
            seconds=float(seconds),
            seed=int(seed),
        )
        elapsed = time.monotonic() - started
    Path(journal).write_text(json.dumps(result["journal"]), encoding="utf-8")
    summary = {
        "name": name,
        "counts": result["counts"],
        "doubled": result["doubled"],
        "seconds": elapsed,
        "conflicts": retries["conflict"],
    }
    say(json.dumps(summary))


def verify_soak(store: BalanceStore, journals: Iterable[list[list[Any]]]) -> dict[str, int]:
    """Check a soaked store against the journals of every worker; return the counts.

    ``lost``: acknowledged entries missing from the ledger or recorded with
    another amount, plus users whose balance is not the start balance plus
    every acknowledged amount (plus the refills applied inside holds, which no
    call returns). ``phantom``: ledger entries no worker acknowledged (other
    than OPEN entries and those refills). ``double_refills``: refills of one
    user less than the interval apart. ``unresolved_holds``: holds not settled
    or released exactly once; ``open_holds``: holds still in an account.
    """
    acknowledged: dict[str, tuple[str, str, Decimal]] = {}
    holds: dict[str, str] = {}
    for rows in journals:
        for op, user, key, entry_id, amount in rows:
            if op == "hold":
                holds[key] = user
                continue
            assert entry_id not in acknowledged, f"entry {entry_id} acknowledged twice"
            acknowledged[entry_id] = (user, op, Decimal(amount))
    per_user: dict[str, list[str]] = defaultdict(list)
    for entry_id, (user, _, _) in acknowledged.items():
        per_user[user].append(entry_id)
    counts: Counter[str] = Counter()
    resolutions: Counter[str] = Counter()
    with localcontext() as exact:
        exact.prec = 100
        for user in store.users():
            account = store.load(user)
            assert account is not None
            entries = store.ledger(user)
            in_ledger = {e.id for e in entries}
            counts["lost"] += sum(1 for i in per_user.pop(user, []) if i not in in_ledger)
            expected = Decimal(START)
            last_refill: datetime | None = None
            for entry in entries:
                if entry.request_id is not None and entry.request_id.startswith(HOLD_PREFIX):
                    resolutions[entry.request_id[len(HOLD_PREFIX) :]] += 1
                if entry.kind is EntryKind.REFILL:
                    counts["refills"] += 1
                    counts["double_refills"] += entry.amount != REFILL_AMOUNT or (
                        last_refill is not None and entry.at - last_refill < REFILL_EVERY
                    )
                    last_refill = entry.at
                found = acknowledged.get(entry.id)
                if found is not None:
                    counts["lost"] += found[2] != entry.amount
                    expected += found[2]
                elif entry.kind is EntryKind.REFILL:
                    expected += entry.amount  # applied inside a hold
                elif entry.kind is not EntryKind.OPEN:
                    counts["phantom"] += 1
            counts["lost"] += account.balance != expected
            counts["open_holds"] += len(account.holds)
    counts["lost"] += sum(len(ids) for ids in per_user.values())  # users missing altogether
    counts["unresolved_holds"] = sum(1 for hold_id in holds if resolutions[hold_id] != 1)
    counts["acknowledged_entries"] = len(acknowledged)
    counts["holds"] = len(holds)
    for name in ("lost", "phantom", "double_refills", "open_holds", "refills"):
        counts[name] += 0  # present, even when zero
    return dict(counts)


# --- race: one request id from many processes at once ------------------------------------------

RACE_CONFIG = BalanceConfig(enabled=True, start_balance=START)


def race(url: str, user: str, request_id: str, amount: str, fd: str) -> None:
    """Charge once under ``request_id`` when the start pipe closes; print the outcome as JSON."""
    with BalanceManager(open_store(url), RACE_CONFIG) as manager:
        say("ready")
        while os.read(int(fd), 1):  # end of file: the parent let every worker go at once
            pass
        try:
            entry = manager.charge(user, Decimal(amount), request_id=request_id)
        except CreditMeterError as exc:
            say(json.dumps({"error": type(exc).__name__}))
        else:
            say(
                json.dumps(
                    {
                        "id": entry.id,
                        "amount": str(entry.amount),
                        "balance_after": str(entry.balance_after),
                        "cost": str(entry.cost),
                        "at": entry.at.astimezone(timezone.utc).isoformat(),
                    }
                )
            )


COMMANDS = {"crash": crash, "soak": soak, "race": race}

if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    COMMANDS[command](*arguments)
