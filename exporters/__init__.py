"""provscope.exporters: where records go (InfluxDB, the SQL lineage store, the embedded
SQLite store, Prometheus), each behind the three-verb contract of ``base.Exporter``."""

from provscope.exporters.base import Exporter, ExportResult
from provscope.exporters.memory import MemoryExporter

__all__ = ["ExportResult", "Exporter", "MemoryExporter"]
