#!/usr/bin/env bash
# Stage 3 (MoE-tuning): the stage-2 model's FFNs are upcycled into sparse MoE layers (every other layer,
# 4 experts, top-2); the experts, the routers and the projector train, on LLaVA-FT 665k + text-only data.
# Writes a MoE checkpoint to $OUTPUT_DIR (loadable with moellava.model.builder.load_pretrained_model).
#
#   MODEL          stage 2's output                              default ./checkpoints/$RUN_NAME-finetune
#   VERSION        conversation template                         default: openchat for FAMILY=openchat, else the
#                                                                model family's
#   DATA_PATH      JSON file(s), space-separated                 default ft_json/llava_image_tune_.json ft_json/nlp_tune.json
#   IMAGE_FOLDER                                                 default train_image_video
#   OUTPUT_DIR                                                   default ./checkpoints/$RUN_NAME-finetune-moe
#                                                                (LORA=1: ...-finetune-moe-lora; every expert gets
#                                                                its own adapter, the routers train in full)
#   MOE_MODE NUM_EXPERTS TOP_K CAPACITY_FACTOR USE_RESIDUAL AUX_COEF EP_SIZE
#                                                                default sparse 4 2 1.5 False 0.01 1
#   TRAIN_MODULES  parameter-name substrings that train          default: the family's FFN names + wg
#   BATCH GRAD_ACC LR SAVE_STEPS WORKERS                         default 8 2 2e-5 24000 4 (openchat: 4 4 ...;
#                                                                LORA=1: LR 2e-4)
# plus the shared variables of scripts/common.sh (FAMILY, RUN_NAME, NUM_GPUS, DEEPSPEED_CONFIG, IMAGE_TOWER, BF16,
# EXTRA_ARGS, DRY_RUN...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL="${MODEL:-./checkpoints/$RUN_NAME-finetune}"
VERSION="${VERSION:-$RECIPE_VERSION}"
DATA_PATH="${DATA_PATH:-ft_json/llava_image_tune_.json ft_json/nlp_tune.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-train_image_video}"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/$RUN_NAME-finetune-moe$LORA_SUFFIX}"
MOE_MODE="${MOE_MODE:-sparse}"
NUM_EXPERTS="${NUM_EXPERTS:-4}"
TOP_K="${TOP_K:-2}"
CAPACITY_FACTOR="${CAPACITY_FACTOR:-1.5}"
USE_RESIDUAL="${USE_RESIDUAL:-False}"
AUX_COEF="${AUX_COEF:-0.01}"
EP_SIZE="${EP_SIZE:-1}"
TRAIN_MODULES="${TRAIN_MODULES:-}"
BATCH="${BATCH:-$RECIPE_MOE_BATCH}"
GRAD_ACC="${GRAD_ACC:-$RECIPE_MOE_GRAD_ACC}"
if [[ "$LORA" != 0 ]]; then LR="${LR:-2e-4}"; else LR="${LR:-2e-5}"; fi
SAVE_STEPS="${SAVE_STEPS:-24000}"
WORKERS="${WORKERS:-4}"

VERSION_ARGS=()
[[ -n "$VERSION" ]] && VERSION_ARGS=(--version "$VERSION")
MODULE_ARGS=()
# shellcheck disable=SC2206
[[ -n "$TRAIN_MODULES" ]] && MODULE_ARGS=(--train_modules $TRAIN_MODULES)

# shellcheck disable=SC2086
launch \
    --model_name_or_path "$MODEL" \
    "${VERSION_ARGS[@]}" \
    --data_path $DATA_PATH \
    --image_folder "$IMAGE_FOLDER" \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --moe_enable True \
    --moe_mode "$MOE_MODE" \
    --num_experts $NUM_EXPERTS \
    --top_k_experts "$TOP_K" \
    --capacity_factor "$CAPACITY_FACTOR" \
    --use_residual "$USE_RESIDUAL" \
    --router_aux_loss_coef "$AUX_COEF" \
    --ep_size "$EP_SIZE" \
    "${MODULE_ARGS[@]}" \
    --output_dir "$OUTPUT_DIR" \
    --per_device_train_batch_size "$BATCH" \
    --gradient_accumulation_steps "$GRAD_ACC" \
    --learning_rate "$LR" \
    --save_steps "$SAVE_STEPS" \
    --dataloader_num_workers "$WORKERS" \
    "${LORA_ARGS[@]}" \
    "${COMMON_ARGS[@]}"
