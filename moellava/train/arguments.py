"""Command-line arguments of `moellava/train/train.py` (parsed with transformers' HfArgumentParser).

Names and meanings follow MoE-LLaVA (spec section 3.1-3.3). Defaults differ where the original's did not
work or disagreed with every shipped recipe:
- `--num_experts` defaults to [4] and takes one value per MoE layer (the original's default was lost by the
  parser and a per-layer list was never stored);
- `--version` defaults to the model family's template (families table) instead of "v0";
- `--moe_mode` defaults to "sparse" (the recipe); the vision settings (`--image_tower`, projector type,
  selected layer and feature) default to the checkpoint's own, else to -2 / patch / linear;
- `--mm_use_im_patch_token` defaults to False (every recipe passes False);
- choices are enforced by the parser (`Literal` fields), not only documented.
- the LoRA flags (`--lora_enable` and its settings, spec 3.3) work for stages 2 and 3, MoE experts included
  (docs/LORA.md); `--lora_target` is new and defaults to the family's attention and FFN Linears;
  `--lora_weight_path` starts the adapters from a LoRA checkpoint (the original declared it unused).
k-bit quantisation and video arguments of the original are not offered: this project does not implement
those paths, and a flag that does nothing would mislead.
"""

import json
import os
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import transformers

MOE_BACKEND_CHOICES = ("auto", "native", "deepspeed")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "LLM (stages 1-2) or previous-stage checkpoint (stage 3): hub id or local folder."},
    )
    version: Optional[str] = field(
        default=None,
        metadata={
            "help": "Conversation template (moellava/conversation.py conv_templates), e.g. plain (stage 1), "
            "v1, phi, qwen, stablelm, mistral. Default: the model family's template."
        },
    )
    freeze_backbone: bool = field(
        default=False, metadata={"help": "Freeze the LLM decoder (embeddings, layers, norm); lm_head trains."}
    )
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Stage 1: train only the projector and save only mm_projector.bin."}
    )
    image_tower: Optional[str] = field(
        default=None,
        metadata={"help": "CLIP/SigLIP vision tower (hub id or folder). Default: the checkpoint's own tower."},
    )
    mm_vision_select_layer: Optional[int] = field(
        default=None,
        metadata={"help": "Hidden layer of the tower fed to the projector. Default: the checkpoint's, else -2 "
                  "(penultimate)."},
    )
    mm_vision_select_feature: Optional[Literal["patch", "cls_patch"]] = field(
        default=None,
        metadata={"help": "patch: patch tokens only; cls_patch: CLS token too (CLIP). Default: the checkpoint's, "
                  "else patch."},
    )
    pretrain_mm_mlp_adapter: Optional[str] = field(
        default=None, metadata={"help": "Stage-1 mm_projector.bin to start the projector from (stage 2)."}
    )
    image_projector_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "linear, mlp{N}x_gelu (recipes: mlp2x_gelu) or identity. Default: the checkpoint's "
            "projector, else linear."
        },
    )
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "Wrap images in <im_start>/<im_end>."})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "Add the <im_patch> token."})

    # Stage 3: MoE-tuning.
    moe_enable: bool = field(default=False, metadata={"help": "Stage 3: upcycle FFNs into MoE layers."})
    train_modules: Optional[List[str]] = field(
        default=None,
        metadata={
            "help": "Name substrings of the parameters that train in stage 3 (besides the projector). "
            "Default: the family's FFN weights and the router wg (e.g. fc1 fc2 wg for phi)."
        },
    )
    moe_mode: Literal["first_half", "second_half", "sparse", "dense"] = field(
        default="sparse",
        metadata={"help": "Which layers become MoE: sparse = every other layer from 0 (the recipe)."},
    )
    moe_layers_idx: Optional[List[int]] = field(
        default=None, metadata={"help": "Explicit MoE layer indices; overrides --moe_mode."}
    )
    ep_size: int = field(default=1, metadata={"help": "Expert-parallel group size (needs --deepspeed)."})
    num_experts: List[int] = field(
        default_factory=lambda: [4],
        metadata={"help": "Experts per MoE layer: one value for all layers, or one value per MoE layer."},
    )
    top_k_experts: Literal[1, 2] = field(default=2, metadata={"help": "Experts each token is routed to."})
    capacity_factor: float = field(default=1.0, metadata={"help": "Expert capacity factor in training."})
    eval_capacity_factor: float = field(default=2.0, metadata={"help": "Expert capacity factor in eval."})
    min_capacity: int = field(default=0, metadata={"help": "Minimum expert capacity (tokens)."})
    use_residual: bool = field(default=False, metadata={"help": "Residual-MoE (dense FFN mixed in)."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    drop_tokens: Optional[bool] = field(
        default=None,
        metadata={"help": "Drop tokens over capacity. Default: dropless (native), capacity-limited (deepspeed)."},
    )
    moe_backend: Literal["auto", "native", "deepspeed"] = field(
        default="auto",
        metadata={
            "help": "auto: deepspeed (DeepSpeed-MoE's all-to-all) for expert parallelism (--ep_size > 1 under "
            "--deepspeed), else native (every expert on every rank: one device, DDP, or DeepSpeed at ep_size 1)."
        },
    )


@dataclass
class DataArguments:
    data_path: Optional[List[str]] = field(
        default=None, metadata={"help": "One or more LLaVA-format JSON files (a list of samples each)."}
    )
    image_folder: Optional[str] = field(default=None, metadata={"help": "Folder the samples' image paths are relative to."})
    lazy_preprocess: bool = field(
        default=True,
        metadata={"help": "Accepted for the original MoE-LLaVA command lines: samples are always preprocessed "
                  "lazily here (when a batch needs them), whatever the value."},
    )
    image_aspect_ratio: Literal["square", "pad"] = field(
        default="square",
        metadata={"help": "square: the processor's resize + centre crop; pad: pad to square first (stages 2-3)."},
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={
            "help": "Leave out and count the samples the data check before training finds bad (a missing or "
            "corrupt image, an image count that does not match their <image> placeholders, a conversation "
            "that cannot be tokenized or does not fit --model_max_length), instead of stopping. The count "
            "is logged and written to <output_dir>/skipped_samples.json."
        },
    )
    max_skipped_fraction: float = field(
        default=0.01,
        metadata={"help": "With --skip_bad_samples: stop when more than this fraction of the data is bad."},
    )
    data_check_workers: Optional[int] = field(
        default=None,
        metadata={"help": "Processes of the data check before training (large data only). Default: one per CPU "
                  "core, at most 16; 0 checks in the training process."},
    )

    def __post_init__(self):
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"--max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}.")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: Optional[str] = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    save_safetensors: bool = field(default=True, metadata={"help": "Save weights as safetensors."})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Keep the projector frozen."})
    model_max_length: int = field(
        default=512,
        metadata={"help": "Maximum sequence length in tokens, image tokens included (longer is cut)."},
    )
    mm_projector_lr: Optional[float] = field(
        default=None, metadata={"help": "Learning rate of the projector (default: --learning_rate)."}
    )
    group_by_modality_length: bool = field(
        default=False,
        metadata={"help": "Batch image and text-only samples separately, grouped by length."},
    )

    # LoRA (stages 2 and 3): adapters on the LLM's Linears; the base weights stay frozen.
    lora_enable: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters on the LLM (and on every expert in stage 3) instead of its "
                  "weights; the projector and the MoE routers still train in full."},
    )
    lora_r: int = field(default=128, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA scaling numerator (the update is alpha/r * B A)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_bias: Literal["none", "all", "lora_only"] = field(
        default="none",
        metadata={"help": "Biases that train and are saved with the adapter: none, all, or those of adapted Linears."},
    )
    lora_target: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Linears of the LLM's decoder layers that get adapters (names or dotted tails, e.g. "
                  "q_proj v_proj or mlp.w1). Default: the family's attention and FFN Linears (experts included)."},
    )
    lora_weight_path: str = field(
        default="",
        metadata={"help": "A LoRA checkpoint folder (adapter_config.json ...) to start the adapters and the other "
                  "trained tensors from; its LoRA settings must be this run's."},
    )


def deepspeed_zero_stage(deepspeed_config) -> Optional[int]:
    """The ZeRO stage of a `--deepspeed` value (a JSON path or a dict), None without DeepSpeed."""
    if not deepspeed_config:
        return None
    if isinstance(deepspeed_config, dict):
        config = deepspeed_config
    else:
        if not os.path.isfile(deepspeed_config):
            raise FileNotFoundError(f"--deepspeed {deepspeed_config}: no such file (see scripts/zero2.json).")
        with open(deepspeed_config, encoding="utf-8") as f:
            config = json.load(f)
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Cross-argument checks, before anything is loaded; each error names the fix."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: the LLM (stages 1-2) or the previous stage's output.")
    if not data_args.data_path:
        raise ValueError("--data_path is required: one or more LLaVA-format JSON files.")
    if model_args.moe_enable and deepspeed_zero_stage(training_args.deepspeed) == 3:
        raise ValueError(
            "MoE training (--moe_enable True) cannot run under ZeRO-3: DeepSpeed-MoE does not support stage 3. "
            "Use --deepspeed scripts/zero2.json (or zero2_offload.json)."
        )
    if model_args.ep_size > 1 and not training_args.deepspeed:
        raise ValueError(
            f"--ep_size {model_args.ep_size} needs the DeepSpeed engine (expert-parallel groups and all-to-all): "
            "launch with `deepspeed` and pass --deepspeed scripts/zero2.json."
        )
    if model_args.ep_size > 1 and model_args.drop_tokens:
        raise ValueError(
            f"--ep_size {model_args.ep_size} with --drop_tokens True: DeepSpeed-MoE sizes each expert's buffer from "
            "the rank's own token count, so ranks whose batches differ in length (as LLaVA batches do) exchange "
            "buffers of different sizes and the all-to-all fails. Leave --drop_tokens unset (expert parallelism "
            "then routes without dropping) or use --ep_size 1."
        )
    if model_args.moe_backend == "deepspeed" and not training_args.deepspeed:
        raise ValueError(
            "--moe_backend deepspeed needs the DeepSpeed engine: pass --deepspeed scripts/zero2.json, or use "
            "--moe_backend native (or auto)."
        )
    if model_args.tune_mm_mlp_adapter and model_args.moe_enable:
        raise ValueError(
            "--tune_mm_mlp_adapter (stage 1) and --moe_enable (stage 3) exclude each other: stage 1 trains only "
            "the projector; run the stages one after the other."
        )
    if model_args.tune_mm_mlp_adapter and training_args.freeze_mm_mlp_adapter:
        raise ValueError(
            "--tune_mm_mlp_adapter trains only the projector, and --freeze_mm_mlp_adapter freezes it: nothing "
            "would train. Drop one of them."
        )
    adapter = model_args.pretrain_mm_mlp_adapter
    if adapter and not os.path.isfile(adapter):
        raise ValueError(
            f"--pretrain_mm_mlp_adapter {adapter}: no such file. Pass the mm_projector.bin written by Stage 1 "
            "(scripts/train_stage1.sh writes <its OUTPUT_DIR>/mm_projector.bin), or leave it out to start the "
            "projector from scratch."
        )
    check_lora_arguments(model_args, training_args)
    if training_args.model_max_length < 1:
        raise ValueError(f"--model_max_length must be positive, got {training_args.model_max_length}.")


def check_lora_arguments(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """The LoRA flags against each other and against the stage; each error names the fix."""
    if not training_args.lora_enable:
        given = [flag for flag, value in (("--lora_target", training_args.lora_target),
                                          ("--lora_weight_path", training_args.lora_weight_path)) if value]
        if given:
            raise ValueError(f"{' and '.join(given)} only apply to LoRA training: add --lora_enable True.")
        return
    conflicts = [
        (model_args.tune_mm_mlp_adapter, "--tune_mm_mlp_adapter (stage 1 trains only the projector; LoRA is for "
                                         "stages 2 and 3)"),
        (model_args.freeze_backbone, "--freeze_backbone (it would freeze the adapters too)"),
        (model_args.train_modules, "--train_modules (with LoRA the experts train through their adapters and the "
                                   "routers in full; choose the adapted Linears with --lora_target)"),
        (model_args.ep_size > 1, f"--ep_size {model_args.ep_size} (expert-parallel LoRA is not supported yet; use "
                                 "--ep_size 1, which data-parallel training still spreads over every GPU)"),
        (model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token,
         "--mm_use_im_start_end / --mm_use_im_patch_token True (new token rows would need the embeddings to train, "
         "which LoRA keeps frozen; every recipe passes False)"),
    ]
    for conflict, flag in conflicts:
        if conflict:
            raise ValueError(f"--lora_enable True cannot be combined with {flag}.")
    if training_args.lora_r < 1:
        raise ValueError(f"--lora_r must be at least 1, got {training_args.lora_r}.")
    if not 0.0 <= training_args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {training_args.lora_dropout}.")
    path = training_args.lora_weight_path
    if path and not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(
            f"--lora_weight_path {path}: no adapter_config.json there. Pass a LoRA checkpoint folder written by "
            "LoRA training (its output_dir or one of its checkpoint-N folders)."
        )
