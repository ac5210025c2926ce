# Sourced by tests/run.sh and launch/demo.sh: create .venv at the repository root on first use, install the
# pinned dependencies (torch 2.13.0 first, so pip never pulls a CUDA build) and LatentWire itself in editable
# mode, then activate it. Reinstalls only when setup.py changes.
set -euo pipefail
LW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LW_VENV="$LW_ROOT/.venv"
LW_PYTHON="${PYTHON:-python3}"
if [ ! -x "$LW_VENV/bin/python" ]; then
    echo "[venv] creating $LW_VENV"
    "$LW_PYTHON" -m venv "$LW_VENV"
fi
# shellcheck disable=SC1091
source "$LW_VENV/bin/activate"
LW_STAMP="$LW_VENV/.latentwire-installed"
LW_WANT="$(sha256sum "$LW_ROOT/setup.py" | cut -d' ' -f1)"
if [ ! -f "$LW_STAMP" ] || [ "$(cat "$LW_STAMP")" != "$LW_WANT" ]; then
    echo "[venv] installing pinned dependencies (first run takes a few minutes)"
    python -m pip install -q --upgrade pip
    python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e "$LW_ROOT[dev]"
    echo "$LW_WANT" > "$LW_STAMP"
fi
cd "$LW_ROOT"
