# unasync-target: _sync.py
# unasync-rename: _tell -> _emit
# unasync-rename: AsyncExitStack -> ExitStack
# unasync-rename: enter_async_context -> enter_context
"""``charge_many`` and ``grant_many``, as the mixin ``AsyncBatchMixin`` of the async manager.

Each user's items are planned in order on one account (``_plan``), and all
of a batch's users are committed with one ``commit_many`` of the store: one
round trip or transaction, whatever the number of items. A write that lost
its compare-and-set is planned again from the account the store reported,
in the next round (bounded by the manager's retry policy); one that met a
request id applied before has its user's request ids looked up, and is
planned again with the repeats answered by their first entries. A store
without ``commit_many`` gets the writes one by one.

While a batch runs it holds the manager's locks of its users (taken in one
order, so two batches never wait on each other in a circle); events are
told after the writes, once they are let go.

This is the source of both mixins: ``_sync.py`` (``BatchMixin``) is generated
from it by ``tools/unasync.py``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from creditmeter._base import LOCK_STRIPES, ManagerBase, Op, Outbox
from creditmeter._compat import AsyncLock, async_sleep
from creditmeter._retry import backoff
from creditmeter.batches import _plan
from creditmeter.batches._plan import Outcome, UserPlan, UserState
from creditmeter.batches.items import BatchResult, ChargeItem, GrantItem
from creditmeter.events import Event
from creditmeter.exceptions import DuplicateRequest, InsufficientBalance, VersionConflict
from creditmeter.stores.base import AsyncBalanceStore, Write, WriteOutcome

__all__ = ["AsyncBatchMixin"]

_CommitMany = Callable[[Sequence[Write]], Awaitable[list[WriteOutcome]]]  # async-only
# sync-only: _CommitMany = Callable[[Sequence[Write]], list[WriteOutcome]]

if TYPE_CHECKING:
    _Manager = ManagerBase
else:
    _Manager = object


class AsyncBatchMixin(_Manager):
    """``charge_many`` and ``grant_many``, for ``AsyncBalanceManager``."""

    if TYPE_CHECKING:
        store: AsyncBalanceStore
        _locks: tuple[AsyncLock, ...]

        async def _tell(self, events: list[Event]) -> None: ...

        async def _tell_after(self, out: Outbox, failed: BaseException) -> None: ...

    async def charge_many(self, items: Iterable[ChargeItem]) -> list[BatchResult]:
        """Apply many charges (of any users) as one batch; one result per item, in order.

        Each item means what the same arguments mean to ``charge()``, and ends
        as that call would: its entry (a repeated request: the first entry),
        or the error it would raise (``InsufficientBalance``,
        ``IdempotencyConflict``, or ``VersionConflict`` once the retry policy
        ran out) in its ``BatchResult``, while the other items apply. A
        user's items apply in the order given. Every item is checked first: a
        malformed one (or more than 10,000 items) raises ``InvalidInput``
        naming its index, and nothing is written. Stores with
        ``commit_many`` (every bundled one) take the whole batch in one round
        trip or transaction. A store error raises; then some users' items
        may have applied, which request ids let a replay of the batch settle.
        """
        listed, ops = _plan.charge_ops(self, items)
        return await self._batch(listed, ops)

    async def grant_many(self, items: Iterable[GrantItem]) -> list[BatchResult]:
        """Apply many grants as one batch; one result per item, in order (see ``charge_many``)."""
        listed, ops = _plan.grant_ops(self, items)
        return await self._batch(listed, ops)

    async def _batch(
        self, items: Sequence[ChargeItem | GrantItem], ops: list[Op]
    ) -> list[BatchResult]:
        if not ops:
            return []
        users = _plan.group(ops, self._seen.get)
        outcomes: list[Outcome | None] = [None] * len(ops)
        told: list[list[Event]] | None = [[] for _ in ops] if self.on_event is not None else None
        try:
            async with contextlib.AsyncExitStack() as held:
                for stripe in sorted({hash(user) % LOCK_STRIPES for user in users}):
                    await held.enter_async_context(self._locks[stripe])
                await self._rounds(ops, users, outcomes, told)
        except BaseException as failed:
            if told is not None:
                await self._tell_after(_plan.in_order(told), failed)
            raise
        if told is not None:
            events = _plan.in_order(told)
            if events:
                await self._tell(events)
        results = []
        for index, (item, outcome) in enumerate(zip(items, outcomes, strict=True)):
            if isinstance(outcome, Exception):
                results.append(BatchResult(index, item, error=outcome))
            else:
                results.append(BatchResult(index, item, entry=outcome))
        return results

    async def _rounds(
        self,
        ops: list[Op],
        users: dict[str, UserState],
        outcomes: list[Outcome | None],
        told: list[list[Event]] | None,
    ) -> None:
        """Plan, commit, and plan again what lost, until every item is settled."""
        waiting = list(users.values())
        retries = 0  # rounds run because a write lost its compare-and-set
        deadline = None
        while waiting:
            now = self._now()
            planned: list[tuple[UserState, UserPlan]] = []
            for state in waiting:
                plan = await self._plan_user(ops, state, now)
                planned.append((state, plan))
            writes = [plan.write for _, plan in planned if plan.write is not None]
            reported = iter(await self._commit_writes(writes) if writes else [])
            waiting = []
            lost = False
            for state, plan in planned:
                outcome = None if plan.write is None else next(reported)
                if outcome is None:
                    self._settle(ops, state, plan, outcomes, told)
                    continue
                if isinstance(outcome, VersionConflict) and not state.guessed:
                    lost = True
                    deadline = deadline or time.monotonic() + self.retry.timeout
                    if not self._may_retry(outcome, state, deadline, told):
                        for index in state.indices:
                            outcomes[index] = outcome
                        continue
                self._reported(outcome, state, ops)
                waiting.append(state)
            if lost:
                retries += 1
                pause = backoff(self.retry, retries)
                if pause and waiting:
                    await async_sleep(pause)

    def _may_retry(
        self,
        conflict: VersionConflict,
        state: UserState,
        deadline: float,
        told: list[list[Event]] | None,
    ) -> bool:
        """Count a lost compare-and-set; tell whether the retry policy allows another round."""
        self._lost(conflict)
        state.conflicts += 1
        if state.conflicts >= self.retry.attempts or time.monotonic() > deadline:
            return False
        self._retried(conflict, None if told is None else told[state.indices[0]])
        return True

    @staticmethod
    def _reported(
        outcome: VersionConflict | DuplicateRequest, state: UserState, ops: list[Op]
    ) -> None:
        """Learn what a write that did not apply met, for the user's next plan."""
        if isinstance(outcome, DuplicateRequest):
            state.found[outcome.request_id] = outcome.entry
            state.missing.discard(outcome.request_id)
            state.look_up = state.request_ids(ops)
            state.reload = True  # the write that applied it changed the account too
        elif outcome.current is None:
            state.reload = True
        else:  # the stored account (for a guessed user: found, as a load would)
            state.loaded(outcome.current)

    async def _plan_user(self, ops: list[Op], state: UserState, now: datetime) -> UserPlan:
        """Plan one user's items, reading what the plan needs first (an account, request ids)."""
        while True:
            if state.reload:
                state.loaded(await self.store.load(state.user_id))
            for request in sorted(state.look_up):
                entry = await self.store.find_request(state.user_id, request)
                if entry is None:
                    state.missing.add(request)
                else:
                    state.found[request] = entry
            state.look_up = set()
            plan = _plan.plan_user(ops, state, now)
            if plan.stale:
                state.reload = True
            elif plan.look_up:
                state.look_up = plan.look_up
            else:
                return plan

    def _settle(
        self,
        ops: list[Op],
        state: UserState,
        plan: UserPlan,
        outcomes: list[Outcome | None],
        told: list[list[Event]] | None,
    ) -> None:
        """The user's write applied (or there was none): each item ends as planned."""
        if plan.write is not None:
            self._remember(plan.write.account)
        elif state.base is not None and state.fresh:
            self._remember(state.base)
        for index in state.indices:
            change = plan.changes.get(index)
            if change is not None:
                outcomes[index] = change.entry
                if told is not None:
                    self._committed(ops[index], change, told[index])
                continue
            outcome = plan.settled[index]
            outcomes[index] = outcome
            if told is not None and isinstance(outcome, InsufficientBalance):
                self._denied(outcome, ops[index].started, told[index])
        state.indices = []

    async def _commit_writes(self, writes: list[Write]) -> list[WriteOutcome]:
        """Commit the writes: in one ``commit_many`` if the store has it, else one by one."""
        store = self.store
        commit_many: _CommitMany | None = getattr(store, "commit_many", None)
        try:
            if commit_many is not None:
                reported = await commit_many(writes)
            else:
                reported = []
                for write in writes:
                    try:
                        await store.commit(
                            write.account, write.entries, expected_version=write.expected_version
                        )
                    except (VersionConflict, DuplicateRequest) as met:  # noqa: PERF203
                        reported.append(met)
                    else:
                        reported.append(None)
        except BaseException:
            # Some writes may have gone through: what this manager saw of their users is stale.
            for write in writes:
                self._seen.pop(write.account.user_id, None)
            raise
        return reported
