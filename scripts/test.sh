#!/usr/bin/env bash
# The test suite (installs what it needs first): ruff's lint and format checks, then pytest. Extra arguments go
# to pytest, e.g. `-m "not slow"` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check src tests scripts
.venv/bin/ruff format --check --quiet src tests scripts
exec .venv/bin/python -m pytest "$@"
