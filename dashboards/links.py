"""Dashboard uids and the links between dashboards.

A lineage row names its series by ``(run_id, host, rank, start, end)`` (docs/lineage.md):
``row_link`` turns those columns of a table row into a link to another dashboard with the
variables ``run``, ``host``, ``rank`` set and the time range set to the row's exact window
(``from``/``to`` in epoch milliseconds, the columns ``start_ms``/``end_ms``).
"""

from __future__ import annotations

from collections.abc import Mapping

from grafana_foundation_sdk.builders.dashboard import DashboardLink
from grafana_foundation_sdk.models.dashboard import DashboardLinkType

__all__ = [
    "LAYERS",
    "LINEAGE",
    "NODES",
    "OVERVIEW",
    "TAG",
    "TRAINING",
    "UIDS",
    "nav_link",
    "row_link",
]

OVERVIEW = "provscope-overview"
TRAINING = "provscope-training"
LAYERS = "provscope-layers"
NODES = "provscope-nodes"
LINEAGE = "provscope-lineage"
#: Every generated dashboard, in the order the build writes them.
UIDS = (OVERVIEW, TRAINING, LAYERS, NODES, LINEAGE)
#: The tag every generated dashboard carries (the navigation link lists them by it).
TAG = "provscope"


def row_link(title: str, uid: str, variables: Mapping[str, str], *,
             window: tuple[str, str] | None = ("start_ms", "end_ms")) -> DashboardLink:
    """A data link to dashboard ``uid`` setting each variable from a column of the row
    (``{"run": "run_id"}``) and, with ``window``, the time range from two columns holding
    epoch milliseconds."""
    params = [f"var-{var}=${{__data.fields.{col}}}" for var, col in variables.items()]
    if window is not None:
        params += [f"from=${{__data.fields.{window[0]}}}", f"to=${{__data.fields.{window[1]}}}"]
    return DashboardLink(title).url(f"/d/{uid}?{'&'.join(params)}").target_blank(False)


def nav_link() -> DashboardLink:
    """The link row on top of every dashboard: the other provscope dashboards, keeping the
    time range and the selected variables."""
    return (DashboardLink("provscope").type(DashboardLinkType.DASHBOARDS).tags([TAG])
            .as_dropdown(False).keep_time(True).include_vars(True).icon("dashboard"))
