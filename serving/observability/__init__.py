"""Observability: Prometheus metrics, per-version statistics (ModelStatistics) and logs.

Used by every layer; imports none of them."""
