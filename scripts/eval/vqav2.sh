#!/usr/bin/env bash
# VQAv2 (test-dev): answers to eval/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl, one chunk per GPU, converted to the
# submission eval/vqav2/answers_upload/$SPLIT/$CKPT_NAME.json for the EvalAI server. Variables: scripts/eval/common.sh,
# plus SPLIT (default llava_vqav2_mscoco_test-dev2015).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SPLIT="${SPLIT:-llava_vqav2_mscoco_test-dev2015}"

answer_chunks model_vqa_loader "$EVAL/vqav2/answers/$SPLIT/$CKPT_NAME" \
    --question-file "$EVAL/vqav2/$SPLIT.jsonl" --image-folder "$EVAL/vqav2/test2015"
score convert_vqav2_for_submission --split "$SPLIT" --ckpt "$CKPT_NAME" --dir "$EVAL/vqav2" \
    --score-file "$SCORES/vqav2.json"
