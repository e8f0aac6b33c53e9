# Sourced by train_stage{1,2,3}.sh: the launcher and the flags every stage shares (MoE-LLaVA's recipe).
# Every value can be overridden from the environment, e.g. `NUM_GPUS=4 BATCH=16 bash scripts/train_stage2.sh`.
#
#   FAMILY            whose recipe gives the defaults (base LLM, checkpoint names, template, stage-3 batch):
#                     phi (default), qwen, stablelm, openchat, mistral, llama
#   RUN_NAME          checkpoint name prefix: ./checkpoints/$RUN_NAME-{pretrain,finetune,finetune-moe}
#                     (default: the family's, e.g. llavaphi-2.7b)
#   DRY_RUN=1         print the command and exit without running it
#   LAUNCHER          deepspeed (default), torchrun, or python (one process, no launcher)
#   NUM_GPUS          processes on this machine (default: deepspeed/torchrun use every visible GPU; 1 for torchrun)
#   MASTER_PORT       rendezvous port (default 29500)
#   LAUNCHER_ARGS     more launcher options, e.g. "--hostfile hostfile" or "--include localhost:0,1" (word-split)
#   DEEPSPEED_CONFIG  ZeRO config (default scripts/zero2.json; empty to train without DeepSpeed)
#   IMAGE_TOWER PROJECTOR SELECT_LAYER   vision tower, projector type, tower layer fed to the projector
#                     (stages 1-2 default to openai/clip-vit-large-patch14-336, mlp2x_gelu, -2; stage 3 and
#                     any empty value: the checkpoint's own)
#   BF16 TF32 GRAD_CKPT                  True/False (CPU runs need BF16=False TF32=False)
#   EPOCHS MAX_STEPS MAX_LEN WARMUP LOG_STEPS SAVE_STEPS SAVE_TOTAL WORKERS REPORT_TO CACHE_DIR SEED
#   EXTRA_ARGS        appended verbatim to the train.py arguments (word-split)
#   LORA=1            stages 2 and 3: train LoRA adapters instead of the LLM's weights (docs/LORA.md), with LLaVA's
#                     finetune_lora values: LORA_R 128, LORA_ALPHA 256, LORA_DROPOUT 0.05, PROJECTOR_LR 2e-5 (the
#                     projector's --mm_projector_lr), LR 2e-4; LORA_TARGET: the adapted Linears (default: the
#                     family's attention and FFN Linears). The output folders get a -lora suffix.

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The original recipe of each family (MoE-LLaVA scripts/v1/<model>/). An empty RECIPE_VERSION leaves
# `--version` to train.py, which takes the family's template from the checkpoint's model_type; OpenChat
# is a Mistral model with its own template. RECIPE_MOE_BATCH/RECIPE_MOE_GRAD_ACC are stage 3's.
FAMILY="${FAMILY:-phi}"
RECIPE_VERSION=""
RECIPE_MOE_BATCH=8
RECIPE_MOE_GRAD_ACC=2
case "$FAMILY" in
    phi)      RECIPE_MODEL=microsoft/phi-2;             RECIPE_NAME=llavaphi-2.7b ;;
    qwen)     RECIPE_MODEL=Qwen/Qwen-1_8B;              RECIPE_NAME=llavaqwen-1.8b ;;
    stablelm) RECIPE_MODEL=stabilityai/stablelm-2-1_6b; RECIPE_NAME=llavastablelm-1.6b ;;
    openchat) RECIPE_MODEL=openchat/openchat-3.5-1210;  RECIPE_NAME=llavaopenchat-7b
              RECIPE_VERSION=openchat; RECIPE_MOE_BATCH=4; RECIPE_MOE_GRAD_ACC=4 ;;
    mistral)  RECIPE_MODEL=mistralai/Mistral-7B-v0.1;   RECIPE_NAME=llavamistral-7b ;;
    llama)    RECIPE_MODEL=lmsys/vicuna-7b-v1.5;        RECIPE_NAME=llavavicuna-7b ;;
    *)
        echo "FAMILY=$FAMILY has no recipe: use phi, qwen, stablelm, openchat, mistral or llama (for another" \
             "LLM, take the closest and set MODEL, VERSION and OUTPUT_DIR)." >&2
        exit 2
        ;;
esac
RUN_NAME="${RUN_NAME:-$RECIPE_NAME}"

LAUNCHER="${LAUNCHER:-deepspeed}"
DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG-$REPO_DIR/scripts/zero2.json}"
BF16="${BF16:-True}"
TF32="${TF32:-True}"
GRAD_CKPT="${GRAD_CKPT:-True}"
EPOCHS="${EPOCHS:-1}"
MAX_STEPS="${MAX_STEPS:--1}"
MAX_LEN="${MAX_LEN:-2048}"
WARMUP="${WARMUP:-0.03}"
LOG_STEPS="${LOG_STEPS:-1}"
SAVE_TOTAL="${SAVE_TOTAL:-1}"
REPORT_TO="${REPORT_TO:-none}"
CACHE_DIR="${CACHE_DIR:-./cache_dir}"
SEED="${SEED:-42}"

# The flags of every stage; the stage scripts add theirs.
COMMON_ARGS=(
    --mm_use_im_start_end False
    --mm_use_im_patch_token False
    --bf16 "$BF16"
    --tf32 "$TF32"
    --num_train_epochs "$EPOCHS"
    --max_steps "$MAX_STEPS"
    --per_device_eval_batch_size 4
    --evaluation_strategy no
    --save_strategy steps
    --save_total_limit "$SAVE_TOTAL"
    --weight_decay 0.
    --warmup_ratio "$WARMUP"
    --lr_scheduler_type cosine
    --logging_steps "$LOG_STEPS"
    --model_max_length "$MAX_LEN"
    --gradient_checkpointing "$GRAD_CKPT"
    --report_to "$REPORT_TO"
    --cache_dir "$CACHE_DIR"
    --seed "$SEED"
)
if [[ -n "$DEEPSPEED_CONFIG" ]]; then
    COMMON_ARGS+=(--deepspeed "$DEEPSPEED_CONFIG")
fi

# The LoRA flags of stages 2 and 3 (LLaVA's scripts/v1_5/finetune_lora.sh values); LORA_SUFFIX names their outputs.
LORA="${LORA:-0}"
LORA_ARGS=()
LORA_SUFFIX=""
if [[ "$LORA" != 0 ]]; then
    LORA_ARGS=(--lora_enable True --lora_r "${LORA_R:-128}" --lora_alpha "${LORA_ALPHA:-256}"
               --lora_dropout "${LORA_DROPOUT:-0.05}" --mm_projector_lr "${PROJECTOR_LR:-2e-5}")
    # shellcheck disable=SC2206
    [[ -n "${LORA_TARGET:-}" ]] && LORA_ARGS+=(--lora_target $LORA_TARGET)
    LORA_SUFFIX="-lora"
fi

# launch ARGS...: print the command, then replace this shell with it (or stop there with DRY_RUN=1).
launch() {
    local cmd
    case "$LAUNCHER" in
        deepspeed)
            cmd=(deepspeed)
            [[ -n "${NUM_GPUS:-}" ]] && cmd+=(--num_gpus "$NUM_GPUS")
            # shellcheck disable=SC2206
            cmd+=(--master_port "${MASTER_PORT:-29500}" ${LAUNCHER_ARGS:-} "$REPO_DIR/moellava/train/train.py")
            ;;
        torchrun)
            # shellcheck disable=SC2206
            cmd=(torchrun --nproc_per_node "${NUM_GPUS:-1}" --master_port "${MASTER_PORT:-29500}" ${LAUNCHER_ARGS:-}
                 "$REPO_DIR/moellava/train/train.py")
            ;;
        python)
            # One process without a launcher: DeepSpeed (if configured) still needs a rendezvous address.
            export RANK="${RANK:-0}" LOCAL_RANK="${LOCAL_RANK:-0}" WORLD_SIZE="${WORLD_SIZE:-1}"
            export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" MASTER_PORT="${MASTER_PORT:-29500}"
            cmd=(python "$REPO_DIR/moellava/train/train.py")
            ;;
        *)
            echo "LAUNCHER=$LAUNCHER is not supported: use deepspeed, torchrun or python." >&2
            exit 2
            ;;
    esac
    local vision=()
    [[ -n "${IMAGE_TOWER:-}" ]] && vision+=(--image_tower "$IMAGE_TOWER")
    [[ -n "${PROJECTOR:-}" ]] && vision+=(--image_projector_type "$PROJECTOR")
    [[ -n "${SELECT_LAYER:-}" ]] && vision+=(--mm_vision_select_layer "$SELECT_LAYER")
    # EXTRA_ARGS is split into words on purpose.
    # shellcheck disable=SC2206
    cmd+=("$@" "${vision[@]}" ${EXTRA_ARGS:-})
    printf '# FAMILY=%s RUN_NAME=%s\n' "$FAMILY" "$RUN_NAME"
    printf '+'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    if [[ "${DRY_RUN:-0}" != 0 ]]; then
        exit 0
    fi
    exec "${cmd[@]}"
}
