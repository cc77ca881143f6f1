#!/usr/bin/env bash
# Set up ./.venv if needed and run the whole test suite (about 16 minutes on 2 cores).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k policy`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/install-chromium.sh  # the web page test drives a real headless Chromium
# shellcheck disable=SC1091
. "${RAYALIGN_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest tests -q -ra --durations=15 "$@"
