#!/usr/bin/env bash
# MMBench (dev, English): answers to eval/mmbench/$SPLIT.tsv with the option-letter prompt, converted to the xlsx
# submission eval/mmbench/answers_upload/$SPLIT/$CKPT_NAME.xlsx for the OpenCompass server.
# Variables: scripts/eval/common.sh, plus SPLIT (default mmbench_dev_20230712) and LANG_ARGS (default empty).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SPLIT="${SPLIT:-mmbench_dev_20230712}"
SCORE_NAME="${SCORE_NAME:-mmbench}"
read -ra LANG_FLAGS <<< "${LANG_ARGS:-}"

answer model_vqa_mmbench "$EVAL/mmbench/answers/$SPLIT/$CKPT_NAME.jsonl" \
    --question-file "$EVAL/mmbench/$SPLIT.tsv" --single-pred-prompt "${LANG_FLAGS[@]}"
mkdir -p "$EVAL/mmbench/answers_upload/$SPLIT"
score convert_mmbench_for_submission --annotation-file "$EVAL/mmbench/$SPLIT.tsv" \
    --result-dir "$EVAL/mmbench/answers/$SPLIT" --upload-dir "$EVAL/mmbench/answers_upload/$SPLIT" \
    --experiment "$CKPT_NAME" --score-file "$SCORES/$SCORE_NAME.json"
