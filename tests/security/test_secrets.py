"""Secrets never leave (docs/security.md): a secret planted everywhere a user could put
one (config file, a password file, the environment, URL credentials, the command line of
`provscope run`, KEY=VALUE words, task params, the run's config) is found in none of the
outputs: stdout, stderr and logs, InfluxDB, PostgreSQL, the SQLite file, the spool, the
generated dashboards and alert provisioning, `provscope config`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SECRETS = {
    "file": "Sfile-7Qx2",  # influxdb.password_file's contents
    "url": "Surl-9Kp4",  # user:password in influxdb.url
    "pg": "Spg-3Vb8",  # password in lineage.url
    "env": "Senv-5Hm1",  # PROVSCOPE_INFLUXDB_TOKEN
    "yaml": "Syaml-2Jd6",  # influxdb.token in the YAML file (overridden by the env)
    "cli": "Scli-8Wr3",  # --api-token on the command line
    "cli2": "Scli2-4Ty9",  # --password=... on the command line
    "kv": "Skv-6Pn2",  # HF_TOKEN=... word on the command line
    "param": "Sparam-1Zc7",  # task param password=
    "hparam": "Shparam-0Lq5",  # run config api_key
}

JOB = textwrap.dedent("""
    import os
    import provscope

    with provscope.workflow("planted", config={"lr": 0.1, "api_key": os.environ["JOB_HP"]}) as run:
        with run.task("prepare", password=os.environ["JOB_PARAM"]):
            run.log(1, loss=1.0)
            run.log(2, loss=0.5)
    print("job done")
""")


def _run(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "provscope.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _dump_influx(server, db) -> str:
    out = [str(server.query("SHOW SERIES", db=db)), str(server.query("SHOW MEASUREMENTS", db=db))]
    for values in (server.query("SHOW MEASUREMENTS", db=db)["results"][0].get("series") or
                   [{"values": []}])[0]["values"]:
        out.append(str(server.query(f'SELECT * FROM "{values[0]}"', db=db)))
    return "\n".join(out)


def _dump_postgres(url: str) -> str:
    import psycopg

    out = []
    with psycopg.connect(url) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        for t in tables:
            out.extend(str(r) for r in conn.execute(f'SELECT * FROM "{t}"'))
    return "\n".join(out)


def _files_text(root: Path) -> str:
    out = []
    for p in root.rglob("*"):
        if p.is_file():
            out.append(p.read_bytes().decode("latin-1"))
    return "\n".join(out)


def test_a_planted_secret_is_found_in_no_output(tmp_path, influx_server, influx_db,
                                                postgres_url, monkeypatch):
    pw_file = tmp_path / "influx.pw"
    pw_file.write_text(SECRETS["file"] + "\n")
    host = influx_server.url.removeprefix("http://")
    pg = postgres_url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRETS['pg']}@")
    assert SECRETS["pg"] in pg
    spool = tmp_path / "spool"
    cfg = tmp_path / "provscope.yaml"
    cfg.write_text(textwrap.dedent(f"""
        influxdb:
          url: http://reader:{SECRETS['url']}@{host}
          database: {influx_db}
          password_file: {pw_file}
          token: {SECRETS['yaml']}
          spool_dir: {spool}
        lineage:
          url: {pg}
        prometheus:
          port: 0
    """))
    (tmp_path / "job.py").write_text(JOB)
    env = {**os.environ, "PROVSCOPE_CONFIG": str(cfg), "PROVSCOPE_INFLUXDB_TOKEN": SECRETS["env"],
           "JOB_HP": SECRETS["hparam"], "JOB_PARAM": SECRETS["param"]}
    outputs = {}
    r = _run(["-vv", "run", "--", sys.executable, "job.py", "--api-token", SECRETS["cli"],
              f"--password={SECRETS['cli2']}", f"HF_TOKEN={SECRETS['kv']}"], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "job done" in r.stdout
    outputs["run stdout/stderr"] = r.stdout + r.stderr
    for args in (["config"], ["--set", "influxdb.password=['x']", "config"],
                 ["--set", f"influxdb.url=htp:/u:{SECRETS['url']}@x", "config"],
                 ["status"], ["runs", "--json"],
                 ["dashboards", "build", "--out", str(tmp_path / "prov")],
                 ["alerts", "build", "--out", str(tmp_path / "prov")]):
        r = _run(args, env, tmp_path)
        outputs[" ".join(args)] = r.stdout + r.stderr
    assert "***" in outputs["config"]  # printed, masked
    bad = outputs["--set influxdb.password=['x'] config"]
    assert "influxdb.password = *** is not allowed" in bad
    outputs["InfluxDB"] = _dump_influx(influx_server, influx_db)
    outputs["PostgreSQL"] = _dump_postgres(postgres_url)
    outputs["files (spool, provisioning, SQLite, logs)"] = _files_text(tmp_path / "prov") + \
        (_files_text(spool) if spool.exists() else "") + "".join(
            p.read_bytes().decode("latin-1") for p in tmp_path.glob("*.db*"))
    # The data arrived: the test looks at real rows, not empty stores.
    assert "planted" in outputs["PostgreSQL"] and "prepare" in outputs["PostgreSQL"]
    assert "***" in outputs["PostgreSQL"]  # the masked command line and params
    assert "loss" in outputs["InfluxDB"]
    hits = [(where, name) for where, text in outputs.items()
            for name, secret in SECRETS.items() if secret in text]
    assert hits == []


def test_the_embedded_file_and_logs_hold_no_planted_secret(tmp_path):
    (tmp_path / "job.py").write_text(JOB)
    env = {**os.environ, "PROVSCOPE_PROMETHEUS_PORT": "0", "JOB_HP": SECRETS["hparam"],
           "JOB_PARAM": SECRETS["param"]}
    r = _run(["-vv", "run", "--", sys.executable, "job.py", "--token", SECRETS["cli"],
              f"AWS_SECRET_ACCESS_KEY={SECRETS['kv']}"], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    db = tmp_path / "provscope.db"
    data = "".join(p.read_bytes().decode("latin-1") for p in tmp_path.glob("provscope.db*"))
    assert "planted" in data and "prepare" in data
    for secret in (SECRETS["cli"], SECRETS["kv"], SECRETS["param"], SECRETS["hparam"]):
        assert secret not in data and secret not in r.stdout + r.stderr
    assert oct(db.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("argv, expected", [
    (["train.py", "--api-token", "X1", "--lr", "3"],
     ["train.py", "--api-token", "***", "--lr", "3"]),
    (["--password=X2", "--max-tokens", "100"], ["--password=***", "--max-tokens", "100"]),
    (["--key", "X3", "--key-file", "k.pem"], ["--key", "***", "--key-file", "k.pem"]),
    (["PGPASSWORD=X4", "MONKEY=1", "HF_TOKEN=X5"], ["PGPASSWORD=***", "MONKEY=1", "HF_TOKEN=***"]),
    (["--secret", "--verbose"], ["--secret", "--verbose"]),  # a flag, no value
    (["postgresql://u:X6@db/x"], ["postgresql://u:***@db/x"]),
])
def test_the_masking_rule(argv, expected):
    from provscope.redact import mask_argv

    assert mask_argv(argv) == expected


def test_the_rule_is_configurable():
    from provscope.config import load_config
    from provscope.redact import mask_argv, mask_mapping

    names = load_config(overrides={"redact.names": ["seed"]}).redact.names
    assert mask_argv(["--seed", "42", "--token", "t"], names) == ["--seed", "***", "--token", "t"]
    assert mask_mapping({"data_seed": 1, "token": "t"}, names) == {"data_seed": "***", "token": "t"}


def test_log_lines_of_provscope_loggers_are_redacted(caplog):
    import logging

    from provscope.config import load_config

    load_config(overrides={"influxdb.password": "Slog-pw-77", "influxdb.url":
                           "http://u:Slog-url-88@h:8086"})
    with caplog.at_level(logging.INFO):
        logging.getLogger("provscope.test").info("sent %s to %s with token=%s", "Slog-pw-77",
                                                 "http://u:Slog-url-88@h:8086/write", "abc")
    text = caplog.text
    assert "Slog-pw-77" not in text and "Slog-url-88" not in text and "token=abc" not in text
    assert "http://u:***@h:8086/write" in text
