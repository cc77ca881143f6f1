#!/usr/bin/env bash
# Set up ./.venv if needed and run the main job on the embedded toy model.
# Writes everything under outputs/quickstart/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${RAYALIGN_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec rayalign eval --prompts toy-heldout --reward toy_fidelity --num-per-prompt 4 --seed 0 \
    --output outputs/quickstart/base_heldout.json "$@"
