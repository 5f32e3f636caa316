"""Another language meters through the JSON API: a Node.js client over a real server.

``node/client.mjs`` (plain Node 20, built-in fetch) checks, charges a model
call's usage, retries that charge with the same request id, holds and settles
(twice), and meets a 402. The test runs it against uvicorn on a loopback
port over an SQLite file, then reads the store back with the Python manager:
one charge for the retried request, the price creditmeter's own pricing
gives, and the balance the client saw.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from live import ADMIN_TOKEN, CONFIG, LiveServer, reader

from creditmeter import EntryKind, Pricing, TokenUsage

CLIENT = Path(__file__).with_name("node") / "client.mjs"
USER = "node-gateway-user"


def node_binary() -> str:
    """The ``node`` command (Node 20 or later), or skip / fail as for a missing service."""
    found = shutil.which("node")
    version = ""
    if found is not None:
        version = subprocess.run(
            [found, "--version"], capture_output=True, text=True, check=False, timeout=30
        ).stdout.strip()
        major = version.lstrip("v").partition(".")[0]
        if major.isdigit() and int(major) >= 20:
            return found
    message = (
        f"the Node.js client test needs node 20 or later (found {version or 'none'}): "
        "apt-get install nodejs"
    )
    if os.environ.get("CREDITMETER_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def test_a_node_client_charges_through_the_api(tmp_path: Path) -> None:
    node = node_binary()
    path = tmp_path / "node.db"
    with LiveServer(path) as server:
        done = subprocess.run(
            [node, str(CLIENT), server.url, ADMIN_TOKEN, USER],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    pricing = Pricing.librechat()

    assert out["check"]["allowed"] is True
    assert Decimal(out["check"]["balance"]) == CONFIG.start_balance

    charge_cost = pricing.cost("gpt-4o-mini", TokenUsage(input=1200, output=350)).total
    assert out["charge"] == out["charge_retry"]  # the retry answers the first charge
    assert out["charge"]["kind"] == "charge"
    assert Decimal(out["charge"]["amount"]) == -charge_cost
    assert out["charge"]["metadata"]["gateway"] == "node"

    assert Decimal(out["hold"]["amount"]) > 0
    assert Decimal(out["held"]) == Decimal(out["hold"]["amount"])
    settle_cost = pricing.cost("gpt-4o", TokenUsage(input=800, output=240)).total
    assert out["settle"] == out["settle_retry"]
    assert Decimal(out["settle"]["amount"]) == -settle_cost

    refused = out["refused"]
    assert refused["status"] == 402
    assert refused["body"]["type"] == "token_balance"
    assert refused["body"]["error"]["code"] == "token_balance"
    assert Decimal(refused["body"]["tokenCost"]) == 10**12

    expected = CONFIG.start_balance - charge_cost - settle_cost
    assert Decimal(out["account"]["balance"]) == expected
    assert out["account"]["held"] == "0"

    with reader(path) as meter:
        ledger = meter.ledger(USER)
        assert meter.balance(USER) == expected
    charges = [e for e in ledger if e.kind is EntryKind.CHARGE]
    assert [e.request_id for e in charges].count("node-call-1") == 1
    assert "node-call-3" not in {e.request_id for e in ledger}
    assert len(charges) == 2
    assert sum(e.amount for e in ledger) == expected
    assert [e["id"] for e in out["ledger"]] == [e.id for e in ledger]
