#!/usr/bin/env bash
# Set up ./.venv if needed, check the code style (ruff) and run the whole test suite (about 41 minutes on 2 cores).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k policy`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/install-test-tools.sh  # Chromium for the web page test, kubectl for the k8s/ tests
# shellcheck disable=SC1091
. "${RAYALIGN_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The code style first (seconds): one line-length limit and import order, configured in pyproject.toml.
ruff check actors orchestrator jobs tests scripts
ruff format --check actors orchestrator jobs tests scripts
exec python -m pytest tests -q -ra --durations=15 "$@"
