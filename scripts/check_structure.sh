#!/usr/bin/env bash
# Static checks of the package as it is installed: import-linter contracts (the direction
# of dependencies) and mypy over every module.
#
# The folders agent/, exporters/ and dashboards/ become provscope.agent, .exporters and
# .dashboards only at install time (setuptools package-dir). Neither import-linter nor
# mypy runs import hooks, so both read a copy of the tree laid out as the wheel lays it
# out; the copy takes well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=${PYTHON:-.venv/bin/python}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
cp -r provscope "$tree/provscope"
for sub in agent exporters dashboards; do
  cp -r "$sub" "$tree/provscope/$sub"
done
find "$tree" -name __pycache__ -prune -exec rm -rf {} +

(cd "$tree" && PYTHONPATH="$tree" "$root/.venv/bin/lint-imports" --config "$root/pyproject.toml" --no-cache)
(cd "$tree" && "$root/$py" -m mypy --config-file "$root/pyproject.toml" -p provscope)
