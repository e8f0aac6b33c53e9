#!/usr/bin/env bash
# LLaVA-Bench (in the wild): answers to eval/llava-bench-in-the-wild/questions.jsonl (long answers, model_vqa), and the
# GPT review requests against answers_gpt4.jsonl. No judge is called (no network): send the requests in
# reviews/requests/$CKPT_NAME.jsonl, save the replies as jsonl {"id", "content"} and rerun with REVIEW_RESPONSES=<file>;
# then (or when reviews/$CKPT_NAME.jsonl exists) the summary is printed. Variables: scripts/eval/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
BENCH="$EVAL/llava-bench-in-the-wild"
REVIEWS="$BENCH/reviews/$CKPT_NAME.jsonl"

answer model_vqa "$BENCH/answers/$CKPT_NAME.jsonl" \
    --question-file "$BENCH/questions.jsonl" --image-folder "$BENCH/images"
RESPONSE_ARGS=()
[[ -n "${REVIEW_RESPONSES:-}" ]] && RESPONSE_ARGS=(--responses "$REVIEW_RESPONSES")
score eval_gpt_review_bench --question "$BENCH/questions.jsonl" --context "$BENCH/context.jsonl" \
    --answer-list "$BENCH/answers_gpt4.jsonl" "$BENCH/answers/$CKPT_NAME.jsonl" --output "$REVIEWS" \
    "${RESPONSE_ARGS[@]}"
if [[ -f "$REVIEWS" ]]; then
    score summarize_gpt_review -f "$REVIEWS" --score-file "$SCORES/llavabench.json"
fi
