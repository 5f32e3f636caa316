"""The public store contract suite, run against every built-in store."""

from __future__ import annotations

from creditmeter.testing import StoreContract


class TestStoreContract(StoreContract):
    """Runs ``creditmeter.testing.StoreContract`` with the ``store`` fixture of conftest."""
