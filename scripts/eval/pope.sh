#!/usr/bin/env bash
# POPE: answers to eval/pope/llava_pope_test.jsonl (COCO val2014 images), scored per category by eval_pope.
# Variables: scripts/eval/common.sh (CKPT, CONV, GPUS, EVAL, BATCH, ...).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

answer model_vqa_loader "$EVAL/pope/answers/$CKPT_NAME.jsonl" \
    --question-file "$EVAL/pope/llava_pope_test.jsonl" --image-folder "$EVAL/pope/val2014"
score eval_pope --annotation-dir "$EVAL/pope/coco" --question-file "$EVAL/pope/llava_pope_test.jsonl" \
    --result-file "$EVAL/pope/answers/$CKPT_NAME.jsonl" --score-file "$SCORES/pope.json"
