"""Time series to InfluxDB: the line protocol encoder (``lineprotocol``) and the writer
(``writer``: v1/v2/v3 endpoints, response policy, spooling while the server is away)."""

from provscope.exporters.influxdb.writer import InfluxDBExporter

__all__ = ["InfluxDBExporter"]
