"""The one place that knows tenacity: retrying a lost compare-and-set.

Managers try once by hand (building no tenacity object on the uncontended
path) and hand over to these only after a first ``VersionConflict``. The
first retry runs at once, from the account the conflict reported; later ones
back off with jitter. Exhaustion re-raises the last ``VersionConflict``,
never ``tenacity.RetryError``.
"""

from __future__ import annotations

import tenacity

from creditmeter.config import RetryPolicy
from creditmeter.exceptions import VersionConflict

__all__ = ["async_retrying", "backoff", "retrying"]


def _wait(policy: RetryPolicy) -> tenacity.wait.wait_base:
    return tenacity.wait_chain(
        tenacity.wait_none(),
        tenacity.wait_random_exponential(multiplier=policy.initial_backoff, max=policy.max_backoff),
    )


def _arguments(policy: RetryPolicy) -> dict[str, object]:
    return {
        # The attempt made by hand before handing over counts as one.
        "stop": tenacity.stop_after_attempt(max(policy.attempts - 1, 1))
        | tenacity.stop_after_delay(policy.timeout),
        "wait": _wait(policy),
        "retry": tenacity.retry_if_exception_type(VersionConflict),
        "reraise": True,
    }


def retrying(policy: RetryPolicy) -> tenacity.Retrying:
    """A fresh ``Retrying`` for one operation (never shared: tenacity keeps state on it)."""
    return tenacity.Retrying(**_arguments(policy))  # type: ignore[arg-type]


def async_retrying(policy: RetryPolicy) -> tenacity.AsyncRetrying:
    """A fresh ``AsyncRetrying`` for one operation; it sleeps with ``asyncio.sleep``."""
    return tenacity.AsyncRetrying(**_arguments(policy))  # type: ignore[arg-type]


def backoff(policy: RetryPolicy, retry_number: int) -> float:
    """Seconds to wait before the ``retry_number``-th retry (1: at once), as the retriers wait.

    For loops that retry many writes together (``charge_many``'s rounds)
    rather than one operation through ``retrying``.
    """
    retrier = tenacity.Retrying(wait=_wait(policy))
    state = tenacity.RetryCallState(retrier, None, (), {})
    state.attempt_number = retry_number
    return float(retrier.wait(state))
