"""Benchmark attention: forward+backward of one Llama decoder layer and of a CLIP image tower, eager against
scaled_dot_product_attention, time and peak memory.

Decoder layer (the same weights in each):
* `eager`: transformers 4.31's `LlamaDecoderLayer` (what `llava_llama` ran before): the full softmax matrix
  in memory, with the 4-D additive mask;
* `sdpa+mask`: our layer (`moellava.model.language_model.llama`) given the same 4-D mask, as every family
  did before: PyTorch's flash kernel refuses any mask, so a GPU gets the memory-efficient kernel at best;
* `sdpa causal`: our layer with no mask (`is_causal`), what unpadded or right-padded batches now run.
Image tower: transformers 4.31's `CLIPVisionModel` (`eager`) against ours (`sdpa`, no mask: vision attention
attends to everything), with as many 336 px images as fill the token count (577 tokens each).
Ratios are against `eager`. Time: median of round-robin passes in one process per token count
(`--cpu-time`, the default on CPU: one torch thread, CPU seconds); memory: one fresh process per row.

    python benchmarks/attention.py                        # 2048 and 4096 tokens, hidden 512, 8 heads
    python benchmarks/attention.py --tokens 1024 --repeats 2 --skip-tower
    python benchmarks/attention.py --device cuda --dtype bf16 --batch 8 --hidden 4096 --heads 32 --intermediate 11008
"""

import argparse
import json

import torch
import transformers

from harness import (
    MEMORY_NOTE, add_device_arguments, clock_name, device_argv, machine_line, peak_memory_mib,
    resolve_device_arguments, round_robin, run_worker,
)

LAYER_VARIANTS = ("eager", "sdpa+mask", "sdpa causal")
TOWER_VARIANTS = ("eager", "sdpa")
TOKENS_PER_IMAGE = (336 // 14) ** 2 + 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096], help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per decoder-layer pass")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--tower-hidden", type=int, default=512)
    parser.add_argument("--tower-heads", type=int, default=8)
    parser.add_argument("--tower-layers", type=int, default=2)
    parser.add_argument("--skip-tower", action="store_true")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    add_device_arguments(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    resolve_device_arguments(args)
    return args


# ----------------------------------------------------------------------------------------------- decoder layer


def layer_step(variant: str, tokens: int, args):
    """`(step, forward)`: closures running forward+backward, and forward only, of one decoder layer on fixed
    random hidden states."""
    from moellava.model.language_model.common import RotaryEmbedding, build_attention_mask
    from moellava.model.language_model.llama.modeling_llama import LlamaDecoderLayer

    dtype, device = DTYPES[args.dtype], args.device
    config = transformers.LlamaConfig(hidden_size=args.hidden, num_attention_heads=args.heads,
                                      intermediate_size=args.intermediate, max_position_embeddings=tokens)
    torch.manual_seed(0)
    reference = transformers.models.llama.modeling_llama.LlamaDecoderLayer(config)
    if variant == "eager":
        layer = reference
    else:
        layer = LlamaDecoderLayer(config)
        layer.load_state_dict(reference.state_dict(), strict=False)  # all but 4.31's rotary buffer
    layer = layer.to(device, dtype).train()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, tokens, args.hidden, generator=generator).to(device, dtype).requires_grad_(True)
    grad = torch.randn(args.batch, tokens, args.hidden, generator=generator).to(device, dtype)
    positions = torch.arange(tokens, device=device)[None].expand(args.batch, -1)
    mask = build_attention_mask(None, args.batch, tokens, 0, dtype, device) if variant != "sdpa causal" else None
    rotary = RotaryEmbedding(args.hidden // args.heads)

    def forward():
        if variant == "eager":
            return layer(x, attention_mask=mask, position_ids=positions)[0]
        return layer(x, mask, rotary(positions))[0]

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        forward().backward(grad)

    return step, forward


# ----------------------------------------------------------------------------------------------- tower


def tower_step(variant: str, tokens: int, args):
    """`(step, forward)` of the image tower on ceil(tokens / 577) random 336 px images."""
    from moellava.model.multimodal_encoder import CLIPVisionModel

    dtype, device = DTYPES[args.dtype], args.device
    config = transformers.CLIPVisionConfig(hidden_size=args.tower_hidden, intermediate_size=4 * args.tower_hidden,
                                           num_attention_heads=args.tower_heads, num_hidden_layers=args.tower_layers,
                                           image_size=336, patch_size=14)
    torch.manual_seed(0)
    reference = transformers.CLIPVisionModel(config)
    if variant == "eager":
        tower = reference
    else:
        tower = CLIPVisionModel(config)
        tower.load_state_dict(reference.state_dict())
    tower = tower.to(device, dtype).train()
    images = -(-tokens // TOKENS_PER_IMAGE)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(images, 3, 336, 336, generator=generator).to(device, dtype).requires_grad_(True)

    def forward():
        return tower(pixels).last_hidden_state

    def step():
        tower.zero_grad(set_to_none=True)
        pixels.grad = None
        forward().float().square().mean().backward()

    return step, forward


BUILDERS = {"layer": (layer_step, LAYER_VARIANTS), "tower": (tower_step, TOWER_VARIANTS)}


def worker(spec: str, tokens: int, args):
    part, _, variant = spec.partition(":")
    build, variants = BUILDERS[part]
    if variant == "time":
        built = {name: build(name, tokens, args) for name in variants}
        with torch.no_grad():  # every variant computes the same thing
            outputs = {name: forward().float() for name, (_, forward) in built.items()}
        for name, output in outputs.items():
            error = (output - outputs["eager"]).abs().max().item()
            if error > 1e-3 * outputs["eager"].abs().max().item():
                raise AssertionError(f"{part} {name} differs from eager by {error}")
        steps = {name: step for name, (step, _) in built.items()}
        return {name: 1000 * s for name, s in round_robin(steps, args.repeats, args.device, args.cpu_time).items()}
    return peak_memory_mib(build(variant, tokens, args)[0], args.device)


def worker_argv(spec: str, tokens: int, args):
    return ["--worker", spec, "--tokens", str(tokens), "--batch", str(args.batch), "--hidden", str(args.hidden),
            "--heads", str(args.heads), "--intermediate", str(args.intermediate), "--tower-hidden",
            str(args.tower_hidden), "--tower-heads", str(args.tower_heads), "--tower-layers", str(args.tower_layers),
            "--dtype", args.dtype, "--repeats", str(args.repeats), *device_argv(args)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens[0], args)))
        return
    clock = clock_name(args)
    print(f"Attention forward+backward, {machine_line(args.device)}, {args.dtype}")
    print(f"decoder layer: Llama, hidden {args.hidden}, {args.heads} heads, intermediate {args.intermediate}, "
          f"batch {args.batch}")
    if not args.skip_tower:
        print(f"tower: CLIP 336 px / patch 14 ({TOKENS_PER_IMAGE} tokens an image), hidden {args.tower_hidden}, "
              f"{args.tower_heads} heads, {args.tower_layers} layers, ceil(tokens / {TOKENS_PER_IMAGE}) images")
    print(f"time = median of {args.repeats} passes ({clock}), variants round-robin in one process after a warm-up")
    print(f"memory = {MEMORY_NOTE[args.device]}")
    print()
    header = f"{'part':>6} {'tokens':>7} {'attention':>12} {'ms':>10} {'x eager':>8} {'peak MiB':>9} {'x eager':>8}"
    print(header)
    print("-" * len(header))
    for part in ("layer",) + (() if args.skip_tower else ("tower",)):
        variants = BUILDERS[part][1]
        for tokens in args.tokens:
            timing = run_worker(__file__, worker_argv(f"{part}:time", tokens, args))
            peaks = {name: run_worker(__file__, worker_argv(f"{part}:{name}", tokens, args)) for name in variants}
            for name in variants:
                mem_ratio = peaks[name] / peaks["eager"] if peaks["eager"] > 0 else float("nan")
                print(f"{part:>6} {tokens:>7} {name:>12} {timing[name]:>10.1f} {timing[name] / timing['eager']:>8.2f} "
                      f"{peaks[name]:>9.1f} {mem_ratio:>8.2f}")


if __name__ == "__main__":
    main()
