"""`train()`: the three MoE-LLaVA training stages, run by the `deepspeed` launcher (or `torchrun`, or plain
`python` on one device).

Stage 1 (`--version plain --tune_mm_mlp_adapter True`): only the projector trains; `mm_projector.bin`.
Stage 2 (`--pretrain_mm_mlp_adapter .../mm_projector.bin`): the LLM and the projector train.
Stage 3 (`--moe_enable True`): the stage-2 model's FFNs are upcycled into MoE layers; the parameters named
by `--train_modules`, the routers and the projector train.
`--lora_enable True` (stages 2 and 3): LoRA adapters on the LLM's Linears (in stage 3 after upcycling, so
every expert gets its own) train instead of the LLM's weights; the projector and the routers train in full.
The output is then a LoRA checkpoint (docs/LORA.md) that `load_pretrained_model` loads over its base model.
A run whose `--output_dir` holds `checkpoint-*` folders resumes from the last one. The final output of
stages 2 and 3 is a Hugging Face checkpoint (safetensors, config with `conv_template`, tokenizer) that
`moellava.model.builder.load_pretrained_model(output_dir)` loads with no other argument.
"""

import dataclasses
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import moellava.model  # noqa: F401  (registers the llava_* / moe_llava_* model types)
from moellava import conversation as conversation_lib
from moellava.errors import run_main
from moellava.model import lora
from moellava.model.builder import is_stage1_output, load_config
from moellava.model.checkpoint_layouts import load_checkpoint
from moellava.model.moe import build_moe_settings, freeze_for_moe_training, moe_blocks, router_parameter_names
from moellava.model.moe_model import has_moe_layers
from moellava.tokenization import family_for_model_type, get_family, load_tokenizer
from moellava.train import checkpointing
from moellava.train.arguments import DataArguments, ModelArguments, TrainingArguments, check_arguments
from moellava.train.data_check import CHECK_FILE
from moellava.train.dataset import make_supervised_data_module
from moellava.train.llava_trainer import PROJECTOR_FILE, SKIP_REPORT_FILE, LLaVATrainer

logger = logging.getLogger("moellava.train")


def setup_logging(training_args: TrainingArguments) -> None:
    """INFO on the main process, warnings only elsewhere (every rank would repeat the same lines)."""
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    logging.getLogger("moellava").setLevel(level)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def resolve_moe_backend(requested: str, training_args: TrainingArguments, ep_size: int) -> str:
    """`auto`: DeepSpeed-MoE's all-to-all only for expert parallelism (`--ep_size` > 1 under the DeepSpeed
    engine), else the native dispatcher: every expert on every rank, no capacity padding, also under the
    engine (which still reduces the expert gradients over the data-parallel ranks)."""
    if requested != "auto":
        return requested
    return "deepspeed" if training_args.deepspeed and ep_size > 1 else "native"


def resolve_drop_tokens(model_args: ModelArguments, saved: Optional[bool] = None) -> Optional[bool]:
    """`--drop_tokens`, else dropless under expert parallelism, else the checkpoint's (or the backend's) default.

    With ep_size > 1, ranks hold batches of different lengths; DeepSpeed-MoE agrees on the all-to-all buffer
    sizes only when it does not drop (it then all-reduces the capacity)."""
    if model_args.drop_tokens is not None:
        return model_args.drop_tokens
    if model_args.ep_size > 1:
        return False
    return saved


def model_class_for(model_type: str, moe: bool):
    """The LLaVA causal-LM class for a checkpoint's `model_type` (a backbone such as "llama", or a
    "llava_<family>" / "moe_llava_<family>" checkpoint); dispatch is on the type, never the folder name."""
    family = family_for_model_type(model_type)
    target = f"moe_llava_{family}" if moe else f"llava_{family}"
    if target not in CONFIG_MAPPING:
        raise ValueError(
            f"model_type {model_type!r} is of the {family!r} family, but no {target!r} model is registered in "
            "moellava.model: that family cannot be trained yet."
        )
    return MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[target]]


def requested_moe_settings(num_layers: int, model_args: ModelArguments, training_args: TrainingArguments,
                           family: str) -> dict:
    """The `config.moe` this run's MoE arguments describe."""
    return build_moe_settings(
        num_layers,
        num_experts=model_args.num_experts,
        moe_mode=model_args.moe_mode,
        moe_layers_idx=model_args.moe_layers_idx,
        top_k_experts=model_args.top_k_experts,
        capacity_factor=model_args.capacity_factor,
        eval_capacity_factor=model_args.eval_capacity_factor,
        min_capacity=model_args.min_capacity,
        use_residual=model_args.use_residual,
        router_aux_loss_coef=model_args.router_aux_loss_coef,
        ep_size=model_args.ep_size,
        # With LoRA the experts train through their adapters: only the routers train in full.
        train_modules=model_args.train_modules or (["wg"] if training_args.lora_enable
                                                   else list(get_family(family).train_modules)),
        backend=resolve_moe_backend(model_args.moe_backend, training_args, model_args.ep_size),
        drop_tokens=resolve_drop_tokens(model_args),
    )


# What a trained MoE model is made of (cannot change), and how it routes (can).
MOE_STRUCTURE = {"num_experts": "--num_experts (NUM_EXPERTS)", "moe_layers_idx": "--moe_mode / --moe_layers_idx "
                 "(MOE_MODE)", "use_residual": "--use_residual (USE_RESIDUAL)"}
MOE_ROUTING = ("top_k_experts", "capacity_factor", "eval_capacity_factor", "min_capacity", "router_aux_loss_coef")


def continued_moe_settings(path: str, saved: dict, requested: dict, model_args: ModelArguments) -> dict:
    """The settings of a run that continues training a MoE checkpoint: its experts and layers as saved (a
    run asking for others is refused), routing settings as this run asks (applied, with a warning), the
    expert layout (processes, --ep_size) of this run."""
    structure = [(key, saved.get(key), requested[key]) for key in MOE_STRUCTURE if saved.get(key) != requested[key]]
    if structure:
        differences = "; ".join(f"{key}: the checkpoint has {old}, this run asks for {new} ({MOE_STRUCTURE[key]})"
                                for key, old, new in structure)
        raise ValueError(
            f"{path} is a MoE checkpoint whose experts and MoE layers are trained and cannot change: {differences}. "
            "Pass the checkpoint's values to continue training it (or upcycle its dense stage-2 model instead)."
        )
    routing = [(key, saved.get(key), requested[key]) for key in MOE_ROUTING if saved.get(key) != requested[key]]
    if routing:
        logger.warning("Continuing %s with this run's routing settings (applied; the expert weights are as "
                       "saved): %s.", path, ", ".join(f"{key} {old} -> {new}" for key, old, new in routing))
    return {**saved, **{key: requested[key] for key in MOE_ROUTING},
            "train_modules": requested["train_modules"], "backend": requested["backend"],
            "ep_size": requested["ep_size"], "drop_tokens": resolve_drop_tokens(model_args, saved.get("drop_tokens"))}


def load_model(model_args: ModelArguments, training_args: TrainingArguments):
    """The model of `--model_name_or_path` in its LLaVA class (MoE class for stage 3), loaded as
    `load_pretrained_model` loads it (checkpoint_layouts: a published checkpoint's layout, a tower it does not
    store taken from its config's tower path or `--image_tower`, any other gap refused)."""
    path = model_args.model_name_or_path
    if is_stage1_output(path):
        raise ValueError(
            f"{path} is a Stage-1 output (only {PROJECTOR_FILE}): pass the base LLM as --model_name_or_path and "
            f"--pretrain_mm_mlp_adapter {os.path.join(path, PROJECTOR_FILE)}."
        )
    if lora.is_lora_checkpoint(path):
        raise ValueError(
            f"{path} is a LoRA checkpoint (adapters over its base model): merge it into a full checkpoint first, "
            f"python scripts/merge_lora_weights.py --model-path {path} --save-model-path {path.rstrip('/')}-merged, "
            "and pass that folder as --model_name_or_path."
        )
    config = load_config(path, cache_dir=training_args.cache_dir)
    already_moe = has_moe_layers(config)
    if already_moe and not model_args.moe_enable:
        raise ValueError(
            f"{path} is a MoE checkpoint: pass --moe_enable True to keep training it."
        )
    model_class = model_class_for(config.model_type, model_args.moe_enable)
    config = model_class.config_class.from_pretrained(path, cache_dir=training_args.cache_dir)
    if already_moe:
        requested = requested_moe_settings(config.num_hidden_layers, model_args, training_args,
                                           family_for_model_type(config.model_type))
        config.moe = continued_moe_settings(path, config.moe, requested, model_args)
    # DeepSpeed casts the model to its precision anyway; without it the Trainer keeps fp32 master weights.
    dtype = torch.float32
    if training_args.deepspeed and (training_args.bf16 or training_args.fp16):
        dtype = torch.bfloat16 if training_args.bf16 else torch.float16
    model = load_checkpoint(model_class, path, config, torch_dtype=dtype, cache_dir=training_args.cache_dir,
                            image_tower=model_args.image_tower)
    model.config.use_cache = False
    return model


def upcycle(model, model_args: ModelArguments, training_args: TrainingArguments, family: str) -> List[str]:
    """Stage 3: MoE layers from the dense FFNs (unless the checkpoint has them); returns the train_modules."""
    if not has_moe_layers(model.config):
        settings = requested_moe_settings(model.config.num_hidden_layers, model_args, training_args, family)
        model.initialize_moe_modules(settings)
    else:
        logger.info("%s already has MoE layers %s: training them further.", model_args.model_name_or_path,
                    model.config.moe["moe_layers_idx"])
    return model.config.moe["train_modules"]


def vision_arguments(model_args: ModelArguments, config) -> Optional[ModelArguments]:
    """The model arguments with the tower, projector type and feature selection filled from the checkpoint
    (a LLaVA checkpoint records them in its config) when not given; None for a text-only model."""
    tower = model_args.image_tower or getattr(config, "mm_image_tower", None)
    if not tower:
        return None
    def pick(value, key, default):
        return value if value is not None else getattr(config, key, default)

    return dataclasses.replace(
        model_args,
        image_tower=tower,
        image_projector_type=pick(model_args.image_projector_type, "image_projector_type", "linear"),
        mm_vision_select_layer=pick(model_args.mm_vision_select_layer, "mm_vision_select_layer", -2),
        mm_vision_select_feature=pick(model_args.mm_vision_select_feature, "mm_vision_select_feature", "patch"),
    )


def add_lora_adapters(model, model_args: ModelArguments, training_args: TrainingArguments, family: str) -> None:
    """`--lora_enable`: adapters on the LLM's Linears of `--lora_target` (default: the family's attention and
    FFN Linears), after upcycling so that every expert has its own; started from `--lora_weight_path`."""
    base = model_args.model_name_or_path
    config = lora.make_lora_config(
        model,
        r=training_args.lora_r,
        alpha=training_args.lora_alpha,
        dropout=training_args.lora_dropout,
        bias=training_args.lora_bias,
        targets=training_args.lora_target or list(get_family(family).lora_target),
        base_model_name_or_path=os.path.abspath(base) if os.path.isdir(base) else base,
    )
    lora.add_lora(model, config)
    bare = [block.layer_idx for block in moe_blocks(model)
            if not all(lora.has_lora(expert) for expert in block.deepspeed_moe.experts.deepspeed_experts)]
    if bare:
        raise ValueError(
            f"--lora_target {' '.join(training_args.lora_target or [])} adapts no FFN Linear of the experts of MoE "
            f"layers {bare}: they would stay identical copies of the dense FFN. Add the FFN names (the family "
            f"default is {' '.join(get_family(family).lora_target)})."
        )
    start = training_args.lora_weight_path
    if start:
        saved = lora.read_lora_config(start)
        for key in ("r", "lora_alpha", "bias"):
            if getattr(saved, key) != getattr(config, key):
                raise ValueError(f"--lora_weight_path {start} has {key}={getattr(saved, key)!r}, this run "
                                 f"{getattr(config, key)!r}: pass the same LoRA settings.")
        if saved.target_modules != config.target_modules:
            raise ValueError(f"--lora_weight_path {start} adapts the Linears {saved.target_modules!r}, this run "
                             f"{config.target_modules!r}: pass the same --lora_target (and model).")
        lora.load_lora_weights(model, start)
        logger.info("LoRA adapters started from %s", start)


def set_trainable(model, model_args: ModelArguments, training_args: TrainingArguments,
                  train_modules: Optional[Sequence[str]]) -> None:
    """Which parameters train in this stage (after every module, new token rows included, exists)."""
    inner = model.get_model()
    projector = getattr(inner, "mm_projector", None)
    if lora.has_lora(model):
        # peft froze everything but the adapters; what upcycling created trains in full.
        for name in router_parameter_names(model):
            model.get_parameter(name).requires_grad_(True)
    elif model_args.moe_enable:
        freeze_for_moe_training(model, train_modules)
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
    if model_args.freeze_backbone:
        inner.requires_grad_(False)
    if projector is not None:
        projector.requires_grad_(not training_args.freeze_mm_mlp_adapter)
    if model_args.tune_mm_mlp_adapter and model_args.mm_use_im_start_end:
        # The <im_start>/<im_end> rows are learnt with the projector in stage 1 (as in LLaVA).
        model.get_input_embeddings().requires_grad_(True)
    tower = model.get_image_tower() if hasattr(model, "get_image_tower") else None
    if tower is not None:
        tower.requires_grad_(False)


def log_trainable(model) -> None:
    trainable = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    logger.info("Trainable: %d tensors, %d of %d parameters (%.2f%%)", len(trainable),
                sum(n for _, n in trainable), total, 100.0 * sum(n for _, n in trainable) / max(total, 1))
    for name, numel in trainable:
        logger.debug("  trains %s (%d)", name, numel)


def checkpoint_to_resume(training_args: TrainingArguments) -> Optional[str]:
    """`--resume_from_checkpoint DIR` when given, else the newest complete checkpoint of `--output_dir`
    (none with `--overwrite_output_dir True`); its pickled states are checked before anything loads them."""
    explicit = training_args.resume_from_checkpoint
    if explicit:
        if not os.path.isdir(explicit):
            raise ValueError(f"--resume_from_checkpoint {explicit}: no such folder.")
        reason = checkpointing.incomplete_reason(explicit)
        if reason is not None and os.path.isfile(os.path.join(explicit, checkpointing.COMPLETE_MARKER)):
            raise ValueError(f"--resume_from_checkpoint {explicit} is not a complete checkpoint: {reason}.")
        if reason is not None:
            logger.warning("%s has no %s (written by an older version, or cut short); resuming from it because "
                           "--resume_from_checkpoint names it.", explicit, checkpointing.COMPLETE_MARKER)
        checkpoint = explicit
    elif training_args.overwrite_output_dir:
        return None
    else:
        checkpoint = checkpointing.last_complete_checkpoint(training_args.output_dir)
    if checkpoint is not None:
        checkpointing.check_pickles(checkpoint)
    return checkpoint


def parse_arguments(argv: Optional[Sequence[str]] = None) -> Tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_arguments(model_args, data_args, training_args)
    return model_args, data_args, training_args


def train(argv: Optional[Sequence[str]] = None) -> None:
    model_args, data_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    checkpointing.check_output_dir(training_args.output_dir)
    transformers.set_seed(training_args.seed)

    model = load_model(model_args, training_args)
    family = family_for_model_type(model.config.model_type)
    tokenizer = load_tokenizer(
        model_args.model_name_or_path,
        family=family,
        model_max_length=training_args.model_max_length,
        padding_side="right",
        cache_dir=training_args.cache_dir,
    )
    version = model_args.version or get_family(family).version
    conversation_lib.set_default_conversation(version)
    model.config.conv_template = version
    model.config.pad_token_id = tokenizer.pad_token_id

    train_modules = upcycle(model, model_args, training_args, family) if model_args.moe_enable else None

    image_processor, tokens_per_image = None, 0
    vision_args = vision_arguments(model_args, model.config)
    if vision_args is not None:
        model.get_model().initialize_vision_modules(vision_args)
        tower = model.get_image_tower()
        image_processor, tokens_per_image = tower.image_processor, tower.num_tokens
        model.config.image_aspect_ratio = data_args.image_aspect_ratio
        model.config.tokenizer_padding_side = tokenizer.padding_side
        model.config.tokenizer_model_max_length = training_args.model_max_length
        model.config.mm_use_im_start_end = model_args.mm_use_im_start_end
        model.config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
        model.config.mm_projector_lr = training_args.mm_projector_lr
        model.config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
        model.config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
        model.initialize_vision_tokenizer(vision_args, tokenizer)
    elif model_args.tune_mm_mlp_adapter or model_args.pretrain_mm_mlp_adapter:
        raise ValueError("The projector flags need an image tower: pass --image_tower.")

    if training_args.lora_enable:
        add_lora_adapters(model, model_args, training_args, family)
    set_trainable(model, model_args, training_args, train_modules)
    if training_args.gradient_checkpointing:
        # Frozen embeddings would give checkpointed layers inputs without grad, and no gradient at all.
        model.enable_input_require_grads()
    log_trainable(model)
    if training_args.should_log:
        checkpointing.report_disk_space(training_args.output_dir, model, training_args.save_total_limit)

    # The main process checks the data (and keeps the result); the others then read it.
    with training_args.main_process_first(local=True, desc="data check"):
        data_module = make_supervised_data_module(
            tokenizer,
            data_args,
            image_processor=image_processor,
            tokens_per_image=tokens_per_image,
            mm_use_im_start_end=model_args.mm_use_im_start_end,
            check_file=os.path.join(training_args.output_dir, CHECK_FILE),
            progress=training_args.should_log and not training_args.disable_tqdm,
        )
    dataset = data_module["train_dataset"]
    projector_only_keys = None
    if model_args.tune_mm_mlp_adapter:
        projector_only_keys = ["mm_projector."] + (["embed_tokens."] if model_args.mm_use_im_start_end else [])
    trainer = LLaVATrainer(
        model=model,
        tokenizer=tokenizer,
        args=training_args,
        skip_report=dataset.skip_report if data_args.skip_bad_samples else None,
        projector_only_keys=projector_only_keys,
        **data_module,
    )

    if training_args.should_save:
        checkpointing.remove_leftovers(training_args.output_dir)
    checkpoint = checkpoint_to_resume(training_args)
    if checkpoint is not None:
        logger.info("Resuming from %s", checkpoint)
        trainer.load_skip_report(checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)

    model.config.use_cache = True
    trainer.save_model(training_args.output_dir)
    # Written last: a run whose output folder has trainer_state.json finished its final save.
    trainer.save_state()
    if data_args.skip_bad_samples:
        trainer.save_skip_report(training_args.output_dir)
        if training_args.should_log:
            logger.info("Bad samples: %s (details in %s)", dataset.skip_report.summary(),
                        os.path.join(training_args.output_dir, SKIP_REPORT_FILE))
    logger.info("Training finished: %s", training_args.output_dir)


if __name__ == "__main__":
    run_main(train, sys.argv[1:])
