#!/usr/bin/env bash
# The whole LatentWire test suite on CPU: `bash tests/run.sh [pytest args]`.
# Creates and uses .venv at the repository root. GPU tests skip without CUDA; tests that need ../shared/data
# skip with a reason when it is absent.
set -euo pipefail
source "$(dirname "$0")/../launch/venv.sh"
export PYTHONUNBUFFERED=1
python -m pytest -p no:cacheprovider "$@"
