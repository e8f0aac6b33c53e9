"""Benchmark one stage-3 training step (forward, backward, optimizer step) of a small MoE-LLaVA on Llama.

Variants, the same weights in each (seeded), timed round-robin in one process:
* MoE: `dense` (the stage-2 model, no experts), `native` and `deepspeed` (4 experts every other layer,
  top-2, each backend with its training default: native dropless, deepspeed capacity factor 1.5);
* attention: `eager` (the model built on transformers 4.31's eager Llama, as `llava_llama` was before) or
  `fused` (our Llama: scaled_dot_product_attention, no mask for these right-padded batches).
A batch is `--batch` sequences of `--seq` tokens (one 16-token image each, the second half right-padded by
an eighth), trained modules as in stage 3 (the FFNs / experts and routers, and the projector); AdamW.
Reported: tokens per second (real tokens, images expanded), ratios against the dense model, the deepspeed
backend and eager attention (each with the rest the same), peak memory of a step (one fresh process per
row), and on CUDA the model FLOPs utilisation: 6 x active parameters + 12 x layers x hidden x sequence
FLOPs per token (PaLM's count; a MoE layer's experts count top_k / num_experts), over `--peak-tflops`.

    python benchmarks/train_step.py                   # CPU: hidden 256, 4 layers, batch 4 x 512
    python benchmarks/train_step.py --repeats 2 --seq 256
    python benchmarks/train_step.py --device cuda --dtype bf16 --hidden 2560 --intermediate 10240 --heads 32 \\
        --layers 4 --batch 8 --seq 2048 --peak-tflops 989
"""

import argparse
import json
import os
import tempfile

import torch
import transformers
from torch import nn

from harness import (
    MEMORY_NOTE, add_device_arguments, clock_name, device_argv, init_single_process_group, machine_line,
    peak_memory_mib, resolve_device_arguments, round_robin, run_worker,
)

MOE = ("dense", "native", "deepspeed")
ATTENTION = ("eager", "fused")
VARIANTS = [(moe, attention) for attention in ATTENTION for moe in MOE]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs, matched in the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: from the GPU name)")
    add_device_arguments(parser)
    parser.add_argument("--tower", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    resolve_device_arguments(args)
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def eager_classes():
    """LLaVA-Llama and its MoE class on transformers 4.31's Llama: what `llava_llama` was before."""
    from moellava.model import LlavaLlamaConfig, MoELLaVALlamaConfig
    from moellava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel
    from moellava.model.moe_model import MoELlavaMixin

    class EagerLlavaLlamaModel(LlavaMetaModel, transformers.LlamaModel):
        config_class = LlavaLlamaConfig

    class EagerLlavaLlamaForCausalLM(LlavaMetaForCausalLM, transformers.LlamaForCausalLM):
        config_class = LlavaLlamaConfig

        def __init__(self, config):
            super(transformers.LlamaForCausalLM, self).__init__(config)
            self.model = EagerLlavaLlamaModel(config)
            self.pretraining_tp, self.vocab_size = config.pretraining_tp, config.vocab_size
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_model(self):
            return self.model

        def get_decoder_layers(self):
            return self.model.layers

    class EagerMoELLaVALlamaForCausalLM(MoELlavaMixin, EagerLlavaLlamaForCausalLM):
        config_class = MoELLaVALlamaConfig

    return EagerLlavaLlamaForCausalLM, EagerMoELLaVALlamaForCausalLM


def build_model(moe: str, attention: str, args):
    from types import SimpleNamespace

    from moellava.model import LlavaLlamaForCausalLM, MoELLaVALlamaConfig, MoELLaVALlamaForCausalLM
    from moellava.model.moe import build_moe_settings

    if attention == "fused":
        dense_class, moe_class = LlavaLlamaForCausalLM, MoELLaVALlamaForCausalLM
    else:
        dense_class, moe_class = eager_classes()
    config = MoELLaVALlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                 max_position_embeddings=args.seq + 64, pad_token_id=0)
    torch.manual_seed(0)
    model = (dense_class if moe == "dense" else moe_class)(config)
    model.get_model().initialize_vision_modules(SimpleNamespace(
        image_tower=args.tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        image_projector_type="mlp2x_gelu", pretrain_mm_mlp_adapter=None))
    if moe != "dense":
        model.initialize_moe_modules(build_moe_settings(
            args.layers, num_experts=args.experts, moe_mode="sparse", top_k_experts=2, capacity_factor=1.5,
            backend=moe, train_modules=["gate_proj", "up_proj", "down_proj", "wg"]))
    for name, param in model.named_parameters():
        param.requires_grad_(("mlp." in name or "mm_projector" in name) and "image_tower" not in name)
    return model.to(args.device, DTYPES[args.dtype]).train()


def make_batch(args):
    from moellava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=generator)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    mask = torch.ones_like(ids)
    mask[args.batch // 2:, args.seq - args.seq // 8:] = 0  # right padding, as the collator pads
    labels = ids.masked_fill((ids == IMAGE_TOKEN_INDEX) | (mask == 0), IGNORE_INDEX)
    images = torch.randn(args.batch, 3, 32, 32, generator=generator)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, images=images)
    return {k: v.to(args.device) for k, v in batch.items()}


def make_step(model, args):
    batch = make_batch(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def tokens_per_step(args) -> int:
    """Real tokens of a batch after splicing: each image placeholder becomes the tower's 16 patch tokens."""
    return int(make_batch(args)["attention_mask"].sum()) + args.batch * 15


def flops_per_token(model, args) -> float:
    """6 x active parameters (embeddings excluded, a MoE layer's experts counted top_k / num_experts) + the
    attention scores, 12 x layers x hidden x sequence (fwd + bwd)."""
    from moellava.model.moe import moe_blocks

    active = sum(p.numel() for n, p in model.named_parameters()
                 if "embed_tokens" not in n and "image_tower" not in n and "deepspeed_experts" not in n)
    for block in moe_blocks(model):
        experts = sum(p.numel() for p in block.deepspeed_moe.experts.parameters())
        active += experts * block.top_k / block.num_experts
    return 6 * active + 12 * args.layers * args.hidden * args.seq


def worker(spec: str, args):
    init_single_process_group(args.device)
    if spec == "time":
        models = {f"{moe} {attention}": build_model(moe, attention, args) for moe, attention in VARIANTS}
        for moe in MOE:  # the same weights for both attentions (4.31's Llama also holds rotary buffers)
            models[f"{moe} eager"].load_state_dict(models[f"{moe} fused"].state_dict(), strict=False)
        steps = {name: make_step(model, args) for name, model in models.items()}
        seconds = round_robin(steps, args.repeats, args.device, args.cpu_time)
        return {name: {"s": s, "flops_per_token": flops_per_token(models[name], args)} for name, s in seconds.items()}
    moe, attention = spec.split()
    return peak_memory_mib(make_step(build_model(moe, attention, args), args), args.device)


def worker_argv(spec: str, args):
    return ["--worker", spec, "--tower", args.tower, "--hidden", str(args.hidden), "--intermediate",
            str(args.intermediate), "--layers", str(args.layers), "--heads", str(args.heads), "--vocab",
            str(args.vocab), "--experts", str(args.experts), "--batch", str(args.batch), "--seq", str(args.seq),
            "--dtype", args.dtype, "--repeats", str(args.repeats), *device_argv(args)]


def peak_tflops(args):
    if args.peak_tflops or args.device != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    from moellava.demo.models import build_tower

    args.tower = build_tower(os.path.join(tempfile.mkdtemp(prefix="bench_train_step_"), "tower"))
    clock = clock_name(args)
    tokens = tokens_per_step(args)
    print(f"Stage-3 training step (forward, backward, AdamW), {machine_line(args.device)}, {args.dtype}")
    print(f"MoE-LLaVA on Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.heads} heads, vocab {args.vocab}; MoE layers {list(range(0, args.layers, 2))} with "
          f"{args.experts} experts, top-2; batch {args.batch} x {args.seq} ({tokens} real tokens, images expanded)")
    print(f"time = median of {args.repeats} steps ({clock}), variants round-robin in one process after a warm-up")
    print(f"memory = {MEMORY_NOTE[args.device]}")
    print()
    header = (f"{'moe':>9} {'attention':>9} {'tokens/s':>9} {'x dense':>8} {'x deepspeed':>11} {'x eager':>8} "
              f"{'peak MiB':>9} {'x eager':>8} {'MFU':>6}")
    print(header)
    print("-" * len(header))
    timing = run_worker(__file__, worker_argv("time", args))
    peaks = {f"{moe} {attention}": run_worker(__file__, worker_argv(f"{moe} {attention}", args))
             for moe, attention in VARIANTS}
    peak = peak_tflops(args)
    for moe, attention in VARIANTS:
        name = f"{moe} {attention}"
        rate = tokens / timing[name]["s"]

        def rate_of(other):
            return tokens / timing[other]["s"]

        eager_mem = peaks[f"{moe} eager"]
        mfu = f"{rate * timing[name]['flops_per_token'] / (peak * 1e12):>6.1%}" if peak else f"{'-':>6}"
        print(f"{moe:>9} {attention:>9} {rate:>9.0f} {rate / rate_of(f'dense {attention}'):>8.2f} "
              f"{rate / rate_of(f'deepspeed {attention}'):>11.2f} {rate / rate_of(f'{moe} eager'):>8.2f} "
              f"{peaks[name]:>9.1f} {peaks[name] / eager_mem if eager_mem > 0 else float('nan'):>8.2f} {mfu}")


if __name__ == "__main__":
    main()
