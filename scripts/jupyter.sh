#!/usr/bin/env bash
# Open the tutorial notebooks in JupyterLab, from nothing (needs only Python 3.11):
#   bash scripts/jupyter.sh                   # JupyterLab on notebooks/ (URL + token printed)
#   bash scripts/jupyter.sh --port 9999       # any other `jupyter lab` option
#   bash scripts/jupyter.sh --register-kernel # JupyterHub: add this environment as a kernel
# Sets up .venv (scripts/_venv.sh), installs the [jupyter] extra into it (JupyterLab,
# ipywidgets, Panel/Bokeh's Jupyter support) and starts JupyterLab on notebooks/.
# On JupyterHub (or any Jupyter you already have), register the kernel once and pick
# "Python (cryosiam_nb)" in the launcher:
#   .venv/bin/python -m ipykernel install --user --name cryosiam_nb --display-name "Python (cryosiam_nb)"
source "$(dirname "$0")/_venv.sh"
unset MPLBACKEND # _venv.sh picks Agg for scripts; notebooks need Jupyter's inline backend

JSTAMP="$VENV/.cryosiam_nb-jupyter"
want="$(sha256sum pyproject.toml | cut -c1-16)"
check='import cryosiam_nb, jupyterlab, ipywidgets, jupyter_bokeh, ipykernel'
if [ "$(cat "$JSTAMP" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "$check" 2>/dev/null; then
  echo "== installing the [jupyter] extra into $VENV =="
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[jupyter]" \
      2> "$VENV/pip-jupyter.log"; then
    grep -v "is ignored: it is neither a file" "$VENV/pip-jupyter.log" >&2 || true
    echo "pip install failed (full log: $VENV/pip-jupyter.log)" >&2
    exit 1
  fi
  if ! "$VENV/bin/python" -c "$check"; then
    echo "the [jupyter] extra did not install JupyterLab / ipywidgets / jupyter_bokeh" >&2
    exit 1
  fi
  echo "$want" > "$JSTAMP"
fi

if [ "${1:-}" = "--register-kernel" ]; then
  exec "$VENV/bin/python" -m ipykernel install --user --name cryosiam_nb \
    --display-name "Python (cryosiam_nb)"
fi
extra=()
[ "$(id -u)" = "0" ] && extra+=(--allow-root) # containers often run as root
exec "$VENV/bin/jupyter" lab --ServerApp.root_dir="$ROOT/notebooks" "${extra[@]}" "$@"
