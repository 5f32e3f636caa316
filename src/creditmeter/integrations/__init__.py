"""Ready-made hooks for the gateways creditmeter runs in: ASGI apps, LiteLLM, OpenTelemetry."""
