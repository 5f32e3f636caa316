"""Usage reports and ledger scans: ``meter.usage()``, ``meter.entries()``, ``meter.iter_users()``.

``_query`` checks the arguments and makes the cursors; ``_async`` holds
``AsyncReportMixin``, written by hand, and ``_sync`` holds ``ReportMixin``,
generated from it by ``tools/unasync.py``. The rows and pages are in
``creditmeter.queries``; which entries count as usage is a rule
(``rules.Tally``).
"""

from creditmeter.queries import EntryPage, UsageRow
from creditmeter.reports._async import AsyncReportMixin
from creditmeter.reports._query import MAX_LIMIT
from creditmeter.reports._sync import ReportMixin

__all__ = ["MAX_LIMIT", "AsyncReportMixin", "EntryPage", "ReportMixin", "UsageRow"]
