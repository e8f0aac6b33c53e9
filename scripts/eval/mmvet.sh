#!/usr/bin/env bash
# MM-Vet: answers to eval/mm-vet/llava-mm-vet.jsonl (long answers, model_vqa), converted to MM-Vet's results file
# eval/mm-vet/results/$CKPT_NAME.json (for MM-Vet's online grader) and to GPT grading requests. No grader is called
# (no network): send the requests, save the replies as jsonl {"id", "content"} and rerun with GRADE_RESPONSES=<file>;
# then (or when the grade file exists) the capability scores are printed. Variables: scripts/eval/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

answer model_vqa "$EVAL/mm-vet/answers/$CKPT_NAME.jsonl" \
    --question-file "$EVAL/mm-vet/llava-mm-vet.jsonl" --image-folder "$EVAL/mm-vet/images"
score convert_mmvet_for_eval --src "$EVAL/mm-vet/answers/$CKPT_NAME.jsonl" --dst "$EVAL/mm-vet/results/$CKPT_NAME.json"
RESPONSE_ARGS=()
[[ -n "${GRADE_RESPONSES:-}" ]] && RESPONSE_ARGS=(--responses "$GRADE_RESPONSES")
score eval_gpt_mmvet --mmvet_path "$EVAL/mm-vet" --ckpt_name "$CKPT_NAME" --result_path "$EVAL/mm-vet/results" \
    --score-file "$SCORES/mmvet.json" "${RESPONSE_ARGS[@]}"
