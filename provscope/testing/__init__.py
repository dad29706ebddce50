"""Helpers for tests and benchmarks: throwaway InfluxDB, PostgreSQL and Prometheus servers
(``servers``) and the one skip-or-fail rule for a missing one (``required``)."""
