#!/usr/bin/env bash
# Stage 1 (pretraining the projector): `--version plain`, only the projector trains, on image-caption
# pairs (LLaVA-PT 558k); writes $OUTPUT_DIR/mm_projector.bin for stage 2.
#
#   MODEL         base LLM (hub id or folder)                 default the FAMILY's, e.g. microsoft/phi-2
#   VERSION       conversation template                       default plain
#   DATA_PATH     JSON file(s), space-separated               default pt_json/llava_image_.json
#   IMAGE_FOLDER  folder the image paths are relative to      default train_image_video
#   OUTPUT_DIR                                                default ./checkpoints/$RUN_NAME-pretrain
#   BATCH GRAD_ACC LR SAVE_STEPS WORKERS                      default 32 1 1e-3 24000 8
# plus the shared variables of scripts/common.sh (FAMILY, RUN_NAME, NUM_GPUS, DEEPSPEED_CONFIG, IMAGE_TOWER, BF16,
# EXTRA_ARGS, DRY_RUN...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ "$LORA" != 0 ]]; then
    echo "LORA=$LORA: stage 1 trains only the projector, LoRA is for stages 2 and 3 (unset LORA here)." >&2
    exit 2
fi

MODEL="${MODEL:-$RECIPE_MODEL}"
IMAGE_TOWER="${IMAGE_TOWER:-openai/clip-vit-large-patch14-336}"
PROJECTOR="${PROJECTOR:-mlp2x_gelu}"
SELECT_LAYER="${SELECT_LAYER:--2}"
VERSION="${VERSION:-plain}"
DATA_PATH="${DATA_PATH:-pt_json/llava_image_.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-train_image_video}"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/$RUN_NAME-pretrain}"
BATCH="${BATCH:-32}"
GRAD_ACC="${GRAD_ACC:-1}"
LR="${LR:-1e-3}"
SAVE_STEPS="${SAVE_STEPS:-24000}"
WORKERS="${WORKERS:-8}"

# shellcheck disable=SC2086
launch \
    --model_name_or_path "$MODEL" \
    --version "$VERSION" \
    --data_path $DATA_PATH \
    --image_folder "$IMAGE_FOLDER" \
    --tune_mm_mlp_adapter True \
    --output_dir "$OUTPUT_DIR" \
    --per_device_train_batch_size "$BATCH" \
    --gradient_accumulation_steps "$GRAD_ACC" \
    --learning_rate "$LR" \
    --save_steps "$SAVE_STEPS" \
    --dataloader_num_workers "$WORKERS" \
    "${COMMON_ARGS[@]}"
