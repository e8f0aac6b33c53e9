"""The original MoE-LLaVA's 12 training command lines (scripts/v1/{phi2,qwen,stablelm,openchat}/
{pretrain,finetune,finetune_moe}.sh, spec section 10.1) run verbatim, one optimizer step per stage, with
`deepspeed moellava/train/train_mem.py`, `--lazy_preprocess True` and `--report_to tensorboard`.

They run in a folder laid out as the scripts expect of `~/MoE-LLaVA`: the hub ids they name
(microsoft/phi-2, Qwen/Qwen-1_8B, stabilityai/stablelm-2-1_6b, openchat/openchat-3.5-1210,
openai/clip-vit-large-patch14-336) are local folders of tiny models there, `./scripts` and `moellava/` are
this repository's, `pt_json/` and `ft_json/` hold tiny data files under the scripts' names, with the images
in `train_image_video/`; the batch sizes of the scripts then make one step of each stage. What differs from
the scripts: `--bf16 True --tf32 True` become False (a CPU has neither), and the launcher gets a free
`--master_port` (its default 29500 may be taken on a shared machine). The environment is the scripts'
(`HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1`) plus DeepSpeed's CPU accelerator.
"""

import glob
import json
import os
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import LlamaTokenizer

from moellava.demo import data
from moellava.demo.run import REPO_DIR, free_port, script_environment

import test_family_pipeline
import tiny_llava

pytestmark = pytest.mark.slow

TOWER = "openai/clip-vit-large-patch14-336"
# scripts/v1/<model>: base LLM, checkpoint name, --version, stage-3 --train_modules, batch, accumulation;
# the family whose tiny backbone and tokenizer stand in for the base LLM.
MODELS = {
    "phi2": ("microsoft/phi-2", "llavaphi-2.7b", "phi", "fc1 fc2 wg", 8, 2, "phi"),
    "qwen": ("Qwen/Qwen-1_8B", "llavaqwen-1.8b", "qwen", "mlp.w1 mlp.w2 mlp.c_proj wg", 8, 2, "qwen"),
    "stablelm": ("stabilityai/stablelm-2-1_6b", "llavastablelm-1.6b", "stablelm", "gate_proj up_proj down_proj wg",
                 8, 2, "stablelm"),
    "openchat": ("openchat/openchat-3.5-1210", "llavaopenchat-7b", "openchat", "up_proj down_proj gate_proj wg",
                 4, 4, "mistral"),
}
# The flags every script ends with, in their order.
COMMON_TAIL = """--per_device_eval_batch_size 4 --gradient_accumulation_steps {grad_acc} --evaluation_strategy "no"
    --save_strategy "steps" --save_steps {save_steps} --save_total_limit 1 --learning_rate {lr} --weight_decay 0.
    --warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 1 --tf32 True --model_max_length 2048
    --gradient_checkpointing True --dataloader_num_workers {workers} --lazy_preprocess True --report_to tensorboard
    --cache_dir "./cache_dir\""""
VISION = """--image_tower openai/clip-vit-large-patch14-336 --image_projector_type mlp2x_gelu"""
TOKENS = """--mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False"""
SCRIPTS = {
    "pretrain": """--deepspeed ./scripts/zero2.json --model_name_or_path {base} --version plain
        --data_path ${{JSON_FOLDER}}/llava_image_.json --image_folder ${{IMAGE_FOLDER}} {vision}
        --tune_mm_mlp_adapter True {tokens} --bf16 True --output_dir ./checkpoints/{name}-pretrain
        --num_train_epochs 1 --per_device_train_batch_size 32 """,
    "finetune": """--deepspeed ./scripts/zero2.json --model_name_or_path {base} --version {version}
        --data_path ${{JSON_FOLDER}}/la_tune_256k.json ${{JSON_FOLDER}}/lrv_tune_331k.json
        ${{JSON_FOLDER}}/lvis_tune_220k_.json ${{JSON_FOLDER}}/svit_tune_157k.json ${{JSON_FOLDER}}/nlp_tune.json
        --image_folder ${{IMAGE_FOLDER}} {vision} --pretrain_mm_mlp_adapter ./checkpoints/{name}-pretrain/mm_projector.bin
        {tokens} --image_aspect_ratio pad --group_by_modality_length True --bf16 True
        --output_dir ./checkpoints/{name}-finetune --num_train_epochs 1 --per_device_train_batch_size 8 """,
    "finetune_moe": """--moe_enable True --num_experts ${{num_experts}} --top_k_experts ${{top_k_experts}}
        --capacity_factor 1.5 --moe_mode ${{moe_mode}} --use_residual ${{use_residual}}
        --router_aux_loss_coef ${{router_aux_loss_coef}} --train_modules {modules}
        --deepspeed ./scripts/zero2.json --model_name_or_path ./checkpoints/{name}-finetune --version {version}
        --data_path ${{JSON_FOLDER}}/llava_image_tune_.json ${{JSON_FOLDER}}/nlp_tune.json
        --image_folder ${{IMAGE_FOLDER}} {vision} {tokens} --image_aspect_ratio pad --group_by_modality_length True
        --bf16 True --output_dir ./checkpoints/{name}-finetune-moe --num_train_epochs 1
        --per_device_train_batch_size {moe_batch} """,
}
# Shell variables the scripts set before the command.
VARIABLES = {"moe_mode": "sparse", "num_experts": "4", "top_k_experts": "2", "use_residual": "False",
             "router_aux_loss_coef": "0.01"}
STAGE_DATA = {"pretrain": "pt_json", "finetune": "ft_json", "finetune_moe": "ft_json"}
# The fields the original's loader and model classes read from a checkpoint's config without a default
# (builder.load_pretrained_model, llava_arch, multimodal_encoder, multimodal_projector, the Eval MoE classes).
ORIGINAL_READS = ("mm_image_tower", "mm_video_tower", "mm_hidden_size", "hidden_size", "num_hidden_layers",
                  "mm_vision_select_layer", "mm_vision_select_feature", "image_projector_type",
                  "video_projector_type", "video_global_proj", "video_temproal_proj", "video_spatial_proj",
                  "use_mm_proj", "mm_use_im_start_end", "mm_use_im_patch_token", "tune_mm_mlp_adapter",
                  "freeze_mm_mlp_adapter", "image_aspect_ratio")
ORIGINAL_MOE_READS = ("moe_enable", "num_experts", "moe_layers_idx", "ep_size", "top_k_experts", "capacity_factor",
                      "eval_capacity_factor", "min_capacity", "use_residual", "router_aux_loss_coef",
                      "train_modules")


def original_command(model: str, stage: str) -> list:
    """`deepspeed moellava/train/train_mem.py ...` of scripts/v1/<model>/<stage>.sh, the shell variables
    expanded as bash would, `--bf16/--tf32 True` set to False."""
    base, name, version, modules, moe_batch, moe_grad_acc, _ = MODELS[model]
    grad_acc, lr, save_steps, workers = {"pretrain": (1, "1e-3", 24000, 8), "finetune": (2, "2e-5", 50000, 4),
                                         "finetune_moe": (moe_grad_acc, "2e-5", 24000, 4)}[stage]
    text = SCRIPTS[stage].format(base=base, name=name, version=version, modules=modules, moe_batch=moe_batch,
                                 vision=VISION, tokens=TOKENS) + COMMON_TAIL.format(
        grad_acc=grad_acc, lr=lr, save_steps=save_steps, workers=workers)
    variables = {**VARIABLES, "JSON_FOLDER": STAGE_DATA[stage], "IMAGE_FOLDER": "train_image_video"}
    for key, value in variables.items():
        text = text.replace("${" + key + "}", value)
    words = shlex.split(text)
    for flag in ("--bf16", "--tf32"):
        words[words.index(flag) + 1] = "False"
    return ["deepspeed", "--master_port", str(free_port()), "moellava/train/train_mem.py", *words]


def write_data(workspace: str) -> None:
    """The scripts' data files: 32 captions (stage 1: one batch of 32), 16 samples for each of stages 2 and 3
    (one step of 8 x 2 or 4 x 4), text-only ones in nlp_tune.json; images in train_image_video/."""
    paths = data.build_dataset(os.path.join(workspace, "build"), num_train_images=32, num_eval_images=0,
                               text_only_fraction=0.25)
    os.rename(paths["image_folder"], os.path.join(workspace, "train_image_video"))

    def load(key):
        with open(paths[key]) as f:
            return json.load(f)

    def write(relative, samples):
        os.makedirs(os.path.dirname(os.path.join(workspace, relative)), exist_ok=True)
        with open(os.path.join(workspace, relative), "w") as f:
            json.dump(samples, f)

    write("pt_json/llava_image_.json", load("stage1"))
    stage2, stage3 = load("stage2"), load("stage3")
    text_only = [s for s in stage2 + stage3 if "image" not in s]
    images2, images3 = [s for s in stage2 if "image" in s], [s for s in stage3 if "image" in s]
    for i, name in enumerate(("la_tune_256k", "lrv_tune_331k", "lvis_tune_220k_", "svit_tune_157k")):
        write(f"ft_json/{name}.json", images2[3 * i:3 * i + 3])
    write("ft_json/nlp_tune.json", text_only[:4])
    write("ft_json/llava_image_tune_.json", images3[:12])


def write_openchat_backbone(folder: Path, mistral_tokenizer_dir: Path) -> None:
    """A Mistral backbone whose tokenizer adds OpenChat's tokens as openchat-3.5-1210's does (`<|end_of_turn|>`
    ends each turn and is its eos, then `<|pad_0|>`), its vocabulary exactly the tokenizer's."""
    tokenizer = LlamaTokenizer.from_pretrained(mistral_tokenizer_dir)
    tokenizer.add_tokens(["<|end_of_turn|>", "<|pad_0|>"], special_tokens=True)
    tokenizer.eos_token = "<|end_of_turn|>"
    config = dict(test_family_pipeline.BACKBONES["mistral"], vocab_size=len(tokenizer),
                  eos_token_id=tokenizer.eos_token_id)
    test_family_pipeline.write_backbone("mistral", folder, mistral_tokenizer_dir, config=config)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module", params=sorted(MODELS))
def runs(request, tmp_path_factory, toy_tokenizer_dir):
    """`~/MoE-LLaVA` with the tiny models and data, and the three stages run in it."""
    model = request.param
    workspace = str(tmp_path_factory.mktemp(f"MoE-LLaVA-{model}"))
    for folder in ("moellava", "scripts"):
        os.symlink(os.path.join(REPO_DIR, folder), os.path.join(workspace, folder))
    base, name, *_, family = MODELS[model]
    if model == "openchat":
        write_openchat_backbone(Path(workspace) / base, toy_tokenizer_dir(family))
    else:
        test_family_pipeline.write_backbone(family, Path(workspace) / base, toy_tokenizer_dir(family))
    tiny_llava.build_tiny_clip_tower(os.path.join(workspace, TOWER))
    write_data(workspace)
    env = script_environment({"HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LOCAL_SIZE": "1"})
    logs = {}
    for stage in ("pretrain", "finetune", "finetune_moe"):
        run = subprocess.run(original_command(model, stage), cwd=workspace, env=env, capture_output=True, text=True,
                             timeout=600)
        logs[stage] = run.stdout + run.stderr
        assert run.returncode == 0, f"{model}/{stage}.sh failed:\n{logs[stage][-5000:]}"
    outputs = {stage: os.path.join(workspace, "checkpoints", f"{name}-{suffix}")
               for stage, suffix in (("pretrain", "pretrain"), ("finetune", "finetune"),
                                     ("finetune_moe", "finetune-moe"))}
    return {"model": model, "family": family, "workspace": workspace, "outputs": outputs, "logs": logs}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_each_stage_takes_one_step_and_writes_tensorboard_events(runs):
    for stage, out in runs["outputs"].items():
        state = read_json(os.path.join(out, "trainer_state.json"))
        assert state["global_step"] == 1, stage
        assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1], stage
        events = glob.glob(os.path.join(out, "runs", "*", "events.out.tfevents.*"))
        assert events and all(os.path.getsize(path) > 0 for path in events), stage
    assert os.path.isfile(os.path.join(runs["outputs"]["pretrain"], "mm_projector.bin"))
    assert "train_mem.py" in " ".join(original_command(runs["model"], "pretrain"))


def test_the_checkpoints_carry_the_recipe(runs):
    stage2 = read_json(os.path.join(runs["outputs"]["finetune"], "config.json"))
    stage3 = read_json(os.path.join(runs["outputs"]["finetune_moe"], "config.json"))
    family = runs["family"]
    assert stage2["model_type"] == f"llava_{family}" and stage3["model_type"] == f"moe_llava_{family}"
    assert stage2["conv_template"] == stage3["conv_template"] == MODELS[runs["model"]][2]
    assert stage3["moe"]["train_modules"] == MODELS[runs["model"]][3].split()
    assert stage3["moe"]["capacity_factor"] == 1.5 and stage3["moe"]["num_experts"] == [4] * len(
        stage3["moe"]["moe_layers_idx"])
    assert stage3["mm_image_tower"] == TOWER and stage3["image_aspect_ratio"] == "pad"


def test_saved_configs_have_every_field_the_original_reads(runs):
    """A checkpoint saved here opens in the original code: each field it reads as an attribute is there."""
    for stage, out in runs["outputs"].items():
        config = SimpleNamespace(**read_json(os.path.join(out, "config.json")))
        values = {field: getattr(config, field) for field in ORIGINAL_READS}  # AttributeError if one is missing
        assert values["mm_video_tower"] is None and values["use_mm_proj"] is True, stage
        assert values["tune_mm_mlp_adapter"] is (stage == "pretrain"), stage
        assert (values["mm_use_im_start_end"], values["mm_use_im_patch_token"]) == (False, False), stage
    moe = read_json(os.path.join(runs["outputs"]["finetune_moe"], "config.json"))["moe"]
    assert all(key in moe for key in ORIGINAL_MOE_READS)
    assert len(moe["num_experts"]) == len(moe["moe_layers_idx"])


def test_the_launcher_passed_local_rank(runs):
    # deepspeed hands each process --local_rank=N, which train_mem.py accepts (TrainingArguments).
    assert "--local_rank=0" in runs["logs"]["finetune_moe"]
