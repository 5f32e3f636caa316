"""The one worker script of every cross-process test, and the checks those tests share.

Run as ``python tests/worker.py COMMAND ...``; each worker opens its own store
by URL (``open_store``), so nothing crosses a process boundary but the store,
and reports on stdout one flushed line per event:

``charge URL USER COUNT GO TAG``
    print "ready", wait for the file GO, charge 1 credit COUNT times
    (request ids ``TAG-n``), then print a JSON summary: ``done``, latencies,
    and the store's ``commits``, lost compare-and-sets (``conflicts``) and
    ``exclusives`` blocks.
``hold URL USER COUNT GO``
    the same, holding 1 credit and settling it COUNT times; the summary
    counts ``ok`` and ``refused`` (InsufficientBalance) holds.
``open_new FOLDER ROUNDS WORKERS GO TAG``
    SQLite only: every worker opens a new file per round at once and
    charges on it; prints the errors as a JSON list.
``crash URL USER TAG RETRY PAUSE_MS``
    charge and hold-then-settle forever, printing each acknowledged step;
    the parent SIGKILLs it.
``soak URL NAME SEED SECONDS OTHERS GO JOURNAL``
    mixed grant/charge/hold/settle/release/refill/replay for SECONDS once the
    file GO exists; writes every acknowledged operation to JOURNAL.
``race URL USER FD REQUEST_ID AMOUNT [FD REQUEST_ID AMOUNT ...]``
    open the store, print "ready"; per round, block until FD reaches end of
    file (the parent closes its end: every worker wakes at once), then
    charge and print the outcome.

Tests import this module (``tests/`` is on ``sys.path``) for ``together``
(start workers, let them go at once, collect their summaries), for
``check_invariants`` and ``snapshot``, and for the soak loop, which also
runs on threads in the test's process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
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
    InsufficientBalance,
    SQLiteStore,
    VersionConflict,
    open_store,
)
from creditmeter._ids import new_id
from creditmeter.rules import HOLD_PREFIX, open_holds
from creditmeter.stores.base import BalanceStore

PATH = Path(__file__)
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


# --- the parent's side: start workers, let them go together ------------------------------


def together(commands: Sequence[Sequence[str]], go: Path, *, timeout: float = 300) -> list[Any]:
    """Start one worker per command, wait for each "ready", touch ``go``; return their summaries.

    Each command is the arguments after ``worker.py``; the summary is the
    JSON line each worker prints last.
    """
    procs = [
        subprocess.Popen([sys.executable, str(PATH), *command], stdout=subprocess.PIPE, text=True)
        for command in commands
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        summaries = [json.loads(proc.stdout.readline()) for proc in procs]  # type: ignore[union-attr]
        for proc in procs:
            assert proc.wait(timeout=timeout) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return summaries


# --- many writers: charge, hold ----------------------------------------------------------

MANY_CONFIG = BalanceConfig(enabled=True, start_balance=START)


def wait_for(go: Path) -> None:
    """Block until the file ``go`` exists (the parent's start signal)."""
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the start signal never came")
        time.sleep(0.001)


def counted(store: Any) -> Counter[str]:
    """Count ``store``'s commits (deltas among them), lost ones and ``exclusive`` blocks."""
    counts: Counter[str] = Counter(commits=0, conflicts=0, exclusives=0, deltas=0)
    commit = store.commit

    def counting_commit(account: Any, entries: Any, *, expected_version: int) -> Any:
        counts["commits"] += 1
        try:
            return commit(account, entries, expected_version=expected_version)
        except VersionConflict:
            counts["conflicts"] += 1
            raise

    store.commit = counting_commit
    commit_delta = getattr(store, "commit_delta", None)
    if commit_delta is not None:  # a delta is a commit too; its guard failing, a lost one

        def counting_delta(account: Any, entry: Any, *, floor: Any) -> Any:
            counts["commits"] += 1
            counts["deltas"] += 1
            try:
                return commit_delta(account, entry, floor=floor)
            except VersionConflict:
                counts["conflicts"] += 1
                raise

        store.commit_delta = counting_delta
    exclusive = getattr(store, "exclusive", None)
    if exclusive is not None:

        @contextlib.contextmanager
        def counting_exclusive(user_id: str) -> Iterator[None]:
            counts["exclusives"] += 1
            with exclusive(user_id):
                yield

        store.exclusive = counting_exclusive
    return counts


def charge(url: str, user: str, count: str, go: str, tag: str) -> None:
    """Charge 1 credit ``count`` times once ``go`` exists; print a JSON summary."""
    store = open_store(url)
    counts = counted(store)
    with BalanceManager(store, MANY_CONFIG) as manager:
        manager.account(user)
        say("ready")
        wait_for(Path(go))
        latencies = []
        started = time.perf_counter()
        for number in range(int(count)):
            begun = time.perf_counter()
            manager.charge(user, 1, request_id=f"{tag}-{number}")
            latencies.append(time.perf_counter() - begun)
        wall = time.perf_counter() - started
    latencies.sort()
    say(
        json.dumps(
            {
                "done": int(count),
                "wall": wall,
                "p50_ms": latencies[len(latencies) // 2] * 1000,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
                "max_ms": latencies[-1] * 1000,
                **counts,
            }
        )
    )


def hold(url: str, user: str, count: str, go: str) -> None:
    """Hold and settle 1 credit ``count`` times once ``go`` exists; print a JSON summary."""
    store = open_store(url)
    counts = counted(store)
    with BalanceManager(store, BalanceConfig(enabled=True)) as manager:
        manager.account(user)
        say("ready")
        wait_for(Path(go))
        ok = refused = 0
        for _ in range(int(count)):
            try:
                held = manager.hold(user, 1)
            except InsufficientBalance:
                refused += 1
                continue
            manager.settle(held, 1)
            ok += 1
    say(json.dumps({"ok": ok, "refused": refused, **counts}))


def open_new(folder: str, rounds: str, workers: str, go: str, tag: str) -> None:
    """Open a new SQLite file per round, all workers at once; print a JSON list of errors.

    Round ``n`` opens ``folder/n.db`` and charges once on it; no worker starts
    a round before every worker has finished the one before (a barrier made
    of marker files), so the opens of each new file really overlap.
    """
    base = Path(folder)
    say("ready")
    wait_for(Path(go))
    errors = []
    for number in range(int(rounds)):
        while len(list(base.glob(f"done-{number - 1}-*"))) < int(workers) and number:
            time.sleep(0)
        try:
            with BalanceManager(SQLiteStore(base / f"{number}.db"), MANY_CONFIG) as manager:
                manager.charge("u", 1, request_id=tag)
        except Exception as exc:  # every failure is the finding
            errors.append(f"round {number}: {exc!r}")
        (base / f"done-{number}-{tag}").touch()
    say(json.dumps(errors))


# --- crash: killed at random points ----------------------------------------------------------

CRASH_CONFIG = BalanceConfig(enabled=True, start_balance=START)
CRASH_TTL = timedelta(seconds=30)
CRASH_HOLD = 5
CRASH_SETTLE = 3


def crash(url: str, user: str, tag: str, retry: str, pause_ms: str) -> None:
    """Even steps charge 1 credit; odd steps hold 5 and settle 3. Runs until killed.

    Prints ``c N RID`` after a charge returns, ``h N HOLD`` after a hold and
    ``s N HOLD`` after its settle. ``RETRY`` (or ``-``) is a charge request id
    whose acknowledgment the previous worker never printed: it is sent again
    first, as a client retries, and reported as ``r RID ENTRY replayed`` when
    the killed worker had applied it, else ``r RID ENTRY applied``.
    """
    pause = int(pause_ms) / 1000
    mine = new_id().rsplit("-", 1)[0]  # this process's id prefix
    with BalanceManager(open_store(url), CRASH_CONFIG) as manager:
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
        wait_for(Path(go))
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


def race(url: str, user: str, *rounds: str) -> None:
    """Charge once per round, each when its start pipe closes; print each outcome as JSON.

    ``rounds`` are triples ``FD REQUEST_ID AMOUNT``: the worker blocks until
    FD reaches end of file, charges ``AMOUNT`` under ``REQUEST_ID``, prints
    the outcome, and goes on to the next round.
    """
    with BalanceManager(open_store(url), RACE_CONFIG) as manager:
        say("ready")
        for fd, request_id, amount in zip(*[iter(rounds)] * 3, strict=True):
            while os.read(int(fd), 1):  # end of file: the parent let every worker go at once
                pass
            try:
                entry = manager.charge(user, Decimal(amount), request_id=request_id)
            except CreditMeterError as exc:
                say(json.dumps({"error": type(exc).__name__}))
                continue
            outcome = {
                "id": entry.id,
                "amount": str(entry.amount),
                "balance_after": str(entry.balance_after),
                "cost": str(entry.cost),
                "at": entry.at.astimezone(timezone.utc).isoformat(),
            }
            say(json.dumps(outcome))


COMMANDS = {
    "charge": charge,
    "hold": hold,
    "open_new": open_new,
    "crash": crash,
    "soak": soak,
    "race": race,
}

if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    COMMANDS[command](*arguments)
