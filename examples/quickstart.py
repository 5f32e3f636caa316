"""creditmeter in one page: open users, charge, grant, refill, refuse.

Runs on an SQLite file in a temporary folder, with a fake clock so that a
month can pass in a line. Run it with ``python examples/quickstart.py``.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

from creditmeter import BalanceConfig, BalanceManager, InsufficientBalance, SQLiteStore
from creditmeter.testing import FakeClock

config = BalanceConfig(
    enabled=True,
    start_balance=20_000,  # LibreChat's default: 20,000 credits = $0.02
    auto_refill_enabled=True,
    refill_interval_value=30,
    refill_interval_unit="days",
    refill_amount=10_000,
)
clock = FakeClock()

with tempfile.TemporaryDirectory() as folder:
    store = SQLiteStore(Path(folder) / "credits.db")
    with BalanceManager(store, config, clock=clock) as meter:
        print("alice opens with", meter.balance("alice"))
        print("bob opens with  ", meter.balance("bob"))

        meter.charge("alice", 1_500, request_id="call-1")
        meter.charge("alice", 1_500, request_id="call-1")  # a retry: charged once
        meter.charge("bob", 19_000)
        meter.grant("bob", 2_500, reason="support ticket 42")

        try:
            meter.require("bob", 5_000)
        except InsufficientBalance as refused:
            print("bob refused:", refused)
            print("  LibreChat payload:", refused.to_dict())

        meter.charge("bob", 4_000)  # spends what is left; the balance stops at 0
        clock.advance(timedelta(days=30))
        refill = meter.maybe_refill("bob")
        print("after 30 days bob is refilled by", refill.amount if refill else 0)

        for user in meter.users():
            print(f"\n{user}: balance {meter.balance(user)}")
            for entry in meter.ledger(user):
                print(
                    f"  {entry.at:%Y-%m-%d}  {entry.kind.value:<7} {entry.amount:>+8}"
                    f"  -> {entry.balance_after}"
                )
