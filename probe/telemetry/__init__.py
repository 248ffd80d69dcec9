"""Telemetry: where measurements are recorded (metrics) and exported (Prometheus, OTLP)."""
