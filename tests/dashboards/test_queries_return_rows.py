"""Every panel, template-variable and annotation query of the generated dashboards,
interpolated as Grafana does, returns rows from the real InfluxDB and PostgreSQL after an
instrumented run; every data link resolves to a generated dashboard, to variables it has
and to columns its panel returns; a task row's link opens Training on non-empty series."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from typing import Any

import pytest
import sqlalchemy as sa

from .conftest import Instrumented, load_dashboards
from .grafana import TimeRange, Variable, interpolate

pytestmark = [pytest.mark.integration, pytest.mark.torch, pytest.mark.slow]

DASHBOARDS = load_dashboards()
INFLUX_TYPE = "influxdb"
SQL_TYPE = "grafana-postgresql-datasource"


class Stores:
    """Runs interpolated queries the way Grafana's datasources send them."""

    def __init__(self, inst: Instrumented) -> None:
        self.inst = inst
        self.engine = sa.create_engine(inst.postgres_url)

    def influx(self, q: str) -> list[dict[str, Any]]:
        """The series of an InfluxQL query (each: name, tags, columns, values)."""
        data = urllib.parse.urlencode({"q": q, "db": self.inst.influx_db,
                                       "epoch": "ms"}).encode()
        with urllib.request.urlopen(self.inst.influx_url + "/query", data=data,
                                    timeout=30) as r:
            body = json.loads(r.read())
        result = body["results"][0]
        assert "error" not in result, f"{result['error']}\n{q}"
        return result.get("series") or []

    def sql(self, q: str) -> tuple[list[str], list[tuple]]:
        with self.engine.connect() as conn:
            res = conn.exec_driver_sql(q)
            return list(res.keys()), [tuple(r) for r in res]

    def rows(self, datasource_type: str, q: str) -> tuple[list[str], list[tuple]]:
        """Column names and rows of a query on either store (InfluxDB: all series)."""
        if datasource_type == INFLUX_TYPE:
            series = self.influx(q)
            cols = sorted({c for s in series for c in s["columns"]}
                          | {t for s in series for t in s.get("tags", {})})
            rows = [tuple(v) for s in series for v in s["values"]]
            return cols, rows
        assert datasource_type == SQL_TYPE, datasource_type
        return self.sql(q)


@pytest.fixture(scope="module")
def stores(instrumented) -> Stores:
    s = Stores(instrumented)
    yield s
    s.engine.dispose()


def _range(inst: Instrumented) -> TimeRange:
    return TimeRange(inst.start_ms - 5_000, inst.end_ms + 5_000)


def _dialect(ds_type: str) -> str:
    return "influxql" if ds_type == INFLUX_TYPE else "sql"


def _query_text(target: dict) -> str:
    return target.get("query") if target["datasource"]["type"] == INFLUX_TYPE \
        else target["rawSql"]


def resolve_variables(stores: Stores, dash: dict, tr: TimeRange,
                      chosen: dict[str, list[str]] | None = None) -> dict[str, Variable]:
    """Evaluate the dashboard's variables in order, as Grafana does (each may use the
    ones before it); ``chosen`` selects values (a link's ``var-x=``), else "All"."""
    variables: dict[str, Variable] = {}
    for v in dash["templating"].get("list", []):
        ds = v["datasource"]["type"]
        q = interpolate(v["query"], _dialect(ds), tr, variables)
        cols, rows = stores.rows(ds, q)
        if ds == INFLUX_TYPE:
            options = [r[cols.index("value")] for r in rows] if rows else []
        else:
            at = cols.index("__value") if "__value" in cols else 0
            options = [str(r[at]) for r in rows]
        assert options, f"variable {v['name']} of {dash['uid']} has no values:\n{q}"
        pick = (chosen or {}).get(v["name"])
        if pick == ["$__all"]:
            pick = None
        variables[v["name"]] = Variable(v["name"], options, pick, v["multi"],
                                        v["includeAll"])
    return variables


def _panels(dash: dict):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels") or []


def _cases():
    for uid, dash in DASHBOARDS.items():
        for p in _panels(dash):
            for t in p.get("targets") or []:
                yield pytest.param(uid, p["id"], t["refId"],
                                   id=f"{uid}:{p['id']}:{p['title']}:{t['refId']}")


def _target(uid: str, panel_id: int, ref: str) -> tuple[str, dict]:
    panel = next(p for p in _panels(DASHBOARDS[uid]) if p["id"] == panel_id)
    return panel["title"], next(t for t in panel["targets"] if t["refId"] == ref)


@pytest.fixture(scope="module")
def all_variables(stores, instrumented) -> dict[str, dict[str, Variable]]:
    tr = _range(instrumented)
    return {uid: resolve_variables(stores, d, tr) for uid, d in DASHBOARDS.items()}


def test_the_suite_covers_every_dashboard():
    assert set(DASHBOARDS) == {"provscope-overview", "provscope-training",
                               "provscope-layers", "provscope-nodes", "provscope-lineage"}
    assert sum(1 for _ in _cases()) >= 60


@pytest.mark.parametrize(("uid", "panel_id", "ref"), list(_cases()))
def test_panel_query_returns_rows(stores, instrumented, all_variables, uid, panel_id, ref):
    title, target = _target(uid, panel_id, ref)
    ds = target["datasource"]["type"]
    q = interpolate(_query_text(target), _dialect(ds), _range(instrumented),
                    all_variables[uid])
    _cols, rows = stores.rows(ds, q)
    assert rows, f"{uid} / {title} / {ref} returned nothing:\n{q}"


def test_every_variable_query_returns_values_including_the_run(all_variables, instrumented):
    assert [uid for uid, v in all_variables.items() if not v] == ["provscope-overview"]
    for uid, variables in all_variables.items():
        for name, var in variables.items():
            if name == "run":
                assert instrumented.run_id in var.options, uid
            if name == "host":
                assert instrumented.host in var.options, uid


def test_every_annotation_query_returns_task_regions(stores, instrumented, all_variables):
    seen = 0
    for uid, dash in DASHBOARDS.items():
        for ann in dash.get("annotations", {}).get("list", []):
            target = ann["target"]
            q = interpolate(target["rawSql"], "sql", _range(instrumented), all_variables[uid])
            cols, rows = stores.sql(q)
            assert {"time", "timeend", "text", "tags"} <= set(cols), uid
            assert rows, f"annotation {ann['name']} of {uid} returned nothing:\n{q}"
            names = {r[cols.index("text")].split(" (")[0] for r in rows}
            assert {"train", "eval", "epoch 0", "epoch 1"} <= names, names
            seen += 1
    assert seen == 3  # Training, Layers, Nodes


_FIELD = re.compile(r"\$\{__data\.fields\.(\w+)\}")


def _links():
    for uid, dash in DASHBOARDS.items():
        for p in _panels(dash):
            for link in (p.get("fieldConfig") or {}).get("defaults", {}).get("links") or []:
                yield uid, p, link


def test_every_data_link_resolves_to_a_dashboard_its_variables_and_row_columns(
        stores, instrumented, all_variables):
    links = list(_links())
    assert len(links) >= 10
    for uid, panel, link in links:
        url = urllib.parse.urlsplit(link["url"])
        target_uid = url.path.removeprefix("/d/").split("/")[0]
        assert target_uid in DASHBOARDS, link["url"]
        target_vars = {v["name"] for v in DASHBOARDS[target_uid]["templating"].get("list", [])}
        params = urllib.parse.parse_qsl(url.query)
        for key, _value in params:
            assert key in ("from", "to") or key.removeprefix("var-") in target_vars, \
                (uid, panel["title"], key)
        assert {"from", "to"} <= {k for k, _ in params}, link["url"]
        # The columns the link reads are columns of the panel's own rows.
        target = panel["targets"][0]
        q = interpolate(_query_text(target), _dialect(target["datasource"]["type"]),
                        _range(instrumented), all_variables[uid])
        cols, rows = stores.rows(target["datasource"]["type"], q)
        assert rows, (uid, panel["title"])
        for col in _FIELD.findall(link["url"]):
            assert col in cols, (uid, panel["title"], col)


def _follow(link_url: str, cols: list[str], row: tuple) -> tuple[str, dict[str, list[str]],
                                                                 TimeRange]:
    """Where Grafana goes when the row's link is clicked: the dashboard uid, the
    variables it sets and the time range."""
    url = _FIELD.sub(lambda m: str(row[cols.index(m.group(1))]), link_url)
    parts = urllib.parse.urlsplit(url)
    params = urllib.parse.parse_qs(parts.query)
    chosen = {k.removeprefix("var-"): v for k, v in params.items() if k.startswith("var-")}
    return (parts.path.removeprefix("/d/"), chosen,
            TimeRange(int(params["from"][0]), int(params["to"][0])))


def test_a_task_row_opens_training_layers_and_nodes_on_that_tasks_series(
        stores, instrumented, all_variables):
    lineage = DASHBOARDS["provscope-lineage"]
    tasks = next(p for p in _panels(lineage) if p["title"] == "Tasks")
    q = interpolate(tasks["targets"][0]["rawSql"], "sql", _range(instrumented),
                    all_variables["provscope-lineage"])
    cols, rows = stores.sql(q)
    train = next(r for r in rows if r[cols.index("name")] == "train")
    start_ns = stores.sql(f"SELECT start_ns, end_ns FROM tasks WHERE task_id = "
                          f"'{train[cols.index('task_id')]}'")[1][0]
    opened = set()
    for link in tasks["fieldConfig"]["defaults"]["links"]:
        uid, chosen, tr = _follow(link["url"], cols, train)
        assert chosen == {"run": [instrumented.run_id], "host": [instrumented.host],
                          "rank": [str(train[cols.index("rank")])]}
        assert (tr.from_ms, tr.to_ms) == (start_ns[0] // 1_000_000, start_ns[1] // 1_000_000)
        dash = DASHBOARDS[uid]
        variables = resolve_variables(stores, dash, tr, chosen)
        assert variables["run"].values() == [instrumented.run_id]
        for p in _panels(dash):
            for t in p.get("targets") or []:
                text = _query_text(t)
                if uid == "provscope-nodes" and "run_id" not in text:
                    continue  # node-wide series: checked over the whole range above
                q = interpolate(text, _dialect(t["datasource"]["type"]), tr, variables)
                _c, r = stores.rows(t["datasource"]["type"], q)
                assert r, f"{uid} / {p['title']} empty in the task's window:\n{q}"
        opened.add(uid)
    assert opened == {"provscope-training", "provscope-layers", "provscope-nodes"}
