#!/usr/bin/env bash
# Install everything the test suite needs, then run it all.
#  - Debian packages (as root, only when missing): influxdb, prometheus, postgresql,
#    docker-compose, victoria-metrics, chromium.
#  - A virtual environment .venv with torch==2.13.0 (the CPU wheel) and provscope[dev,torch].
#  - ruff; the structure checks (import-linter contracts, mypy over the whole package);
#    then pytest with a node agent listening on the default socket (a private
#    XDG_RUNTIME_DIR); pytest's "no tests collected" (exit 5) counts as a failure, and so
#    does any record a test sent to that agent.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v influxd >/dev/null || need+=(influxdb)
command -v prometheus >/dev/null || need+=(prometheus)
# VictoriaMetrics takes InfluxDB's v2 /api/v2/write: the v2 write path's real server.
command -v victoria-metrics >/dev/null || need+=(victoria-metrics)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# docker-compose (1.29) parses and prints docker-compose.yml in tests/alerts without an engine.
command -v docker-compose >/dev/null || need+=(docker-compose)
# Headless Chromium renders the HTML report in tests/analysis (console errors, figures drawn).
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "missing system packages: ${need[*]} (run as root or install them: apt-get install ${need[*]})" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev,torch]'

.venv/bin/ruff check .
# import-linter contracts (the direction of dependencies) and mypy over the whole package.
bash scripts/check_structure.sh

# The suite runs with a node agent listening on the default socket, as on a user's
# machine: tests must never reach it (tests/conftest.py isolates socket and state
# directories). The agent lives in a private runtime directory exported for the whole
# run and writes its defaults into a private directory; it is stopped on exit, and the
# run fails if any record reached it.
root=$PWD
agent_home=$(mktemp -d /tmp/provscope-ci-XXXXXX)
export XDG_RUNTIME_DIR="$agent_home/runtime"
mkdir -m 700 "$XDG_RUNTIME_DIR"
agent_cli() {
  (cd "$agent_home" && env -u PROVSCOPE_AGENT_SOCKET_PATH -u PROVSCOPE_CONFIG \
    XDG_STATE_HOME="$agent_home/state" "$root/.venv/bin/provscope" "$@")
}
stop_agent() {
  agent_cli stop --timeout 30 >/dev/null || true
  rm -rf "$agent_home"
}
trap stop_agent EXIT
agent_cli --set prometheus.port=0 agent --detach
agent_cli status >/dev/null

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
received=$(agent_cli status --json | .venv/bin/python -c \
  'import json, sys; i = json.load(sys.stdin)["ingest"]; print(int(i["ingest_points_total"] + i["ingest_records_total"]))') \
  || received="an unknown number of (the agent stopped answering)"
if [ "$received" != 0 ]; then
  echo "the agent on the default socket received $received records from the tests: a test is not isolated" >&2
  [ "$rc" = 0 ] && rc=1
fi
exit "$rc"
