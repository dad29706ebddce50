"""Config: YAML < environment < overrides, frozen models, one-line errors, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from provscope.config import Config, defaults_yaml, env_names, load_config
from provscope.errors import ConfigError


def test_defaults_need_no_file_and_point_at_the_embedded_store():
    config = load_config(environ={})
    assert config.influxdb.url is None
    assert config.lineage_url.startswith("sqlite:///")
    assert config.lineage_url.endswith("provscope.db")


def test_yaml_then_environment_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("influxdb:\n  url: http://a:1\n  batch_size: 10\nhost: filehost\n")
    config = load_config(
        path,
        environ={"PROVSCOPE_INFLUXDB_BATCH_SIZE": "20", "PROVSCOPE_HOST": "envhost"},
        overrides={"host": "flaghost"},
    )
    assert config.influxdb.url == "http://a:1"
    assert config.influxdb.batch_size == 20
    assert config.host_name == "flaghost"


def test_config_is_frozen():
    config = load_config(environ={})
    with pytest.raises(Exception, match=r"frozen"):
        config.influxdb.batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("influxdb:\n  urll: x\n", "unknown key 'influxdb.urll'; allowed keys here: url, api"),
        ("influxdb:\n  api: v9\n",
         "influxdb.api = 'v9' is not allowed; allowed: 'v1', 'v2' or 'v3'"),
        ("influxdb:\n  batch_size: 0\n", "influxdb.batch_size = 0 is not allowed"),
        ("agent:\n  collectors:\n    nvml:\n      on_startup_error: maybe\n",
         "agent.collectors.nvml.on_startup_error = 'maybe'"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_config_gives_one_line_naming_key_value_and_allowed(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_override_key_is_rejected():
    with pytest.raises(ConfigError,
                       match=r"--set: unknown key 'influxdb\.nope'; allowed keys here: url"):
        load_config(overrides=["influxdb.nope=1"], environ={})


def test_every_leaf_setting_has_an_environment_variable():
    names = env_names()
    assert names["PROVSCOPE_INFLUXDB_URL"] == "influxdb.url"
    assert names["PROVSCOPE_AGENT_COLLECTORS_NVML_ENABLED"] == "agent.collectors.nvml.enabled"
    assert len(set(names.values())) == len(names)


def test_defaults_sample_lists_every_setting_and_parses_when_uncommented():
    sample = defaults_yaml()
    uncommented = "\n".join(
        line[2:] for line in sample.splitlines()
        if line.startswith("# ") and not line.startswith("## ")
        and ":" in line and not line.startswith("# provscope")
        and not line.startswith("# Load") and not line.startswith("# as the")
    )
    tree = yaml.safe_load(uncommented)
    assert Config.model_validate(tree) == Config()
    for key in env_names().values():
        assert key.split(".")[-1] + ":" in sample


def test_cli_bad_value_exits_2_with_one_line_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "provscope.cli", "--set", "influxdb.api=v7", "config"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "influxdb.api = 'v7' is not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_config_defaults_prints_the_sample():
    proc = subprocess.run(
        [sys.executable, "-m", "provscope.cli", "config", "--defaults"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0
    assert "#   batch_size: 5000" in proc.stdout


# ----------------------------------------------------------------------------- sources


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    with pytest.raises(ConfigError) as info:
        load_config(environ={"PROVSCOPE_TORCH_EVERY": "0"})
    message = str(info.value)
    assert message.startswith("PROVSCOPE_TORCH_EVERY: torch.every = 0 is not allowed")
    assert "greater than or equal to 1" in message


def test_lenient_loading_keeps_the_valid_settings_and_reports_each_bad_one(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("torch:\n  every: 5\n  evry: 3\n")
    lines: list[str] = []
    config = load_config(
        path,
        environ={"PROVSCOPE_INFLUXDB_API": "v9", "PROVSCOPE_HOST": "envhost"},
        overrides={"embedded.path": "mine.db", "influxdb.ulr": "http://x",
                   "client.no_agent": "maybe"},
        overrides_source="workflow(settings=...)",
        report=lines.append,
    )
    # Every valid setting from every source is kept.
    assert config.torch.every == 5
    assert config.host == "envhost"
    assert config.embedded.path == "mine.db"
    # The bad ones fall back to their defaults, each reported once with its own source.
    assert config.influxdb.api == "v1" and config.client.no_agent == "embedded"
    assert len(lines) == 4, lines
    assert all("\n" not in line for line in lines)
    by_source = {line.split(":")[0]: line for line in lines}
    assert "unknown key 'torch.evry'" in by_source[str(path)]
    assert "did you mean 'torch.every'?" in by_source[str(path)]
    assert "influxdb.api = 'v9' is not allowed; allowed: 'v1', 'v2' or 'v3'" \
        in by_source["PROVSCOPE_INFLUXDB_API"]
    settings_lines = [line for line in lines if line.startswith("workflow(settings=...)")]
    assert any("unknown key 'influxdb.ulr'" in line and "did you mean 'influxdb.url'?" in line
               for line in settings_lines)
    assert any("client.no_agent = 'maybe' is not allowed; allowed: 'embedded' or 'drop'"
               in line for line in settings_lines)


def test_a_bad_override_falls_back_to_the_environment_value_not_the_default():
    lines: list[str] = []
    config = load_config(environ={"PROVSCOPE_TORCH_EVERY": "7"},
                         overrides={"torch.every": -1}, report=lines.append)
    assert config.torch.every == 7
    assert len(lines) == 1 and lines[0].startswith("--set: torch.every = -1")


def test_lenient_loading_reports_an_unreadable_file_and_keeps_the_rest(tmp_path):
    lines: list[str] = []
    config = load_config(tmp_path / "missing.yaml", environ={},
                         overrides={"torch.every": 3}, report=lines.append)
    assert config.torch.every == 3
    assert len(lines) == 1 and "cannot be read" in lines[0] and "missing.yaml" in lines[0]


def test_unknown_provscope_variable_is_reported_once_with_the_closest_name(
        monkeypatch, caplog):
    from provscope import config as config_module

    monkeypatch.setattr(config_module, "_reported_env", set())
    environ = {"PROVSCOPE_INFLUXDB_ULR": "http://x", "PROVSCOPE_RUN_ID": "r1",
               "PROVSCOPE_ENABLED": "1"}
    with caplog.at_level("WARNING", logger="provscope.config"):
        first = load_config(environ=environ)
        load_config(environ=environ)
        config_module.check_environment(environ)
    warnings = [r.getMessage() for r in caplog.records if r.name == "provscope.config"]
    assert len(warnings) == 1, warnings
    assert "PROVSCOPE_INFLUXDB_ULR" in warnings[0]
    assert "did you mean PROVSCOPE_INFLUXDB_URL?" in warnings[0]
    assert first.influxdb.url is None  # never fatal, never applied


def test_cli_unknown_variable_warns_and_still_works(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
    env["PROVSCOPE_TORCH_EVRY"] = "3"
    proc = subprocess.run([sys.executable, "-m", "provscope.cli", "config"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("PROVSCOPE_TORCH_EVRY") == 1
    assert "did you mean PROVSCOPE_TORCH_EVERY?" in proc.stderr


def test_client_destination_is_a_documented_setting():
    assert env_names()["PROVSCOPE_CLIENT_DESTINATION"] == "client.destination"
    assert "destination: auto" in defaults_yaml()
    with pytest.raises(ConfigError, match=r"client\.destination = 'somewhere' is not allowed; "
                       r"allowed: 'auto', 'agent' or 'own'"):
        load_config(environ={}, overrides={"client.destination": "somewhere"})
