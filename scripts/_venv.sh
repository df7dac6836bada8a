# Sourced by scripts/test.sh and scripts/demo.sh: create / refresh the project's .venv.
# Needs only Python 3.11. torch==2.13.0 (CPU build) comes from pyproject.toml's pin.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.cryosiam_nb-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "== setting up $VENV (first run takes a few minutes) =="
  "$PY" -m venv "$VENV"
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]" \
      2> "$VENV/pip-install.log"; then
    grep -v "is ignored: it is neither a file" "$VENV/pip-install.log" >&2 || true
    echo "pip install failed (full log: $VENV/pip-install.log)" >&2
    exit 1
  fi
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export MPLBACKEND="${MPLBACKEND:-Agg}"
