"""register_store: a third-party store opens by URL, sync and async, like the bundled ones."""

from __future__ import annotations

import asyncio

import pytest

import creditmeter.stores
from creditmeter import BalanceManager, ConfigError
from creditmeter._urls import redact
from creditmeter.stores import (
    AsyncMemoryStore,
    MemoryStore,
    open_async_store,
    open_store,
    register_store,
)

BUNDLED = ("memory", "sqlite", "redis", "rediss", "postgresql", "postgres")


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Each test registers into a copy of the registry, thrown away afterwards."""
    copy = dict(creditmeter.stores._OPENERS)
    monkeypatch.setattr(creditmeter.stores, "_OPENERS", copy)
    return copy


def memory(_url: str) -> MemoryStore:
    return MemoryStore()


def async_memory(_url: str) -> AsyncMemoryStore:
    return AsyncMemoryStore()


class Opened:
    """Openers backed by the memory stores, remembering the URLs they were given."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def sync(self, url: str) -> MemoryStore:
        self.urls.append(url)
        return MemoryStore()

    def async_(self, url: str) -> AsyncMemoryStore:
        self.urls.append(url)
        return AsyncMemoryStore()


def test_a_registered_scheme_opens_sync():
    opened = Opened()
    register_store("acme", opened.sync, opened.async_)
    with BalanceManager(open_store("acme://db.example/credits")) as meter:
        meter.grant("alice", 5)
        assert meter.balance("alice") == 5
    assert opened.urls == ["acme://db.example/credits"]  # the whole URL, as written


def test_a_registered_scheme_opens_async():
    opened = Opened()
    register_store("acme+tls", opened.sync, opened.async_)

    async def main():
        store = open_async_store("acme+tls://db.example/credits")
        assert isinstance(store, AsyncMemoryStore)
        assert await store.users() == []
        await store.aclose()

    asyncio.run(main())
    assert opened.urls == ["acme+tls://db.example/credits"]


def test_scheme_matching_ignores_case():
    opened = Opened()
    register_store("acme", opened.sync, opened.async_)
    open_store("ACME://x").close()
    open_store("Acme://y").close()
    assert opened.urls == ["ACME://x", "Acme://y"]


@pytest.mark.parametrize(
    "scheme", ["", "Acme", "1acme", "+acme", "ac me", "acme://", "acme:", "ac_me", "äcme", 7, None]
)
def test_a_bad_scheme_is_refused(scheme):
    with pytest.raises(ConfigError, match="scheme is a lowercase letter"):
        register_store(scheme, memory, None)


@pytest.mark.parametrize("scheme", ["a", "acme", "acme+tls", "x-y.z", "s3"])
def test_every_valid_scheme_is_taken(scheme, registry):
    register_store(scheme, memory, None)
    assert scheme in registry


def test_a_registered_scheme_is_refused_twice(registry):
    opened = Opened()
    register_store("acme", opened.sync, None)
    with pytest.raises(ConfigError, match="acme:// is already registered; pass replace=True"):
        register_store("acme", memory, None)
    open_store("acme://").close()
    assert opened.urls == ["acme://"]  # still the first one
    register_store("acme", memory, None, replace=True)
    open_store("acme://").close()
    assert opened.urls == ["acme://"]  # the second one opened it


@pytest.mark.parametrize("scheme", BUNDLED)
def test_a_bundled_scheme_is_replaced_only_when_asked(scheme):
    opened = Opened()
    with pytest.raises(ConfigError, match="already registered"):
        register_store(scheme, opened.sync, opened.async_)
    register_store(scheme, opened.sync, opened.async_, replace=True)
    open_store(f"{scheme}://anything").close()
    assert opened.urls == [f"{scheme}://anything"]


def test_the_bundled_schemes_are_registered(registry):
    assert set(BUNDLED) <= set(registry)


def test_a_missing_sync_opener_is_a_config_error():
    register_store("aio", None, async_memory)
    with pytest.raises(ConfigError, match=r"aio:// store has no sync flavour.*open_async_store"):
        open_store("aio://x")

    async def main():
        await open_async_store("aio://x").aclose()

    asyncio.run(main())


def test_a_missing_async_opener_is_a_config_error():
    register_store("synconly", memory, None)
    with pytest.raises(ConfigError, match=r"synconly:// store has no async flavour.*open_store"):
        open_async_store("synconly://x")
    open_store("synconly://x").close()


def test_two_missing_openers_are_refused(registry):
    with pytest.raises(ConfigError, match="needs an opener, an async_opener or both"):
        register_store("nothing", None, None)
    assert "nothing" not in registry


@pytest.mark.parametrize(("sync", "async_"), [("not callable", None), (None, 42)])
def test_an_opener_must_be_callable(sync, async_):
    with pytest.raises(ConfigError, match="must be callable or None"):
        register_store("acme", sync, async_)


def test_an_opener_raising_config_error_reaches_the_caller():
    def refuse(url: str) -> MemoryStore:
        raise ConfigError(f"acme wants a host, got {url!r}")

    register_store("acme", refuse, None)
    with pytest.raises(ConfigError, match="acme wants a host"):
        open_store("acme://")


def test_the_unknown_scheme_error_lists_registered_schemes_and_hides_the_password():
    register_store("acme", memory, None)
    for opener in (open_store, open_async_store):
        with pytest.raises(ConfigError) as caught:
            opener("other+db://admin:hunter2@db.example/x")
        message = str(caught.value)
        assert "hunter2" not in message
        assert "unknown store URL 'other+db://admin:***@db.example/x'" in message
        assert "acme://" in message
        assert "memory://" in message


def test_redact_hides_the_password_of_a_third_party_url():
    assert creditmeter.stores.redact is redact  # the old name still imports
    assert redact("acme://admin:hunter2@db.example/x") == "acme://admin:***@db.example/x"
    assert redact("acme+tls://:hunter2@[db") == "acme+tls://:***@[db"
