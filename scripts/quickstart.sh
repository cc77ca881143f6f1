#!/usr/bin/env bash
# Set up ./.venv if needed and run the main job on the embedded toy model: a short DDPO
# run (`rayalign train --preset quickstart`), then the base model and the trained LoRA
# scored on the 18 held-out prompts. Writes everything under outputs/quickstart/ (a new
# numbered directory when that one already holds a run). Extra arguments go to
# `rayalign train`, e.g. `--set train.epochs=12`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${RAYALIGN_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

out=outputs/quickstart
n=1
while [ -e "$out/metrics.jsonl" ]; do n=$((n + 1)); out="outputs/quickstart-$n"; done

rayalign train --preset quickstart --output-dir "$out" "$@"
# Held-out prompts. The trained adapter is sampled as it was trained (10 DDIM steps, no
# guidance) by itself; the base model is asked for the same settings, like for like.
heldout=(--prompts toy-heldout --reward toy_fidelity --num-per-prompt 4 --seed 0)
rayalign eval "${heldout[@]}" --steps 10 --guidance-scale 1 --output "$out/eval/base_heldout.json"
rayalign eval "${heldout[@]}" --lora "$out" --output "$out/eval/trained_heldout.json"
