#!/usr/bin/env bash
# Install everything into .venv (if needed) and run the whole test suite.
# Usage: bash scripts/test.sh [pytest args...]     e.g. -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
stepvideo_venv requirements.txt requirements-test.txt
# Two pytest workers: the multi-process tests run in turn on one of them (tests/conftest.py), the other
# test modules spread over both. pytest exits 5 when it collected nothing: that is a failure here too.
exec python -m pytest -n 2 "$@"
