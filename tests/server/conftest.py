"""Fixtures of the server tests: the app over a real store (see ``server_helpers``).

``server`` runs over a ``MemoryStore`` and an SQLite file (``server_kind``);
``memory_server`` over a ``MemoryStore`` only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import ADMIN, READ, Server, open_meter

from creditmeter.server import create_app
from creditmeter.testing import FakeClock


@pytest.fixture(params=["memory", "sqlite"])
def server_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server(server_kind: str, tmp_path: Path, clock: FakeClock) -> Iterator[Server]:
    meter, path = open_meter(server_kind, tmp_path, clock)
    app = create_app(meter, admin_token=ADMIN, read_token=READ)
    with TestClient(app, base_url="http://testserver") as client:
        running = Server(meter, client, path)
        yield running
        running.call(meter.aclose)


@pytest.fixture
def memory_server(tmp_path: Path, clock: FakeClock) -> Iterator[Server]:
    meter, path = open_meter("memory", tmp_path, clock)
    app = create_app(meter, admin_token=ADMIN, read_token=READ)
    with TestClient(app, base_url="http://testserver") as client:
        running = Server(meter, client, path)
        yield running
        running.call(meter.aclose)
