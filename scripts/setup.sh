#!/usr/bin/env bash
# Create ./.venv (once) and install rayalign into it, PyTorch first.
#
# PyTorch goes in before everything else: asked for indirectly, pip would pick a
# multi-GB CUDA build even on CPU-only machines. Override the wheel with TORCH_SPEC
# (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126").
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV="${RAYALIGN_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.rayalign-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] $VENV is up to date"
    exit 0
fi

echo "[setup] installing PyTorch ($TORCH_SPEC)"
python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
python -m pip install --quiet $TORCH_SPEC
echo "[setup] installing rayalign and its dependencies (about 3 minutes on a fresh machine)"
python -m pip install --quiet -e ".[test]"
echo "$want" > "$stamp"
echo "[setup] done: $(python -c 'import torch, ray, diffusers; print(f"torch {torch.__version__}, ray {ray.__version__}, diffusers {diffusers.__version__}")')"
