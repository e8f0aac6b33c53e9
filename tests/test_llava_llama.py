"""LlavaLlamaForCausalLM and MoELLaVALlamaForCausalLM: registration, upcycled MoE == dense, save/load
round trips (dense, stage-3 upcycling, deepspeed-saved -> native in a plain process), generation with
and without KV cache, loss fields, bad MoE settings."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from moellava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG
from moellava.mm_utils import tokenizer_image_token
from moellava.model import LlavaLlamaConfig, LlavaLlamaForCausalLM, MoELLaVALlamaConfig, MoELLaVALlamaForCausalLM
from moellava.model.moe import MoEBlock, build_moe_settings, moe_blocks
from moellava.tokenization import load_tokenizer

import tiny_llava

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_llama")
    return {
        "tokenizer": tiny_llava.build_tiny_llama_tokenizer(root / "tokenizer"),
        "tower": tiny_llava.build_tiny_clip_tower(root / "clip"),
        "root": root,
    }


@pytest.fixture(scope="module")
def tokenizer(dirs):
    return load_tokenizer(dirs["tokenizer"])


@pytest.fixture(scope="module")
def dense(dirs):
    return tiny_llava.tiny_llava_llama(dirs["tokenizer"], dirs["tower"])


@pytest.fixture(scope="module")
def prompt(tokenizer):
    text = "USER: <image>\nWhat is in the image? ASSISTANT:"
    return tokenizer_image_token(text, tokenizer, return_tensors="pt").unsqueeze(0)


def saturate_routers(model, scale=1e4, seed=3):
    """Push every router's softmax to one-hot, so a top-1 gate (its probability) is 1.0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(model):
            weight = block.deepspeed_moe.gate.wg.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * scale)


def test_registration():
    assert type(AutoConfig.for_model("llava_llama")) is LlavaLlamaConfig
    assert type(AutoConfig.for_model("moe_llava_llama")) is MoELLaVALlamaConfig
    small = dict(tiny_llava.TINY_LLAMA, vocab_size=300)
    assert type(AutoModelForCausalLM.from_config(LlavaLlamaConfig(**small))) is LlavaLlamaForCausalLM
    assert type(AutoModelForCausalLM.from_config(MoELLaVALlamaConfig(**small))) is MoELLaVALlamaForCausalLM


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_upcycled_moe_gives_the_dense_logits(request, dense, prompt, top_k, backend):
    if backend == "deepspeed":
        request.getfixturevalue("ds_group")
    # Capacity for every token in eval, so no token is dropped on the deepspeed backend either.
    moe = tiny_llava.upcycle_llava_llama(dense, num_experts=4, top_k_experts=top_k, eval_capacity_factor=4.0,
                                         backend=backend)
    assert [block.layer_idx for block in moe_blocks(moe)] == [0, 2]
    assert all(block.backend == backend for block in moe_blocks(moe))
    if top_k == 1:
        # A top-1 gate is the router probability (GShard): identical experts give the dense FFN only
        # when that probability is 1.
        saturate_routers(moe)
    pixels = tiny_llava.random_pixels(1)
    expected = dense(prompt, images=pixels).logits
    torch.testing.assert_close(moe(prompt, images=pixels).logits, expected, rtol=1e-5, atol=1e-5)


def test_dense_round_trip_is_exact_and_offline(dirs, dense, prompt, tmp_path):
    path = tmp_path / "dense"
    dense.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    # The tower's configs travel in config.json; its weights in the checkpoint.
    config["mm_image_tower"] = str(tmp_path / "tower-folder-that-no-longer-exists")
    (path / "config.json").write_text(json.dumps(config))

    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(loaded) is LlavaLlamaForCausalLM
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    pixels = tiny_llava.random_pixels(1)
    torch.testing.assert_close(loaded.eval()(prompt, images=pixels).logits, dense(prompt, images=pixels).logits,
                               rtol=0, atol=0)


def test_stage3_upcycling_save_and_reload(dirs, dense, prompt, tmp_path):
    """Stage-2 checkpoint -> MoE class -> initialize_moe_modules -> save -> AutoModel rebuilds the MoE layers."""
    stage2 = tmp_path / "stage2"
    dense.save_pretrained(stage2)
    model = MoELLaVALlamaForCausalLM.from_pretrained(stage2).eval()
    assert model.config.model_type == "moe_llava_llama" and not moe_blocks(model)
    pixels = tiny_llava.random_pixels(1)
    torch.testing.assert_close(model(prompt, images=pixels).logits, dense(prompt, images=pixels).logits,
                               rtol=0, atol=0)

    settings = build_moe_settings(4, num_experts=[4, 2], moe_mode="sparse", top_k_experts=2,
                                  train_modules=["gate_proj", "up_proj", "down_proj", "wg"])
    model.initialize_moe_modules(settings)
    with pytest.raises(ValueError, match="already has MoE layers"):
        model.initialize_moe_modules(settings)
    tiny_llava.perturb_experts(model)  # experts and routers that differ, so the round trip is meaningful
    before = model(prompt, images=pixels).logits

    stage3 = tmp_path / "stage3"
    model.save_pretrained(stage3)
    config = json.loads((stage3 / "config.json").read_text())
    assert config["model_type"] == "moe_llava_llama"
    assert config["architectures"] == ["MoELLaVALlamaForCausalLM"]
    assert config["moe"]["moe_layers_idx"] == [0, 2] and config["moe"]["num_experts"] == [4, 2]

    loaded, info = AutoModelForCausalLM.from_pretrained(stage3, output_loading_info=True)
    assert type(loaded) is MoELLaVALlamaForCausalLM
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    layers = loaded.get_decoder_layers()
    assert isinstance(layers[0].mlp, MoEBlock) and isinstance(layers[2].mlp, MoEBlock)
    assert not isinstance(layers[1].mlp, MoEBlock) and layers[2].mlp.num_experts == 2
    torch.testing.assert_close(loaded.eval()(prompt, images=pixels).logits, before, rtol=0, atol=0)


def test_moe_loss_is_lm_loss_plus_weighted_aux(dense, prompt):
    moe = tiny_llava.upcycle_llava_llama(dense, num_experts=4, router_aux_loss_coef=0.1)
    moe.train()
    labels = prompt.clone()
    labels[:, :3] = IGNORE_INDEX
    out = moe(prompt, images=tiny_llava.random_pixels(1), labels=labels)

    assert len(out.moe_loss_list) == 2
    torch.testing.assert_close(out.aux_loss, 0.1 * torch.stack(out.moe_loss_list).sum())
    assert not out.aux_loss.requires_grad and out.loss.requires_grad
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    image_at = prompt[0].tolist().index(IMG)
    spliced = [IGNORE_INDEX] * 3 + prompt[0, 3:image_at].tolist() + [IGNORE_INDEX] * 16 + prompt[0, image_at + 1:].tolist()
    expected_lm = F.cross_entropy(out.logits[0, :-1], torch.tensor(spliced[1:]), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.lm_loss, expected_lm)
    out.loss.backward()
    assert all(block.deepspeed_moe.gate.wg.weight.grad is not None for block in moe_blocks(moe))

    as_tuple = moe(prompt, images=tiny_llava.random_pixels(1), labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)


@pytest.fixture(scope="module", params=["dense", "moe"])
def generator_model(request, dense):
    if request.param == "dense":
        return dense
    moe = tiny_llava.upcycle_llava_llama(dense, num_experts=4, top_k_experts=2)
    tiny_llava.perturb_experts(moe)
    return moe


def greedy(model, ids, images, use_cache, mask=None, new=10):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, images=images, do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, use_cache=use_cache)


def test_generate_with_cache_equals_without(generator_model, prompt):
    pixels = tiny_llava.random_pixels(1)
    cached = greedy(generator_model, prompt, pixels, use_cache=True)
    uncached = greedy(generator_model, prompt, pixels, use_cache=False)
    assert cached.shape == (1, prompt.shape[1] + 10)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :prompt.shape[1]], prompt)
    # Eval routing is deterministic: the same run gives the same tokens.
    assert torch.equal(greedy(generator_model, prompt, pixels, use_cache=True), cached)


def test_batched_left_padded_generation_matches_single_prompts(generator_model, tokenizer):
    texts = ["USER: <image>\nWhat is in the image? ASSISTANT:", "USER: <image>\nDescribe it. ASSISTANT:"]
    prompts = [tokenizer_image_token(t, tokenizer, return_tensors="pt") for t in texts]
    length = max(len(p) for p in prompts)
    ids = torch.full((2, length), tokenizer.pad_token_id)
    mask = torch.zeros((2, length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    pixels = tiny_llava.random_pixels(2)
    generator_model.config.tokenizer_padding_side = "left"
    try:
        cached = greedy(generator_model, ids, pixels, use_cache=True, mask=mask)
        uncached = greedy(generator_model, ids, pixels, use_cache=False, mask=mask)
        singles = [greedy(generator_model, p[None], pixels[i:i + 1], use_cache=True) for i, p in enumerate(prompts)]
    finally:
        generator_model.config.tokenizer_padding_side = None
    assert torch.equal(cached, uncached)
    for i, single in enumerate(singles):
        assert cached[i, length:].tolist() == single[0, len(prompts[i]):].tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=2, top_k_experts=2, moe_layers_idx=None), None),
        (dict(num_experts=1, top_k_experts=2), r"top_k_experts=2 exceeds num_experts=1: use top_k_experts <= num_experts"),
        (dict(num_experts=4, ep_size=3, backend="deepspeed"), r"ep_size=3 does not divide num_experts=4.*use an ep_size that divides"),
        (dict(num_experts=4, moe_layers_idx=[0, 4]), r"outside 0..3 \(the model has 4 layers\): \[4\]. Use indices in range\(0, 4\)"),
        (dict(num_experts=[4, 4, 4]), r"num_experts has 3 entries but there are 2 MoE layers: give one value for all layers or exactly one per MoE layer"),
    ],
)
def test_bad_moe_settings_name_the_fix(dense, kwargs, message):
    if message is None:
        tiny_llava.upcycle_llava_llama(dense, **kwargs)  # the valid baseline builds
        return
    with pytest.raises(ValueError, match=message):
        tiny_llava.upcycle_llava_llama(dense, **kwargs)


def test_bad_moe_config_json_fails_at_load(dense, tmp_path):
    path = tmp_path / "moe"
    tiny_llava.upcycle_llava_llama(dense, num_experts=4).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["moe"]["num_experts"] = [4, 4, 4]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"num_experts'\] must be a list with one entry per MoE layer \(2\)"):
        AutoModelForCausalLM.from_pretrained(path)


def test_moe_model_checks_images_against_placeholders(dense):
    moe = tiny_llava.upcycle_llava_llama(dense, num_experts=4)
    with pytest.raises(ValueError, match=r"Sample 0 of the batch has 2 <image> placeholder\(s\) but only 1"):
        moe(torch.tensor([[1, IMG, 300, IMG]]), images=tiny_llava.random_pixels(1))


LOAD_ON_NATIVE = textwrap.dedent("""
    import sys
    import torch
    from moellava.model.builder import load_pretrained_model
    from moellava.model.moe import moe_blocks

    tokenizer, model, processor, context_len = load_pretrained_model(sys.argv[1])
    assert not torch.distributed.is_initialized(), "a plain process must not need a process group"
    assert [b.backend for b in moe_blocks(model)] == ["native", "native"]
    data = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(data["ids"], images=data["images"]).logits
    torch.save(logits, sys.argv[3])
""")


def test_deepspeed_saved_checkpoint_loads_on_native_in_a_plain_process(ds_group, dirs, tmp_path):
    path = tiny_llava.build_tiny_llava_llama(
        tmp_path / "ds_moe", dirs["tokenizer"], dirs["tower"], seed=5,
        moe=dict(num_experts=4, top_k_experts=2, backend="deepspeed"),
    )
    assert json.loads(open(os.path.join(path, "config.json")).read())["moe"]["backend"] == "deepspeed"
    reference_model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert [b.backend for b in moe_blocks(reference_model)] == ["deepspeed", "deepspeed"]
    ids = torch.tensor([[1, 300, IMG, 301, 302]])
    images = tiny_llava.random_pixels(1, seed=7)
    with torch.no_grad():
        expected = reference_model(ids, images=images).logits
    torch.save({"ids": ids, "images": images}, tmp_path / "inputs.pt")

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, TESTS_DIR, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", LOAD_ON_NATIVE, path, str(tmp_path / "inputs.pt"),
                          str(tmp_path / "logits.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)
