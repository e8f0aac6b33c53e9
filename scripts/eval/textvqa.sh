#!/usr/bin/env bash
# TextVQA (val, with OCR tokens in the prompt): answers to eval/textvqa/llava_textvqa_val_v051_ocr.jsonl, scored
# by eval_textvqa against TextVQA_0.5.1_val.json. Variables: scripts/eval/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

answer model_vqa_loader "$EVAL/textvqa/answers/$CKPT_NAME.jsonl" \
    --question-file "$EVAL/textvqa/llava_textvqa_val_v051_ocr.jsonl" --image-folder "$EVAL/textvqa/train_images"
score eval_textvqa --annotation-file "$EVAL/textvqa/TextVQA_0.5.1_val.json" \
    --result-file "$EVAL/textvqa/answers/$CKPT_NAME.jsonl" --score-file "$SCORES/textvqa.json"
