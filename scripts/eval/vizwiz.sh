#!/usr/bin/env bash
# VizWiz (test): answers to eval/vizwiz/llava_test.jsonl, converted to the submission
# eval/vizwiz/answers_upload/$CKPT_NAME.json for the EvalAI server. Variables: scripts/eval/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

answer model_vqa_loader "$EVAL/vizwiz/answers/$CKPT_NAME.jsonl" \
    --question-file "$EVAL/vizwiz/llava_test.jsonl" --image-folder "$EVAL/vizwiz/test"
score convert_vizwiz_for_submission --annotation-file "$EVAL/vizwiz/llava_test.jsonl" \
    --result-file "$EVAL/vizwiz/answers/$CKPT_NAME.jsonl" \
    --result-upload-file "$EVAL/vizwiz/answers_upload/$CKPT_NAME.json" --score-file "$SCORES/vizwiz.json"
