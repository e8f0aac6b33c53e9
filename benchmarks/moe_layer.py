"""Benchmark one MoE layer: forward+backward time and peak memory.

Compares, measured in the same run and with the same expert weights:
* `native`: our sorted/indexed dispatcher (`MoEBlock(backend="native")`);
* `deepspeed`: DeepSpeed-MoE's GShard dispatcher (capacity padding, all-to-all; one process here);
* `floor`: the no-routing reference, the true floor of a routed layer: each expert runs once on a fixed
  contiguous slice of S * k / E tokens (what perfect balance gives it), no router, no permutation, the k
  outputs of a slice averaged;
* `dense`: one FFN with k x the expert intermediate size, i.e. the same expert FLOPs per token.
Ratios are against `dense` and against `floor`.
* Time: one process per token count builds the layers and times them round-robin, so a change in machine
  load hits all alike; the median of the passes. `--cpu-time` (the default on CPU) pins torch to one thread
  and measures CPU seconds of the process, which other processes on the cores barely disturb.
* Memory: one fresh process per (layer, token count), so peaks do not mix; and, exactly, the activations a
  forward saves for backward.

    python benchmarks/moe_layer.py                 # 1k, 4k, 16k tokens, hidden 512, 4 experts, top-2
    python benchmarks/moe_layer.py --quick         # small setting, a few minutes on 2 CPU cores
    python benchmarks/moe_layer.py --tokens 2048 --hidden 256 --repeats 3 --dropless
    python benchmarks/moe_layer.py --device cuda --dtype bf16 --mlp gelu --hidden 2560 --intermediate 10240 \\
        --tokens 8192 32768                        # a Phi-2-shaped MoE layer on a GPU
"""

import argparse
import json

import torch
from torch import nn

from harness import (
    MEMORY_NOTE, add_device_arguments, clock_name, device_argv, init_single_process_group, machine_line,
    peak_memory_mib, resolve_device_arguments, round_robin, run_worker,
)

CONFIGS = ("dense", "floor", "native", "deepspeed")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=None, help="expert FFN size (default 4 x hidden)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2, choices=(1, 2))
    parser.add_argument("--mlp", choices=("swiglu", "gelu"), default="swiglu",
                        help="swiglu: Llama's gate/up/down FFN; gelu: Phi-2's fc1/gelu/fc2")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--capacity-factor", type=float, default=1.5, help="as in the MoE-LLaVA scripts")
    parser.add_argument("--dropless", action="store_true", help="no capacity limit on either backend")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes per layer")
    parser.add_argument("--quick", action="store_true", help="tokens 512 2048, hidden 256, 5 repeats")
    add_device_arguments(parser)
    parser.add_argument("--worker", choices=("time",) + CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.repeats = [512, 2048], 256, 5
    if args.intermediate is None:
        args.intermediate = 4 * args.hidden
    if args.experts % args.top_k:
        parser.error("--experts must be a multiple of --top-k (the floor gives each group of k experts a slice)")
    resolve_device_arguments(args)
    return args


def make_ffn(args, intermediate: int):
    from moellava.model.language_model.common import SwiGLUMLP
    from moellava.model.language_model.phi.modeling_phi import PhiConfig, PhiMLP

    if args.mlp == "gelu":
        return PhiMLP(PhiConfig(hidden_size=args.hidden, intermediate_size=intermediate, num_attention_heads=1))
    return SwiGLUMLP(args.hidden, intermediate)


class NoRoutingExperts(nn.Module):
    """The floor: expert group g (experts g*k .. g*k+k-1) runs on the g-th contiguous slice of the tokens."""

    def __init__(self, experts: nn.ModuleList, top_k: int):
        super().__init__()
        self.experts, self.top_k = experts, top_k

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        groups = len(self.experts) // self.top_k
        outputs = []
        for g, chunk in enumerate(tokens.chunk(groups)):
            members = self.experts[g * self.top_k : (g + 1) * self.top_k]
            outputs.append(sum(expert(chunk) for expert in members) / self.top_k)
        return torch.cat(outputs)


def build_layer(config: str, args):
    from moellava.model.moe import MoEBlock

    torch.manual_seed(0)
    dtype = getattr(torch, DTYPES[args.dtype])
    if config == "dense":
        return make_ffn(args, args.top_k * args.intermediate).to(args.device, dtype)
    backend = "deepspeed" if config == "deepspeed" else "native"
    block = MoEBlock(args.hidden, make_ffn(args, args.intermediate), args.experts, top_k=args.top_k,
                     backend=backend, capacity_factor=args.capacity_factor, drop_tokens=not args.dropless)
    block = block.to(args.device, dtype)
    if config == "floor":
        return NoRoutingExperts(block.deepspeed_moe.experts.deepspeed_experts, args.top_k)
    return block


def make_step(layer, num_tokens: int, args):
    """A closure running one forward+backward (fresh gradients each time) on fixed random tokens."""
    dtype = getattr(torch, DTYPES[args.dtype])
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, args.hidden, generator=generator).to(args.device, dtype).requires_grad_(True)
    grad = torch.randn(num_tokens, args.hidden, generator=generator).to(args.device, dtype)

    def step():
        for param in layer.parameters():
            param.grad = None
        x.grad = None
        layer(x).backward(grad)

    return step


def saved_mib(layer, num_tokens: int, args) -> float:
    """MiB of activations one forward saves for backward (distinct storages, parameters excluded): exact and
    independent of the allocator, unlike a peak."""
    dtype = getattr(torch, DTYPES[args.dtype])
    x = torch.randn(num_tokens, args.hidden).to(args.device, dtype).requires_grad_(True)
    parameters = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters | seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    return total / 2**20


def time_worker(num_tokens: int, args) -> dict:
    """Median forward+backward seconds of each layer, timed round-robin; each MoE layer's drop rate and the
    activations each layer saves for backward."""
    init_single_process_group(args.device)
    layers = {config: build_layer(config, args) for config in CONFIGS}
    steps = {config: make_step(layer, num_tokens, args) for config, layer in layers.items()}
    seconds = round_robin(steps, args.repeats, args.device, args.cpu_time)
    return {
        config: {
            "ms": 1000 * seconds[config],
            "dropped": float(layers[config].last_dropped_fraction) if config in ("native", "deepspeed") else 0.0,
            "saved": saved_mib(layers[config], num_tokens, args),
        }
        for config in CONFIGS
    }


def memory_worker(config: str, num_tokens: int, args) -> float:
    """Peak memory (MiB) of one forward+backward above what the layer and its inputs already hold."""
    if config == "deepspeed":
        init_single_process_group(args.device)
    return peak_memory_mib(make_step(build_layer(config, args), num_tokens, args), args.device)


def worker_argv(worker: str, num_tokens: int, args):
    argv = ["--worker", worker, "--tokens", str(num_tokens), "--hidden", str(args.hidden), "--intermediate",
            str(args.intermediate), "--experts", str(args.experts), "--top-k", str(args.top_k), "--mlp", args.mlp,
            "--dtype", args.dtype, "--capacity-factor", str(args.capacity_factor), "--repeats", str(args.repeats),
            *device_argv(args)]
    return argv + (["--dropless"] if args.dropless else [])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker == "time":
        print(json.dumps(time_worker(args.tokens[0], args)))
        return
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.tokens[0], args)))
        return
    capacity = "dropless" if args.dropless else f"capacity factor {args.capacity_factor} (tokens dropped past it)"
    clock = clock_name(args)
    print(f"MoE layer forward+backward, {machine_line(args.device)}")
    print(f"hidden {args.hidden}, {args.experts} {args.mlp} experts of intermediate {args.intermediate}, "
          f"top-{args.top_k}, {args.dtype}, {capacity}")
    print(f"dense = one {args.mlp} FFN of intermediate {args.top_k} x {args.intermediate} (same expert FLOPs per "
          f"token); floor = the experts on fixed slices of {args.top_k}/{args.experts} of the tokens, no routing")
    print(f"time = median of {args.repeats} passes ({clock}), layers timed round-robin in one process after a "
          "warm-up")
    print(f"memory = {MEMORY_NOTE[args.device]}; saved = activations one forward keeps for backward")
    print()
    header = (f"{'tokens':>7} {'layer':>10} {'ms':>10} {'x dense':>8} {'x floor':>8} {'peak MiB':>9} {'x dense':>8} "
              f"{'x floor':>8} {'saved MiB':>9} {'x floor':>8} {'dropped':>8}")
    print(header)
    print("-" * len(header))
    script = __file__
    for num_tokens in args.tokens:
        timing = run_worker(script, worker_argv("time", num_tokens, args))
        peaks = {config: run_worker(script, worker_argv(config, num_tokens, args)) for config in CONFIGS}
        for config in CONFIGS:
            ms, peak, saved = timing[config]["ms"], peaks[config], timing[config]["saved"]

            def ratio(value, base):
                return value / base if base > 0 else float("nan")

            print(f"{num_tokens:>7} {config:>10} {ms:>10.2f} {ratio(ms, timing['dense']['ms']):>8.2f} "
                  f"{ratio(ms, timing['floor']['ms']):>8.2f} {peak:>9.1f} {ratio(peak, peaks['dense']):>8.2f} "
                  f"{ratio(peak, peaks['floor']):>8.2f} {saved:>9.1f} {ratio(saved, timing['floor']['saved']):>8.2f} "
                  f"{timing[config]['dropped']:>8.1%}")


if __name__ == "__main__":
    main()
