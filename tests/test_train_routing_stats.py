"""Training-time routing statistics: per MoE layer, each expert's share of the token-choices, the dropped
fraction and the balance, averaged over the logging window, in the Trainer logs and in tensorboard."""

import glob

import pytest
import torch
from transformers import TrainerCallback

from moellava import conversation as conversation_lib
from moellava.demo import data
from moellava.model.moe import load_balance, moe_blocks
from moellava.tokenization import load_tokenizer
from moellava.train.arguments import DataArguments, TrainingArguments
from moellava.train.dataset import make_supervised_data_module
from moellava.train.llava_trainer import LLaVATrainer

import tiny_llava


class StepRouting(TrainerCallback):
    """What each MoE block counted in the last forward of every optimizer step (no gradient accumulation)."""

    def __init__(self, model):
        self.blocks = moe_blocks(model)
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append([(block.last_tokens_per_expert.float(), float(block.last_dropped_fraction))
                           for block in self.blocks])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing_stats")
    paths = data.build_dataset(str(root / "data"), num_train_images=12, num_eval_images=1)
    tokenizer_dir = tiny_llava.build_tiny_llama_tokenizer(root / "tokenizer")
    tower_dir = tiny_llava.build_tiny_clip_tower(root / "tower")
    dense = tiny_llava.tiny_llava_llama(tokenizer_dir, tower_dir)
    # A small capacity, so that tokens are dropped and the dropped fraction is not trivially 0.
    model = tiny_llava.upcycle_llava_llama(dense, num_experts=4, moe_mode="sparse", top_k_experts=2,
                                           drop_tokens=True, capacity_factor=0.5).train()
    tokenizer = load_tokenizer(tokenizer_dir, model_max_length=256)
    conversation_lib.set_default_conversation("v1")
    module = make_supervised_data_module(
        tokenizer, DataArguments(data_path=[paths["stage3"]], image_folder=paths["image_folder"],
                                 image_aspect_ratio="pad"),
        image_processor=model.get_image_tower().image_processor, tokens_per_image=16)
    args = TrainingArguments(output_dir=str(root / "out"), logging_dir=str(root / "tb"), max_steps=4,
                             per_device_train_batch_size=2, logging_steps=2, learning_rate=1e-3, save_strategy="no",
                             report_to=["tensorboard"], disable_tqdm=True, dataloader_num_workers=0, seed=0)
    steps = StepRouting(model)
    trainer = LLaVATrainer(model=model, tokenizer=tokenizer, args=args, callbacks=[steps], **module)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"history": history, "steps": steps.steps, "tb": str(root / "tb")}


def test_logs_hold_each_layers_expert_shares_dropped_fraction_and_balance(trained):
    history, steps = trained["history"], trained["steps"]
    assert len(history) == 2 and len(steps) == 4
    for window, entry in enumerate(history):
        for layer in range(2):
            counted = steps[2 * window: 2 * window + 2]
            shares = torch.stack([step[layer][0] / step[layer][0].sum() for step in counted]).mean(0)
            prefix = f"routing/moe_layer_{layer}/"
            logged = torch.tensor([entry[f"{prefix}expert_{j}"] for j in range(4)])
            torch.testing.assert_close(logged, shares, atol=1e-4, rtol=0)
            assert entry[f"{prefix}balance"] == pytest.approx(load_balance(shares), abs=2e-4)
            dropped = sum(step[layer][1] for step in counted) / 2
            assert entry[f"{prefix}dropped"] == pytest.approx(dropped, abs=1e-4)
            assert 0 < entry[f"{prefix}dropped"] < 1  # capacity factor 0.5 drops choices
        assert "routing/moe_layer_2/expert_0" not in entry  # layers are numbered among MoE layers, 0 and 1


def test_tensorboard_gets_per_expert_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = {path.rsplit("/", 1)[0] for path in glob.glob(f"{trained['tb']}/**/events.out.tfevents.*",
                                                               recursive=True)}
    events = EventAccumulator(folder)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for layer in range(2):
        for name in [f"expert_{j}" for j in range(4)] + ["dropped", "balance"]:
            tag = f"train/routing/moe_layer_{layer}/{name}"
            assert tag in tags
            values = [event.value for event in events.Scalars(tag)]
            expected = [entry[f"routing/moe_layer_{layer}/{name}"] for entry in trained["history"]]
            assert values == pytest.approx(expected, abs=1e-6)
