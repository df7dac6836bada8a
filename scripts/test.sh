#!/usr/bin/env bash
# The test command: set up .venv from nothing, then lint, format-check and run the suite.
source "$(dirname "$0")/_venv.sh"
if [ -f scripts/install_browser.sh ]; then
  bash scripts/install_browser.sh || echo "(browser tests will skip: Chromium unavailable)"
fi
echo "== ruff =="
ruff check .
ruff format --check .
echo "== pytest =="
python -m pytest "$@"
