#!/usr/bin/env bash
# SEED-Bench: answers to eval/seed_bench/llava-seed-bench.jsonl (images and middle video frames), one chunk per GPU,
# scored against SEED-Bench.json (SEED-IMG: the image questions) and converted to the leaderboard upload.
# Variables: scripts/eval/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

answer_chunks model_vqa_loader "$EVAL/seed_bench/answers/$CKPT_NAME" \
    --question-file "$EVAL/seed_bench/llava-seed-bench.jsonl" --image-folder "$EVAL/seed_bench"
score convert_seed_for_submission --annotation-file "$EVAL/seed_bench/SEED-Bench.json" \
    --result-file "$EVAL/seed_bench/answers/$CKPT_NAME/merge.jsonl" \
    --result-upload-file "$EVAL/seed_bench/answers_upload/$CKPT_NAME.jsonl" --score-file "$SCORES/seed.json"
