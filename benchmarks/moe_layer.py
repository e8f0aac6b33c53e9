"""Benchmark one MoE layer: forward+backward time and peak memory.

Compares the `native` and `deepspeed` MoE dispatchers (same weights, same capacity semantics) against a
dense SwiGLU FFN with k x the expert intermediate size, i.e. the same expert FLOPs per token, measured in
the same run. Every (configuration, token count) runs in a fresh subprocess so memory peaks do not mix.

    python benchmarks/moe_layer.py                 # 1k, 4k, 16k tokens, hidden 512, 4 experts, top-2
    python benchmarks/moe_layer.py --quick         # small setting, about a minute on 2 CPU cores
    python benchmarks/moe_layer.py --tokens 2048 --hidden 256 --repeats 3 --dropless
"""

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

CONFIGS = ("dense", "native", "deepspeed")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=None, help="expert FFN size (default 4 x hidden)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2, choices=(1, 2))
    parser.add_argument("--capacity-factor", type=float, default=1.5, help="as in the MoE-LLaVA scripts")
    parser.add_argument("--dropless", action="store_true", help="no capacity limit on either backend")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes (median)")
    parser.add_argument("--quick", action="store_true", help="tokens 512 1024, hidden 256, 3 repeats")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.repeats = [512, 1024], 256, 3
    if args.intermediate is None:
        args.intermediate = 4 * args.hidden
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_layer(config: str, args):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from moellava.model.moe import MoEBlock

    torch.manual_seed(0)
    if config == "dense":
        ffn_size = args.top_k * args.intermediate
        return LlamaMLP(LlamaConfig(hidden_size=args.hidden, intermediate_size=ffn_size))
    if config == "deepspeed":
        import deepspeed

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo", verbose=False)
    expert = LlamaMLP(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate))
    return MoEBlock(args.hidden, expert, args.experts, top_k=args.top_k, capacity_factor=args.capacity_factor,
                    backend=config, drop_tokens=not args.dropless)


def run_worker(config: str, num_tokens: int, args) -> dict:
    """Time forward+backward of one layer on `num_tokens` tokens; return times and the memory peak."""
    import torch

    device = torch.device(args.device)
    layer = build_layer(config, args).to(device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, args.hidden, generator=generator).to(device).requires_grad_(True)
    grad = torch.randn(num_tokens, args.hidden, generator=generator).to(device)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Memory baseline after setup, before any pass: the peak counts the first pass's allocations too.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _max_rss_mib()
    step()  # warm-up (allocator, kernel selection), not timed
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _max_rss_mib() - base
    dropped = float(layer.last_dropped_fraction) if config != "dense" else 0.0
    return {"ms": 1000 * statistics.median(times), "peak_mib": peak, "dropped": dropped}


def measure(config: str, num_tokens: int, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", config, "--tokens", str(num_tokens),
               "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--experts",
               str(args.experts), "--top-k", str(args.top_k), "--capacity-factor", str(args.capacity_factor),
               "--repeats", str(args.repeats), "--device", args.device]
    if args.dropless:
        command.append("--dropless")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo)
    if done.returncode != 0:
        raise RuntimeError(f"{config} at {num_tokens} tokens failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.tokens[0], args)))
        return
    import torch

    memory = ("peak CUDA memory allocated during the passes, above what the layer and inputs already held"
              if args.device == "cuda" else
              "growth of the process's max RSS (getrusage) during the passes over its value after setup, "
              "one fresh process per row; a lower bound when setup (imports) peaked higher")
    capacity = "dropless" if args.dropless else f"capacity factor {args.capacity_factor} (tokens dropped past it)"
    print(f"MoE layer forward+backward, {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"hidden {args.hidden}, {args.experts} SwiGLU experts of intermediate {args.intermediate}, "
          f"top-{args.top_k}, {capacity}")
    print(f"dense = one SwiGLU of intermediate {args.top_k} x {args.intermediate} (same expert FLOPs per token)")
    print(f"time = median of {args.repeats} passes after one warm-up; memory = {memory}")
    print()
    header = f"{'tokens':>7} {'layer':>10} {'ms':>10} {'x dense':>8} {'peak MiB':>9} {'x dense':>8} {'dropped':>8}"
    print(header)
    print("-" * len(header))
    for num_tokens in args.tokens:
        rows = {config: measure(config, num_tokens, args) for config in CONFIGS}
        dense = rows["dense"]
        for config, row in rows.items():
            mem_ratio = row["peak_mib"] / dense["peak_mib"] if dense["peak_mib"] > 0 else float("nan")
            print(f"{num_tokens:>7} {config:>10} {row['ms']:>10.2f} {row['ms'] / dense['ms']:>8.2f} "
                  f"{row['peak_mib']:>9.1f} {mem_ratio:>8.2f} {row['dropped']:>8.1%}")


if __name__ == "__main__":
    main()
