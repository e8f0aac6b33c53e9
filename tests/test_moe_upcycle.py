"""MoE settings, upcycling a dense model, freezing for MoE training, stats, and expert-parallel checkpoints."""

import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from deepspeed import comm as ds_comm
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from moellava.model.moe import (
    MOE_MODES,
    MoEBlock,
    aux_loss_total,
    build_moe_settings,
    convert_layers_to_moe,
    expert_parallel_state_dict,
    freeze_for_moe_training,
    moe_blocks,
    resolve_moe_layers_idx,
    routing_stats,
)

from conftest import free_port

HIDDEN = 64
PROJS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(params=("native", "deepspeed"))
def backend(request):
    if request.param == "deepspeed":
        request.getfixturevalue("ds_group")
    return request.param


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def diversify(module: nn.Module, seed: int = 3) -> None:
    """Different random weights for every router and expert, so routing matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(module):
            for param in block.deepspeed_moe.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


# ---------------------------------------------------------------- settings


def test_modes_select_the_documented_layers():
    assert MOE_MODES == ("first_half", "second_half", "sparse", "dense")
    assert resolve_moe_layers_idx(7, "first_half") == [0, 1, 2]
    assert resolve_moe_layers_idx(7, "second_half") == [3, 4, 5, 6]
    assert resolve_moe_layers_idx(7, "sparse") == [0, 2, 4, 6]
    assert resolve_moe_layers_idx(7, "dense") == list(range(7))
    assert resolve_moe_layers_idx(7, "sparse", [5, 1]) == [1, 5]


def test_settings_are_complete_and_json_serialisable():
    moe = build_moe_settings(24, num_experts=4, train_modules=["gate_proj", "wg"])
    assert moe == {
        "moe_enable": True, "num_experts": [4] * 12, "moe_layers_idx": list(range(0, 24, 2)),
        "moe_mode": "sparse", "top_k_experts": 2, "capacity_factor": 1.0, "eval_capacity_factor": 2.0,
        "min_capacity": 0, "use_residual": False, "router_aux_loss_coef": 0.01, "ep_size": 1,
        "train_modules": ["gate_proj", "wg"], "backend": "native", "drop_tokens": None,
    }
    assert json.loads(json.dumps(moe)) == moe


def test_explicit_layers_override_the_mode_and_keep_per_layer_experts():
    moe = build_moe_settings(6, num_experts=[2, 8], moe_layers_idx=[4, 1], moe_mode="dense")
    assert moe["moe_mode"] == "custom"
    assert moe["moe_layers_idx"] == [1, 4]
    assert moe["num_experts"] == [8, 2]  # each count stays with the layer it was given for
    assert build_moe_settings(4, num_experts=[3])["num_experts"] == [3, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(moe_layers_idx=[]), r"moe_layers_idx is empty: pass at least one layer index"),
        (dict(moe_layers_idx=[0, 8]), r"outside 0..7 .*: \[8\]\. Use indices in range\(0, 8\)"),
        (dict(moe_layers_idx=[-1]), r"outside 0..7"),
        (dict(moe_layers_idx=[2, 2]), r"repeats \[2\]: list each layer once"),
        (dict(num_experts=[4, 4]), r"num_experts has 2 entries but there are 4 MoE layers: give one value"),
        (dict(moe_mode="half"), r"Unknown moe_mode 'half': use one of \('first_half'"),
        (dict(backend="tutel"), r"Unknown MoE backend 'tutel'"),
        (dict(capacity_factor=0), r"capacity_factor must be a number > 0"),
        (dict(eval_capacity_factor=0), r"eval_capacity_factor must be a number > 0"),
        (dict(top_k_experts=3), r"top_k_experts=3 is not supported: use 1 or 2"),
        (dict(num_experts=1), r"top_k_experts=2 exceeds num_experts=1"),
        (dict(num_experts=[4, 4, 0, 4]), r"num_experts must be an int >= 1, got 0"),
        (dict(num_experts=4, ep_size=3, backend="deepspeed"), r"ep_size=3 does not divide num_experts=4"),
        (dict(ep_size=2), r"ep_size=2 needs backend='deepspeed'"),
        (dict(train_modules="wg"), r"got the string 'wg': write \['wg'\]"),
        (dict(use_residual="yes"), r"use_residual must be True or False"),
    ],
)
def test_bad_settings_raise_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_moe_settings(8, **kwargs)


# ---------------------------------------------------------------- upcycling


@pytest.mark.parametrize("use_residual", [False, True])
def test_upcycled_llama_gives_the_dense_logits(backend, use_residual):
    dense = tiny_llama().eval()
    moe_model = copy.deepcopy(dense)
    moe = build_moe_settings(4, num_experts=4, use_residual=use_residual, backend=backend)
    convert_layers_to_moe(moe_model.model.layers, moe, HIDDEN)
    assert [block.layer_idx for block in moe_blocks(moe_model)] == [0, 2]
    assert all(isinstance(moe_model.model.layers[i].mlp, LlamaMLP) for i in (1, 3))
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(moe_model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def test_state_dict_names_match_the_published_layout():
    model = tiny_llama()
    convert_layers_to_moe(model.model.layers, build_moe_settings(4, num_experts=2), HIDDEN)
    names = set(model.state_dict())
    assert "model.layers.0.mlp.deepspeed_moe.gate.wg.weight" in names
    assert "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.1.down_proj.weight" in names
    assert "model.layers.1.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate_proj.weight" not in names


class _ReinitialisedOnCopy(nn.Linear):
    """An FFN that does not survive deepcopy: the copy gets fresh random weights."""

    def __deepcopy__(self, memo):
        return nn.Linear(self.in_features, self.out_features)


class _Layer(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.mlp = mlp


def test_upcycling_verifies_each_expert_equals_the_dense_ffn():
    layers = nn.ModuleList([_Layer(_ReinitialisedOnCopy(HIDDEN, HIDDEN))])
    moe = build_moe_settings(1, num_experts=2, moe_mode="dense")
    with pytest.raises(RuntimeError, match=r"Layer 0: expert 0 differs from the dense FFN at 'weight'"):
        convert_layers_to_moe(layers, moe, HIDDEN)
    assert isinstance(layers[0].mlp, _ReinitialisedOnCopy)  # nothing replaced on failure
    convert_layers_to_moe(layers, moe, HIDDEN, upcycle=False)  # weights come from a checkpoint
    assert isinstance(layers[0].mlp, MoEBlock)


def test_conversion_refuses_layers_without_a_dense_mlp():
    class NoMlp(nn.Module):
        pass

    moe = build_moe_settings(1, num_experts=2, moe_mode="dense")
    with pytest.raises(ValueError, match=r"Layer 0 \(NoMlp\) has no `mlp` module to upcycle"):
        convert_layers_to_moe([NoMlp()], moe, HIDDEN)
    layers = nn.ModuleList([_Layer(nn.Linear(HIDDEN, HIDDEN))])
    convert_layers_to_moe(layers, moe, HIDDEN)
    with pytest.raises(ValueError, match=r"Layer 0 is already a MoE layer: convert a dense model only once"):
        convert_layers_to_moe(layers, moe, HIDDEN)
    with pytest.raises(ValueError, match=r"outside 0..0"):
        convert_layers_to_moe(layers, build_moe_settings(2, num_experts=2, moe_mode="dense"), HIDDEN)


def test_published_settings_without_backend_convert_to_native():
    published = {  # LanguageBind/MoE-LLaVA-Qwen-1.8B-4e config.json, "moe" (for a 4-layer toy)
        "capacity_factor": 1.0, "ep_size": 1, "eval_capacity_factor": 2.0, "min_capacity": 0,
        "moe_enable": True, "moe_layers_idx": [0, 2], "moe_mode": "sparse", "num_experts": [4, 4],
        "router_aux_loss_coef": 0.01, "top_k_experts": 2, "train_modules": ["mlp.w1", "mlp.w2", "mlp.c_proj", "wg"],
        "use_residual": False,
    }
    model = tiny_llama()
    convert_layers_to_moe(model.model.layers, published, HIDDEN, upcycle=False)
    assert [(b.backend, b.num_experts, b.drop_tokens) for b in moe_blocks(model)] == [("native", 4, False)] * 2


def test_expert_parallel_settings_load_on_one_device_with_the_native_backend():
    moe = build_moe_settings(4, num_experts=4, ep_size=2, backend="deepspeed")
    model = tiny_llama()
    convert_layers_to_moe(model.model.layers, moe, HIDDEN, backend="native", upcycle=False)
    assert [(b.backend, b.ep_size, b.num_local_experts) for b in moe_blocks(model)] == [("native", 1, 4)] * 2

# ---------------------------------------------------------------- aux loss and stats


def _moe_llama(coef: float) -> LlamaForCausalLM:
    model = tiny_llama()
    convert_layers_to_moe(model.model.layers, build_moe_settings(4, num_experts=4, router_aux_loss_coef=coef),
                          HIDDEN)
    diversify(model)
    return model


def _grads(model: nn.Module) -> dict:
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def test_router_trains_from_aux_loss_under_llama_gradient_checkpointing():
    coef = 0.5
    ids = input_ids()
    reference = _moe_llama(coef=0.0).train()  # no checkpointing, aux added to the loss by hand
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for block in moe_blocks(reference)]
    lm_loss = reference(input_ids=ids, labels=ids).loss
    aux = []
    for block, x in zip(moe_blocks(reference), inputs):
        gates = F.softmax(x.reshape(-1, HIDDEN) @ block.deepspeed_moe.gate.wg.weight.t(), dim=1)
        me, ce = gates.mean(0), F.one_hot(gates.argmax(1), 4).float().mean(0)
        aux.append((me * ce).mean() * 16)
    for hook in hooks:
        hook.remove()
    lm_loss.backward(retain_graph=True)
    lm_only = _grads(reference)
    reference.zero_grad()
    (lm_loss + coef * sum(aux)).backward()
    with_aux = _grads(reference)

    for block_coef, expected in ((coef, with_aux), (0.0, lm_only)):
        model = _moe_llama(coef=block_coef).train()
        model.gradient_checkpointing_enable()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for name, grad in _grads(model).items():
            torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-4, msg=name)

    wg = "model.layers.2.mlp.deepspeed_moe.gate.wg.weight"
    assert (with_aux[wg] - lm_only[wg]).abs().max() > 1e-3  # the aux term is really there


def test_aux_loss_total_and_routing_stats_report_the_last_forward():
    model = _moe_llama(coef=0.01).eval()
    with pytest.raises(RuntimeError, match="No forward has run through the MoE layers yet"):
        aux_loss_total(model)
    with torch.no_grad():
        model(input_ids())
    blocks = moe_blocks(model)
    total = aux_loss_total(model)
    assert not total.requires_grad
    assert float(total) == pytest.approx(sum(float(b.last_aux_loss) for b in blocks))
    stats = routing_stats(model)
    assert [s["layer"] for s in stats] == [0, 2]
    for stat, block in zip(stats, blocks):
        assert stat["tokens_per_expert"] == block.last_tokens_per_expert.tolist()
        assert sum(stat["tokens_per_expert"]) == 2 * 12 * 2
        assert stat["dropped_fraction"] == 0.0
        assert stat["aux_loss"] == pytest.approx(float(block.last_aux_loss))
    with pytest.raises(ValueError, match="no MoE layers: call convert_layers_to_moe first"):
        aux_loss_total(tiny_llama())


# ---------------------------------------------------------------- freezing


def test_freeze_trains_named_ffns_and_every_router():
    model = _moe_llama(coef=0.01)
    trainable = freeze_for_moe_training(model, ["gate_proj", "up_proj", "down_proj", "wg"])
    expected = []
    for i in range(4):
        if i in (0, 2):
            expected.append(f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight")
            expected += [f"model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{j}.{p}.weight"
                         for j in range(4) for p in PROJS]
        else:  # dense FFNs match by substring too, as in the original
            expected += [f"model.layers.{i}.mlp.{p}.weight" for p in PROJS]
    assert trainable == expected
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(expected)


def test_freeze_refuses_train_modules_that_miss_every_expert():
    model = _moe_llama(coef=0.01)
    with pytest.raises(ValueError, match=r"train_modules=\['fc1'\] matches no expert parameter.*named "
                                         r"\['down_proj', 'gate_proj', 'up_proj'\]"):
        freeze_for_moe_training(model, ["fc1"])
    with pytest.raises(ValueError, match=r"train_modules is empty"):
        freeze_for_moe_training(model, [])
    with pytest.raises(ValueError, match=r"no MoE layers: call convert_layers_to_moe"):
        freeze_for_moe_training(tiny_llama(), ["gate_proj"])


class _QWenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(HIDDEN, 32, bias=False)
        self.w2 = nn.Linear(HIDDEN, 32, bias=False)
        self.c_proj = nn.Linear(32, HIDDEN, bias=False)

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


def test_freeze_matches_experts_through_their_dense_names_and_trains_the_residual_mix():
    # Published Qwen settings name "mlp.w1": the original matched it before copying the FFN into experts.
    h = nn.ModuleList([_Layer(_QWenMLP()), _Layer(_QWenMLP())])
    convert_layers_to_moe(h, build_moe_settings(2, num_experts=2, moe_mode="first_half", use_residual=True),
                          HIDDEN)
    trainable = freeze_for_moe_training(h, ["mlp.w1", "wg"])
    assert trainable == [
        "0.mlp.deepspeed_moe.gate.wg.weight",
        "0.mlp.deepspeed_moe.experts.deepspeed_experts.0.w1.weight",
        "0.mlp.deepspeed_moe.experts.deepspeed_experts.1.w1.weight",
        "0.mlp.mlp.w1.weight",  # the dense residual FFN
        "0.mlp.coefficient.weight",
        "0.mlp.coefficient.bias",
        "1.mlp.w1.weight",
    ]


# ---------------------------------------------------------------- expert-parallel checkpoints


def test_expert_parallel_state_dict_is_the_state_dict_without_expert_parallelism(backend):
    model = tiny_llama()
    convert_layers_to_moe(model.model.layers, build_moe_settings(4, num_experts=2, backend=backend), HIDDEN)
    state, plain = expert_parallel_state_dict(model), model.state_dict()
    assert list(state) == list(plain)
    assert all(torch.equal(state[key], plain[key]) for key in plain)


def _swiglu(seed: int) -> LlamaMLP:
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=32))


def _ep_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        reference = nn.Module()
        reference.mlp = MoEBlock(HIDDEN, _swiglu(0), 4, backend="native")
        diversify(reference, seed=4)
        model = nn.Module()
        model.mlp = MoEBlock(HIDDEN, _swiglu(1), 4, backend="deepspeed", ep_size=2, drop_tokens=False)
        load = model.load_state_dict(reference.state_dict())
        xs = [torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(10 + r)) for r in range(2)]
        out = model.mlp(xs[rank])
        out.pow(2).sum().backward()
        expected = [reference.mlp(x) for x in xs]
        sum(e.pow(2).sum() for e in expected).backward()  # experts see both ranks' tokens
        torch.save({
            "load": str(load),
            "out": out.detach(), "expected": expected[rank].detach(),
            "local_grads": {n: p.grad for n, p in model.named_parameters() if "experts" in n},
            "reference_grads": {n: p.grad for n, p in reference.named_parameters()},
            "gathered": expert_parallel_state_dict(model),
            "reference_state": reference.state_dict(),
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        ds_comm.destroy_process_group()


@pytest.mark.slow
def test_two_process_expert_parallelism_matches_one_process(tmp_path):
    mp.spawn(_ep_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    prefix = "mlp.deepspeed_moe.experts.deepspeed_experts."
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["load"] == "<All keys matched successfully>"
        torch.testing.assert_close(result["out"], result["expected"], atol=1e-6, rtol=1e-5)
        for name, grad in result["local_grads"].items():  # local expert j is global expert 2 * rank + j
            local = int(name[len(prefix):].split(".")[0])
            global_name = name.replace(f"{prefix}{local}.", f"{prefix}{2 * rank + local}.")
            torch.testing.assert_close(grad, result["reference_grads"][global_name], atol=1e-5, rtol=1e-5)
        gathered, reference = result["gathered"], result["reference_state"]
        assert list(gathered) == list(reference)
        assert all(torch.equal(gathered[key], reference[key]) for key in reference)
