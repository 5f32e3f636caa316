"""What ``charge_many`` and ``grant_many`` decide without I/O, for both managers.

A batch is checked whole (``charge_ops``, ``grant_ops``) before anything is
written. Then its items are grouped by user, and each user's items are
planned in the order given on an in-memory account (``plan_user``), exactly
as successive ``charge()`` or ``grant()`` calls would apply them; all of a
user's changes become ONE write (its last account and all its entries), so
that a batch is one ``commit_many`` however many items it has. The managers
run the rounds: commit, then re-plan the users whose write met a conflict or
a request id applied before.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import NamedTuple, TypeVar

from creditmeter import rules
from creditmeter._base import ManagerBase, Op
from creditmeter.batches.items import ChargeItem, GrantItem
from creditmeter.events import Event
from creditmeter.exceptions import (
    CreditMeterError,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
)
from creditmeter.models import Account, LedgerEntry
from creditmeter.stores.base import Write

__all__ = [
    "MAX_ITEMS",
    "Outcome",
    "UserPlan",
    "UserState",
    "charge_ops",
    "grant_ops",
    "plan_user",
]

MAX_ITEMS = 10_000
"""The most items one ``charge_many`` or ``grant_many`` call takes."""

Outcome = LedgerEntry | CreditMeterError
"""What became of one item: its entry (or the first one, for a repeat), or its error."""

_Item = TypeVar("_Item", ChargeItem, GrantItem)


def _listed(items: object, kind: type[_Item]) -> list[_Item]:
    """The items as a list, each checked to be a ``kind``; at most ``MAX_ITEMS`` of them."""
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise InvalidInput(f"items must be a list of {kind.__name__}, got {type(items).__name__}")
    listed = list(itertools.islice(items, MAX_ITEMS + 1))
    if len(listed) > MAX_ITEMS:
        raise InvalidInput(f"a batch holds at most {MAX_ITEMS} items, got more")
    for index, item in enumerate(listed):
        if not isinstance(item, kind):
            raise InvalidInput(
                f"item {index}: expected a {kind.__name__}, got {type(item).__name__}"
            )
    return listed


def charge_ops(manager: ManagerBase, items: object) -> tuple[list[ChargeItem], list[Op]]:
    """Check every item as ``charge()`` checks its arguments; the items and their ops."""
    listed = _listed(items, ChargeItem)
    return listed, _ops(
        listed,
        lambda item: manager._charge_op(  # noqa: SLF001 - the managers' shared helpers
            item.user_id,
            item.amount,
            model=item.model,
            usage=item.usage,
            incomplete=item.incomplete,
            strict=item.strict,
            request_id=item.request_id,
            metadata=item.metadata,
        ),
    )


def grant_ops(manager: ManagerBase, items: object) -> tuple[list[GrantItem], list[Op]]:
    """Check every item as ``grant()`` checks its arguments; the items and their ops."""
    listed = _listed(items, GrantItem)
    return listed, _ops(
        listed,
        lambda item: manager._grant_op(  # noqa: SLF001 - the managers' shared helpers
            item.user_id,
            item.amount,
            request_id=item.request_id,
            reason=item.reason,
            metadata=item.metadata,
            expires_at=item.expires_at,
            priority=item.priority,
        ),
    )


def _ops(listed: list[_Item], make: Callable[[_Item], Op]) -> list[Op]:
    """Each item's op; a bad item raises ``InvalidInput`` naming its index."""
    ops = []
    for index, item in enumerate(listed):
        try:
            ops.append(make(item))
        except InvalidInput as exc:  # noqa: PERF203 - raised once, naming the item
            raise InvalidInput(f"item {index}: {exc}") from None
    return ops


class UserState:
    """One user of a batch between rounds: the items left, and what is known of the store.

    ``base`` is the account the next plan starts from: the last one seen,
    one read or reported by a conflict (``fresh``), or ``None`` guessed for a
    user this manager has not seen (``guessed``: a conflict then only tells
    the stored account, as a load would, and costs no retry).
    """

    __slots__ = (
        "base",
        "conflicts",
        "found",
        "fresh",
        "guessed",
        "indices",
        "look_up",
        "missing",
        "reload",
        "user_id",
    )

    def __init__(self, user_id: str, seen: Account | None) -> None:
        self.user_id = user_id
        self.indices: list[int] = []  # the user's items not settled yet, in order
        self.base = seen
        self.fresh = False
        self.guessed = seen is None
        self.reload = False  # load the account before the next plan
        self.look_up: set[str] = set()  # request ids to look up before the next plan
        self.found: dict[str, LedgerEntry] = {}  # request ids known applied, with their entry
        self.missing: set[str] = set()  # request ids known not applied
        self.conflicts = 0

    def loaded(self, account: Account | None) -> None:
        """The account was read from the store (or reported by it) just now."""
        self.base = account
        self.fresh = True
        self.guessed = False
        self.reload = False

    def request_ids(self, ops: list[Op]) -> set[str]:
        """The request ids of the items left that are not known either way."""
        found, missing = self.found, self.missing
        return {
            request
            for request in (ops[index].request_id for index in self.indices)
            if request is not None and request not in found and request not in missing
        }


class UserPlan(NamedTuple):
    """One user's items planned in order on one account.

    ``write`` commits the changes (``None``: nothing to write); ``changes``
    and ``settled`` say what becomes of each item once it has. ``stale``: an
    item was refused on an account not known to be current (read it, plan
    again); ``look_up``: refused strict items whose request ids must be
    looked up first (a refused repeat gets its first entry, as ``charge()``).
    """

    write: Write | None
    changes: dict[int, rules.Change]
    settled: dict[int, Outcome]
    stale: bool
    look_up: set[str]


def plan_user(ops: list[Op], state: UserState, now: datetime) -> UserPlan:
    """Plan the user's items left in order, as successive single calls would apply them."""
    account = state.base
    entries: list[LedgerEntry] = []
    made: dict[str, LedgerEntry] = {}  # request ids applied by this plan
    changes: dict[int, rules.Change] = {}
    settled: dict[int, Outcome] = {}
    stale = False
    look_up: set[str] = set()
    for index in state.indices:
        op = ops[index]
        request = op.request_id
        first = None
        if request is not None:
            first = made.get(request) or state.found.get(request)
        if first is not None:
            attempted = (op.lenient or op.plan)(account, now)
            try:
                settled[index] = rules.replay(first, attempted.entry)
            except IdempotencyConflict as conflict:
                settled[index] = conflict
            continue
        try:
            change = op.plan(account, now)
        except (InsufficientBalance, InvalidInput) as refused:
            # InvalidInput: a rule's own refusal (an expiry passed since the check, too many blocks)
            stale = _refused(refused, op, state, look_up) or stale
            settled[index] = refused
            continue
        account = change.account
        entries.extend(change.entries)
        changes[index] = change
        if request is not None:
            made[request] = change.entry
    write = None
    if entries:
        assert account is not None  # a change always holds its account
        base = state.base
        write = Write(account, tuple(entries), None if base is None else base.version)
    return UserPlan(write, changes, settled, stale, look_up)


def _refused(refused: CreditMeterError, op: Op, state: UserState, look_up: set[str]) -> bool:
    """Note what a refused item needs; whether the plan was made from a stale account."""
    if not isinstance(refused, InsufficientBalance):
        return False
    if not state.fresh:
        return True
    request = op.request_id
    if request is not None and op.lenient is not None and request not in state.missing:
        look_up.add(request)
    return False


def group(ops: list[Op], seen: Callable[[str], Account | None]) -> dict[str, UserState]:
    """The batch's users, in order of first appearance, each with its items in order."""
    users: dict[str, UserState] = {}
    for index, op in enumerate(ops):
        state = users.get(op.user_id)
        if state is None:
            state = users[op.user_id] = UserState(op.user_id, seen(op.user_id))
        state.indices.append(index)
    return users


def in_order(per_item: list[list[Event]]) -> list[Event]:
    """Every item's events, item after item."""
    return [event for events in per_item for event in events]
