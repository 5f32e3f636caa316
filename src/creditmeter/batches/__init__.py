"""Batches: many charges or grants, for many users, in one store round trip or transaction.

``meter.charge_many(items)`` and ``meter.grant_many(items)`` take
``ChargeItem``s or ``GrantItem``s and return one ``BatchResult`` per item, in
order, with the same entries, errors and events as the same calls made one
by one. For replaying logs, offline metering and importing usage.

``_plan`` holds what both managers decide alike; ``_async`` holds
``AsyncBatchMixin``, written by hand, and ``_sync`` holds ``BatchMixin``,
generated from it by ``tools/unasync.py``.
"""

from creditmeter.batches._async import AsyncBatchMixin
from creditmeter.batches._plan import MAX_ITEMS
from creditmeter.batches._sync import BatchMixin
from creditmeter.batches.items import BatchResult, ChargeItem, GrantItem

__all__ = ["MAX_ITEMS", "AsyncBatchMixin", "BatchMixin", "BatchResult", "ChargeItem", "GrantItem"]
