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
    with pytest.raises(ConfigError, match=r"--set influxdb\.nope: unknown setting"):
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
