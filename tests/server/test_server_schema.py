"""Schemathesis over ``/api/openapi.json``: no generated request gets a 5xx.

Every operation is called with requests generated from the schema
(valid ones, and schemathesis' coverage phase of boundary and invalid
values), with the admin token, against the app over a real in-memory store;
the only check is that the server never answers 5xx. Examples are kept few
so the whole run stays within seconds.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from server_helpers import ADMIN, START

from creditmeter import AsyncBalanceManager, AsyncMemoryStore, BalanceConfig
from creditmeter.server import create_app

APP = create_app(
    AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True, start_balance=START)),
    admin_token=ADMIN,
)
schema = schemathesis.openapi.from_asgi("/api/openapi.json", APP)


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case):
    case.call_and_validate(
        headers={"Authorization": f"Bearer {ADMIN}"}, checks=[not_a_server_error]
    )
