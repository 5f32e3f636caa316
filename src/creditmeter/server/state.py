"""What the API and the console share: the manager, the tokens, and each operation once.

Every write goes through ``ServerState`` so the API and the console's forms
record the same thing: the actor (the role of the token that asked, and
whether it came through the API or the console) and the reason, in the
entry's metadata where the manager's method takes metadata. Reads never open
an account (a ``GET`` must not write): they load what the store holds.
"""

from __future__ import annotations

from contextlib import aclosing
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import attrs

from creditmeter import _validate, rules
from creditmeter.aio import AsyncBalanceManager
from creditmeter.config import IntervalUnit, RefillSettings
from creditmeter.exceptions import InvalidInput
from creditmeter.models import Account, BalanceCheck, Hold, LedgerEntry
from creditmeter.server.errors import ApiError
from creditmeter.server.security import LoginThrottle, Role, Sessions, Tokens
from creditmeter.usage import TokenUsage

__all__ = ["MAX_LEDGER_DEPTH", "Actor", "ServerState", "parse_amount"]

MAX_LEDGER_DEPTH = 100_000
"""How far back the console pages one user's ledger (newest first)."""
_AMOUNT_CHARS = frozenset("0123456789.")
_ZERO = Decimal(0)


def parse_amount(text: object, *, name: str = "amount") -> Decimal:
    """A decimal string (``"1500"``, ``"0.25"``) as a Decimal; anything else is ``InvalidInput``.

    Only digits and one point: no sign, exponent, NaN, infinity, spaces or
    thousands separators. The manager checks the range.
    """
    if not isinstance(text, str) or not text or len(text) > 64:
        raise InvalidInput(f'{name} must be a decimal string such as "1500" or "0.25"')
    if not set(text) <= _AMOUNT_CHARS or text.count(".") > 1 or text in {".", ""}:
        raise InvalidInput(f'{name} must be a decimal string such as "1500" or "0.25"')
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the characters were checked
        raise InvalidInput(f"{name} is not a number") from None


@attrs.frozen(kw_only=True)
class Actor:
    """Who asked for a write: the token's role, and the way in (``"api"`` or ``"console"``)."""

    role: Role
    via: Literal["api", "console"]

    def metadata(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """``extra`` with ``actor`` and ``via`` set (they win over the caller's own keys)."""
        return {**(extra or {}), "actor": self.role.value, "via": self.via}


@attrs.define(kw_only=True)
class ServerState:
    """The manager and the security parts one app uses."""

    meter: AsyncBalanceManager
    tokens: Tokens
    sessions: Sessions
    throttle: LoginThrottle

    def now(self) -> datetime:
        """The manager's clock."""
        return self.meter.clock()

    # --- reads -----------------------------------------------------------------

    async def stored(self, user_id: str) -> Account | None:
        """The user's account as stored (open holds only), or ``None``; opens nothing."""
        account = await self.meter.store.load(_validate.user_id(user_id))
        return None if account is None else rules.open_holds(account, self.now())

    async def users_page(
        self, *, prefix: str | None, after: str | None, limit: int
    ) -> tuple[list[Account], str | None]:
        """Up to ``limit`` accounts in id order after ``after`` whose ids start with ``prefix``.

        Returns the accounts and the cursor of the next page (``None`` at the
        end). Reads ``limit + 1`` ids from ``iter_users``: never all users.
        """
        if prefix is not None:
            _validate.user_id(prefix)
        start = after
        ids: list[str] = []
        if prefix is not None and (start is None or start < prefix):
            if await self.meter.store.load(prefix) is not None:
                ids.append(prefix)
            start = prefix
        if len(ids) <= limit:
            async with aclosing(
                self.meter.iter_users(after=start, page_size=limit + 1)  # type: ignore[type-var]
            ) as found:
                async for user_id in found:
                    if prefix is not None and not user_id.startswith(prefix):
                        break
                    ids.append(user_id)
                    if len(ids) > limit:
                        break
        more = len(ids) > limit
        ids = ids[:limit]
        accounts = [account for user_id in ids if (account := await self.stored(user_id))]
        return accounts, (ids[-1] if more and ids else None)

    async def ledger_newest(
        self, user_id: str, *, skip: int, limit: int
    ) -> tuple[list[LedgerEntry], bool]:
        """``limit`` entries of the user's ledger, newest first, after the newest ``skip``.

        Returns the entries and whether older ones remain.
        """
        if not 0 <= skip <= MAX_LEDGER_DEPTH:
            raise InvalidInput(f"older must be in 0..{MAX_LEDGER_DEPTH}")
        found = await self.meter.ledger(user_id, limit=skip + limit + 1)
        newest = found[::-1]
        return newest[skip : skip + limit], len(newest) > skip + limit

    # --- admin writes ------------------------------------------------------------

    async def grant(
        self,
        actor: Actor,
        user_id: str,
        amount: str,
        *,
        reason: str,
        request_id: str | None = None,
        expires_at: datetime | None = None,
        priority: int | None = None,
    ) -> LedgerEntry:
        """Grant credits, recording the actor and the reason."""
        return await self.meter.grant(
            user_id,
            parse_amount(amount),
            reason=_reason(reason),
            request_id=request_id,
            metadata=actor.metadata(),
            expires_at=expires_at,
            priority=priority,
        )

    async def set_balance(
        self, actor: Actor, user_id: str, amount: str, *, reason: str, request_id: str | None = None
    ) -> LedgerEntry:
        """Set the balance, recording the actor and the reason."""
        return await self.meter.set_balance(
            user_id,
            parse_amount(amount),
            reason=_reason(reason),
            request_id=request_id,
            metadata=actor.metadata(),
        )

    async def refill(self, actor: Actor, user_id: str, *, reason: str) -> LedgerEntry | None:
        """Apply the user's refill if one is due; its entry (with actor and reason), or ``None``."""
        return await self.meter.maybe_refill(
            user_id, reason=_reason(reason), metadata=actor.metadata()
        )

    async def configure_refill(
        self,
        actor: Actor,
        user_id: str,
        *,
        reason: str,
        reset: bool = False,
        enabled: bool | None = None,
        amount: str | None = None,
        interval_value: int | None = None,
        interval_unit: IntervalUnit | None = None,
    ) -> Account:
        """Give the user their own refill settings (``reset``: follow the config again).

        Values left out keep what applies to the user now (their own or the
        config's). The entry records what the settings became, the actor and
        the reason.
        """
        reason = _reason(reason)
        user_id = _validate.user_id(user_id)
        changes = (enabled, amount, interval_value, interval_unit) != (None, None, None, None)
        if reset and changes:
            raise InvalidInput("reset cannot be combined with other refill settings")
        if not reset and not changes:
            raise InvalidInput("give enabled, amount, interval_value/interval_unit, or reset")
        settings: RefillSettings | None = None
        if not reset:
            stored = await self.meter.store.load(user_id)
            config = self.meter.config
            current = config.refill if stored is None else rules.effective_refill(stored, config)
            settings = RefillSettings(
                enabled=current.enabled if enabled is None else enabled,
                interval_value=current.interval_value if interval_value is None else interval_value,
                interval_unit=current.interval_unit if interval_unit is None else interval_unit,
                amount=current.amount if amount is None else parse_amount(amount),
            )
        account = await self.meter.configure_refill(
            user_id, settings, reason=reason, metadata=actor.metadata()
        )
        return rules.open_holds(account, self.now())

    # --- gateway calls -----------------------------------------------------------

    async def check(
        self,
        user_id: str,
        *,
        cost: str | None = None,
        model: str | None = None,
        input_tokens: int | None = None,
    ) -> BalanceCheck:
        """Tell whether the user can pay; a due refill is applied first."""
        price = None if cost is None else parse_amount(cost, name="cost")
        return await self.meter.check(user_id, price, model=model, input_tokens=input_tokens)

    async def charge(
        self,
        actor: Actor,
        user_id: str,
        *,
        request_id: str,
        amount: str | None = None,
        model: str | None = None,
        usage: TokenUsage | None = None,
        incomplete: bool = False,
        strict: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerEntry:
        """Charge an amount, or the priced usage of a model."""
        return await self.meter.charge(
            user_id,
            None if amount is None else parse_amount(amount),
            model=model,
            usage=usage,
            incomplete=incomplete,
            strict=strict,
            request_id=request_id,
            metadata=actor.metadata(_validate.metadata(metadata)),
        )

    async def hold(
        self,
        user_id: str,
        *,
        request_id: str,
        amount: str | None = None,
        model: str | None = None,
        usage: TokenUsage | None = None,
        ttl: Any = None,
    ) -> Hold:
        """Set credits aside for a call about to run (idempotent by ``request_id``)."""
        extra = {} if ttl is None else {"ttl": ttl}
        return await self.meter.hold(
            user_id,
            None if amount is None else parse_amount(amount),
            model=model,
            usage=usage,
            request_id=request_id,
            **extra,
        )

    async def find_hold(self, user_id: str, hold_id: str) -> Hold:
        """The user's hold ``hold_id`` as stored; a stand-in if it was resolved before.

        A hold that is no longer in the account but was resolved (its
        ``hold:<id>`` request is recorded) gets a stand-in with that id:
        settling or releasing it again replays the first answer. Any other id
        is a 404: a mistyped id must not become a charge. (An expired hold
        still in the account is found and settled, as the manager settles it;
        one that a later write has dropped is answered 404: charge the call.)
        """
        user_id = _validate.user_id(user_id)
        _validate.optional_text(hold_id, name="hold_id", max_length=rules.MAX_HOLD_ID_LENGTH)
        account = await self.meter.store.load(user_id)
        for held in () if account is None else account.holds:
            if held.id == hold_id:
                return held
        if await self.meter.store.find_request(user_id, rules.HOLD_PREFIX + hold_id) is None:
            raise ApiError(
                404,
                f"user {user_id!r} has no hold {hold_id!r}: it was never made, or it expired "
                "and is gone (charge the call instead)",
                "hold_not_found",
                param="hold_id",
            )
        now = self.now()
        return Hold(id=hold_id, user_id=user_id, amount=_ZERO, created_at=now, expires_at=now)

    async def settle(
        self,
        actor: Actor,
        user_id: str,
        hold_id: str,
        *,
        amount: str | None = None,
        model: str | None = None,
        usage: TokenUsage | None = None,
        incomplete: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerEntry:
        """Resolve a hold with the real cost (once: a retry returns the first entry)."""
        held = await self.find_hold(user_id, hold_id)
        return await self.meter.settle(
            held,
            None if amount is None else parse_amount(amount),
            model=model,
            usage=usage,
            incomplete=incomplete,
            metadata=actor.metadata(_validate.metadata(metadata)),
        )

    async def release(self, user_id: str, hold_id: str) -> LedgerEntry:
        """Resolve a hold without a charge."""
        return await self.meter.release(await self.find_hold(user_id, hold_id))


def _reason(value: object) -> str:
    """A required reason: 1..1000 printable characters."""
    text = _validate.optional_text(value, name="reason", max_length=1000, remember=False)
    if text is None or not text.strip():
        raise InvalidInput("a reason is required")
    return text
