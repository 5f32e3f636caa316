"""Kept for compatibility: ``creditmeter.otel`` is now ``creditmeter.integrations.otel``.

Existing imports (``from creditmeter.otel import OTelMetrics, fan_out``) keep
working; new code imports from ``creditmeter.integrations.otel``. Like that
module, this one does not import OpenTelemetry until an ``OTelMetrics`` is made.
"""

from __future__ import annotations

from creditmeter.integrations.otel import DURATION_BUCKETS, OTelMetrics, fan_out

__all__ = ["DURATION_BUCKETS", "OTelMetrics", "fan_out"]
