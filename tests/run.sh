#!/usr/bin/env bash
# The whole LatentWire test suite on CPU, slow tests included: `bash tests/run.sh [pytest args]`.
# Creates and uses .venv at the repository root. GPU tests skip without CUDA; tests that need ../shared/data
# skip with a reason when it is absent.
set -euo pipefail
source "$(dirname "$0")/../launch/venv.sh"
export PYTHONUNBUFFERED=1
# pytest.ini deselects the slow tests for a fast inner loop; the suite runs all of them.
python -m pytest -p no:cacheprovider -m "slow or not slow" "$@"
