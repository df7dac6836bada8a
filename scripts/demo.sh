#!/usr/bin/env bash
# The demo command: set up .venv from nothing, then run the end-to-end demo.
#   bash scripts/demo.sh                 # simulated tomogram
#   bash scripts/demo.sh --mrc my.mrc --voxel-size 6.8
source "$(dirname "$0")/_venv.sh"
cryosiam-nb demo --overwrite "$@"
