#!/usr/bin/env bash
# The README's test command. pytest exits 5 when it collects no test; that is a failure here too.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 MLFLOW_ALLOW_FILE_STORE=true
python -m pytest -q tests "$@"
