"""Benchmark one MoE layer: forward+backward time and peak memory.

Compares the `native` and `deepspeed` MoE dispatchers (same weights, same capacity semantics) against a
dense SwiGLU FFN with k x the expert intermediate size, i.e. the same expert FLOPs per token, measured in
the same run.
* Time: one process per token count builds the three layers and times them round-robin, so a change in
  machine load hits all three alike; the median of the passes is reported.
* Memory: one fresh process per (layer, token count), so peaks do not mix.

    python benchmarks/moe_layer.py                 # 1k, 4k, 16k tokens, hidden 512, 4 experts, top-2
    python benchmarks/moe_layer.py --quick         # small setting, under 2 minutes on 2 CPU cores
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
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes per layer")
    parser.add_argument("--quick", action="store_true", help="tokens 512 2048, hidden 256, 5 repeats")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--worker", choices=("time",) + CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.repeats = [512, 2048], 256, 5
    if args.intermediate is None:
        args.intermediate = 4 * args.hidden
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


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
        layer = LlamaMLP(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.top_k * args.intermediate))
    else:
        expert = LlamaMLP(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate))
        layer = MoEBlock(args.hidden, expert, args.experts, top_k=args.top_k, backend=config,
                         capacity_factor=args.capacity_factor, drop_tokens=not args.dropless)
    return layer.to(args.device)


def init_process_group(args) -> None:
    """The deepspeed backend needs a process group: a one-process one here."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo", verbose=False)


def make_step(layer, num_tokens: int, args):
    """A closure running one forward+backward (fresh gradients each time) on fixed random tokens."""
    import torch

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, args.hidden, generator=generator).to(args.device).requires_grad_(True)
    grad = torch.randn(num_tokens, args.hidden, generator=generator).to(args.device)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)
        if args.device == "cuda":
            torch.cuda.synchronize()

    return step


def time_worker(num_tokens: int, args) -> dict:
    """Median forward+backward seconds of each layer, timed round-robin; and each MoE layer's drop rate."""
    init_process_group(args)
    layers = {config: build_layer(config, args) for config in CONFIGS}
    steps = {config: make_step(layer, num_tokens, args) for config, layer in layers.items()}
    for step in steps.values():
        step()  # warm-up: allocator, kernel selection
    times = {config: [] for config in CONFIGS}
    for _ in range(args.repeats):
        for config, step in steps.items():
            start = time.perf_counter()
            step()
            times[config].append(time.perf_counter() - start)
    return {
        config: {
            "ms": 1000 * statistics.median(times[config]),
            "dropped": float(layers[config].last_dropped_fraction) if config != "dense" else 0.0,
        }
        for config in CONFIGS
    }


def memory_worker(config: str, num_tokens: int, args) -> float:
    """Peak memory (MiB) of one forward+backward above what the layer and its inputs already hold."""
    import torch

    if config == "deepspeed":
        init_process_group(args)
    step = make_step(build_layer(config, args), num_tokens, args)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _max_rss_mib()
    step()
    return _max_rss_mib() - base


def run_subprocess(worker: str, num_tokens: int, args):
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--tokens", str(num_tokens),
               "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--experts",
               str(args.experts), "--top-k", str(args.top_k), "--capacity-factor", str(args.capacity_factor),
               "--repeats", str(args.repeats), "--device", args.device]
    if args.dropless:
        command.append("--dropless")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo)
    if done.returncode != 0:
        raise RuntimeError(f"worker {worker} at {num_tokens} tokens failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker == "time":
        print(json.dumps(time_worker(args.tokens[0], args)))
        return
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.tokens[0], args)))
        return
    import torch

    memory = ("peak CUDA memory allocated by one pass, above what the layer and inputs already held"
              if args.device == "cuda" else
              "growth of the process's max RSS (getrusage) over one pass, from its value after setup, one "
              "fresh process per row (a lower bound if setup peaked higher)")
    capacity = "dropless" if args.dropless else f"capacity factor {args.capacity_factor} (tokens dropped past it)"
    print(f"MoE layer forward+backward, {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"hidden {args.hidden}, {args.experts} SwiGLU experts of intermediate {args.intermediate}, "
          f"top-{args.top_k}, {capacity}")
    print(f"dense = one SwiGLU of intermediate {args.top_k} x {args.intermediate} (same expert FLOPs per token)")
    print(f"time = median of {args.repeats} passes, layers timed round-robin in one process after a warm-up")
    print(f"memory = {memory}")
    print()
    header = f"{'tokens':>7} {'layer':>10} {'ms':>10} {'x dense':>8} {'peak MiB':>9} {'x dense':>8} {'dropped':>8}"
    print(header)
    print("-" * len(header))
    for num_tokens in args.tokens:
        timing = run_subprocess("time", num_tokens, args)
        peaks = {config: run_subprocess(config, num_tokens, args) for config in CONFIGS}
        for config in CONFIGS:
            ms, peak = timing[config]["ms"], peaks[config]
            mem_ratio = peak / peaks["dense"] if peaks["dense"] > 0 else float("nan")
            print(f"{num_tokens:>7} {config:>10} {ms:>10.2f} {ms / timing['dense']['ms']:>8.2f} "
                  f"{peak:>9.1f} {mem_ratio:>8.2f} {timing[config]['dropped']:>8.1%}")


if __name__ == "__main__":
    main()
