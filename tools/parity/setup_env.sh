#!/usr/bin/env bash
# Creates tools/parity/.venv: a separate environment holding a newer transformers release with native
# Phi, StableLM and Mistral, used only by run_parity.py (never by `make test`).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$HERE/.venv"

# The project's constraints pin transformers 4.31; they must not apply to this environment.
unset PIP_CONSTRAINT

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip<25"
# torch pinned to the project's CPU build: an unpinned torch pulls the CUDA wheels (gigabytes).
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
# 4.46.3: native Phi (4.36), StableLM (4.38), Mistral (4.34); its tokenizers/safetensors ship cp311 wheels.
"$VENV/bin/python" -m pip install -q "transformers==4.46.3" "numpy" "safetensors"
"$VENV/bin/python" -c "import torch, transformers; print('parity env ready: torch', torch.__version__, 'transformers', transformers.__version__)"
