"""provscope.dashboards: Grafana dashboards, datasources and alert rules generated as code."""
