"""SQL pieces the Overview and Lineage dashboards share: run and task rows with the
columns their data links read (``run_id``, ``host``, ``rank``, ``start_ms``, ``end_ms``).

``end_ms`` of a run or task still in progress is now, so a link opens its window so far.
"""

from __future__ import annotations

__all__ = ["NOW_NS", "duration_s", "end_ms", "start_ms"]

#: Now in Unix nanoseconds, in PostgreSQL.
NOW_NS = "(EXTRACT(EPOCH FROM now()) * 1e9)::bigint"


def start_ms(alias: str = "") -> str:
    """The start of a row as epoch milliseconds (a link's ``from``)."""
    p = f"{alias}." if alias else ""
    return f"{p}start_ns / 1000000 AS start_ms"


def end_ms(alias: str = "") -> str:
    """The end of a row as epoch milliseconds, now while it runs (a link's ``to``)."""
    p = f"{alias}." if alias else ""
    return f"COALESCE({p}end_ns, {NOW_NS}) / 1000000 AS end_ms"


def duration_s(alias: str = "") -> str:
    """Seconds from start to end (to now while it runs)."""
    p = f"{alias}." if alias else ""
    return f"(COALESCE({p}end_ns, {NOW_NS}) - {p}start_ns) / 1e9 AS duration_s"
