"""OpenTelemetry metrics for a manager's events: ``on_event=OTelMetrics()``.

Needs the ``otel`` extra (``pip install 'creditmeter[otel]'``, which brings
``opentelemetry-api``); export them by configuring an OpenTelemetry SDK
``MeterProvider`` as usual. ``creditmeter`` itself never imports
OpenTelemetry, and this module imports it only when an ``OTelMetrics`` is
made, so ``fan_out`` works without it::

    from creditmeter.integrations.otel import OTelMetrics, fan_out

    meter = BalanceManager(store, config, on_event=fan_out(my_audit_hook, OTelMetrics()))

(``creditmeter.otel``, this module's first home, still exports the same names.)

The instruments, named under ``prefix`` (``creditmeter`` by default):

========================================  ===========  ==================================
name                                      unit         attributes
========================================  ===========  ==================================
``creditmeter.credits.charged``           ``{credit}`` ``model`` (when the charge has one)
``creditmeter.credits.granted``           ``{credit}``
``creditmeter.credits.refilled``          ``{credit}``
``creditmeter.refills``                   ``{refill}``
``creditmeter.credits.expired``           ``{credit}``
``creditmeter.blocks.expired``            ``{block}``
``creditmeter.denials``                   ``{denial}``
``creditmeter.conflict.retries``          ``{retry}``
``creditmeter.low_balance.crossings``     ``{crossing}``
``creditmeter.calls.unmetered``           ``{call}``     ``operation`` (``charge`` or ``settle``),
                                                       ``model`` (when known)
``creditmeter.operation.duration``        ``s``        ``operation``: ``charge``, ``grant``,
                                                       ``refill`` or ``denied``
========================================  ===========  ==================================

All but the last are counters; the last is a histogram, of the seconds from
the call to its commit (or refusal). ``require()`` does not time its
refusals (their ``Denied.duration`` is 0), so they are counted as denials but
left out of the histogram. Expiries are not timed either: a credit block is
written off by whichever operation comes first after its expiry (or
``meter.expire()``), and that operation is timed as itself.

The two expiry counters follow the ``Expired`` events: ``credits.expired``
adds what was left of each credit block when it expired (what its ``EXPIRE``
entry took off the balance), ``blocks.expired`` counts those blocks (one per
event; a block used up before its expiry writes nothing and is not counted).

Credits are counted as floats: what left (or entered) the balance, so a
charge clamped at zero counts only what was taken, and a charge with
balances disabled counts 0. A float is exact for whole credits up to 2**53
(about 9 * 10**15, above the largest amount creditmeter accepts) and keeps
about 15 significant digits of fractional credits; the ledger, not the
metrics, is the exact record.

User ids are never put on attributes unless ``include_user_id=True`` (then
as ``user.id`` on every instrument but the histogram): one time series per
user is expensive for a metrics backend and puts personal identifiers in it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING

from creditmeter._version import __version__
from creditmeter.events import (
    Charged,
    ConflictRetried,
    Denied,
    Event,
    Expired,
    Granted,
    LowBalance,
    Refilled,
    Unmetered,
)
from creditmeter.exceptions import InvalidInput

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, Meter, MeterProvider

__all__ = ["DURATION_BUCKETS", "OTelMetrics", "fan_out"]

# The logger's name is the module's old one, which logging configurations may name.
logger = logging.getLogger("creditmeter.otel")

# Seconds: an in-memory charge takes tens of microseconds, a SQLite one about a
# millisecond, a contended networked store can take seconds.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""The histogram's bucket boundaries, given as advice (opentelemetry-api 1.30 or later)."""

# OpenTelemetry's instrument name syntax, less room for the longest suffix used here.
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_./-]{0,200}")


class OTelMetrics:
    """An ``on_event`` callback that records a manager's events as OpenTelemetry metrics.

    ``meter_provider`` defaults to the global one (``opentelemetry.metrics``);
    ``prefix`` starts every instrument name. ``include_user_id=True`` adds a
    ``user.id`` attribute (off by default: see the module docs). One
    instance may serve any number of managers, sync or async, from any
    thread. Events of kinds it does not know are ignored.
    """

    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        *,
        prefix: str = "creditmeter",
        include_user_id: bool = False,
    ) -> None:
        if not isinstance(prefix, str) or _PREFIX.fullmatch(prefix) is None:
            raise InvalidInput(
                f"prefix must start with a letter and hold only letters, digits and _./-, "
                f"got {prefix!r}"
            )
        if type(include_user_id) is not bool:
            raise InvalidInput(f"include_user_id must be True or False, got {include_user_id!r}")
        meter = _meter(meter_provider)
        self.prefix = prefix
        self.include_user_id = include_user_id
        self.charged: Counter = meter.create_counter(
            f"{prefix}.credits.charged",
            unit="{credit}",
            description="Credits taken from balances by charges and settled holds.",
        )
        self.granted: Counter = meter.create_counter(
            f"{prefix}.credits.granted",
            unit="{credit}",
            description="Credits added to balances by grants.",
        )
        self.refilled: Counter = meter.create_counter(
            f"{prefix}.credits.refilled",
            unit="{credit}",
            description="Credits added to balances by automatic refills.",
        )
        self.refills: Counter = meter.create_counter(
            f"{prefix}.refills",
            unit="{refill}",
            description="Automatic refills applied.",
        )
        self.expired: Counter = meter.create_counter(
            f"{prefix}.credits.expired",
            unit="{credit}",
            description="Credits written off when the credit blocks holding them expired.",
        )
        self.expiries: Counter = meter.create_counter(
            f"{prefix}.blocks.expired",
            unit="{block}",
            description="Credit blocks that expired with credits left (Expired events).",
        )
        self.denials: Counter = meter.create_counter(
            f"{prefix}.denials",
            unit="{denial}",
            description="Strict charges, holds and require() calls refused for want of credits.",
        )
        self.retries: Counter = meter.create_counter(
            f"{prefix}.conflict.retries",
            unit="{retry}",
            description="Writes retried after losing a compare-and-set to another writer.",
        )
        self.unmetered: Counter = meter.create_counter(
            f"{prefix}.calls.unmetered",
            unit="{call}",
            description="Calls served whose charge the store could not take (Unmetered events).",
        )
        self.low_balance: Counter = meter.create_counter(
            f"{prefix}.low_balance.crossings",
            unit="{crossing}",
            description="Balances that fell below the low-balance threshold.",
        )
        self.duration: Histogram = _histogram(
            meter,
            f"{prefix}.operation.duration",
            unit="s",
            description="How long charges, grants, refills and refusals took.",
        )

    def __call__(self, event: Event) -> None:
        """Record one event."""
        if isinstance(event, Charged):
            attributes = self._user(event.user_id)
            if event.entry.model is not None:
                attributes["model"] = event.entry.model
            self.charged.add(_credits(-event.entry.amount), attributes)
            self._took("charge", event.duration)
        elif isinstance(event, Granted):
            self.granted.add(_credits(event.entry.amount), self._user(event.user_id))
            self._took("grant", event.duration)
        elif isinstance(event, Refilled):
            attributes = self._user(event.user_id)
            self.refilled.add(_credits(event.entry.amount), attributes)
            self.refills.add(1, attributes)
            self._took("refill", event.duration)
        elif isinstance(event, Expired):
            attributes = self._user(event.user_id)
            self.expired.add(_credits(-event.entry.amount), attributes)
            self.expiries.add(1, attributes)
        else:
            self._count(event)

    def _count(self, event: Event) -> None:
        """Record an event that moves no credits: a refusal, a retry, a crossing, a lost charge."""
        if isinstance(event, Denied):
            self.denials.add(1, self._user(event.user_id))
            self._took("denied", event.duration)
        elif isinstance(event, ConflictRetried):
            self.retries.add(1, self._user(event.user_id))
        elif isinstance(event, LowBalance):
            self.low_balance.add(1, self._user(event.user_id))
        elif isinstance(event, Unmetered):
            attributes = self._user(event.user_id)
            attributes["operation"] = event.operation
            if event.model is not None:
                attributes["model"] = event.model
            self.unmetered.add(1, attributes)

    def __repr__(self) -> str:
        return f"OTelMetrics(prefix={self.prefix!r}, include_user_id={self.include_user_id})"

    def _user(self, user_id: str) -> dict[str, str]:
        return {"user.id": user_id} if self.include_user_id else {}

    def _took(self, operation: str, seconds: float) -> None:
        # A duration of 0 was not measured (``require()`` does not time its refusals).
        if seconds > 0:
            self.duration.record(seconds, {"operation": operation})


def fan_out(*callbacks: Callable[[Event], object] | None) -> Callable[[Event], None]:
    """One ``on_event`` callback that hands each event to every callback given, in order.

    ``None`` is skipped, so a gateway's optional hook can be passed as it is.
    A callback that raises is logged on the ``creditmeter.otel`` logger and
    the rest still hear the event; the combined callback never raises
    ``Exception``.
    """
    hooks: tuple[Callable[[Event], object], ...] = tuple(c for c in callbacks if c is not None)
    for hook in hooks:
        if not callable(hook):
            raise InvalidInput(f"fan_out takes callables taking an event, got {hook!r}")

    def each(event: Event) -> None:
        for hook in hooks:
            try:
                hook(event)
            except Exception:  # noqa: PERF203 - every callback gets the event
                logger.exception(
                    "the on_event callback %r failed on %s", hook, type(event).__name__
                )

    return each


def _meter(provider: MeterProvider | None) -> Meter:
    try:
        from opentelemetry import metrics  # noqa: PLC0415 - the otel extra is optional
    except ImportError as missing:  # pragma: no cover - the test extra installs it
        raise ImportError(
            "creditmeter.otel needs opentelemetry-api: pip install 'creditmeter[otel]'"
        ) from missing
    if provider is None:
        return metrics.get_meter("creditmeter", __version__)
    return provider.get_meter("creditmeter", __version__)


def _histogram(meter: Meter, name: str, *, unit: str, description: str) -> Histogram:
    boundaries: Sequence[float] = DURATION_BUCKETS
    try:
        return meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=boundaries
        )
    except TypeError:  # pragma: no cover - opentelemetry-api before 1.30 takes no advice
        return meter.create_histogram(name, unit=unit, description=description)


def _credits(amount: Decimal) -> float:
    """Credits as a counter takes them: a float, never negative (a counter only grows)."""
    value = float(amount)
    return value if value > 0 else 0.0
