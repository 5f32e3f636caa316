"""creditmeter.otel: OpenTelemetry metrics from a manager's events, read back from the SDK.

Inputs tried: a real manager over a memory store driven through grants to
two users, a charge priced by model, a charge by amount that crosses the
low-balance threshold, a refused strict charge, a hold settled, a charge
clamped at zero, a refill after a day on a fake clock; a conflict between
two managers; an async manager; user ids left off and opted in; a custom
prefix and bad ones; credit blocks that expire (one partly spent, one whole,
one used up before its time, one never expiring), written off by
``expire()`` and lazily by a charge, on a sync and an async manager;
``fan_out`` with a raising callback, ``None`` and a non-callable; importing
creditmeter without touching OpenTelemetry.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
)

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceConfig,
    BalanceManager,
    Charged,
    EntryKind,
    Expired,
    Granted,
    InsufficientBalance,
    InvalidInput,
    MemoryStore,
    TokenUsage,
    Unmetered,
)
from creditmeter.otel import DURATION_BUCKETS, OTelMetrics, fan_out
from creditmeter.testing import FakeClock

CONFIG = BalanceConfig(
    enabled=True,
    start_balance=0,
    auto_refill_enabled=True,
    refill_interval_value=1,
    refill_interval_unit="days",
    refill_amount=500,
    refill_mode="on_interval",
)

UNITS = {
    "creditmeter.credits.charged": "{credit}",
    "creditmeter.credits.granted": "{credit}",
    "creditmeter.credits.refilled": "{credit}",
    "creditmeter.refills": "{refill}",
    "creditmeter.credits.expired": "{credit}",
    "creditmeter.blocks.expired": "{block}",
    "creditmeter.denials": "{denial}",
    "creditmeter.conflict.retries": "{retry}",
    "creditmeter.low_balance.crossings": "{crossing}",
    "creditmeter.operation.duration": "s",
}

EXPIRY = ("creditmeter.credits.expired", "creditmeter.blocks.expired")

Points = dict[frozenset[tuple[str, object]], object]


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield provider
    provider.shutdown()


def exported(reader: InMemoryMetricReader) -> dict[str, Metric]:
    """Every metric the reader collects now, by name; all from the ``creditmeter`` scope."""
    data = reader.get_metrics_data()
    found: dict[str, Metric] = {}
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "creditmeter"
            for metric in scope.metrics:
                assert metric.name not in found
                found[metric.name] = metric
    return found


def values(metric: Metric) -> Points:
    """A sum's data points: attributes -> value."""
    points: Points = {}
    for point in metric.data.data_points:
        assert isinstance(point, NumberDataPoint)
        points[frozenset((point.attributes or {}).items())] = point.value
    return points


def histogram(metric: Metric) -> dict[frozenset[tuple[str, object]], HistogramDataPoint]:
    points = {}
    for point in metric.data.data_points:
        assert isinstance(point, HistogramDataPoint)
        points[frozenset((point.attributes or {}).items())] = point
    return points


def attrs(**pairs: object) -> frozenset[tuple[str, object]]:
    return frozenset(pairs.items())


NONE = attrs()


def drive(manager: BalanceManager, clock: FakeClock) -> None:
    """The scenario every metric test below reads back."""
    manager.grant("alice", 1000)  # alice 1000
    manager.grant("bob", Decimal("250.5"))
    priced = manager.charge(
        "alice", model="gpt-4o-mini", usage=TokenUsage(input=1000, output=500)
    )  # 1000 * 0.15 + 500 * 0.6 = 450: alice 550
    assert priced.amount == -450
    manager.charge("alice", 500)  # alice 50: below the threshold of 100
    with pytest.raises(InsufficientBalance):
        manager.charge("alice", 100, strict=True)
    held = manager.hold("alice", 30)
    manager.settle(held, 20)  # alice 30
    clamped = manager.charge("alice", 80, model="gpt-4o-mini")  # only 30 left to take
    assert (clamped.amount, clamped.cost) == (-30, 80)
    clock.advance(timedelta(days=1))
    refill = manager.maybe_refill("alice")
    assert refill is not None
    assert refill.amount == 500


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_run_is_counted_exactly(provider, reader, clock):
    manager = BalanceManager(
        MemoryStore(),
        CONFIG,
        clock=clock,
        on_event=OTelMetrics(provider),
        low_balance_threshold=100,
    )
    drive(manager, clock)
    found = exported(reader)
    assert set(found) == set(UNITS) - {"creditmeter.conflict.retries", *EXPIRY}
    for name, metric in found.items():
        assert metric.unit == UNITS[name]
        assert metric.description
    assert values(found["creditmeter.credits.charged"]) == {
        attrs(model="gpt-4o-mini"): 450.0 + 30.0,  # what left the balance, not the cost of 80
        NONE: 500.0 + 20.0,
    }
    assert values(found["creditmeter.credits.granted"]) == {NONE: 1250.5}
    assert values(found["creditmeter.credits.refilled"]) == {NONE: 500.0}
    assert values(found["creditmeter.refills"]) == {NONE: 1}
    assert values(found["creditmeter.denials"]) == {NONE: 1}
    assert values(found["creditmeter.low_balance.crossings"]) == {NONE: 1}
    for name in ("credits.charged", "credits.granted", "refills", "denials"):
        assert found["creditmeter." + name].data.is_monotonic
    latency = histogram(found["creditmeter.operation.duration"])
    assert {key: point.count for key, point in latency.items()} == {
        attrs(operation="charge"): 4,
        attrs(operation="grant"): 2,
        attrs(operation="refill"): 1,
        attrs(operation="denied"): 1,
    }
    for point in latency.values():
        assert tuple(point.explicit_bounds) == DURATION_BUCKETS
        assert 0 < point.min <= point.max < 10
        assert sum(point.bucket_counts) == point.count


def test_user_ids_are_left_off_by_default(provider, reader, clock):
    manager = BalanceManager(
        MemoryStore(),
        CONFIG,
        clock=clock,
        on_event=OTelMetrics(provider),
        low_balance_threshold=100,
    )
    drive(manager, clock)
    for metric in exported(reader).values():
        for point in metric.data.data_points:
            for key, value in (point.attributes or {}).items():
                assert key in {"model", "operation"}
                assert "alice" not in str(value)
                assert "bob" not in str(value)


def test_user_ids_are_opt_in(provider, reader, clock):
    metrics = OTelMetrics(provider, include_user_id=True)
    manager = BalanceManager(
        MemoryStore(), CONFIG, clock=clock, on_event=metrics, low_balance_threshold=100
    )
    drive(manager, clock)
    found = exported(reader)
    alice = ("user.id", "alice")
    assert values(found["creditmeter.credits.charged"]) == {
        attrs(model="gpt-4o-mini", **{"user.id": "alice"}): 480.0,
        frozenset({alice}): 520.0,
    }
    assert values(found["creditmeter.credits.granted"]) == {
        frozenset({alice}): 1000.0,
        frozenset({("user.id", "bob")}): 250.5,
    }
    for name in ("credits.refilled", "refills", "denials", "low_balance.crossings"):
        assert set(values(found["creditmeter." + name])) == {frozenset({alice})}
    # The latency histogram stays per operation only, even then.
    latency = histogram(found["creditmeter.operation.duration"])
    assert all(dict(key).keys() == {"operation"} for key in latency)


def test_retried_conflicts_are_counted(provider, reader):
    metrics = OTelMetrics(provider)
    store = MemoryStore()
    first = BalanceManager(store, BalanceConfig(enabled=True), on_event=metrics)
    second = BalanceManager(store, BalanceConfig(enabled=True), on_event=metrics)
    first.charge("u", 1)
    second.charge("u", 1)
    first.charge("u", 1)  # from a stale account: loses once, then retries
    found = exported(reader)
    assert values(found["creditmeter.conflict.retries"]) == {NONE: 1}
    assert found["creditmeter.conflict.retries"].unit == "{retry}"
    assert values(found["creditmeter.credits.charged"]) == {NONE: 3.0}


def test_async_manager(provider, reader):
    async def main() -> None:
        meter = AsyncBalanceManager(
            AsyncMemoryStore(), BalanceConfig(enabled=True), on_event=OTelMetrics(provider)
        )
        await meter.grant("u", 10)
        await meter.charge("u", 4, model="claude-sonnet-4")
        await meter.aclose()

    asyncio.run(main())
    found = exported(reader)
    assert values(found["creditmeter.credits.charged"]) == {attrs(model="claude-sonnet-4"): 4.0}
    assert values(found["creditmeter.credits.granted"]) == {NONE: 10.0}


def test_require_refusals_are_counted_and_timed(provider, reader):
    manager = BalanceManager(
        MemoryStore(), BalanceConfig(enabled=True, start_balance=5), on_event=OTelMetrics(provider)
    )
    with pytest.raises(InsufficientBalance):
        manager.require("u", 6)
    found = exported(reader)
    assert values(found["creditmeter.denials"]) == {NONE: 1}
    timed = histogram(found["creditmeter.operation.duration"])
    assert timed[attrs(operation="denied")].count == 1


def test_prefix(provider, reader):
    manager = BalanceManager(
        MemoryStore(), BalanceConfig(enabled=True), on_event=OTelMetrics(provider, prefix="gw.llm")
    )
    manager.charge("u", Decimal("0.25"))
    found = exported(reader)
    assert set(found) == {"gw.llm.credits.charged", "gw.llm.operation.duration"}
    assert values(found["gw.llm.credits.charged"]) == {NONE: 0.25}


@pytest.mark.parametrize(
    "arguments",
    [
        {"prefix": ""},
        {"prefix": "1st"},
        {"prefix": "has space"},
        {"prefix": "x" * 300},
        {"prefix": None},
        {"include_user_id": "yes"},
    ],
)
def test_bad_arguments(provider, arguments):
    with pytest.raises(InvalidInput):
        OTelMetrics(provider, **arguments)


def test_the_global_provider_is_the_default():
    # Without an SDK configured the global provider is a no-op: recording is harmless.
    metrics = OTelMetrics()
    manager = BalanceManager(MemoryStore(), BalanceConfig(enabled=True), on_event=metrics)
    manager.charge("u", 1)
    assert repr(metrics) == "OTelMetrics(prefix='creditmeter', include_user_id=False)"


def test_fan_out_reaches_every_callback_when_one_raises(provider, reader, caplog):
    heard = []

    def broken(event):
        raise RuntimeError("sink down")

    manager = BalanceManager(
        MemoryStore(),
        BalanceConfig(enabled=True, start_balance=0),
        on_event=fan_out(broken, None, OTelMetrics(provider), heard.append),
    )
    with caplog.at_level(logging.ERROR, logger="creditmeter"):
        grant = manager.grant("u", 5)
        charge = manager.charge("u", 2)
    assert [type(event) for event in heard] == [Granted, Charged]
    assert [event.entry for event in heard] == [grant, charge]
    found = exported(reader)
    assert values(found["creditmeter.credits.granted"]) == {NONE: 5.0}
    assert values(found["creditmeter.credits.charged"]) == {NONE: 2.0}
    # Logged by fan_out itself, once per event; the manager's own guard saw nothing fail.
    failures = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert [record.name for record in failures] == ["creditmeter.otel"] * 2
    assert all(record.exc_info is not None for record in failures)
    assert "failed on Granted" in failures[0].getMessage()
    assert "failed on Charged" in failures[1].getMessage()


def test_fan_out_arguments():
    with pytest.raises(InvalidInput):
        fan_out(print, "not callable")  # type: ignore[arg-type]
    nothing = fan_out(None)
    manager = BalanceManager(MemoryStore(), BalanceConfig(enabled=True), on_event=nothing)
    assert manager.charge("u", 1).amount == -1


def test_importing_creditmeter_leaves_opentelemetry_alone():
    code = (
        "import sys, creditmeter, creditmeter.otel\n"
        "from creditmeter.otel import fan_out\n"
        "fan_out(print)\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unmetered_calls_are_counted_by_operation_and_model(provider, reader):
    metrics = OTelMetrics(provider)
    metrics(Unmetered(user_id="u", operation="charge", error="down", model="gpt-4o"))
    metrics(Unmetered(user_id="u", operation="charge", error="down", model="gpt-4o"))
    metrics(Unmetered(user_id="v", operation="settle", error="down"))
    found = exported(reader)
    assert found["creditmeter.calls.unmetered"].unit == "{call}"
    assert values(found["creditmeter.calls.unmetered"]) == {
        attrs(operation="charge", model="gpt-4o"): 2,
        attrs(operation="settle"): 1,
    }


# --- credit blocks that expire ----------------------------------------------------


def blocks(manager: BalanceManager, clock: FakeClock, user: str = "ann") -> None:
    """Four blocks: 30 (10 of it spent), 12.5 whole, 5 used up, and 7 that never expires."""
    hour = timedelta(hours=1)
    manager.grant(user, 100)
    manager.grant(user, 5, expires_at=clock() + hour, priority=0)
    manager.grant(user, 30, expires_at=clock() + hour, priority=1)
    manager.grant(user, Decimal("12.5"), expires_at=clock() + 2 * hour)
    manager.grant(user, 7, priority=100)
    drew = manager.charge(user, 15)  # all of the 5, then 10 of the 30
    assert [amount for _, amount in drew.drawn] == [5, 10]


def test_expired_credits_and_blocks_are_counted(provider, reader, clock):
    heard: list[object] = []
    manager = BalanceManager(
        MemoryStore(),
        BalanceConfig(enabled=True, start_balance=0),
        clock=clock,
        on_event=fan_out(OTelMetrics(provider), heard.append),
    )
    blocks(manager, clock)
    assert not any(name in exported(reader) for name in EXPIRY)  # nothing expired yet
    clock.advance(timedelta(hours=3))
    written = manager.expire("ann")
    assert sorted(-entry.amount for entry in written) == [Decimal("12.5"), 20]
    assert manager.expire("ann") == []  # once only
    expired = [event for event in heard if isinstance(event, Expired)]
    assert [event.entry for event in expired] == written
    found = exported(reader)
    assert found["creditmeter.credits.expired"].unit == "{credit}"
    assert found["creditmeter.blocks.expired"].unit == "{block}"
    for name in EXPIRY:
        assert found[name].description
        assert found[name].data.is_monotonic
    assert values(found["creditmeter.credits.expired"]) == {NONE: 32.5}
    assert values(found["creditmeter.blocks.expired"]) == {NONE: 2}
    # Expiries are not timed on their own: the histogram has grants and the charge only.
    latency = histogram(found["creditmeter.operation.duration"])
    assert {dict(key)["operation"] for key in latency} == {"grant", "charge"}
    assert manager.balance("ann") == 100 + 7
    assert sum(entry.amount for entry in manager.ledger("ann")) == manager.balance("ann")


def test_an_expiry_written_by_a_charge_is_counted_per_user(provider, reader, clock):
    manager = BalanceManager(
        MemoryStore(),
        BalanceConfig(enabled=True, start_balance=0),
        clock=clock,
        on_event=OTelMetrics(provider, include_user_id=True),
    )
    blocks(manager, clock, "ann")
    blocks(manager, clock, "ben")
    clock.advance(timedelta(minutes=90))  # the 30 block is due; the 12.5 one is not
    charged = manager.charge("ann", 1)  # writes ann's expiry first, then draws 12.5's block
    kinds = [entry.kind for entry in manager.ledger("ann")[-2:]]
    assert kinds == [EntryKind.EXPIRE, EntryKind.CHARGE]
    assert charged.amount == -1
    found = exported(reader)
    ann = frozenset({("user.id", "ann")})
    assert values(found["creditmeter.credits.expired"]) == {ann: 20.0}
    assert values(found["creditmeter.blocks.expired"]) == {ann: 1}
    clock.advance(timedelta(hours=1))
    manager.expire("ben")  # both of ben's dated blocks with credits left
    found = exported(reader)
    ben = frozenset({("user.id", "ben")})
    assert values(found["creditmeter.credits.expired"]) == {ann: 20.0, ben: 32.5}
    assert values(found["creditmeter.blocks.expired"]) == {ann: 1, ben: 2}


def test_async_expiry_is_counted(provider, reader, clock):
    async def main() -> None:
        meter = AsyncBalanceManager(
            AsyncMemoryStore(),
            BalanceConfig(enabled=True, start_balance=0),
            clock=clock,
            on_event=OTelMetrics(provider),
        )
        await meter.grant("u", Decimal("0.25"), expires_at=clock() + timedelta(seconds=1))
        clock.advance(timedelta(seconds=1))  # due at its expires_at, not after
        assert [entry.amount for entry in await meter.expire("u")] == [Decimal("-0.25")]
        await meter.aclose()

    asyncio.run(main())
    found = exported(reader)
    assert values(found["creditmeter.credits.expired"]) == {NONE: 0.25}
    assert values(found["creditmeter.blocks.expired"]) == {NONE: 1}
