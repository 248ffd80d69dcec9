"""kubenurse-otel: a Kubernetes network probe, kubenurse-compatible and OpenTelemetry-native."""

__version__ = "0.1.0"
