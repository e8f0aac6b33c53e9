# Sourced by scripts/eval/<bench>.sh: the checkpoint, the data folder, and answer generation over GPUs.
# Every value can be overridden from the environment, e.g. `CKPT=checkpoints/x GPUS=0,1 bash scripts/eval/gqa.sh`.
#
#   CKPT        checkpoint folder                          default checkpoints/$CKPT_NAME
#   CKPT_NAME   name of its answers and scores             default the folder name of CKPT (<run>_checkpoint-N)
#   CONV        conversation template                      default: the checkpoint's (config.conv_template)
#   GPUS        comma-separated GPU ids, one answer process (chunk) each   default $CUDA_VISIBLE_DEVICES, else 0
#   EVAL        the benchmark data folder (LLaVA's eval.zip layout, docs/EVAL.md)   default eval
#   BATCH       questions generated together               default 8
#   WORKERS     data-loading processes per answer process  default 4
#   SCORES      where the score files for report go        default $EVAL/scores/$CKPT_NAME
#   PYTHON      interpreter                                default python3
#   EXTRA_ARGS  appended to every answer-generation command (word-split), e.g. "--dtype bfloat16"
set -euo pipefail

PYTHON="${PYTHON:-python3}"
if [[ -z "${CKPT:-}" && -z "${CKPT_NAME:-}" ]]; then
    echo "Set CKPT (the checkpoint folder) or CKPT_NAME (a folder under checkpoints/)." >&2
    exit 2
fi
if [[ -z "${CKPT_NAME:-}" ]]; then
    # As mm_utils.get_model_name_from_path: a checkpoint-N folder is named with its parent.
    CKPT_NAME="$(basename "${CKPT%/}")"
    [[ "$CKPT_NAME" == checkpoint-* ]] && CKPT_NAME="$(basename "$(dirname "${CKPT%/}")")_$CKPT_NAME"
fi
CKPT="${CKPT:-checkpoints/$CKPT_NAME}"
CONV="${CONV:-}"
GPUS="${GPUS:-${CUDA_VISIBLE_DEVICES:-0}}"
EVAL="${EVAL:-eval}"
BATCH="${BATCH:-8}"
WORKERS="${WORKERS:-4}"
SCORES="${SCORES:-$EVAL/scores/$CKPT_NAME}"
IFS=',' read -ra GPU_LIST <<< "$GPUS"
CHUNKS=${#GPU_LIST[@]}
CONV_ARGS=()
[[ -n "$CONV" ]] && CONV_ARGS=(--conv-mode "$CONV")
mkdir -p "$SCORES"

# show_and_run CMD...: print the command, then run it.
show_and_run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    "$@"
}

# score MODULE ARGS...: run a scorer or converter of moellava.eval.
score() {
    local module=$1
    shift
    show_and_run "$PYTHON" -m "moellava.eval.$module" "$@"
}

# answer_one GPU MODULE ARGS...: one answer-generation process on one GPU.
answer_one() {
    local gpu=$1 module=$2
    shift 2
    # EXTRA_ARGS is split into words on purpose.
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES="$gpu" show_and_run "$PYTHON" -m "moellava.eval.$module" --model-path "$CKPT" \
        "${CONV_ARGS[@]}" --temperature 0 --batch-size "$BATCH" --num-workers "$WORKERS" "$@" ${EXTRA_ARGS:-}
}

# answer_chunks MODULE DIR ARGS...: one process per GPU answers its chunk into DIR/<CHUNKS>_<IDX>.jsonl; the
# chunks are then concatenated, in order, into DIR/merge.jsonl. A rerun resumes every chunk.
answer_chunks() {
    local module=$1 dir=$2
    shift 2
    mkdir -p "$dir"
    local pids=() idx failed=0
    for idx in $(seq 0 $((CHUNKS - 1))); do
        answer_one "${GPU_LIST[$idx]}" "$module" --answers-file "$dir/${CHUNKS}_${idx}.jsonl" \
            --num-chunks "$CHUNKS" --chunk-idx "$idx" "$@" &
        pids+=($!)
    done
    for idx in "${!pids[@]}"; do
        wait "${pids[$idx]}" || { echo "Chunk $idx of $CHUNKS failed (see above)." >&2; failed=1; }
    done
    [[ $failed == 0 ]] || exit 1
    : > "$dir/merge.jsonl"
    for idx in $(seq 0 $((CHUNKS - 1))); do
        cat "$dir/${CHUNKS}_${idx}.jsonl" >> "$dir/merge.jsonl"
    done
}

# answer MODULE FILE ARGS...: the answers file FILE, from one process, or with several GPUs from chunks
# answered under FILE's name without .jsonl and merged into FILE.
answer() {
    local module=$1 file=$2
    shift 2
    if [[ $CHUNKS == 1 ]]; then
        mkdir -p "$(dirname "$file")"
        answer_one "${GPU_LIST[0]}" "$module" --answers-file "$file" "$@"
    else
        answer_chunks "$module" "${file%.jsonl}" "$@"
        cp "${file%.jsonl}/merge.jsonl" "$file"
    fi
}
