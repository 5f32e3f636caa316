"""The decimal context every credit computation runs in: wide enough to be exact, or loud.

Python's default context keeps 28 significant digits and rounds silently, so
a balance near 10**15 plus an amount with many decimals would lose digits
and break "ledger sum == balance". Inputs are limited to 10**15 and 30
decimal places (see ``_validate.amount``); this context keeps 100 digits and
raises instead of rounding, so no credit is ever rounded away unnoticed.
Arithmetic goes through its methods (``EXACT.add`` …) rather than operators,
which would use the caller's thread-local context.
"""

from __future__ import annotations

import decimal

__all__ = ["EXACT"]

EXACT = decimal.Context(
    prec=100,
    rounding=decimal.ROUND_HALF_EVEN,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow, decimal.Inexact],
)
