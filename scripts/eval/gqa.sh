#!/usr/bin/env bash
# GQA (testdev-balanced): answers to eval/gqa/llava_gqa_testdev_balanced.jsonl, one chunk per GPU, converted to GQA
# predictions and scored by the GQA evaluator (eval_gqa). Variables: scripts/eval/common.sh, plus
#   SPLIT          default llava_gqa_testdev_balanced
#   GQA_QUESTIONS  default $EVAL/gqa/data/questions1.2/testdev_balanced_questions.json
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SPLIT="${SPLIT:-llava_gqa_testdev_balanced}"
GQADIR="$EVAL/gqa/data"
GQA_QUESTIONS="${GQA_QUESTIONS:-$GQADIR/questions1.2/testdev_balanced_questions.json}"

answer_chunks model_vqa_loader "$EVAL/gqa/answers/$SPLIT/$CKPT_NAME" \
    --question-file "$EVAL/gqa/$SPLIT.jsonl" --image-folder "$GQADIR/images"
mkdir -p "$GQADIR/$SPLIT/$CKPT_NAME"
score convert_gqa_for_eval --src "$EVAL/gqa/answers/$SPLIT/$CKPT_NAME/merge.jsonl" \
    --dst "$GQADIR/$SPLIT/$CKPT_NAME/testdev_balanced_predictions.json"
score eval_gqa --tier "$GQADIR/$SPLIT/$CKPT_NAME/testdev_balanced" --questions "$GQA_QUESTIONS" \
    --score-file "$SCORES/gqa.json"
