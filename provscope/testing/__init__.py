"""Helpers for tests and benchmarks: throwaway InfluxDB, PostgreSQL and Prometheus servers."""
