"""creditmeter: token-credit balances for LLM gateways.

Check a model call against a user's balance before it runs, charge it after
it returns, grant credits and refill them on a schedule, with LibreChat's
``balance`` rules over a pluggable store.
"""

from creditmeter import stores as _stores
from creditmeter._version import __version__
from creditmeter.aio import AsyncBalanceManager
from creditmeter.batches import BatchResult, ChargeItem, GrantItem
from creditmeter.config import BalanceConfig, RefillSettings, RetryPolicy, load_config
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
from creditmeter.exceptions import (
    ConfigError,
    CreditMeterError,
    DuplicateRequest,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
    ReplicationTimeout,
    StoreError,
    VersionConflict,
)
from creditmeter.manager import BalanceManager
from creditmeter.metering import AsyncMeteredStream, MeteredStream, acting_as, metered
from creditmeter.models import Account, BalanceCheck, CreditBlock, EntryKind, Hold, LedgerEntry
from creditmeter.pricing import Cost, ModelRate, Pricing, Rates
from creditmeter.queries import EntryPage, UsageRow
from creditmeter.reservations import AsyncReservation, Reservation
from creditmeter.stores import (
    AsyncBalanceStore,
    AsyncMemoryStore,
    AsyncSQLiteStore,
    BalanceStore,
    MemoryStore,
    SQLiteStore,
    open_async_store,
    open_store,
    register_store,
)
from creditmeter.usage import StreamUsage, TokenUsage, usage_from_stream


def __getattr__(name: str) -> object:
    """The Redis and PostgreSQL store classes, imported on first use (their drivers are extras)."""
    if name in _LAZY_STORES:
        return getattr(_stores, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_LAZY_STORES = frozenset({"AsyncPostgresStore", "AsyncRedisStore", "PostgresStore", "RedisStore"})

__all__ = [
    "Account",
    "AsyncBalanceManager",
    "AsyncBalanceStore",
    "AsyncMemoryStore",
    "AsyncMeteredStream",
    "AsyncPostgresStore",
    "AsyncRedisStore",
    "AsyncReservation",
    "AsyncSQLiteStore",
    "BalanceCheck",
    "BalanceConfig",
    "BalanceManager",
    "BalanceStore",
    "BatchResult",
    "ChargeItem",
    "Charged",
    "ConfigError",
    "ConflictRetried",
    "Cost",
    "CreditBlock",
    "CreditMeterError",
    "Denied",
    "DuplicateRequest",
    "EntryKind",
    "EntryPage",
    "Event",
    "Expired",
    "GrantItem",
    "Granted",
    "Hold",
    "IdempotencyConflict",
    "InsufficientBalance",
    "InvalidInput",
    "LedgerEntry",
    "LowBalance",
    "MemoryStore",
    "MeteredStream",
    "ModelRate",
    "PostgresStore",
    "Pricing",
    "Rates",
    "RedisStore",
    "RefillSettings",
    "Refilled",
    "ReplicationTimeout",
    "Reservation",
    "RetryPolicy",
    "SQLiteStore",
    "StoreError",
    "StreamUsage",
    "TokenUsage",
    "Unmetered",
    "UsageRow",
    "VersionConflict",
    "__version__",
    "acting_as",
    "load_config",
    "metered",
    "open_async_store",
    "open_store",
    "register_store",
    "usage_from_stream",
]
