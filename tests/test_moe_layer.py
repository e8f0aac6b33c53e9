"""MoEBlock: routing semantics, native vs DeepSpeed parity, capacity dropping, aux-loss gradient, settings errors."""


import pytest
import torch
import torch.nn.functional as F
from deepspeed import comm as ds_comm
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from moellava.model.moe import MoEBlock

HIDDEN = 32
BACKENDS = ("native", "deepspeed")


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "deepspeed":
        request.getfixturevalue("ds_group")
    return request.param


def swiglu(hidden=HIDDEN, intermediate=64, seed=0) -> LlamaMLP:
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate))


def diversify(block: MoEBlock, seed: int = 1) -> None:
    """Give every expert (and the router) different random weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def tokens(shape=(3, 11), seed=2, requires_grad=False) -> torch.Tensor:
    x = torch.randn(*shape, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


def expected_aux_loss(x: torch.Tensor, wg: torch.Tensor, top_k: int) -> torch.Tensor:
    """The GShard load-balancing loss, written out from its definition."""
    gates = F.softmax(x.reshape(-1, x.shape[-1]).float() @ wg.float().t(), dim=1)
    num_experts = gates.shape[1]
    me = gates.mean(0)
    ce = F.one_hot(gates.argmax(1), num_experts).float().mean(0)
    return (me * ce).sum() * num_experts if top_k == 1 else (me * ce).mean() * num_experts ** 2


# Runs first: the module's DeepSpeed group does not exist yet.
def test_deepspeed_backend_without_process_group_names_the_fix():
    if ds_comm.is_initialized():
        pytest.skip("a DeepSpeed process group is already initialised in this session")
    with pytest.raises(RuntimeError, match=r"deepspeed.init_distributed\(\).*backend='native'"):
        MoEBlock(HIDDEN, swiglu(), 4, backend="deepspeed")


def test_parameter_names_are_deepspeeds(backend):
    block = MoEBlock(HIDDEN, swiglu(), 2, backend=backend, use_residual=True)
    names = [name for name, _ in block.named_parameters()]
    experts = [f"deepspeed_moe.experts.deepspeed_experts.{j}.{p}_proj.weight" for j in range(2)
               for p in ("gate", "up", "down")]
    assert names == ["deepspeed_moe.gate.wg.weight", *experts, "mlp.gate_proj.weight", "mlp.up_proj.weight",
                     "mlp.down_proj.weight", "coefficient.weight", "coefficient.bias"]
    assert block.deepspeed_moe.gate.wg.weight.shape == (2, HIDDEN)


def test_upcycled_top2_equals_dense_ffn(backend):
    dense = swiglu()
    block = MoEBlock(HIDDEN, dense, 4, backend=backend)
    x = tokens()
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, dense(x), atol=1e-6, rtol=1e-5)


def test_upcycled_top1_is_dense_ffn_scaled_by_router_probability(backend):
    # Top-1 gates are not renormalised (as in DeepSpeed): the output is p_max * FFN(x).
    dense = swiglu()
    block = MoEBlock(HIDDEN, dense, 4, top_k=1, capacity_factor=4.0, backend=backend)
    x = tokens()
    probs = F.softmax(x @ block.deepspeed_moe.gate.wg.weight.t(), dim=-1)
    torch.testing.assert_close(block(x), probs.max(-1).values.unsqueeze(-1) * dense(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("use_residual", [False, True])
def test_native_and_deepspeed_agree_on_outputs_and_gradients(ds_group, top_k, use_residual):
    settings = dict(top_k=top_k, use_residual=use_residual, capacity_factor=4.0, router_aux_loss_coef=0.1)
    native = MoEBlock(HIDDEN, swiglu(), 4, backend="native", **settings)
    diversify(native)
    deep = MoEBlock(HIDDEN, swiglu(), 4, backend="deepspeed", **settings)
    deep.load_state_dict(native.state_dict())

    x_native, x_deep = tokens(requires_grad=True), tokens(requires_grad=True)
    out_native, out_deep = native(x_native), deep(x_deep)
    torch.testing.assert_close(out_native, out_deep, atol=1e-6, rtol=1e-5)
    assert torch.equal(native.last_tokens_per_expert, deep.last_tokens_per_expert)
    assert int(native.last_tokens_per_expert.sum()) == x_native.shape[0] * x_native.shape[1] * top_k
    assert float(native.last_dropped_fraction) == float(deep.last_dropped_fraction) == 0.0
    torch.testing.assert_close(native.last_aux_loss, deep.last_aux_loss)

    weight = torch.randn(out_native.shape, generator=torch.Generator().manual_seed(5))
    (out_native * weight).sum().backward()
    (out_deep * weight).sum().backward()
    torch.testing.assert_close(x_native.grad, x_deep.grad, atol=1e-5, rtol=1e-5)
    deep_params = dict(deep.named_parameters())
    for name, param in native.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, deep_params[name].grad, atol=1e-5, rtol=1e-5, msg=name)


# Forced routing for 16 tokens (capacity factor 1.0, 4 experts):
#   tokens 0..11: first choice expert 0; second choice expert 1 (even tokens) or 2 (odd tokens)
#   tokens 12..15: first choice expert 1, second choice expert 2
FIRST = [0] * 12 + [1] * 4
SECOND = [1 if t % 2 == 0 else 2 for t in range(12)] + [2] * 4


def _forced_routing_case():
    x = torch.zeros(16, HIDDEN)
    x[:, 0] = 1.0
    x[:, 1] = torch.tensor([1.0, -1.0]).repeat(8)
    x[12:, 2] = 1.0
    x[:, 3:] = torch.randn(16, HIDDEN - 3, generator=torch.Generator().manual_seed(3)) * 0.1
    wg = torch.zeros(4, HIDDEN)
    wg[0, 0] = 10.0
    wg[1, :3] = torch.tensor([5.0, 3.0, 30.0])
    wg[2, :3] = torch.tensor([5.0, -3.0, 14.0])
    return x, wg


def _dropping_block(backend, top_k, wg, use_residual=False):
    # drop_tokens=None means capacity-limited on deepspeed; native drops only when asked.
    drop = True if backend == "native" else None
    block = MoEBlock(HIDDEN, swiglu(), 4, top_k=top_k, capacity_factor=1.0, backend=backend, drop_tokens=drop,
                     use_residual=use_residual)
    diversify(block)
    with torch.no_grad():
        block.deepspeed_moe.gate.wg.weight.copy_(wg)
    return block


def test_top2_capacity_drops_in_token_order_and_renormalises_survivors(backend):
    x, wg = _forced_routing_case()
    block = _dropping_block(backend, 2, wg)
    with torch.no_grad():
        out = block(x)
        experts = block.deepspeed_moe.experts.deepspeed_experts
        probs = F.softmax(x @ wg.t(), dim=-1)
    assert torch.equal(probs.topk(2).indices, torch.tensor([FIRST, SECOND]).t())
    # capacity = ceil(16 / 4 * 1.0 * 2) = 8 slots per expert, first choices before second choices:
    # expert 0 keeps first choices of tokens 0..7; expert 1 holds 4 first choices (12..15), so only the
    # second choices of tokens 0, 2, 4, 6 fit; expert 2 keeps second choices 1, 3, ..., 11, 12, 13.
    first_kept = [t < 8 or t >= 12 for t in range(16)]
    second_kept = [t not in (8, 10, 14, 15) for t in range(16)]
    assert block.last_tokens_per_expert.tolist() == [12, 10, 10, 0]
    assert float(block.last_dropped_fraction) == 8 / 32
    for t in range(16):
        row = x[t:t + 1]
        kept = [(e, probs[t, e]) for e, k in ((FIRST[t], first_kept[t]), (SECOND[t], second_kept[t])) if k]
        expected = torch.zeros(HIDDEN)  # tokens 8 and 10 lose both choices
        if kept:
            total = sum(g for _, g in kept)
            expected = sum(g / total * experts[e](row)[0] for e, g in kept)
        torch.testing.assert_close(out[t], expected, atol=1e-6, rtol=1e-5, msg=f"token {t}")


def test_top1_capacity_drop_leaves_only_the_residual_path(backend):
    x, wg = _forced_routing_case()
    block = _dropping_block(backend, 1, wg, use_residual=True)
    with torch.no_grad():
        out = block(x)
        mix = F.softmax(block.coefficient(x), dim=-1)
        residual_only = block.mlp(x) * mix[:, 1:]
        probs = F.softmax(x @ wg.t(), -1)
        experts = block.deepspeed_moe.experts.deepspeed_experts
        routed = torch.stack([probs[t, e] * experts[e](x[t]) for t, e in enumerate(FIRST)])
        full = routed * mix[:, :1] + residual_only
    # capacity = ceil(16 / 4 * 1.0) = 4: expert 0 keeps 4 of its 12 tokens, expert 1 all of its 4.
    kept = [t for t in range(16) if torch.allclose(out[t], full[t], atol=1e-6)]
    dropped = [t for t in range(16) if torch.allclose(out[t], residual_only[t], atol=1e-6)]
    assert sorted(kept + dropped) == list(range(16))
    assert len(kept) == 8 and kept[4:] == [12, 13, 14, 15]
    if backend == "native":
        assert kept[:4] == [0, 1, 2, 3]  # token order; DeepSpeed's Random Token Selection keeps a random 4
    assert float(block.last_dropped_fraction) == 8 / 16


def test_eval_routing_is_deterministic_and_uses_eval_capacity(backend):
    drop = True if backend == "native" else None
    block = MoEBlock(HIDDEN, swiglu(), 4, capacity_factor=0.5, eval_capacity_factor=4.0, backend=backend,
                     drop_tokens=drop)
    diversify(block)
    x = tokens()
    with torch.no_grad():
        block.train()
        block(x)
        assert float(block.last_dropped_fraction) > 0  # capacity ceil(33 / 4 * 0.5 * 2) = 9 < 66 choices
        block.eval()
        first = block(x)
        first_counts = block.last_tokens_per_expert.clone()
        second = block(x)
    assert float(block.last_dropped_fraction) == 0.0
    assert torch.equal(first, second)
    assert torch.equal(first_counts, block.last_tokens_per_expert)


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_matches_its_definition(backend, top_k):
    block = MoEBlock(HIDDEN, swiglu(), 4, top_k=top_k, capacity_factor=4.0, backend=backend)
    diversify(block)
    x = tokens()
    block(x)
    expected = expected_aux_loss(x, block.deepspeed_moe.gate.wg.weight, top_k)
    torch.testing.assert_close(block.last_aux_loss, expected.detach())
    assert not block.last_aux_loss.requires_grad


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_router_gets_aux_loss_gradient_under_checkpointing(backend, use_reentrant):
    coef = 0.25
    with_aux = MoEBlock(HIDDEN, swiglu(), 4, backend=backend, router_aux_loss_coef=coef, capacity_factor=4.0)
    diversify(with_aux)
    without_aux = MoEBlock(HIDDEN, swiglu(), 4, backend=backend, router_aux_loss_coef=0.0, capacity_factor=4.0)
    without_aux.load_state_dict(with_aux.state_dict())
    # A small LM-side gradient keeps fp32 cancellation in (aux - plain) well below the aux term.
    weight = torch.randn(3, 11, HIDDEN, generator=torch.Generator().manual_seed(7)) * 1e-3

    grads = {}
    for name, block in (("aux", with_aux), ("plain", without_aux)):
        x = tokens(requires_grad=True)
        (checkpoint(block, x, use_reentrant=use_reentrant) * weight).sum().backward()
        grads[name] = (block.deepspeed_moe.gate.wg.weight.grad, x.grad)

    wg = with_aux.deepspeed_moe.gate.wg.weight.detach().requires_grad_(True)
    x = tokens(requires_grad=True)
    d_wg, d_x = torch.autograd.grad(expected_aux_loss(x, wg, top_k=2), (wg, x))
    assert d_wg.abs().sum() > 0
    torch.testing.assert_close(grads["aux"][0] - grads["plain"][0], coef * d_wg, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(grads["aux"][1] - grads["plain"][1], coef * d_x, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_combine_accumulates_in_fp32_like_the_formula(dtype):
    """The gate-weighted sum of each token's routed expert outputs and its gradients equal
    `(routes.float() * gate).sum(1)` computed by autograd."""
    from moellava.model.moe.native import _GateCombine

    generator = torch.Generator().manual_seed(3)
    routes = torch.randn(40, 2, HIDDEN, generator=generator).to(dtype).requires_grad_(True)
    gate = torch.rand(40, 2, generator=generator).requires_grad_(True)
    grad = torch.randn(40, HIDDEN, generator=generator).to(dtype)
    combined = _GateCombine.apply(routes, gate)
    combined.backward(grad)
    grads = routes.grad.clone(), gate.grad.clone()
    routes.grad = gate.grad = None
    reference = (routes.float() * gate.unsqueeze(-1)).sum(1).to(dtype)
    reference.backward(grad)
    assert combined.dtype == dtype
    torch.testing.assert_close(combined, reference, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], routes.grad, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], gate.grad, rtol=1e-6, atol=1e-6)


def test_bf16_native_layer_saves_no_fp32_copy_of_the_routed_outputs():
    block = MoEBlock(HIDDEN, swiglu(), 4, top_k=2, backend="native")
    diversify(block)
    block.to(torch.bfloat16)
    x = tokens((4, 16)).to(torch.bfloat16).requires_grad_(True)
    saved = []

    def record(tensor):
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        block(x).float().sum().backward()
    routed_size = 4 * 16 * 2 * HIDDEN  # tokens x top-k x hidden
    assert (torch.bfloat16, routed_size) in saved  # the routes themselves, in bf16
    assert not [n for dtype, n in saved if dtype == torch.float32 and n >= routed_size]
    assert x.grad is not None and block.deepspeed_moe.gate.wg.weight.grad is not None


def test_state_dict_moves_between_backends(ds_group):
    settings = dict(use_residual=True, capacity_factor=4.0)
    native = MoEBlock(HIDDEN, swiglu(), 4, backend="native", **settings)
    diversify(native, seed=11)
    deep = MoEBlock(HIDDEN, swiglu(seed=5), 4, backend="deepspeed", **settings)
    assert str(deep.load_state_dict(native.state_dict())) == "<All keys matched successfully>"
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(deep(x), native(x), atol=1e-6, rtol=1e-5)

    diversify(deep, seed=12)
    back = MoEBlock(HIDDEN, swiglu(seed=6), 4, backend="native", **settings)
    assert str(back.load_state_dict(deep.state_dict())) == "<All keys matched successfully>"
    with torch.no_grad():
        torch.testing.assert_close(back(x), deep(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=3), r"top_k_experts=3 is not supported: use 1 or 2"),
        (dict(num_experts=1, top_k=2), r"exceeds num_experts=1: use top_k_experts <= num_experts"),
        (dict(num_experts=0), r"num_experts must be an int >= 1"),
        (dict(num_experts=6, ep_size=4), r"ep_size=4 does not divide num_experts=6"),
        (dict(backend="tutel"), r"Unknown MoE backend 'tutel': use one of \('native', 'deepspeed'\)"),
        (dict(capacity_factor=0.0), r"capacity_factor must be a number > 0"),
        (dict(eval_capacity_factor=-1.0), r"eval_capacity_factor must be a number > 0"),
        (dict(min_capacity=-1), r"min_capacity must be an int >= 0"),
        (dict(num_experts=4, ep_size=2), r"ep_size=2 needs backend='deepspeed'.*use ep_size=1"),
        (dict(drop_tokens="yes"), r"drop_tokens must be None, True or False"),
        (dict(router_aux_loss_coef=-0.1), r"router_aux_loss_coef must be a number >= 0 \(0 disables"),
    ],
)
def test_bad_settings_raise_with_the_fix(kwargs, message):
    kwargs = {"num_experts": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        MoEBlock(HIDDEN, nn.Linear(HIDDEN, HIDDEN), **kwargs)


def test_deepspeed_ep_size_must_divide_world_size(ds_group):
    with pytest.raises(ValueError, match=r"ep_size=2 does not divide the world size 1"):
        MoEBlock(HIDDEN, swiglu(), 4, backend="deepspeed", ep_size=2)


class _Tiny(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.mlp = MoEBlock(HIDDEN, swiglu(), 4, backend=backend, capacity_factor=4.0)

    def forward(self, x):
        return self.mlp(self.proj(x)).pow(2).mean()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_deepspeed_engine_trains_saves_and_reloads_the_block(ds_group, tmp_path, backend_name):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    model = _Tiny(backend_name)
    groups = split_params_into_different_moe_groups_for_optimizer([{"params": list(model.parameters()),
                                                                     "name": "all"}])
    assert [group["name"] for group in groups] == ["all", "ep_size_1"]  # experts get their own group
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    assert engine.has_moe_layers  # DeepSpeed recognises MoEBlock as its MoE layer, for either backend
    x = tokens((8,))
    before = model.mlp.deepspeed_moe.experts.deepspeed_experts[0].up_proj.weight.detach().clone()
    engine.backward(engine(x))
    engine.step()
    assert not torch.equal(before, model.mlp.deepspeed_moe.experts.deepspeed_experts[0].up_proj.weight)

    engine.save_checkpoint(str(tmp_path), tag="step1")
    saved = sorted(p.name for p in (tmp_path / "step1").iterdir())
    assert [f"layer_0_expert_{j}_mp_rank_00_model_states.pt" for j in range(4)] == saved[:4]
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    engine.load_checkpoint(str(tmp_path), tag="step1")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
