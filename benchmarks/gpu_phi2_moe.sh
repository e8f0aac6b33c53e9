#!/usr/bin/env bash
# The GPU measurements of issue 11 (deliver 8), prepared for a session that is lent a CUDA device: the MoE layer
# at the Phi-2 shape (hidden 2560, intermediate 10240, 4 experts, top-2, gelu FFN, bf16) at 8k-32k tokens, and
# a stage-3 training step at Phi-2 width. Needs a CUDA build of the pinned torch with the project installed
# (PY=python of that environment). About 5 minutes on one H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
"$PY" benchmarks/moe_layer.py --device cuda --dtype bf16 --mlp gelu --hidden 2560 --intermediate 10240 \
    --experts 4 --top-k 2 --tokens 8192 16384 32768 --repeats 10
"$PY" benchmarks/train_step.py --device cuda --dtype bf16 --hidden 2560 --intermediate 10240 --heads 32 \
    --layers 4 --vocab 51200 --batch 8 --seq 2048 --repeats 5
