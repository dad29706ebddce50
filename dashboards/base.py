"""What every generated dashboard shares: live by default (refresh 5 s, last 15 minutes),
shared crosshair, the ``provscope`` tag and the navigation link to the other dashboards.
The build (``provscope.dashboards.build``) adds the version, the provscope release and
the content digest."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard, TimePicker
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync
from provscope.dashboards.links import TAG, nav_link

__all__ = ["REFRESH", "TIME_FROM", "dashboard"]

REFRESH = "5s"
TIME_FROM = "now-15m"


def dashboard(uid: str, title: str, description: str) -> Dashboard:
    """A dashboard with provscope's common settings."""
    return (
        Dashboard(title).uid(uid).description(description).tags([TAG])
        .refresh(REFRESH).time(TIME_FROM, "now").timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR).editable()
        .timepicker(TimePicker().refresh_intervals(["5s", "10s", "30s", "1m", "5m", "15m"]))
        .link(nav_link())
    )
