"""The backoff of batch rounds is the retriers' own: at once first, then jittered and capped."""

from __future__ import annotations

from creditmeter._retry import backoff
from creditmeter.config import RetryPolicy


def test_the_first_retry_is_at_once_and_later_ones_stay_under_their_caps() -> None:
    policy = RetryPolicy(attempts=20, timeout=5.0, initial_backoff=0.001, max_backoff=0.01)
    assert backoff(policy, 1) == 0
    for number in range(2, 20):
        waits = [backoff(policy, number) for _ in range(50)]
        cap = min(policy.initial_backoff * 2 ** (number - 1), policy.max_backoff)
        assert all(0 <= wait <= cap for wait in waits)
        assert len(set(waits)) > 1  # jittered, not a fixed sleep
