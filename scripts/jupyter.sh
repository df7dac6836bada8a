#!/usr/bin/env bash
# Open the tutorial notebooks in JupyterLab, from nothing (needs only Python 3.11):
#   bash scripts/jupyter.sh                   # JupyterLab on notebooks/ (URL + token printed)
#   bash scripts/jupyter.sh --port 9999       # any other `jupyter lab` option
#   bash scripts/jupyter.sh --register-kernel # JupyterHub: add this environment as a kernel
# Sets up .venv (scripts/_venv.sh), tops up the [jupyter] extra in it (JupyterLab,
# ipywidgets, ipykernel, Panel/Bokeh's Jupyter support; pip runs only for what is missing)
# and starts JupyterLab on notebooks/ (the URL with its token is printed).
# On JupyterHub (or any Jupyter you already have), register the kernel once and pick
# "Python (cryosiam_nb)" in the launcher:
#   .venv/bin/python -m ipykernel install --user --name cryosiam_nb --display-name "Python (cryosiam_nb)"
source "$(dirname "$0")/_venv.sh"
unset MPLBACKEND # _venv.sh picks Agg for scripts; notebooks need Jupyter's inline backend

# Top up the [jupyter] extra: pip runs only when one of its requirements is missing or at a
# version outside its pin (a .venv made by scripts/test.sh with [dev] usually has them all),
# so a second start, or one on a machine without network, needs no index.
satisfied() {
  "$VENV/bin/python" -I - 2> /dev/null <<'EOF'
import os, sys, tomllib
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["jupyter"]
for req in map(Requirement, extra):
    try:
        ok = req.specifier.contains(version(req.name), prereleases=True)
    except PackageNotFoundError:
        ok = False
    if not ok:
        sys.exit(1)
import cryosiam_nb, ipykernel, ipywidgets, jupyter_bokeh, jupyterlab  # noqa: E401, F401
# -I: not found via the current folder; the kernel imports this checkout from anywhere
root = os.path.realpath(os.getcwd()) + os.sep
sys.exit(not os.path.realpath(cryosiam_nb.__file__).startswith(root))
EOF
}
if ! satisfied; then
  echo "== installing the [jupyter] extra into $VENV =="
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[jupyter]" \
      2> "$VENV/pip-jupyter.log"; then
    grep -v "is ignored: it is neither a file" "$VENV/pip-jupyter.log" >&2 || true
    echo "pip install failed (full log: $VENV/pip-jupyter.log)" >&2
    exit 1
  fi
  if ! satisfied; then
    echo "the [jupyter] extra did not install JupyterLab / ipywidgets / jupyter_bokeh / ipykernel" >&2
    exit 1
  fi
fi

if [ "${1:-}" = "--register-kernel" ]; then
  exec "$VENV/bin/python" -m ipykernel install --user --name cryosiam_nb \
    --display-name "Python (cryosiam_nb)"
fi
extra=()
[ "$(id -u)" = "0" ] && extra+=(--allow-root) # containers often run as root
exec "$VENV/bin/jupyter" lab --ServerApp.root_dir="$ROOT/notebooks" "${extra[@]}" "$@"
