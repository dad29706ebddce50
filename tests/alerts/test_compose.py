"""docker-compose.yml, parsed and printed by a real compose implementation (Debian's
docker-compose 1.29: `config` needs no engine), and the Prometheus config of its
optional profile checked by promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from provscope.testing.required import require_binary

ROOT = Path(__file__).resolve().parents[2]


def _config(*files: str, env_file: str | None = ".env.example") -> subprocess.CompletedProcess:
    compose = require_binary("docker-compose", "docker-compose")
    cmd = [compose, "--project-directory", str(ROOT)]
    if env_file:
        cmd += ["--env-file", str(ROOT / env_file)]
    for f in files:
        cmd += ["-f", str(ROOT / f)]
    return subprocess.run([*cmd, "config"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_compose_config_parses_with_the_example_env():
    out = _config("docker-compose.yml")
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert {"influxdb", "postgres", "grafana", "agent", "prometheus"} <= set(services)
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["influxdb"]["image"].startswith("influxdb:1.")
    assert services["grafana"]["image"] == "grafana/grafana:11.6.0"
    mounts = {}
    for v in services["grafana"]["volumes"]:  # compose 1.29 prints SOURCE:TARGET[:MODE]
        source, target, *mode = v.split(":") if isinstance(v, str) else \
            (v["source"], v["target"])
        mounts[target] = (source, mode)
    for sub in ("datasources", "dashboards", "alerting"):
        source, mode = mounts[f"/etc/grafana/provisioning/{sub}"]
        assert source == str(ROOT / "provisioning" / sub) and mode == ["ro"]
    agent = services["agent"]
    assert agent["pid"] == "host" and agent["network_mode"] == "host"
    assert agent["build"]["dockerfile"] == "provisioning/agent.Dockerfile"
    assert (ROOT / agent["build"]["dockerfile"]).is_file()
    env = agent["environment"]
    assert env["PROVSCOPE_INFLUXDB_URL"] == "http://127.0.0.1:8086"
    assert env["PROVSCOPE_LINEAGE_URL"].startswith("postgresql://")
    # The example's passwords reach the services only through .env interpolation.
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == example["POSTGRES_PASSWORD"]
    text = (ROOT / "docker-compose.yml").read_text()
    for key, value in example.items():
        if "PASSWORD" in key:
            assert value not in text, f"{key}'s value is written in docker-compose.yml"


def test_compose_without_env_names_the_missing_password(tmp_path):
    out = _config("docker-compose.yml", env_file=None)
    assert out.returncode != 0
    assert "set it in .env (cp .env.example .env)" in out.stderr


def test_gpu_override_reserves_nvidia_devices_for_the_agent():
    out = _config("docker-compose.yml", "docker-compose.gpu.yml")
    assert out.returncode == 0, out.stderr
    agent = yaml.safe_load(out.stdout)["services"]["agent"]
    (device,) = agent["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_prometheus_profile_config_and_rules(tmp_path):
    promtool = require_binary("promtool", "prometheus")
    out = subprocess.run([promtool, "check", "config",
                          str(ROOT / "provisioning" / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "provscope-rules.yml" in out.stdout and "SUCCESS" in out.stdout
