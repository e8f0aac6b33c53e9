#!/usr/bin/env bash
# Stage 2 (instruction tuning): the LLM and the projector train, starting from stage 1's projector, on
# conversations (Hybrid-FT) mixed with text-only data; writes a full checkpoint to $OUTPUT_DIR.
#
#   MODEL             base LLM (the one of stage 1)                 default the FAMILY's, e.g. microsoft/phi-2
#   VERSION           conversation template                         default: openchat for FAMILY=openchat, else the
#                                                                   model family's (phi, qwen, stablelm, mistral, v1)
#   PRETRAIN_ADAPTER  stage 1's mm_projector.bin (empty: none)      default ./checkpoints/$RUN_NAME-pretrain/mm_projector.bin
#   DATA_PATH         JSON file(s), space-separated                 default the Hybrid-FT files under ft_json/
#   IMAGE_FOLDER                                                    default train_image_video
#   OUTPUT_DIR                                                      default ./checkpoints/$RUN_NAME-finetune
#                                                                   (LORA=1: ...-finetune-lora)
#   BATCH GRAD_ACC LR SAVE_STEPS WORKERS                            default 8 2 2e-5 50000 4 (LORA=1: LR 2e-4)
# plus the shared variables of scripts/common.sh (FAMILY, RUN_NAME, NUM_GPUS, DEEPSPEED_CONFIG, IMAGE_TOWER, BF16,
# EXTRA_ARGS, DRY_RUN...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL="${MODEL:-$RECIPE_MODEL}"
IMAGE_TOWER="${IMAGE_TOWER:-openai/clip-vit-large-patch14-336}"
PROJECTOR="${PROJECTOR:-mlp2x_gelu}"
SELECT_LAYER="${SELECT_LAYER:--2}"
VERSION="${VERSION:-$RECIPE_VERSION}"
PRETRAIN_ADAPTER="${PRETRAIN_ADAPTER-./checkpoints/$RUN_NAME-pretrain/mm_projector.bin}"
DATA_PATH="${DATA_PATH:-ft_json/la_tune_256k.json ft_json/lrv_tune_331k.json ft_json/lvis_tune_220k_.json ft_json/svit_tune_157k.json ft_json/nlp_tune.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-train_image_video}"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/$RUN_NAME-finetune$LORA_SUFFIX}"
BATCH="${BATCH:-8}"
GRAD_ACC="${GRAD_ACC:-2}"
if [[ "$LORA" != 0 ]]; then LR="${LR:-2e-4}"; else LR="${LR:-2e-5}"; fi
SAVE_STEPS="${SAVE_STEPS:-50000}"
WORKERS="${WORKERS:-4}"

VERSION_ARGS=()
[[ -n "$VERSION" ]] && VERSION_ARGS=(--version "$VERSION")
ADAPTER_ARGS=()
[[ -n "$PRETRAIN_ADAPTER" ]] && ADAPTER_ARGS=(--pretrain_mm_mlp_adapter "$PRETRAIN_ADAPTER")

# shellcheck disable=SC2086
launch \
    --model_name_or_path "$MODEL" \
    "${VERSION_ARGS[@]}" \
    --data_path $DATA_PATH \
    --image_folder "$IMAGE_FOLDER" \
    "${ADAPTER_ARGS[@]}" \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --output_dir "$OUTPUT_DIR" \
    --per_device_train_batch_size "$BATCH" \
    --gradient_accumulation_steps "$GRAD_ACC" \
    --learning_rate "$LR" \
    --save_steps "$SAVE_STEPS" \
    --dataloader_num_workers "$WORKERS" \
    "${LORA_ARGS[@]}" \
    "${COMMON_ARGS[@]}"
