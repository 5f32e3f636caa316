"""``creditmeter demo``: the whole job end to end, in a few seconds, with no network.

A simulated gateway meters a fake model function with ``@meter.metered``.
Several users call it at once, plain and streamed; some clients drop a stream
halfway. A trial user with a small balance runs dry and is refused; a month
later (on a fake clock) it is refilled and its call goes through. At the end
every user's ledger must add up to its balance.

It runs on a temporary SQLite file unless it is given a store, and a store it
is given must be empty: it refuses one that holds any user, even an earlier
demo's (a second month dated before the first one's refills would jumble those
ledgers). Nothing it writes is dated in the future: the simulated month is the
month before the run, so its calls are dated 31 days ago and its refill now.

Run it with ``creditmeter demo`` (needs the ``[cli]`` extra).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import random
import re
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from creditmeter._urls import redact
from creditmeter.cli.format import credits_text, money, plain
from creditmeter.cli.session import open_url
from creditmeter.config import BalanceConfig
from creditmeter.exceptions import InsufficientBalance, InvalidInput
from creditmeter.manager import BalanceManager
from creditmeter.models import EntryKind
from creditmeter.stores import BalanceStore, SQLiteStore
from creditmeter.testing import FakeClock

__all__ = ["run_demo"]

MODELS = ("gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet-20241022", "gemini-2.0-flash")
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
VOCAB = ("the", "a", "credit", "token", "model", "user", "balance", "ledger", "refill", "call")
DEMO_USER = re.compile(rf"demo-({'|'.join(NAMES)}|user[0-9]+)")  # the ids the demo makes
TRIAL_BALANCE = Decimal(2_500)  # the last user's: less than one Claude 3.5 Sonnet call holds
CONFIG = BalanceConfig(
    enabled=True,
    start_balance=Decimal(20_000),  # LibreChat's default: 20,000 credits = $0.02
    auto_refill_enabled=True,
    refill_interval_value=30,
    refill_interval_unit="days",
    refill_amount=Decimal(10_000),
)

Complete = Callable[..., Any]  # returns a response, or an iterator of chunks when streaming


def prompt_tokens(prompt: str, **_: object) -> int:
    """The meter's estimate of a prompt's input tokens: one per word."""
    return len(prompt.split())


def fake_model(prompt: str, user: str, model: str, max_tokens: int) -> tuple[list[str], Any]:
    """Words of a reply and its usage: pseudo-random, the same for the same request."""
    rng = random.Random(f"{user}|{model}|{prompt}")  # noqa: S311 - a simulation, not a secret
    words = rng.choices(VOCAB, k=rng.randint(10, max_tokens))
    time.sleep(rng.uniform(0.01, 0.05))  # "network" latency, so that calls overlap
    sent, got = prompt_tokens(prompt) + 7, len(words)  # 7: the chat template's own tokens
    return words, {"prompt_tokens": sent, "completion_tokens": got, "total_tokens": sent + got}


def build_gateway(meter: BalanceManager) -> Complete:
    """The gateway's model function, metered. Like OpenAI's, it streams with ``stream=True``.

    With ``estimate=`` and a ``max_tokens`` parameter, a call holds its prompt plus
    ``max_tokens`` of completion before it runs and settles with the usage reported;
    a stream it returns is charged once, when the stream ends or is closed.
    """

    @meter.metered(user="user_id", model="model", estimate=prompt_tokens, request_id="request_id")
    def complete(
        prompt: str,
        *,
        user_id: str,
        model: str,
        request_id: str,
        stream: bool = False,
        max_tokens: int = 300,
    ) -> Any:
        words, usage = fake_model(prompt, user_id, model, max_tokens)
        if stream:
            return chunks(words, usage, {"id": request_id, "model": model})
        message = {"role": "assistant", "content": " ".join(words)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {"id": request_id, "model": model, "choices": [choice], "usage": usage}

    return complete


def chunks(words: list[str], usage: Any, base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A reply as OpenAI chat chunks, a word each; the last one carries the usage."""
    for number, word in enumerate(words, 1):
        finish = "stop" if number == len(words) else None
        delta = {"index": 0, "delta": {"content": word + " "}, "finish_reason": finish}
        yield {**base, "choices": [delta]}
    yield {**base, "choices": [], "usage": usage}  # as with stream_options.include_usage


class Planned(NamedTuple):
    """One call a user will make; ``kind`` is plain, stream, or cut (dropped after 2 chunks)."""

    user: str
    model: str
    prompt: str
    kind: str
    request_id: str


def plan_calls(user_ids: list[str], calls: int, *, run: str) -> dict[str, list[Planned]]:
    """Deal ``calls`` calls round-robin to the users, drawn from a seeded generator."""
    rng = random.Random(7)  # noqa: S311 - a simulation, not a secret
    plans: dict[str, list[Planned]] = {user: [] for user in user_ids}
    for number in range(calls):
        user = user_ids[number % len(user_ids)]
        mine = len(plans[user])
        model = rng.choice(MODELS)
        if user == user_ids[-1] and mine == 0:
            model = "claude-3-5-sonnet-20241022"  # the trial user's first call: too dear
        kind = "cut" if mine == 2 else "stream" if mine % 2 else "plain"
        prompt = " ".join(rng.choices(VOCAB, k=rng.randint(30, 400)))
        plans[user].append(Planned(user, model, prompt, kind, f"demo-{run}-{number}"))
    return plans


def make_call(complete: Complete, call: Planned) -> None:
    """Call the gateway as its client would; ``InsufficientBalance`` if refused."""
    who = {"user_id": call.user, "model": call.model, "request_id": call.request_id}
    if call.kind == "plain":
        complete(call.prompt, **who)
    elif call.kind == "stream":
        for _chunk in complete(call.prompt, stream=True, **who):
            pass  # the last chunk carries the usage: charged once, when the stream ends
    else:
        # The client goes away after two chunks: closing the stream charges what was
        # sent (the estimated prompt and two output tokens) at LibreChat's cancel rate.
        with contextlib.closing(complete(call.prompt, stream=True, **who)) as stream:
            list(itertools.islice(stream, 2))


def open_demo_store(store_url: str | None, stack: contextlib.ExitStack) -> BalanceStore:
    """The store ``store_url`` names, if it is empty, else SQLite in a temporary folder.

    The stack removes the folder; the caller closes the store. A store that holds
    any user is closed again and refused (``InvalidInput``) before anything is
    written to it.
    """
    if store_url is None:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="creditmeter-demo-"))
        # "normal" durability: a throw-away file needs no sync to disk at every commit.
        return SQLiteStore(Path(folder) / "credits.db", durability="normal")
    store = open_url(store_url)
    try:
        users = store.users()
        if users:
            raise InvalidInput(_refusal(redact(store_url), users))
    except BaseException:
        store.close()
        raise
    return store


def _refusal(shown: str, users: list[str]) -> str:
    """Why the demo will not write to a store that holds ``users``: whose they are."""
    others = [user for user in users if not DEMO_USER.fullmatch(user)]
    if others:
        shown_ids = [repr(user if len(user) <= 40 else user[:37] + "...") for user in others[:3]]
        named = ", ".join(shown_ids) + (", ..." if len(others) > 3 else "")
        held = f"{len(users):,} user{'s' if len(users) > 1 else ''} ({named})"
    else:
        held = f"a demo run ({len(users):,} demo users)"
    return (
        f"the demo needs an empty store, and {shown} already holds {held}; "
        "name an empty store, or none to run on a temporary one"
    )


class MonthClock(FakeClock):
    """The demo month's clock: moved on as calls are done, spread over its first four weeks.

    A day-by-day usage report of the demo then has something to show, and the
    refill (due a month after the start) stays due only after the calls.
    """

    SPREAD = timedelta(days=28)

    def __init__(self, start: datetime, calls: int) -> None:
        super().__init__(start)
        self.start, self.calls, self.done = start, calls, 0
        self._moving = threading.Lock()

    def one_done(self) -> None:
        """Count a call done and move the clock to its share of the four weeks (never back)."""
        with self._moving:
            self.done += 1
            share = self.start + self.SPREAD * min(self.done, self.calls) / self.calls
            self.set(max(self(), share))


def run_demo(
    *,
    store_url: str | None = None,
    users: int = 5,
    calls: int = 40,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo and return its summary as JSON-able data (Decimals as strings).

    The store is an SQLite file in a temporary folder, removed afterwards,
    unless ``store_url`` names one, which must hold no user (else
    ``InvalidInput``, and nothing is written). The simulated month ends now:
    no entry is dated in the future. With a ``console``, show a progress bar
    and the summary tables on it; without one, print nothing.
    """
    if not all(type(value) is int and value >= 1 for value in (users, calls)):
        raise InvalidInput(f"users and calls must be whole numbers >= 1, got {users!r}, {calls!r}")
    user_ids = [f"demo-{NAMES[n]}" if n < len(NAMES) else f"demo-user{n + 1}" for n in range(users)]
    plans = plan_calls(user_ids, calls, run=uuid.uuid4().hex[:8])
    counts: Counter[tuple[str, str]] = Counter()  # (user, "plain"|"stream"|"cut"|"refused")
    refused: dict[str, tuple[Planned, Decimal]] = {}  # each user's last refused call, its cost
    month = timedelta(days=CONFIG.refill_interval_value + 1)  # the refill is due after it
    now = datetime.now(timezone.utc).replace(microsecond=0)
    clock = MonthClock(now - month, calls)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    sink = console or Console(file=io.StringIO())
    with contextlib.ExitStack() as stack:
        store = open_demo_store(store_url, stack)
        meter = stack.enter_context(BalanceManager(store, CONFIG, clock=clock))
        complete = build_gateway(meter)
        meter.set_balance(user_ids[-1], TRIAL_BALANCE, reason="trial account")
        progress = stack.enter_context(Progress(*columns, console=sink, disable=console is None))
        task = progress.add_task("model calls", total=calls)

        def call_once(call: Planned) -> None:
            try:
                make_call(complete, call)
                counts[call.user, call.kind] += 1
            except InsufficientBalance as no:
                counts[call.user, "refused"] += 1
                cost = no.cost or Decimal(0)
                refused[call.user] = (call, cost)
                why = f"{call.model} holds {credits_text(cost)}, {money(no.available)} available"
                progress.console.print(f"[red]refused[/] {call.user}: {why}")
            progress.advance(task)
            clock.one_done()

        def calls_of(user: str) -> None:
            for call in plans[user]:
                call_once(call)

        # Threads and the sync BalanceManager: most Python gateways serve each request on
        # a thread (WSGI servers, pools around blocking SDKs). The manager is thread-safe
        # (a lock per user, compare-and-set in the store) and SQLiteStore keeps a
        # connection per thread. A user's own calls run one after another.
        with ThreadPoolExecutor(max_workers=min(users, 16)) as pool:
            list(pool.map(calls_of, user_ids))  # list(): a failure on a thread is raised here

        # A month passes. LibreChat refills only a balance that cannot cover the call at
        # hand, so each user is asked with the cost of its last refused call (or none).
        clock.set(now)  # back to the real now, never beyond it
        progress.update(task, total=calls + len(refused))
        refilled = []
        for user in user_ids:
            entry = meter.maybe_refill(user, cost=refused[user][1] if user in refused else 0)
            if entry is not None:
                refilled.append(user)
                progress.console.print(f"[green]refilled[/] {user}: {credits_text(entry.amount)}")
        for call, _cost in list(refused.values()):  # and each refused call is tried again
            call_once(call._replace(request_id=call.request_id + "-retry"))
        summary = summarize(meter, user_ids, counts)
    shown = "temporary sqlite" if store_url is None else redact(store_url)
    result = {"store": shown, **summary, "refilled": refilled}
    if console is not None:
        print_summary(console, result)
    return result


def summarize(
    meter: BalanceManager, user_ids: list[str], counts: Counter[tuple[str, str]]
) -> dict[str, Any]:
    """Balances, spend and calls per user and per model, read back from the ledger."""
    rows: list[dict[str, Any]] = []
    ok = True
    model_calls: Counter[str] = Counter()
    model_spent: defaultdict[str, Decimal] = defaultdict(Decimal)
    for user in user_ids:
        entries, balance = meter.ledger(user), meter.balance(user)
        # The ledger balances: its running sum is each entry's balance_after, and the balance.
        running = list(itertools.accumulate(entry.amount for entry in entries))
        chained = running == [entry.balance_after for entry in entries]
        ok = ok and chained and running[-1:] == [balance]
        charges = [entry for entry in entries if entry.kind is EntryKind.CHARGE]
        for entry in charges:
            model_calls[entry.model or "?"] += 1
            model_spent[entry.model or "?"] -= entry.amount
        spent = -sum((entry.amount for entry in charges), Decimal(0))
        row = {"user": user, "balance": plain(balance), "spent": plain(spent)}
        rows.append({**row, "calls": len(charges), "refused": counts[user, "refused"]})
    models = [
        {"model": model, "calls": model_calls[model], "spent": plain(model_spent[model])}
        for model in sorted(model_calls)
    ]
    streams = {"complete": sum(counts[user, "stream"] for user in user_ids)}
    streams["cut_short"] = sum(counts[user, "cut"] for user in user_ids)
    return {"users": rows, "models": models, "ledger_balanced": ok, "streams": streams}


def _credits(text: str) -> str:
    return money(Decimal(text))


def print_summary(console: Console, result: dict[str, Any]) -> None:
    """The summary as two rich tables, per user and per model."""
    title, store = "creditmeter demo: balances and spend per user", result["store"]
    users = Table(
        title=title, title_justify="left", caption=f"store: {store}", caption_justify="left"
    )
    for column in ("user", "calls", "refused", "spent", "balance", "refilled"):
        users.add_column(column, justify="left" if column == "user" else "right")
    for row in result["users"]:
        again = "yes" if row["user"] in result["refilled"] else ""
        numbers = (str(row["calls"]), str(row["refused"]), _credits(row["spent"]))
        users.add_row(row["user"], *numbers, _credits(row["balance"]), again)
    models = Table(title="spend per model", title_justify="left", show_footer=True)
    total = sum((Decimal(row["spent"]) for row in result["models"]), Decimal(0))
    count = sum(row["calls"] for row in result["models"])
    models.add_column("model", footer="total")
    models.add_column("calls", justify="right", footer=str(count))
    models.add_column("spent", justify="right", footer=_credits(str(total)))
    for row in result["models"]:
        models.add_row(row["model"], str(row["calls"]), _credits(row["spent"]))
    whole, cut = result["streams"]["complete"], result["streams"]["cut_short"]
    streams = f"Streams: {whole} charged at their end, {cut} cut short (at the cancel rate)."
    console.print(users, models, streams)
