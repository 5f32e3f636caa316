"""on_event: typed events after commits and refusals; per-user refill settings; env config.

Inputs tried: charges, grants, refills, holds settled and refused, a balance
falling through the low-balance threshold twice (and one that stays below),
a callback that raises, conflicts between two managers; refill settings set,
changed and reset; CHECK_BALANCE / START_BALANCE with and without a YAML
overlay, a YAML without a balance section, a bad START_BALANCE.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from decimal import Decimal

import pytest

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceConfig,
    BalanceManager,
    Charged,
    ConfigError,
    ConflictRetried,
    Denied,
    EntryKind,
    Granted,
    InsufficientBalance,
    InvalidInput,
    LowBalance,
    Refilled,
    RefillSettings,
    load_config,
)


@pytest.fixture
def heard():
    return []


@pytest.fixture
def loud(store, clock, heard):
    config = BalanceConfig(
        enabled=True,
        start_balance=1000,
        auto_refill_enabled=True,
        refill_interval_value=1,
        refill_interval_unit="days",
        refill_amount=500,
    )
    return BalanceManager(
        store, config, clock=clock, on_event=heard.append, low_balance_threshold=100
    )


def test_events_follow_commits(loud, heard, clock):
    grant = loud.grant("u", 5)
    charge = loud.charge("u", 10)
    assert heard == [
        Granted(user_id="u", entry=grant, duration=heard[0].duration),
        Charged(user_id="u", entry=charge, duration=heard[1].duration),
    ]
    assert all(event.duration >= 0 for event in heard)
    loud.set_balance("u", 0)
    clock.advance(timedelta(days=1))
    refill = loud.maybe_refill("u")
    assert isinstance(heard[-1], Refilled)
    assert heard[-1].entry == refill


def test_low_balance_fires_once_per_crossing(loud, heard):
    loud.charge("u", 850)  # 1000 -> 150: still above
    loud.charge("u", 60)  # 150 -> 90: crossed
    loud.charge("u", 10)  # stays below: no new event
    loud.grant("u", 500)  # back above
    loud.charge("u", 500)  # crossed again
    lows = [event for event in heard if isinstance(event, LowBalance)]
    assert lows == [
        LowBalance(user_id="u", balance=Decimal(90), threshold=Decimal(100)),
        LowBalance(user_id="u", balance=Decimal(80), threshold=Decimal(100)),
    ]


def test_denials_are_events(loud, heard):
    with pytest.raises(InsufficientBalance):
        loud.require("u", 5000)
    with pytest.raises(InsufficientBalance):
        loud.charge("u", 5000, strict=True)
    with pytest.raises(InsufficientBalance):
        loud.hold("u", 5000)
    denied = [event for event in heard if isinstance(event, Denied)]
    assert len(denied) == 3
    assert {event.cost for event in denied} == {Decimal(5000)}
    assert all(event.available == 1000 for event in denied)


def test_a_failing_callback_is_logged_and_never_breaks_a_charge(store, caplog):
    def explode(event):
        raise RuntimeError("dashboard down")

    manager = BalanceManager(store, BalanceConfig(enabled=True), on_event=explode)
    with caplog.at_level(logging.ERROR, logger="creditmeter"):
        entry = manager.charge("u", 1)
    assert entry.amount == -1
    assert "on_event callback failed" in caplog.text
    assert manager.balance("u") == 19999


def test_conflicts_are_events(store_factory, config):
    heard = []
    first = BalanceManager(store_factory(), config, on_event=heard.append)
    second = BalanceManager(store_factory(), config)
    first.charge("u", 1)
    second.charge("u", 1)
    first.charge("u", 1)  # from a stale account: loses once, then retries
    assert ConflictRetried(user_id="u") in heard
    assert first.balance("u") == 20000 - 3


def test_async_manager_events():
    async def main():
        heard = []
        async with AsyncBalanceManager(
            AsyncMemoryStore(), BalanceConfig(enabled=True), on_event=heard.append
        ) as meter:
            held = await meter.hold("u", 10)
            await meter.settle(held, 7)
            with pytest.raises(InsufficientBalance):
                await meter.require("u", 10**6)
        return heard

    heard = asyncio.run(main())
    assert [type(event) for event in heard] == [Charged, Denied]
    assert heard[0].entry.amount == -7


def test_bad_event_options(store):
    with pytest.raises(InvalidInput):
        BalanceManager(store, on_event="print")
    with pytest.raises(InvalidInput):
        BalanceManager(store, low_balance_threshold=-1)


# --- per-user refill settings -------------------------------------------------------


def test_configure_refill_overrides_and_resets(manager, clock):
    own = RefillSettings(enabled=True, interval_value=1, interval_unit="hours", amount=Decimal(7))
    account = manager.configure_refill("u", own)
    assert account.refill == own
    entry = manager.ledger("u")[-1]
    assert entry.kind is EntryKind.ADJUST
    assert entry.amount == 0
    assert entry.metadata == {"refill": "enabled, 7 every 1 hours"}
    manager.set_balance("u", 0)
    clock.advance(timedelta(hours=1))
    assert manager.maybe_refill("u").amount == 7  # the config has auto refill off
    assert manager.configure_refill("u", None).refill is None
    assert manager.ledger("u")[-1].metadata == {"refill": "follow the config"}
    clock.advance(timedelta(hours=1))
    assert manager.maybe_refill("u") is None
    assert sum(e.amount for e in manager.ledger("u")) == manager.balance("u")


def test_configure_refill_refuses_other_things(manager):
    with pytest.raises(InvalidInput):
        manager.configure_refill("u", {"enabled": True})
    assert manager.users() == []


# --- LibreChat's environment --------------------------------------------------------


def test_from_env_reads_the_legacy_variables():
    assert BalanceConfig.from_env({}) == BalanceConfig()
    config = BalanceConfig.from_env({"CHECK_BALANCE": "True ", "START_BALANCE": "750"})
    assert config.enabled
    assert config.start_balance == 750
    assert not BalanceConfig.from_env({"CHECK_BALANCE": "yes"}).enabled  # only "true" is true
    with pytest.raises(ConfigError, match="START_BALANCE"):
        BalanceConfig.from_env({"START_BALANCE": "lots"})


def test_load_config_overlays_the_yaml_on_the_environment(tmp_path):
    env = {"CHECK_BALANCE": "true", "START_BALANCE": "500"}
    path = tmp_path / "librechat.yaml"
    path.write_text("version: 1.2.1\nbalance:\n  startBalance: 42\n  autoRefillEnabled: true\n")
    config = load_config(path, env=env)
    assert config.enabled  # from the environment
    assert config.start_balance == 42  # the YAML wins
    assert config.auto_refill_enabled
    path.write_text("version: 1.2.1\nendpoints: {}\n")
    assert load_config(path, env=env).start_balance == 500
    assert load_config(env={}) == BalanceConfig()
    path.write_text("balance:\n  enabled: false\n  start_balance: 3\n")
    overlaid = load_config(path, env=env)
    assert not overlaid.enabled
    assert overlaid.start_balance == 3
