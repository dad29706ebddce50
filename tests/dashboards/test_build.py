"""The generated dashboards: the committed files are the build's output, the build is
byte-for-byte reproducible, versions follow content, the JSON decodes into the SDK's
models, and every query names catalogued measurements, fields and tags."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard as DashboardModel
from provscope.dashboards import build, training
from provscope.dashboards.links import UIDS
from provscope.dashboards.templating import VARIABLES
from provscope.dashboards.versions import VERSIONS

from provscope import catalogue
from provscope._version import __version__

from .conftest import PROVISIONING, load_dashboards

DATASOURCES = {("influxdb", "provscope-influxdb"),
               ("grafana-postgresql-datasource", "provscope-lineage")}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted((root / "dashboards").rglob("*")) if p.is_file()}


def test_the_committed_provisioning_files_are_the_builds_output(tmp_path):
    build.write(tmp_path)
    fresh = _files(tmp_path)
    committed = _files(PROVISIONING)
    assert sorted(fresh) == sorted(committed), \
        "run `provscope dashboards build` and commit provisioning/dashboards"
    for name, data in fresh.items():
        assert committed[name] == data, \
            f"{name} differs from the build: run `provscope dashboards build` and commit it"


def test_the_cli_writes_the_same_bytes_every_time(tmp_path):
    cmd = [sys.executable, "-m", "provscope.cli", "dashboards", "build"]
    first = subprocess.run([*cmd, "--out", str(tmp_path / "a")], capture_output=True,
                           text=True, check=True)
    assert "5 dashboards" in first.stdout and "6 files changed" in first.stdout
    subprocess.run([*cmd, "--out", str(tmp_path / "b")], check=True, capture_output=True)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    again = subprocess.run([*cmd, "--out", str(tmp_path / "a")], capture_output=True,
                           text=True, check=True)
    assert "0 files changed" in again.stdout
    assert _files(tmp_path / "a") == _files(PROVISIONING)


def test_each_dashboard_records_its_current_version_and_digest():
    for r in build.render_all():
        assert VERSIONS.get(r.uid) == (r.version, r.digest), (
            f"{r.uid} changed: set VERSIONS[{r.uid!r}] = ({r.version}, {r.digest!r}) in "
            "dashboards/versions.py and say what changed in docs/dashboards-changelog.md")
        changelog = (Path(__file__).resolve().parents[2] / "docs" /
                     "dashboards-changelog.md").read_text()
        assert f"{r.uid} {r.version}" in changelog, f"no changelog entry for {r.uid} {r.version}"


def test_the_version_follows_content_not_the_release(monkeypatch):
    before = build.render("provscope-training")
    monkeypatch.setattr(build, "__version__", "99.0.0")
    release = build.render("provscope-training")
    assert (release.digest, release.version) == (before.digest, before.version)
    assert "provscope-99.0.0" in json.loads(release.text)["tags"]
    assert release.text != before.text

    def retitled():
        return training.build().title("provscope / Training (changed)")

    monkeypatch.setitem(build.BUILDERS, "provscope-training", retitled)
    changed = build.render("provscope-training")
    assert changed.digest != before.digest
    assert changed.version == before.version + 1


def test_dashboards_decode_into_the_sdk_models_and_encode_back_unchanged():
    for uid, data in load_dashboards().items():
        model = DashboardModel.from_json(data)
        assert model.uid == uid and model.title == data["title"]
        back = json.loads(JSONEncoder(sort_keys=True).encode(model))
        # The SDK models an annotation target as the built-in Grafana annotation query
        # only (limit, matchAny, tags, type): the SQL of ours does not survive its model.
        for doc in (back, data):
            for ann in doc.get("annotations", {}).get("list", []):
                ann.pop("target", None)
        assert back == data, uid


def _panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels") or []


def test_every_dashboard_is_live_tagged_and_uses_only_the_provisioned_datasources():
    dashboards = load_dashboards()
    assert tuple(dashboards) == tuple(sorted(UIDS))
    for uid, d in dashboards.items():
        assert d["refresh"] == "5s" and d["time"] == {"from": "now-15m", "to": "now"}
        assert d["tags"] == ["provscope", f"provscope-{__version__}"]
        assert f"provscope {__version__}" in d["description"]
        assert "id" not in d and isinstance(d["version"], int)
        ids = [p["id"] for p in _panels(d)]
        assert len(ids) == len(set(ids)), uid
        for v in d["templating"].get("list", []):
            assert v["name"] in VARIABLES
            assert (v["datasource"]["type"], v["datasource"]["uid"]) in DATASOURCES
        for p in _panels(d):
            if p["type"] == "row":
                continue
            assert p["description"], (uid, p["title"])
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            for t in p["targets"]:
                assert (t["datasource"]["type"], t["datasource"]["uid"]) in DATASOURCES
            if p["type"] in ("timeseries", "stat", "heatmap"):
                assert p["fieldConfig"]["defaults"].get("unit"), (uid, p["title"])


_FROM = re.compile(r'FROM "(\w+)"')
_FIELD = re.compile(r'\w+\("(\w+)"\)')
_TAG = re.compile(r'"(\w+)" =~|WITH KEY = "(\w+)"|GROUP BY (.*?)(?: fill|$)')


def _influx_queries():
    for uid, d in load_dashboards().items():
        for v in d["templating"].get("list", []):
            if v["datasource"]["type"] == "influxdb":
                yield uid, v["query"]
        for p in _panels(d):
            for t in p.get("targets") or []:
                if t["datasource"]["type"] == "influxdb":
                    yield uid, t["query"]


def test_every_influxql_query_names_catalogued_measurements_fields_and_tags():
    checked = 0
    for uid, q in _influx_queries():
        (measurement,) = _FROM.findall(q)
        specs = catalogue.by_measurement(measurement)
        assert specs, (uid, q)
        tags = set().union(*(s.tags for s in specs))
        for field in _FIELD.findall(q):
            assert catalogue.lookup(measurement, field), (uid, measurement, field)
            checked += 1
        for a, b, group in _TAG.findall(q):
            names = [a or b] if (a or b) else re.findall(r'"(\w+)"', group)
            for name in names:
                assert name in tags, (uid, measurement, name)
    assert checked > 50


def test_counters_are_drawn_as_rates_and_gauges_never_are():
    """Over time a counter is its rate; a table of totals may show its last value."""
    for uid, q in _influx_queries():
        (measurement,) = _FROM.findall(q)
        for m in re.finditer(r'(\w+)\((\w+)\("(\w+)"\)', q):
            spec = catalogue.lookup(measurement, m.group(3))
            if m.group(1) == "non_negative_derivative":
                assert spec.kind == "counter", (uid, q)
        for m in re.finditer(r'(?<!\()\b(mean|max|last)\("(\w+)"\)', q):
            spec = catalogue.lookup(measurement, m.group(2))
            if spec.kind == "counter" and "time($__interval)" in q:
                assert f'non_negative_derivative({m.group(1)}("{m.group(2)}")' in q, (uid, q)


def test_the_dashboard_provider_points_grafana_at_the_json_folder():
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "provscope.yaml").read_text())
    (p,) = provider["providers"]
    assert provider["apiVersion"] == 1
    assert p["folder"] == "provscope" and p["type"] == "file"
    assert p["allowUiUpdates"] is False
    assert p["options"]["path"] == "/etc/grafana/provisioning/dashboards/json"
