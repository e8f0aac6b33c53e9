#!/usr/bin/env bash
# ScienceQA (test, image and text questions): answers to eval/scienceqa/llava_test_CQM-A.json with the option-letter
# prompt, scored by eval_science_qa (SQA-IMG is its IMG-Accuracy). Variables: scripts/eval/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

answer model_vqa_science "$EVAL/scienceqa/answers/$CKPT_NAME.jsonl" \
    --question-file "$EVAL/scienceqa/llava_test_CQM-A.json" --image-folder "$EVAL/scienceqa/images/test" \
    --single-pred-prompt
score eval_science_qa --base-dir "$EVAL/scienceqa" --result-file "$EVAL/scienceqa/answers/$CKPT_NAME.jsonl" \
    --output-file "$EVAL/scienceqa/answers/${CKPT_NAME}_output.jsonl" \
    --output-result "$EVAL/scienceqa/answers/${CKPT_NAME}_result.json" --score-file "$SCORES/sqa.json"
