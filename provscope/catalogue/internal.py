"""Metric specs of provscope's own health (measurement ``provscope``).

Every drop is counted here: data is never lost silently.
"""

from __future__ import annotations

from provscope.catalogue import MetricSpec

_T = ("host", "component")


def _c(field: str, unit: str, help_: str) -> MetricSpec:
    return MetricSpec("provscope", field, "counter", unit, help_, _T)


def _g(field: str, unit: str, help_: str) -> MetricSpec:
    return MetricSpec("provscope", field, "gauge", unit, help_, _T)


SPECS: list[MetricSpec] = [
    _c("points_received_total", "points", "Records handed to this component."),
    _c("points_written_total", "points", "Records the destination accepted."),
    _c("points_dropped_total", "points", "Records lost on purpose (queue full, rejected by the server, spool full)."),
    _c("points_spooled_total", "points", "Records written to the on-disk spool while the destination was unreachable."),
    _c("points_replayed_total", "points", "Spooled records delivered after the destination came back."),
    _c("retries_total", "count", "Export attempts repeated after a retryable failure."),
    _c("batches_failed_total", "count", "Batches the destination rejected."),
    _c("fields_skipped_total", "count", "Fields a destination leaves out on purpose (not catalogued, not a number, over a series limit, setting off); counted, never silent."),
    _c("points_rejected_total", "points", "Points refused before sending (sanitisation policy) or by the server; each counted alone, included in points_dropped_total."),
    _c("fields_rejected_total", "count", "Field values left out of a point that was written (invalid value, type conflict, unusable key)."),
    _c("rejected_invalid_name_total", "count", "Points or field values refused for an unusable name (empty measurement or key, series key over 65535 bytes)."),
    _c("rejected_invalid_time_total", "points", "Points refused for a time outside InfluxDB's range."),
    _c("rejected_invalid_value_total", "count", "Field values refused: NaN or infinite, an int out of range, a type line protocol cannot carry."),
    _c("rejected_type_conflict_total", "count", "Field values refused for a type other than their field's (the catalogue's, else the first seen)."),
    _c("rejected_no_field_total", "points", "Points refused because no writable field was left."),
    _c("rejected_server_total", "points", "Points the server refused (partial writes, lines isolated from a rejected batch)."),
    _g("queue_depth", "points", "Records waiting in the in-memory queue."),
    _g("spool_bytes", "bytes", "Bytes waiting in the on-disk spool."),
    _g("export_latency_seconds", "seconds", "Duration of the last successful export call."),
]
