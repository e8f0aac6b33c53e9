#!/usr/bin/env bash
# MME: answers to eval/MME/llava_mme.jsonl, converted to MME's result files (convert_answer_to_mme) and scored as
# MME's calculation.py does (mme_calculation): Perception and Cognition totals. Variables: scripts/eval/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

answer model_vqa_loader "$EVAL/MME/answers/$CKPT_NAME.jsonl" \
    --question-file "$EVAL/MME/llava_mme.jsonl" --image-folder "$EVAL/MME/MME_Benchmark_release_version"
score convert_answer_to_mme --experiment "$CKPT_NAME" --data-path "$EVAL/MME/MME_Benchmark_release_version" \
    --answers-dir "$EVAL/MME/answers" --result-dir "$EVAL/MME/eval_tool/answers"
score mme_calculation --results_dir "$EVAL/MME/eval_tool/answers/$CKPT_NAME" --score-file "$SCORES/mme.json"
