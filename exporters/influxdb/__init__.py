"""Time series to InfluxDB: the line protocol encoder (``lineprotocol``), the HTTP
transport (``transport``: v1/v2/v3 endpoints, auth, keep-alive connection, gzip) and the
writer (``writer``: response policy, splitting, spooling while the server is away)."""

from provscope.exporters.influxdb.writer import InfluxDBExporter

__all__ = ["InfluxDBExporter"]
