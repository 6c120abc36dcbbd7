"""Traces and metrics: the catalogue, the instruments, and the per-process setup from OTEL_* variables."""
